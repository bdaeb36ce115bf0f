"""`Learner`: what the controller and the checkpointer need from a learner.

`TorchLearner` (one process) and `DistributedLearner` (several ranks; torch all-reduce or
DeepSpeed ZeRO) implement it; nothing outside `dapo.learner.torch_learner` reaches past these methods.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class Learner(Protocol):
    model: torch.nn.Module  # the policy (on rank 0 of a ZeRO-3 learner: partitioned parameters)

    def needs_old_log_probs(self, num_rows: int) -> bool:
        """Whether the update needs the old-policy log-probs computed first (several optimizer
        steps per batch make the policy move within the step)."""

    def compute_log_probs(self, batch) -> torch.Tensor:
        """log pi(response tokens) under the current weights, ``[B, R]``."""

    def update(self, batch) -> dict[str, float]:
        """Mini-batch updates over the training batch; returns the step's actor metrics."""

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights for the rollout engines, by parameter name."""

    def full_state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """Full (gathered) model weights for a checkpoint."""

    def load_model_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load full model weights (from a checkpoint) on every rank."""

    def state_dict(self) -> dict:
        """Optimizer, schedule and step counters."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
