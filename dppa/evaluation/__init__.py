"""Evaluation: lm-eval on in-memory or saved models, task sources, the score cache, the normalised score."""
