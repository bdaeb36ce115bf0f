"""`Scorer`: what the controller needs from the reward side.

`RewardScorer` (a bounded worker pool in this process) and `RemoteScorer` (the reward replicas
over HTTP, dapo.services.reward) implement it.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from dapo.reward.result import RewardResult


@runtime_checkable
class Scorer(Protocol):
    def score_batch(self, responses: Sequence[str], ground_truths: Sequence[str],
                    data_sources: Sequence[str | None] | None = None,
                    response_lengths: Sequence[int] | None = None,
                    truncated: Sequence[bool] | None = None,
                    extra_infos: Sequence[dict | None] | None = None) -> list[RewardResult]:
        """One result per response, in input order: shaped score, unshaped accuracy, prediction.
        ``extra_infos`` (the rows' `PromptRecord.extra_info`) reach run-file and remote scorers."""

    def close(self) -> None:
        """Release workers / connections."""
