"""The learner over N ranks of torch.distributed: rank 0 drives, ranks >= 1 follow.

(~570 lines: the three pieces below share one ordered protocol, the sequence of collectives
every rank must issue identically; split over files, that order would be hard to check.)

Three pieces, composed:

- `RankGroup`: this process's rank in the default process group, collectives that fail with an
  error naming the rank, and the data-parallel arithmetic (row shards, global normalisers,
  reduced metrics, gathered rows).
- Data-parallel `LearnerBackend`s for `TorchLearner`: `DataParallelBackend` here (strategy
  ``torch``: replicated parameters and AdamW state, gradients summed with all-reduce; CPU/gloo
  and GPU/NCCL) and `DeepSpeedBackend` (``deepspeed-zero2`` / ``deepspeed-zero3``,
  `dapo.learner.deepspeed_backend`).
- `DistributedLearner`: the `Learner` the trainer sees on rank 0. It has a `TorchLearner` (with
  one of those backends) and a `CommandChannel`; each call that needs the other ranks first posts
  a command, then runs the same `TorchLearner` call as the followers, which sit in `follow()`.
  So every collective is issued in the same order on every rank.

Command channel: the header (command name, batch tensor shapes, extra JSON) goes through the
default group's TCP store under ``dapo-learner/cmd/<seq>``; the batch tensors follow as
broadcasts from rank 0. Followers wait on the store in short slices, so the long idle phase while
rank 0 generates rollouts never trips a collective timeout, and a follower notices when rank 0's
store is gone (controller died) instead of hanging. Every collective runs under the process
group's timeout (``init_process_group(timeout=...)``): a dead rank gives an error, not a hang.

Math (DAPO's token-level loss, arXiv 2503.14476; docs/algorithm.md: the token-mean's counts are
those of the whole mini-batch across micro-batches and data-parallel ranks): each
rank takes a contiguous shard of every mini-batch's rows; the normalisers N_tokens / N_seqs are
all-reduced (SUM) so every rank divides by the GLOBAL counts; every rank's micro-batch losses are
then partial sums of the mini-batch loss, and the gradient is SUMMED across ranks (torch
strategy: one all_reduce(SUM) of the flattened gradients; DeepSpeed averages, so its loss is
multiplied by the world size). Two ranks therefore take the same step as one rank on the whole
batch. Gradient clipping sees the summed gradient (the global norm); metrics are token-weighted
means reduced across ranks.

Checkpoints (`dapo.storage.checkpointer.Checkpointer`, on rank 0): `full_state_dict_for_save` gives rank 0
the full weights (ZeRO-3: gathered one parameter at a time, copied to CPU, so rank 0 holds the
model once on CPU and one gathered parameter on the device), `load_model_weights` puts rank 0's
full weights into every rank's module (ZeRO-3: each parameter gathered, overwritten on rank 0,
broadcast and re-partitioned), then `load_state_dict` restores each rank's optimizer shard.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import time
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from dapo.errors import DapoError
from dapo.learner.base import LearnerBackend, WeightedStats
from dapo.learner.batch import TrainBatch, mini_batch_normalisers, split_rows
from dapo.model.lora import adapter_parameters, check_adapter_names, is_lora
from dapo.learner.torch_learner import (METRIC_KEYS, OptimizerSettings, TorchBackend, TorchLearner,
                                        learner_kwargs_from_spec)
from dapo.learner.weights import check_weight_names

log = logging.getLogger("dapo.learner.distributed")

STRATEGIES = ("torch", "deepspeed-zero2", "deepspeed-zero3")
_CMD_PREFIX = "dapo-learner/cmd/"
# every tensor a follower needs to run the same update (the rollout-correction weights are derived
# on each rank from old_log_probs, behaviour_log_probs and weight_versions of the whole batch)
_BATCH_FIELDS = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask", "advantages",
                 "old_log_probs", "behaviour_log_probs", "weight_versions")
_GRAD_BUCKET_ELEMENTS = 16 << 20  # gradients are all-reduced in flat buckets of this many elements

# commands rank 0 posts to the followers
CMD_LOG_PROBS = "log_probs"
CMD_UPDATE = "update"
CMD_STATE_DICT = "state_dict"
CMD_LOAD_STATE = "load_state"
CMD_SYNC_PARAMS = "sync_params"
CMD_LOAD_WEIGHTS = "load_weights"
CMD_SHUTDOWN = "shutdown"


class DistributedLearnerError(DapoError, RuntimeError):
    """A rank failed or disappeared; the message names which and what to check."""


# --------------------------------------------------------------------------- pure helpers


def shard_bounds(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous balanced shard [start, stop) of ``num_rows`` rows for ``rank``: the first
    num_rows % world_size ranks get one row more than floor(num_rows / world_size)."""
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def micro_batch_count(num_rows: int, micro_batch_rows: int) -> int:
    """ceil(num_rows / micro_batch_rows): forward/backward passes one rank runs for its shard."""
    return -(-num_rows // micro_batch_rows)


def resolve_process_group_backend(device: torch.device | str) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: torch.device | str = "cpu", timeout_s: float = 600.0) -> None:
    """Initialise the default process group from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    (env://) unless it is up already; gloo on CPU, NCCL on GPU; every collective bounded by
    ``timeout_s``."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedLearnerError(
            f"the distributed learner needs the environment variables {missing} (torch.distributed env:// "
            "init); the operator sets them on learner pods, `dapo run --launcher processes` sets them locally")
    backend = resolve_process_group_backend(device)
    try:
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:
        raise DistributedLearnerError(
            f"learner rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} could not join the {backend} group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s: {exc}. Check that "
            "learner rank 0 runs and that every rank has the same WORLD_SIZE / MASTER_ADDR / MASTER_PORT") from exc


def _batch_header(batch: TrainBatch | None) -> dict | None:
    if batch is None:
        return None
    fields = {}
    for name in _BATCH_FIELDS:
        tensor = getattr(batch, name)
        if tensor is not None:
            fields[name] = [str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]
    return {"prompt_width": batch.prompt_width, "policy_version": batch.policy_version, "fields": fields}


def to_bytes(obj: Any) -> bytes:
    """torch.save into bytes: tensors travel in one pickle-free-of-storage-sharing blob."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=False)


