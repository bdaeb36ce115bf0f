"""The run's seed and the seeds derived from it.

Every random choice of a run follows from ``spec.learner.seed``: the process-wide generators
(`seed_all`) and per-use seeds computed from (stream, step, call) (`seed_for`), so a run resumed
at step s draws exactly what the uninterrupted run drew, with no generator state to carry.
"""

from __future__ import annotations

import random

import torch

# offsets of the run seed that keep the derived streams apart
GENERATION = 0  # rollout sampling, per (step, generation call)
EVALUATION = 7919  # held-out evaluation sampling, per (step, call)
MINI_BATCH_ORDER = 15_013  # the learner's shuffle of a batch's rows, per weight version


def seed_all(seed: int) -> None:
    """Seed every process-wide random source from the run's seed (spec.learner.seed): Python's
    ``random``, numpy's legacy global generator (when numpy is installed) and torch (CPU and every
    CUDA device), so that nothing in a role process starts from OS randomness."""
    random.seed(seed)
    try:
        import numpy
    except ImportError:  # numpy is optional for the runtime
        pass
    else:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_for(base_seed: int, step: int, call: int = 0) -> int:
    """A distinct, reproducible seed per (base seed + stream offset, step, call)."""
    return (base_seed * 1_000_003 + step * 10_007 + call) % (2**63 - 1)
