"""`DeepSpeedBackend`: the `LearnerBackend` of strategies ``deepspeed-zero2`` / ``deepspeed-zero3``.

DeepSpeed wraps the module and torch's AdamW (the client optimizer; the lr schedule stays torch's
LambdaLR on it) and partitions the optimizer state (ZeRO-2) and the parameters too (ZeRO-3)
over the data-parallel ranks. The rows, normalisers and metrics are the `RankGroup`'s, as for the
torch strategy (`dapo.learner.distributed`). What changes:

- every forward/backward is collective (gradient reduce-scatter; ZeRO-3 parameter gathers), so
  every rank runs the same number of passes: `micro_batches` pads a shorter shard with masked
  rows (loss and gradient 0); ZeRO-3 does so for the log-prob passes too;
- DeepSpeed averages gradients over the ranks; the loss is multiplied by the world size, so the
  result is the sum the DAPO objective needs (`dapo.learner.distributed`, "Math");
- ZeRO-3 weights are gathered one parameter at a time for the weight sync and the checkpoint,
  and overwritten one gathered parameter at a time on load;
- the optimizer state is one shard per rank: `state_dict` gathers them on rank 0, and a
  checkpoint loads only into as many ranks as wrote it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

from dapo.learner.distributed import DataParallelBackend, DistributedLearnerError, RankGroup, from_bytes, to_bytes
from dapo.learner.batch import TrainBatch, split_rows
from dapo.learner.torch_learner import OptimizerSettings, warmup_factor
from dapo.learner.weights import parameter_aliases, persistent_buffers, weight_for

log = logging.getLogger("dapo.learner.deepspeed_backend")


class DeepSpeedBackend(DataParallelBackend):
    """ZeRO stage 2 or 3 over the `RankGroup` (module docstring)."""

    partitioned_optimizer = True

    def __init__(self, model, settings: OptimizerSettings, device: torch.device, *, ranks: RankGroup, stage: int,
                 micro_batch_rows: int, overrides: dict):
        """``overrides`` is merged into the DeepSpeed config (its "zero_optimization" entry key by key)."""
        super().__init__(model, settings, device, ranks=ranks)  # AdamW + LambdaLR, rank 0's weights everywhere
        import deepspeed

        if self.device.type == "cpu":
            # the shared-memory comm op is a JIT-compiled C++ extension; without a compiler it
            # fails, and gloo does the same job here
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # DeepSpeed insists on LOCAL_RANK (its launchers set it); one learner process per pod
        os.environ.setdefault("LOCAL_RANK", str(self.device.index or 0) if self.device.type == "cuda" else "0")
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_rows,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # engine.step() is the boundary we choose
            "gradient_clipping": settings.grad_clip,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        for key, value in overrides.items():
            config[key] = {**config[key], **value} if key == "zero_optimization" else value
        engine, optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=config,
                                                       dist_init_required=False)
        self.engine = engine
        self.model = engine.module
        self.optimizer = optimizer
        self.apply_schedule()

    @property
    def partitioned_weights(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    # -- rows: collective passes run in lockstep
    def micro_batches(self, rows: TrainBatch, shard: TrainBatch, micro_batch_rows: int, *,
                      training: bool) -> list[TrainBatch]:
        if training or self.partitioned_weights:
            return self.ranks.padded_micro_batches(rows, shard, micro_batch_rows)
        return split_rows(shard, micro_batch_rows)

    # -- compute
    def forward(self, **inputs) -> torch.Tensor:
        return self.engine(**inputs).logits

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; x world_size turns that into the sum
        self.engine.backward(loss * self.ranks.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        """DeepSpeed reduces, clips (gradient_clipping) and steps; returns its global norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def advance_schedule(self) -> None:
        super().advance_schedule()
        self.apply_schedule()

    def apply_schedule(self) -> None:
        """The lr schedule lives on the client optimizer; DeepSpeed's wrapper has its own groups.
        The base lr is the schedule's (a guardrail rollback may have scaled it), not the spec's."""
        lr = self.scheduler.base_lrs[0] * warmup_factor(self.scheduler.last_epoch, self.settings.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- weights
    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.partitioned_weights:
            yield from super().named_parameters_for_sync()
            return
        import deepspeed

        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.detach()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """ZeRO-3: each parameter gathered (all ranks take part) and copied to CPU before the next
        one; tied names share one tensor, so save_pretrained drops the alias as it does for the
        module's own state_dict."""
        if not self.partitioned_weights:
            return super().full_state_dict()
        state = {name: tensor.to("cpu", copy=True) for name, tensor in self.named_parameters_for_sync()}
        for alias, canonical in parameter_aliases(self.model).items():
            state[alias] = state[canonical]
        for name, buffer in persistent_buffers(self.model):  # buffers are never partitioned
            state[name] = buffer.detach().to("cpu", copy=True)
        return state

    def load_model_weights(self, state: Mapping[str, torch.Tensor] | None) -> None:
        if not self.partitioned_weights:
            super().load_model_weights(state)
            return
        import deepspeed

        ranks = self.ranks
        aliases = parameter_aliases(self.model) if ranks.is_controller else {}
        with torch.no_grad():
            # same parameter order on every rank (same architecture): the gathers pair up
            for name, param in self.model.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if ranks.is_controller:
                        param.copy_(weight_for(name, state, aliases))
            for name, buffer in persistent_buffers(self.model):
                if ranks.is_controller:
                    buffer.copy_(state[name])
                buf = buffer.detach().to(ranks.comm_device).contiguous()
                ranks.collective(dist.broadcast, buf, 0, what=f"broadcast of buffer {name}")
                if not ranks.is_controller:
                    buffer.copy_(buf)

    # -- optimizer state: one shard per rank
    def state_dict(self) -> dict:
        """The per-rank ZeRO shards gathered into a list on rank 0 ({} elsewhere)."""
        ranks = self.ranks
        mine = to_bytes(self.optimizer.state_dict())
        gathered = [None] * ranks.world_size if ranks.is_controller else None
        ranks.collective(dist.gather_object, mine, gathered, dst=0, what="gather of optimizer shards")
        if not ranks.is_controller:
            return {}
        return {"zero_shards": gathered, "scheduler": self.scheduler.state_dict(), "world_size": ranks.world_size}

    def load_state_dict(self, state: dict | None) -> None:
        ranks = self.ranks
        if ranks.is_controller and state.get("world_size") != ranks.world_size:
            raise DistributedLearnerError(
                f"this DeepSpeed checkpoint holds optimizer shards of {state.get('world_size')} learner ranks "
                f"but the run has {ranks.world_size}: resume with spec.learner.replicas={state.get('world_size')}")
        # DeepSpeed's ZeRO load_state_dict takes every rank's shard and picks its own by dp rank
        shards = ranks.broadcast_object(state["zero_shards"] if ranks.is_controller else None, "optimizer shards")
        self.optimizer.load_state_dict([from_bytes(b) for b in shards], load_optimizer_states=True,
                                       load_from_fp32_weights=True)
        # the checkpoint's position, not rank 0's
        self.scheduler.load_state_dict(ranks.broadcast_object(state["scheduler"] if ranks.is_controller else None,
                                                              "the lr schedule"))
        self.apply_schedule()


_DS_CPU_USABLE: bool | None = None


def deepspeed_cpu_usable() -> bool:
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
