"""Evaluations: long-range memory, long-session stability."""
