"""Evaluating a policy the way papers report it: avg@n, unbiased pass@k, maj@k per data source.

- `metrics`: the estimators (pure functions);
- `sampling`: n samples per prompt, scored, with the seeds the trainer's evaluation uses (so
  `dapo eval` of a checkpoint reproduces the run's own evaluation at that step);
- `command`: `dapo eval MODEL --data FILE` (checkpoints, Hugging Face folders, built-in models).
"""