# --------------------------------------------------------------------------- ranks


class RankGroup:
    """This process's place in the default process group (joined on construction): rank, world
    size, the device collectives run on, and the data-parallel arithmetic over the ranks."""

    def __init__(self, device: torch.device, timeout_s: float):
        init_distributed(device, timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.timeout_s = timeout_s
        self.store = dist.distributed_c10d._get_default_store()

    @property
    def is_controller(self) -> bool:
        return self.rank == 0

    def collective(self, fn, *args, what: str, **kwargs):
        """Run one collective; a failure (dead peer, timeout) becomes an error naming this rank."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise DistributedLearnerError(
                f"learner rank {self.rank}/{self.world_size}: {what} failed ({str(exc).splitlines()[0][:300]}). "
                f"Another learner rank probably died or hangs; check the logs of every learner rank. The "
                f"collective timeout is {self.timeout_s:g} s (init_process_group timeout)") from exc

    def broadcast_module(self, model: torch.nn.Module, *, adapters_only: bool = False) -> None:
        """Copy rank 0's parameters and buffers to every rank (``adapters_only``: a LoRA model's
        adapters, whose frozen base every rank loaded itself)."""
        named = (list(adapter_parameters(model)) if adapters_only
                 else list(model.named_parameters()) + list(model.named_buffers()))
        with torch.no_grad():
            for name, tensor in named:
                buf = tensor.detach().to(self.comm_device).contiguous()
                self.collective(dist.broadcast, buf, 0, what=f"broadcast of parameter {name}")
                if self.rank != 0:
                    tensor.copy_(buf)

    def broadcast_object(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass None)."""
        box = [obj if self.is_controller else None]
        self.collective(dist.broadcast_object_list, box, src=0, device=self.comm_device, what=f"broadcast of {what}")
        return box[0]

    # -- the data-parallel arithmetic of `LearnerBackend`

    def shard(self, rows: TrainBatch) -> TrainBatch:
        return rows.rows(*shard_bounds(rows.num_rows, self.world_size, self.rank))

    def max_shard_rows(self, num_rows: int) -> int:
        start, stop = shard_bounds(num_rows, self.world_size, 0)  # rank 0 holds the largest shard
        return stop - start

    def padded_micro_batches(self, rows: TrainBatch, shard: TrainBatch, micro_batch_rows: int) -> list[TrainBatch]:
        """Micro-batches of ``shard`` plus masked one-row fillers so that every rank runs as many
        passes as the rank with the most rows (a filler has no valid token: loss and gradient 0)."""
        micros = split_rows(shard, micro_batch_rows)
        filler = rows.rows(0, 1)
        filler = TrainBatch(**{**filler.__dict__, "response_mask": torch.zeros_like(filler.response_mask)})
        while len(micros) < micro_batch_count(self.max_shard_rows(rows.num_rows), micro_batch_rows):
            micros.append(filler)
        return micros

    def global_normalisers(self, rows: TrainBatch, shard: TrainBatch) -> tuple[float, float]:
        """The shards' counts summed over ranks. Every rank holds the whole mini-batch, so its
        counts are global already; the all_reduce makes that explicit and catches ranks that
        disagree on the batch."""
        counts = torch.tensor(mini_batch_normalisers(rows.response_mask), dtype=torch.float64)
        local = torch.tensor(mini_batch_normalisers(shard.response_mask), dtype=torch.float64, device=self.comm_device)
        self.collective(dist.all_reduce, local, what="all_reduce of token counts")
        if not torch.equal(local.cpu(), counts):
            raise DistributedLearnerError(f"learner rank {self.rank}: global token counts {local.tolist()} differ "
                                          f"from the mini-batch's {counts.tolist()}: ranks hold different batches")
        num_tokens, num_seqs = local.cpu().tolist()
        return num_tokens, num_seqs

    def reduce_metrics(self, stats: WeightedStats, loss: float) -> tuple[WeightedStats, float]:
        """Global token-weighted means as (mean, total weight): sum_r v_r w_r / sum_r w_r per key
        of `METRIC_KEYS` (0 when no weight; the weight lets update() weigh mini-batches by their
        tokens as well), and the summed loss."""
        pairs = [stats.get(key, (0.0, 0.0)) for key in METRIC_KEYS]
        flat = torch.tensor([x for v, w in pairs for x in (v * w, w)], dtype=torch.float64, device=self.comm_device)
        self.collective(dist.all_reduce, flat, what="all_reduce of metrics")
        reduced = {k: (vw / w if w else 0.0, w) for k, (vw, w) in zip(METRIC_KEYS, flat.view(-1, 2).cpu().tolist())}
        total = torch.tensor([loss], dtype=torch.float64, device=self.comm_device)
        self.collective(dist.all_reduce, total, what="all_reduce of the loss")
        return reduced, float(total.item())

    def gather_rows(self, local: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Each rank's shard rows (float) -> all ``num_rows`` rows in rank order, on every rank."""
        padded = torch.zeros((self.max_shard_rows(num_rows), *local.shape[1:]), dtype=torch.float32,
                             device=self.comm_device)
        padded[: local.shape[0]] = local.to(self.comm_device)
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        self.collective(dist.all_gather, pieces, padded, what="all_gather of log-probs")
        sizes = [stop - start for start, stop in (shard_bounds(num_rows, self.world_size, r)
                                                  for r in range(self.world_size))]
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)]).cpu()


