"""Reward shaping: DAPO's soft overlong punishment added to the scorer's score.

    score = correctness + overlong_penalty(length)      (correctness: the scorer's score,
    acc   = the scorer's acc                             +1 / -1 for the built-in ones)

``overlong_penalty`` is `dapo.algo.overlong_penalty` (DAPO section 3.4): 0 up to
L_max - L_cache tokens, then a linear ramp to -factor at L_max.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["OverlongShaping"]


@dataclass(frozen=True)
class OverlongShaping:
    """Soft overlong punishment in tokens (spec.algorithm.overlong, spec.rollout.maxResponseLength)."""

    enabled: bool = True
    max_response_length: int | None = None
    buffer_length: int | None = None
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.enabled:
            from dapo.algo import check_overlong  # deferred: workers import this package and must stay torch-free

            check_overlong(self.max_response_length, self.buffer_length, self.factor)

    def penalties(self, response_lengths: Sequence[int] | None, count: int) -> list[float]:
        """Per-response penalty (<= 0; zeros when shaping is off)."""
        if not self.enabled:
            return [0.0] * count
        if response_lengths is None or len(response_lengths) != count:
            raise ValueError(
                f"score_batch: overlong shaping needs response_lengths (tokens) for all {count} responses, "
                f"got {None if response_lengths is None else len(response_lengths)}"
            )
        import torch  # deferred: workers import this package and must stay torch-free

        from dapo.algo import overlong_penalty

        lengths = torch.as_tensor(list(response_lengths), dtype=torch.float64)
        penalty = overlong_penalty(lengths, self.max_response_length, self.buffer_length, self.factor)
        return [float(p) for p in penalty.tolist()]
