"""The learner over N ranks of torch.distributed: rank 0 drives, ranks >= 1 follow.

(~650 lines: the command channel, sharding, the torch all-reduce path and the DeepSpeed ZeRO
path share one ordered protocol; split apart, the order of collectives, which every rank must
issue identically, would be spread over files.)

Every rank constructs a `DistributedLearner` (same model architecture, same spec). Rank 0 is the
controller: `dapo.controller.trainer.Trainer` calls the `TorchLearner` interface on it
(`compute_log_probs`, `update`, `named_parameters_for_sync`, `state_dict`, `load_state_dict`).
Each such call that needs the other ranks first posts a command; ranks >= 1 sit in `follow()`
and execute the same command, so every collective is issued in the same order on every rank.

Command channel: the header (command name, batch tensor shapes, extra JSON) goes through the
default group's TCP store under ``dapo-learner/cmd/<seq>``; the batch tensors follow as
broadcasts from rank 0. Followers wait on the store in short slices, so the long idle phase while
rank 0 generates rollouts never trips a collective timeout, and a follower notices when rank 0's
store is gone (controller died) instead of hanging. Every collective runs under the process
group's timeout (``init_process_group(timeout=...)``): a dead rank gives an error, not a hang.

Math (DAPO-NOTES "token-mean ... across every micro-batch and every data-parallel rank"): each
rank takes a contiguous shard of every mini-batch's rows; the normalisers N_tokens / N_seqs are
all-reduced (SUM) so every rank divides by the GLOBAL counts; every rank's micro-batch losses are
then partial sums of the mini-batch loss, and the gradient is SUMMED across ranks (torch
strategy: one all_reduce(SUM) of the flattened gradients; DeepSpeed averages, so its loss is
multiplied by the world size). Two ranks therefore take the same step as one rank on the whole
batch. Gradient clipping sees the summed gradient (the global norm); metrics are token-weighted
means reduced across ranks.

Strategies: ``torch`` (plain torch, replicated parameters and AdamW state, works on CPU/gloo and
GPU/NCCL) and ``deepspeed-zero2`` / ``deepspeed-zero3`` (DeepSpeed with torch's AdamW as client
optimizer; parameters of ZeRO-3 are gathered one at a time for the weight sync).

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
from typing import Any, Iterator

import torch
import torch.distributed as dist

from dapo.errors import DapoError
from dapo.learner.torch_learner import (TorchLearner, TrainBatch, check_weight_names, loss_kwargs_from_spec,
                                        mini_batch_normalisers, parameter_aliases, persistent_buffers, warmup_factor,
                                        weight_for)

log = logging.getLogger("dapo.learner.distributed")

STRATEGIES = ("torch", "deepspeed-zero2", "deepspeed-zero3")
_CMD_PREFIX = "dapo-learner/cmd/"
# every tensor a follower needs to run the same update (the rollout-correction weights are derived
# on each rank from old_log_probs, behaviour_log_probs and weight_versions of the whole batch)
_BATCH_FIELDS = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask", "advantages",
                 "old_log_probs", "behaviour_log_probs", "weight_versions")
_METRIC_KEYS = ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/entropy")
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


def _reduce_weighted(pairs: dict[str, tuple[float, float]], keys, device) -> dict[str, tuple[float, float]]:
    """Global token-weighted means as (mean, total weight): sum_r v_r w_r / sum_r w_r per key
    (0 when no weight); the weight lets update() weigh mini-batches by their tokens as well."""
    flat = torch.tensor([x for k in keys for x in (pairs.get(k, (0.0, 0.0))[0] * pairs.get(k, (0.0, 0.0))[1],
                                                     pairs.get(k, (0.0, 0.0))[1])], dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    values = flat.view(-1, 2).cpu().tolist()
    return {k: (vw / w if w else 0.0, w) for k, (vw, w) in zip(keys, values)}


# --------------------------------------------------------------------------- the learner


class DistributedLearner(TorchLearner):
    """`TorchLearner` spread over the default process group (see the module docstring)."""

    def __init__(self, model, *, strategy: str = "torch", timeout_s: float = 600.0, poll_s: float = 2.0,
                 idle_timeout_s: float | None = None, deepspeed_overrides: dict | None = None, **learner_kwargs):
        """``deepspeed_overrides`` is merged into the DeepSpeed config (its "zero_optimization"
        entry key by key), e.g. {"zero_optimization": {"stage3_param_persistence_threshold": 0}}."""
        if strategy not in STRATEGIES:
            raise ValueError(f"spec.learner.strategy={strategy!r}: use one of {STRATEGIES}")
        device = torch.device(learner_kwargs.get("device", "cpu"))
        init_distributed(device, timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        if strategy.startswith("deepspeed") and device.type == "cpu" and not _deepspeed_cpu_usable():
            log.warning("spec.learner.strategy=%s: DeepSpeed is not usable on this CPU machine (see the log above); "
                        "training with strategy torch (same math, replicated optimizer state)", strategy)
            strategy = "torch"
        self.strategy = strategy
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.idle_timeout_s = idle_timeout_s
        self._seq = 0
        self._store = dist.distributed_c10d._get_default_store()
        self._engine = None
        self._deepspeed_overrides = deepspeed_overrides or {}
        super().__init__(model, **learner_kwargs)
        # one starting point on every rank whatever each rank's initialisation was
        self._broadcast_parameters()
        if strategy.startswith("deepspeed"):
            self._init_deepspeed(stage=3 if strategy.endswith("3") else 2)

    @classmethod
    def from_spec(cls, model, spec, device="cpu", *, timeout_s: float = 600.0, **kwargs) -> "DistributedLearner":
        """Build on every rank from a `DAPORunSpec` (spec.learner.strategy picks the backend);
        mini-batch sizes are global (responses = prompts x n across all ranks), the micro-batch
        size is per rank."""
        ls = spec.learner
        return cls(
            model, strategy=ls.strategy, timeout_s=timeout_s, lr=ls.lr, weight_decay=ls.weight_decay,
            warmup_steps=ls.warmup_steps, grad_clip=ls.grad_clip, mini_batch_rows=ls.mini_batch_size * spec.rollout.n,
            micro_batch_rows=ls.micro_batch_size, ppo_epochs=ls.ppo_epochs, device=device,
            **loss_kwargs_from_spec(spec), **kwargs)

    @property
    def is_controller(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ DeepSpeed

    def _init_deepspeed(self, stage: int) -> None:
        import deepspeed

        if self.device.type == "cpu":
            # the shared-memory comm op is a JIT-compiled C++ extension; without a compiler it
            # fails, and gloo does the same job here
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # DeepSpeed insists on LOCAL_RANK (its launchers set it); one learner process per pod
        os.environ.setdefault("LOCAL_RANK", str(self.device.index or 0) if self.device.type == "cuda" else "0")
        config = {
            "train_micro_batch_size_per_gpu": self.micro_batch_rows,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # engine.step() is the boundary we choose
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        for key, value in self._deepspeed_overrides.items():
            if key == "zero_optimization":
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        engine, optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=config,
                                                       dist_init_required=False)
        self._engine = engine
        self.model = engine.module
        self.optimizer = optimizer

    def _response_logits(self, mb: TrainBatch) -> torch.Tensor:
        if self._engine is None:
            return super()._response_logits(mb)
        width_r = mb.responses.shape[1]
        out = self._engine(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                           use_cache=False, logits_to_keep=width_r + 1)
        return out.logits[:, :-1, :] / self.temperature

    def _backward(self, loss: torch.Tensor) -> None:
        if self._engine is None:
            loss.backward()
        else:  # DeepSpeed averages gradients over ranks; x world_size turns that into the sum
            self._engine.backward(loss * self.world_size, scale_wrt_gas=False)

    # ------------------------------------------------------------------ command channel

    def _post(self, command: str, batch: TrainBatch | None = None, extra: dict | None = None) -> None:
        """Rank 0: announce ``command`` to the followers, then broadcast the batch tensors."""
        if not self.is_controller:
            raise DistributedLearnerError(f"rank {self.rank} called a controller method; ranks >= 1 run follow()")
        if self.world_size == 1:
            return
        self._seq += 1
        header = {"cmd": command, "batch": _batch_header(batch), "extra": extra or {}}
        self._store.set(f"{_CMD_PREFIX}{self._seq}", json.dumps(header))
        if batch is not None:
            self._broadcast_batch(batch, header["batch"])

    def _broadcast_batch(self, batch: TrainBatch | None, header: dict) -> TrainBatch:
        """Rank 0 sends, followers receive the tensors named in ``header``."""
        tensors = {}
        for name, (dtype, shape) in header["fields"].items():
            if self.is_controller:
                tensor = getattr(batch, name).to(self.comm_device).contiguous()
            else:
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.comm_device)
            self._collective(dist.broadcast, tensor, 0, what=f"broadcast of batch field {name}")
            tensors[name] = tensor.cpu()
        if self.is_controller:
            return batch
        return TrainBatch(prompt_width=int(header["prompt_width"]), policy_version=header.get("policy_version"),
                          **{n: tensors.get(n) for n in _BATCH_FIELDS})

    def _collective(self, fn, *args, what: str, **kwargs):
        """Run one collective; a failure (dead peer, timeout) becomes an error naming this rank."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise DistributedLearnerError(
                f"learner rank {self.rank}/{self.world_size}: {what} failed ({str(exc).splitlines()[0][:300]}). "
                f"Another learner rank probably died or hangs; check the logs of every learner rank. The "
                f"collective timeout is {self.timeout_s:g} s (init_process_group timeout)") from exc

    def _next_command(self) -> dict:
        """Follower: wait (in poll_s slices, unbounded unless idle_timeout_s) for rank 0's next command."""
        key = f"{_CMD_PREFIX}{self._seq + 1}"
        waited = 0.0
        while True:
            try:
                self._store.wait([key], datetime.timedelta(seconds=self.poll_s))
                break
            except Exception as exc:
                alive = True
                try:
                    self._store.check([key])
                except Exception:
                    alive = False
                if not alive:
                    raise DistributedLearnerError(
                        f"learner rank {self.rank}: the controller (learner rank 0, store at "
                        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}) is gone: {exc}") from exc
                waited += self.poll_s
                if self.idle_timeout_s is not None and waited >= self.idle_timeout_s:
                    raise DistributedLearnerError(
                        f"learner rank {self.rank}: no command from learner rank 0 for {waited:g} s "
                        f"(idle_timeout_s={self.idle_timeout_s:g})") from exc
        self._seq += 1
        return json.loads(self._store.get(key))

    def follow(self) -> None:
        """Ranks >= 1: execute rank 0's commands until it posts shutdown."""
        if self.is_controller:
            raise DistributedLearnerError("rank 0 is the controller: it runs the Trainer, not follow()")
        log.info("learner rank %d/%d following the controller", self.rank, self.world_size)
        while True:
            header = self._next_command()
            command = header["cmd"]
            batch = self._broadcast_batch(None, header["batch"]) if header["batch"] else None
            if command == CMD_SHUTDOWN:
                log.info("learner rank %d: shutdown from the controller", self.rank)
                # rank 0 hosts the store: it waits for this before it may exit
                self._store.add(f"{_CMD_PREFIX}shutdown-acks", 1)
                return
            if command == CMD_LOG_PROBS:
                self._local_log_probs(batch)
            elif command == CMD_UPDATE:
                self._local_update(batch)
            elif command == CMD_STATE_DICT:
                self._gather_state()
            elif command == CMD_LOAD_STATE:
                self._scatter_state(None)
            elif command == CMD_SYNC_PARAMS:
                for _ in self._gathered_parameters():
                    pass
            elif command == CMD_LOAD_WEIGHTS:
                self._receive_weights(None)
            else:
                raise DistributedLearnerError(f"learner rank {self.rank}: unknown command {command!r} from rank 0 "
                                              "(every learner rank must run the same dapo version)")

    def shutdown(self) -> None:
        """Rank 0: release the followers (they return from follow()) and wait until each has
        read the command (rank 0 serves the store they read it from)."""
        if not self.is_controller or self.world_size == 1:
            return
        self._post(CMD_SHUTDOWN)
        deadline = time.monotonic() + self.timeout_s
        while (acks := self._store.add(f"{_CMD_PREFIX}shutdown-acks", 0)) < self.world_size - 1:
            if time.monotonic() > deadline:
                raise DistributedLearnerError(
                    f"learner rank 0: only {acks} of {self.world_size - 1} follower ranks confirmed shutdown within "
                    f"{self.timeout_s:g} s; check the logs of the other learner ranks")
            time.sleep(0.05)

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, R] log-probs of the whole batch on rank 0; each rank computes its row shard."""
        self._post(CMD_LOG_PROBS, batch)
        return self._local_log_probs(batch)

    def _local_log_probs(self, batch: TrainBatch) -> torch.Tensor:
        start, stop = shard_bounds(batch.num_rows, self.world_size, self.rank)
        shard = batch.rows(start, stop)
        if self._engine is not None and self._engine.zero_optimization_stage() == 3:
            local = self._log_probs_in_lockstep(batch, shard)
        elif shard.num_rows:
            local = super().compute_log_probs(shard)
        else:
            local = torch.zeros((0, batch.responses.shape[1]))
        width = shard_bounds(batch.num_rows, self.world_size, 0)[1]  # rank 0 holds the largest shard
        padded = torch.zeros((width, batch.responses.shape[1]), dtype=torch.float32, device=self.comm_device)
        padded[: local.shape[0]] = local.to(self.comm_device)
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective(dist.all_gather, pieces, padded, what="all_gather of log-probs")
        rows = [pieces[r][: (lambda b: b[1] - b[0])(shard_bounds(batch.num_rows, self.world_size, r))]
                for r in range(self.world_size)]
        return torch.cat(rows).cpu()

    def _log_probs_in_lockstep(self, batch: TrainBatch, shard: TrainBatch) -> torch.Tensor:
        """ZeRO-3 forwards gather parameters collectively: every rank runs the same number of
        micro-batches (padding with a masked row where its shard is shorter)."""
        micros = self._padded_micro_batches(batch, shard, _max_shard_rows(batch.num_rows, self.world_size))
        was_training = self.model.training
        self.model.eval()
        pieces = []
        from dapo.algo import log_probs_from_logits

        for mb in micros:
            mb = mb.to(self.device)
            pieces.append(log_probs_from_logits(self._response_logits(mb), mb.responses).float().cpu())
        self.model.train(was_training)
        out = torch.cat(pieces)[: shard.num_rows] if pieces else torch.zeros((0, batch.responses.shape[1]))
        return out * shard.response_mask

    def _padded_micro_batches(self, full: TrainBatch, shard: TrainBatch, max_rows: int) -> list[TrainBatch]:
        """Micro-batches of ``shard`` plus masked one-row fillers so that every rank runs
        micro_batch_count(max_rows) passes (a filler has no valid token: loss and gradient 0)."""
        micros = self._micro_batches(shard) if shard.num_rows else []
        filler = full.rows(0, 1)
        filler = TrainBatch(**{**filler.__dict__, "response_mask": torch.zeros_like(filler.response_mask)})
        while len(micros) < micro_batch_count(max_rows, self.micro_batch_rows):
            micros.append(filler)
        return micros

    # ------------------------------------------------------------------ update

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One training step on every rank; returns the globally reduced metrics on rank 0."""
        self.check_update_inputs(batch)
        self._post(CMD_UPDATE, batch)
        return self._local_update(batch)

    def _local_update(self, batch: TrainBatch) -> dict[str, float]:
        if self._engine is not None:
            # the lr schedule lives on the client optimizer; DeepSpeed's wrapper has its own groups
            lr = self.base_lr * warmup_factor(self.scheduler.last_epoch, self.warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return TorchLearner.update(self, batch)

    def _optimizer_step(self, mini: TrainBatch) -> dict[str, tuple[float, float]]:
        """This rank's shard of one mini-batch, global normalisers, summed gradients, one step."""
        counts = torch.tensor(mini_batch_normalisers(mini.response_mask), dtype=torch.float64)
        # every rank holds the whole mini-batch, so the counts are global already; the all_reduce
        # of each shard's counts makes that explicit and catches ranks that disagree on the batch
        start, stop = shard_bounds(mini.num_rows, self.world_size, self.rank)
        shard = mini.rows(start, stop)
        local = torch.tensor(mini_batch_normalisers(shard.response_mask), dtype=torch.float64, device=self.comm_device)
        self._collective(dist.all_reduce, local, what="all_reduce of token counts")
        if not torch.equal(local.cpu(), counts):
            raise DistributedLearnerError(f"learner rank {self.rank}: global token counts {local.tolist()} differ "
                                          f"from the mini-batch's {counts.tolist()}: ranks hold different batches")
        num_tokens, num_seqs = local.cpu().tolist()
        if self._engine is not None:
            micros = self._padded_micro_batches(mini, shard, _max_shard_rows(mini.num_rows, self.world_size))
        else:
            micros = self._micro_batches(shard) if shard.num_rows else []
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, stats = self._accumulate_gradients(micros, num_tokens, num_seqs)
        grad_norm = self._step_all_ranks()
        reduced = _reduce_weighted(stats, _METRIC_KEYS, self.comm_device)
        loss = torch.tensor([total_loss], dtype=torch.float64, device=self.comm_device)
        self._collective(dist.all_reduce, loss, what="all_reduce of the loss")
        out = dict(reduced)
        out["actor/pg_loss"] = (float(loss.item()), 1.0)
        out["actor/grad_norm"] = (grad_norm, 1.0)
        return out

    def _step_all_ranks(self) -> float:
        """Sum gradients across ranks, clip by the global norm, step; returns the norm."""
        if self._engine is not None:
            self._engine.step()
            norm = self._engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        self._all_reduce_gradients()
        return float(self._clip_and_step())

    def _all_reduce_gradients(self) -> None:
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
            flat = torch.cat([q.grad.reshape(-1) for q in bucket]).to(self.comm_device)
            self._collective(dist.all_reduce, flat, what="all_reduce of gradients")
            offset = 0
            for q in bucket:
                q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
                offset += q.numel()
            bucket, size = ([p], p.numel()) if p is not None else ([], 0)

    def _broadcast_parameters(self) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        with torch.no_grad():
            for name, tensor in list(self.model.named_parameters()) + list(self.model.named_buffers()):
                buf = tensor.detach().to(self.comm_device).contiguous()
                self._collective(dist.broadcast, buf, 0, what=f"broadcast of parameter {name}")
                if self.rank != 0:
                    tensor.copy_(buf)

    # ------------------------------------------------------------------ weight sync

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank 0: full (name, tensor) pairs. Under ZeRO-3 each parameter is gathered from its
        shards just before it is yielded (all ranks take part, one parameter at a time), so the
        consumer must use each tensor before advancing and issue no other learner collective
        until the iterator is exhausted."""
        if not self.is_controller:
            raise DistributedLearnerError("named_parameters_for_sync() runs on learner rank 0")
        if not self._zero3:
            yield from super().named_parameters_for_sync()
            return
        self._post(CMD_SYNC_PARAMS)
        yield from self._gathered_parameters()

    @property
    def _zero3(self) -> bool:
        return self._engine is not None and self._engine.zero_optimization_stage() == 3

    def _gathered_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed

        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.detach()

    # ------------------------------------------------------------------ checkpoints

    def full_state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """Rank 0: every weight by name, full size (what save_pretrained(state_dict=...) writes).
        torch / ZeRO-2: rank 0's module holds them. ZeRO-3: each parameter is gathered (all ranks
        take part) and copied to CPU before the next one; tied names share one tensor, so
        save_pretrained drops the alias as it does for the module's own state_dict."""
        if not self._zero3:
            if not self.is_controller:
                raise DistributedLearnerError("full_state_dict_for_save() runs on learner rank 0")
            return super().full_state_dict_for_save()
        state = {name: tensor.to("cpu", copy=True) for name, tensor in self.named_parameters_for_sync()}
        for alias, canonical in parameter_aliases(self.model).items():
            state[alias] = state[canonical]
        for name, buffer in persistent_buffers(self.model):  # buffers are never partitioned
            state[name] = buffer.detach().to("cpu", copy=True)
        return state

    def load_model_weights(self, state) -> None:
        """Rank 0: put ``state`` (full weights by name, e.g. a checkpoint's safetensors) into every
        rank's module. The names are checked before the followers are called in, so a mismatch
        (ValueError) leaves them waiting for the next command instead of half-way in collectives."""
        if not self.is_controller:
            raise DistributedLearnerError("load_model_weights() runs on learner rank 0")
        check_weight_names(self.model, state.keys())
        self._post(CMD_LOAD_WEIGHTS)
        self._receive_weights(state)

    def _receive_weights(self, state) -> None:
        """Every rank: rank 0's ``state`` into this rank's module (followers pass None)."""
        if not self._zero3:
            if self.is_controller:
                TorchLearner.load_model_weights(self, state)
            self._broadcast_parameters()
            return
        import deepspeed

        aliases = parameter_aliases(self.model) if self.is_controller else {}
        with torch.no_grad():
            # same parameter order on every rank (same architecture): the gathers pair up
            for name, param in self.model.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.is_controller:
                        param.copy_(weight_for(name, state, aliases))
            for name, buffer in persistent_buffers(self.model):
                if self.is_controller:
                    buffer.copy_(state[name])
                buf = buffer.detach().to(self.comm_device).contiguous()
                self._collective(dist.broadcast, buf, 0, what=f"broadcast of buffer {name}")
                if not self.is_controller:
                    buffer.copy_(buf)

    def state_dict(self) -> dict:
        """Rank 0: optimizer + schedule state. torch strategy: rank 0's state is every rank's
        (replicated); DeepSpeed: the per-rank ZeRO shards gathered into a list."""
        if self._engine is None:
            return super().state_dict()
        self._post(CMD_STATE_DICT)
        return self._gather_state()

    def _gather_state(self) -> dict:
        mine = _to_bytes(self.optimizer.state_dict())
        gathered = [None] * self.world_size if self.is_controller else None
        self._collective(dist.gather_object, mine, gathered, dst=0, what="gather of optimizer shards")
        if not self.is_controller:
            return {}
        return {"zero_shards": gathered, "scheduler": self.scheduler.state_dict(), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 (after `load_model_weights` put the checkpoint's weights on every rank): give
        every rank its part of the optimizer / schedule state."""
        self._post(CMD_LOAD_STATE)
        self._scatter_state(state)

    def _scatter_state(self, state: dict | None) -> None:
        if self._engine is None:
            box = [_to_bytes(state) if self.is_controller else None]
            self._collective(dist.broadcast_object_list, box, src=0, device=self.comm_device,
                             what="broadcast of optimizer state")
            TorchLearner.load_state_dict(self, _from_bytes(box[0]))
            return
        if self.is_controller and state.get("world_size") != self.world_size:
            raise DistributedLearnerError(
                f"this DeepSpeed checkpoint holds optimizer shards of {state.get('world_size')} learner ranks "
                f"but the run has {self.world_size}: resume with spec.learner.replicas={state.get('world_size')}")
        # DeepSpeed's ZeRO load_state_dict takes every rank's shard and picks its own by dp rank
        box = [state["zero_shards"] if self.is_controller else None]
        self._collective(dist.broadcast_object_list, box, src=0, device=self.comm_device,
                         what="broadcast of optimizer shards")
        self.optimizer.load_state_dict([_from_bytes(b) for b in box[0]], load_optimizer_states=True,
                                       load_from_fp32_weights=True)
        box = [state["scheduler"] if self.is_controller else None]  # the checkpoint's position, not rank 0's
        self._collective(dist.broadcast_object_list, box, src=0, device=self.comm_device,
                         what="broadcast of the lr schedule")
        self.scheduler.load_state_dict(box[0])


def _max_shard_rows(num_rows: int, world_size: int) -> int:
    start, stop = shard_bounds(num_rows, world_size, 0)
    return stop - start


def _to_bytes(obj: Any) -> bytes:
    """torch.save into bytes: tensors travel in one pickle-free-of-storage-sharing blob."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=False)


_DS_CPU_USABLE: bool | None = None


def _deepspeed_cpu_usable() -> bool:
    """Whether DeepSpeed imports and picks its CPU accelerator here (checked once)."""
    global _DS_CPU_USABLE
    if _DS_CPU_USABLE is None:
        started = time.perf_counter()
        try:
            import deepspeed  # noqa: F401
            from deepspeed.accelerator import get_accelerator

            _DS_CPU_USABLE = get_accelerator().device_name() == "cpu"
            if not _DS_CPU_USABLE:
                log.warning("DeepSpeed picked accelerator %r on a CPU-only learner", get_accelerator().device_name())
        except Exception as exc:  # not installed, or broken install
            log.warning("DeepSpeed cannot be imported (%s: %s)", type(exc).__name__, exc)
            _DS_CPU_USABLE = False
        log.debug("DeepSpeed probe took %.1fs", time.perf_counter() - started)
    return _DS_CPU_USABLE
