"""The speech codec side of a base: calibrating a random Mimi on speech, and reporting how well a
Mimi's codes carry speech (`moshi-ttt codec-report`)."""