# --------------------------------------------------------------------------- torch data parallel


class DataParallelBackend(TorchBackend):
    """`LearnerBackend` of strategy ``torch``: `TorchBackend` on every rank (replicated
    parameters and AdamW state), each rank its shard of the rows, gradients summed across ranks
    before the (global-norm) clip and the step."""

    def __init__(self, model, settings: OptimizerSettings, device: torch.device, *, ranks: RankGroup):
        super().__init__(model, settings, device)
        self.ranks = ranks
        ranks.broadcast_module(self.model)  # one starting point on every rank whatever each rank's initialisation was

    def shard(self, rows: TrainBatch) -> TrainBatch:
        return self.ranks.shard(rows)

    def global_normalisers(self, rows: TrainBatch, shard: TrainBatch) -> tuple[float, float]:
        return self.ranks.global_normalisers(rows, shard)

    def reduce_metrics(self, stats: WeightedStats, loss: float) -> tuple[WeightedStats, float]:
        return self.ranks.reduce_metrics(stats, loss)

    def gather_rows(self, local: torch.Tensor, num_rows: int) -> torch.Tensor:
        return self.ranks.gather_rows(local, num_rows)

    def step(self) -> float:
        self.all_reduce_gradients()
        return float(self.clip_and_step())

    def all_reduce_gradients(self) -> None:
        """SUM every parameter's gradient across ranks in flat buckets (missing grads count as 0)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in params + [None]:
            if p is not None and (size + p.numel() <= _GRAD_BUCKET_ELEMENTS or not bucket):
                bucket.append(p)
                size += p.numel()
                continue
            flat = torch.cat([q.grad.reshape(-1) for q in bucket]).to(self.ranks.comm_device)
            self.ranks.collective(dist.all_reduce, flat, what="all_reduce of gradients")
            offset = 0
            for q in bucket:
                q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
                offset += q.numel()
            bucket, size = ([p], p.numel()) if p is not None else ([], 0)

    def load_model_weights(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Rank 0 copies ``state`` into its module, then every rank takes rank 0's."""
        if self.ranks.is_controller:
            super().load_model_weights(state)
        self.ranks.broadcast_module(self.model, adapters_only=self.lora)  # LoRA: a checkpoint restores adapters only

    def load_state_dict(self, state: dict | None) -> None:
        """Rank 0's optimizer + schedule state (the same on every rank: replicated) to every rank."""
        blob = self.ranks.broadcast_object(to_bytes(state) if self.ranks.is_controller else None, "optimizer state")
        super().load_state_dict(from_bytes(blob))


