"""Evaluation: RULER NIAH over a memory bank, and its results files."""
