"""Data: moshi-finetune's dataset format, tokenisation into Moshi's 17 streams, synthetic data."""