# --------------------------------------------------------------------------- the command channel


class CommandChannel:
    """Rank 0 posts commands with their batch; ranks >= 1 read them in order (module docstring)."""

    def __init__(self, ranks: RankGroup, poll_s: float, idle_timeout_s: float | None):
        self.ranks = ranks
        self.poll_s = poll_s
        self.idle_timeout_s = idle_timeout_s
        self.seq = 0

    def post(self, command: str, batch: TrainBatch | None = None, extra: dict | None = None) -> None:
        """Rank 0: announce ``command`` to the followers, then broadcast the batch tensors."""
        ranks = self.ranks
        if not ranks.is_controller:
            raise DistributedLearnerError(f"rank {ranks.rank} called a controller method; ranks >= 1 run follow()")
        if ranks.world_size == 1:
            return
        self.seq += 1
        header = {"cmd": command, "batch": _batch_header(batch), "extra": extra or {}}
        ranks.store.set(f"{_CMD_PREFIX}{self.seq}", json.dumps(header))
        if batch is not None:
            self._broadcast_batch(batch, header["batch"])

    def receive(self) -> tuple[str, TrainBatch | None]:
        """Follower: the next command and its batch (None when it has none)."""
        header = self._next_header()
        batch = self._broadcast_batch(None, header["batch"]) if header["batch"] else None
        return header["cmd"], batch

    def _broadcast_batch(self, batch: TrainBatch | None, header: dict) -> TrainBatch:
        """Rank 0 sends, followers receive the tensors named in ``header``."""
        ranks = self.ranks
        tensors = {}
        for name, (dtype, shape) in header["fields"].items():
            if ranks.is_controller:
                tensor = getattr(batch, name).to(ranks.comm_device).contiguous()
            else:
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=ranks.comm_device)
            ranks.collective(dist.broadcast, tensor, 0, what=f"broadcast of batch field {name}")
            tensors[name] = tensor.cpu()
        if ranks.is_controller:
            return batch
        return TrainBatch(prompt_width=int(header["prompt_width"]), policy_version=header.get("policy_version"),
                          **{n: tensors.get(n) for n in _BATCH_FIELDS})

    def _next_header(self) -> dict:
        """Follower: wait (in poll_s slices, unbounded unless idle_timeout_s) for rank 0's next command."""
        ranks = self.ranks
        key = f"{_CMD_PREFIX}{self.seq + 1}"
        waited = 0.0
        while True:
            try:
                ranks.store.wait([key], datetime.timedelta(seconds=self.poll_s))
                break
            except Exception as exc:
                alive = True
                try:
                    ranks.store.check([key])
                except Exception:
                    alive = False
                if not alive:
                    raise DistributedLearnerError(
                        f"learner rank {ranks.rank}: the controller (learner rank 0, store at "
                        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}) is gone: {exc}") from exc
                waited += self.poll_s
                if self.idle_timeout_s is not None and waited >= self.idle_timeout_s:
                    raise DistributedLearnerError(
                        f"learner rank {ranks.rank}: no command from learner rank 0 for {waited:g} s "
                        f"(idle_timeout_s={self.idle_timeout_s:g})") from exc
        self.seq += 1
        return json.loads(ranks.store.get(key))

    def acknowledge_shutdown(self) -> None:
        """Follower: tell rank 0 (which hosts the store and waits for this before it may exit)."""
        self.ranks.store.add(f"{_CMD_PREFIX}shutdown-acks", 1)

    def wait_for_shutdown_acks(self) -> None:
        ranks = self.ranks
        deadline = time.monotonic() + ranks.timeout_s
        while (acks := ranks.store.add(f"{_CMD_PREFIX}shutdown-acks", 0)) < ranks.world_size - 1:
            if time.monotonic() > deadline:
                raise DistributedLearnerError(
                    f"learner rank 0: only {acks} of {ranks.world_size - 1} follower ranks confirmed shutdown within "
                    f"{ranks.timeout_s:g} s; check the logs of the other learner ranks")
            time.sleep(0.05)


