"""The learner's two interfaces.

`Learner`: what the controller and the checkpointer see. `TorchLearner` (one process) and
`DistributedLearner` (several ranks; rank 0 drives, the others follow) implement it.

`LearnerBackend`: what `TorchLearner` (the DAPO update: mini-batches, micro-batches, the loss
through `dapo.algo`, rollout correction, metrics) needs from whatever runs the model in this
process: forward / backward / gradient sync + clip + optimizer step, the lr schedule, which rows
this process computes and how the processes' results combine, and the weights and state.
`TorchBackend` (`torch_learner.py`, one process), `DataParallelBackend` (`distributed.py`,
replicated parameters, gradients summed with all-reduce) and `DeepSpeedBackend`
(`deepspeed_backend.py`, ZeRO-2/3) implement it. Data-parallel backends run the same calls on every
rank in the same order (each call may issue collectives); `DistributedLearner` sees to that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Mapping, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from dapo.learner.batch import TrainBatch

# (value, weight) per metric: a weighted mean and the weight it is taken over
WeightedStats = dict[str, tuple[float, float]]


@runtime_checkable
class Learner(Protocol):
    model: torch.nn.Module  # the policy (on rank 0 of a ZeRO-3 learner: partitioned parameters)
    proximal_seconds: float  # the last update's extra forward pass for proximal log-probs

    def compute_log_probs(self, batch) -> torch.Tensor:
        """log pi(response tokens) under the current weights, ``[B, R]``."""

    def update(self, batch) -> dict[str, float]:
        """Mini-batch updates over the training batch; returns the step's actor metrics. Without
        ``batch.old_log_probs`` the update computes the proximal log-probs it needs itself (the
        seconds of their extra forward pass: ``proximal_seconds``)."""

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


@runtime_checkable
class LearnerBackend(Protocol):
    """How this process runs the model for `TorchLearner` (see the module docstring).

    Methods marked "every rank" are called on every rank of a data-parallel backend in the same
    order; where only rank 0 has or gets data, the other ranks pass / receive None."""

    model: torch.nn.Module  # the module whose parameters train (DeepSpeed: the engine's module)
    device: torch.device

    # -- which rows this process computes, and how the processes' results combine
    def shard(self, rows: "TrainBatch") -> "TrainBatch":
        """This process's contiguous share of ``rows`` (one process: all of them)."""

    def micro_batches(self, rows: "TrainBatch", shard: "TrainBatch", micro_batch_rows: int, *,
                      training: bool) -> list["TrainBatch"]:
        """The forward (``training``: forward/backward) passes over ``shard``, at most
        ``micro_batch_rows`` rows each; a backend whose passes are collective pads with masked
        rows of ``rows`` so that every rank runs the same number."""

    def global_normalisers(self, rows: "TrainBatch", shard: "TrainBatch") -> tuple[float, float]:
        """(valid tokens, non-empty responses) of the whole mini-batch ``rows``: the token-mean /
        seq-mean denominators every rank divides by (every rank)."""

    def reduce_metrics(self, stats: WeightedStats, loss: float) -> tuple[WeightedStats, float]:
        """This process's token-weighted metric means and summed loss -> those of all ranks (every rank)."""

    def gather_rows(self, local: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Each rank's ``shard`` rows of a per-row result -> all ``num_rows`` rows, in order (every rank)."""

    # -- compute
    def forward(self, **inputs) -> torch.Tensor:
        """The model's logits for ``inputs`` (HF causal-LM keywords)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d loss / d parameters into this process's gradients."""

    def zero_grad(self) -> None:
        """Forget the accumulated gradients."""

    def step(self) -> float:
        """Gradients summed over ranks, clipped by the global norm, one optimizer step (a
        non-finite norm skips it); returns the norm before clipping (every rank)."""

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer steps use."""

    def advance_schedule(self) -> None:
        """One training step done: move the lr schedule on."""

    # -- weights and state
    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (name, tensor) pairs; a partitioned backend gathers each just before yielding it
        (every rank, consumed to the end)."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight by full name, full size, on rank 0 (what save_pretrained writes)."""

    def load_model_weights(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Rank 0's full weights into every rank's module, in place (every rank)."""

    def state_dict(self) -> dict:
        """Optimizer + lr schedule state, complete on rank 0 (every rank)."""

    def load_state_dict(self, state: dict | None) -> None:
        """Rank 0's :meth:`state_dict` into every rank (every rank)."""

    @property
    def partitioned_weights(self) -> bool:
        """Whether rank 0's module holds only its part of the weights (ZeRO-3): the weight sync
        and the checkpoint's full weights then need every rank."""

    @property
    def partitioned_optimizer(self) -> bool:
        """Whether each rank holds only its part of the optimizer state (ZeRO): `state_dict`
        then needs every rank."""
