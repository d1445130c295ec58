"""The trainer that produces TTT-augmented weights: `moshi-ttt train`."""