# --------------------------------------------------------------------------- the learner


def _consume(weights: Iterator) -> None:
    for _ in weights:
        pass


# what a follower runs for each command: the same `TorchLearner` call as rank 0 (followers have
# no state / weights to pass, and their results are rank 0's only)
_FOLLOWER_CALLS = {
    CMD_LOG_PROBS: lambda learner, batch: learner.compute_log_probs(batch),
    CMD_UPDATE: lambda learner, batch: learner.update(batch),
    CMD_STATE_DICT: lambda learner, batch: learner.state_dict(),
    CMD_LOAD_STATE: lambda learner, batch: learner.load_state_dict(None),
    CMD_SYNC_PARAMS: lambda learner, batch: _consume(learner.named_parameters_for_sync()),
    CMD_LOAD_WEIGHTS: lambda learner, batch: learner.load_model_weights(None),
}


class DistributedLearner:
    """The `Learner` of a multi-rank run (module docstring): every rank constructs one (same
    model architecture, same settings); rank 0 hands it to the trainer, the others call
    `follow()`. It has a `TorchLearner` over a data-parallel backend (``strategy``) and the
    `CommandChannel` that keeps the ranks' calls in step."""

    def __init__(self, model, *, strategy: str = "torch", timeout_s: float = 600.0, poll_s: float = 2.0,
                 idle_timeout_s: float | None = None, deepspeed_overrides: dict | None = None, **learner_kwargs):
        """``learner_kwargs`` are `TorchLearner`'s; ``deepspeed_overrides`` is merged into the
        DeepSpeed config (its "zero_optimization" entry key by key), e.g.
        {"zero_optimization": {"stage3_param_persistence_threshold": 0}}."""
        if strategy not in STRATEGIES:
            raise ValueError(f"spec.learner.strategy={strategy!r}: use one of {STRATEGIES}")
        device = torch.device(learner_kwargs.get("device", "cpu"))
        self.ranks = RankGroup(device, timeout_s)
        if strategy.startswith("deepspeed"):
            from dapo.learner.deepspeed_backend import DeepSpeedBackend, deepspeed_cpu_usable

            if device.type == "cpu" and not deepspeed_cpu_usable():
                log.warning("spec.learner.strategy=%s: DeepSpeed is not usable on this CPU machine (see the log "
                            "above); training with strategy torch (same math, replicated optimizer state)", strategy)
                strategy = "torch"
        self.strategy = strategy
        if strategy == "torch":
            def backend(model_, settings, device_) -> LearnerBackend:
                return DataParallelBackend(model_, settings, device_, ranks=self.ranks)
        else:
            def backend(model_, settings, device_) -> LearnerBackend:
                return DeepSpeedBackend(model_, settings, device_, ranks=self.ranks, stage=int(strategy[-1]),
                                        micro_batch_rows=learner_kwargs["micro_batch_rows"],
                                        overrides=deepspeed_overrides or {})
        self.learner = TorchLearner(model, backend=backend, **learner_kwargs)
        self.channel = CommandChannel(self.ranks, poll_s, idle_timeout_s)

    @classmethod
    def from_spec(cls, model, spec, device="cpu", *, timeout_s: float = 600.0, **kwargs) -> "DistributedLearner":
        """Build on every rank from a `DAPORunSpec` (spec.learner.strategy picks the backend);
        mini-batch sizes are global (responses = prompts x n across all ranks), the micro-batch
        size is per rank."""
        return cls(model, strategy=spec.learner.strategy, timeout_s=timeout_s, device=device,
                   **learner_kwargs_from_spec(spec), **kwargs)

    @property
    def model(self) -> torch.nn.Module:
        return self.learner.model

    @property
    def proximal_seconds(self) -> float:
        return self.learner.proximal_seconds

    @property
    def backend(self) -> LearnerBackend:
        return self.learner.backend

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def is_controller(self) -> bool:
        return self.ranks.is_controller

    def _require_controller(self, call: str) -> None:
        if not self.is_controller:
            raise DistributedLearnerError(f"{call} runs on learner rank 0")

    # ------------------------------------------------------------------ rank 0: the Learner calls

    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, R] log-probs of the whole batch on rank 0; each rank computes its row shard."""
        self.channel.post(CMD_LOG_PROBS, batch)
        return self.learner.compute_log_probs(batch)

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One training step on every rank; returns the globally reduced metrics on rank 0."""
        self.learner.check_update_inputs(batch)  # a bad batch fails before the followers are called in
        self.channel.post(CMD_UPDATE, batch)
        return self.learner.update(batch)

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank 0: full (name, tensor) pairs. Under ZeRO-3 each parameter is gathered from its
        shards just before it is yielded (all ranks take part, one parameter at a time), so the
        consumer must use each tensor before advancing and issue no other learner collective
        until the iterator is exhausted."""
        self._require_controller("named_parameters_for_sync()")
        if self.backend.partitioned_weights:
            self.channel.post(CMD_SYNC_PARAMS)
        yield from self.learner.named_parameters_for_sync()

    def full_state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """Rank 0: every weight by name, full size (what save_pretrained(state_dict=...) writes);
        under ZeRO-3 the followers take part in the gathers as for the weight sync."""
        self._require_controller("full_state_dict_for_save()")
        if self.backend.partitioned_weights:
            self.channel.post(CMD_SYNC_PARAMS)
        return self.learner.full_state_dict_for_save()

    def load_model_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Rank 0: put ``state`` (full weights by name, e.g. a checkpoint's safetensors) into every
        rank's module. The names are checked before the followers are called in, so a mismatch
        (ValueError) leaves them waiting for the next command instead of half-way in collectives."""
        self._require_controller("load_model_weights()")
        if is_lora(self.model):  # a LoRA checkpoint holds the adapters only
            check_adapter_names(self.model, state.keys())
        else:
            check_weight_names(self.model, state.keys())
        self.channel.post(CMD_LOAD_WEIGHTS)
        self.learner.load_model_weights(state)

    def state_dict(self) -> dict:
        """Rank 0: optimizer + schedule state. torch strategy: rank 0's state is every rank's
        (replicated); DeepSpeed: the per-rank ZeRO shards gathered into a list."""
        if self.backend.partitioned_optimizer:
            self.channel.post(CMD_STATE_DICT)
        return self.learner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 (after `load_model_weights` put the checkpoint's weights on every rank): give
        every rank its part of the optimizer / schedule state."""
        self.channel.post(CMD_LOAD_STATE)
        self.learner.load_state_dict(state)

    def shutdown(self) -> None:
        """Rank 0: release the followers (they return from follow()) and wait until each has
        read the command (rank 0 serves the store they read it from)."""
        if not self.is_controller or self.world_size == 1:
            return
        self.channel.post(CMD_SHUTDOWN)
        self.channel.wait_for_shutdown_acks()

    # ------------------------------------------------------------------ ranks >= 1

    def follow(self) -> None:
        """Ranks >= 1: execute rank 0's commands until it posts shutdown."""
        if self.is_controller:
            raise DistributedLearnerError("rank 0 is the controller: it runs the Trainer, not follow()")
        log.info("learner rank %d/%d following the controller", self.rank, self.world_size)
        while True:
            command, batch = self.channel.receive()
            if command == CMD_SHUTDOWN:
                log.info("learner rank %d: shutdown from the controller", self.rank)
                self.channel.acknowledge_shutdown()
                return
            call = _FOLLOWER_CALLS.get(command)
            if call is None:
                raise DistributedLearnerError(f"learner rank {self.rank}: unknown command {command!r} from rank 0 "
                                              "(every learner rank must run the same dapo version)")
            call(self.learner, batch)
