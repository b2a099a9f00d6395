"""Evaluation: cached features, kNN, linear probe, low-shot fine-tuning, baselines."""
