"""The learner: recompute log-probs and run DAPO policy-gradient updates with torch.

`TorchLearner` implements the `dapo.learner.base.Learner` calls the controller makes
(`compute_log_probs`, `update`, `named_parameters_for_sync`, `state_dict` / `load_state_dict`,
`full_state_dict_for_save` / `load_model_weights`). It holds the DAPO update itself and runs the
model through a `LearnerBackend`: `TorchBackend` here (one process, torch's AdamW), or a
data-parallel one (`dapo.learner.distributed`, `dapo.learner.deepspeed_backend`), which
`DistributedLearner` drives on every rank. The batch it trains on is `dapo.learner.batch`'s
`TrainBatch`; the names of the weights it syncs and saves, `dapo.learner.weights`.

Three policies (the decoupled objective, `dapo.algo.rollout_correction_weights`): the BEHAVIOUR
policy sampled the rows (`TrainBatch.behaviour_log_probs`, the engine's own log-probs, possibly
from older weights: ``weight_versions``); the PROXIMAL policy is the learner's weights at the
start of the training step (`TrainBatch.old_log_probs`, recomputed by `compute_log_probs`); the
PPO ratio is taken against the proximal policy and an importance weight behaviour -> proximal
(truncated or masked, ``spec.algorithm.rolloutCorrection``) multiplies each token's loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Mapping

import torch

from dapo.algo import (PolicyLossConfig, RolloutCorrection, check_policy_loss, compute_policy_loss,
                       entropy_from_logits, log_probs_from_logits, rollout_correction_metrics,
                       rollout_correction_weights)
from dapo.learner.base import LearnerBackend, WeightedStats
from dapo.learner.batch import (TrainBatch, by_length, in_row_order, mini_batch_normalisers, padded_columns,
                                split_rows)
from dapo.learner.weights import check_weight_names, parameter_aliases, persistent_buffers, weight_for
from dapo.model.lora import adapter_parameters, adapter_state, is_lora, load_adapter_state
from dapo.seeding import MINI_BATCH_ORDER, seed_for

# the token-weighted per-micro-batch metrics (the loss and the grad norm are per mini-batch)
METRIC_KEYS = ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/entropy")


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether the model drops activations in training mode: an ``nn.Dropout`` module with p > 0,
    or a config rate > 0 that transformers applies functionally (``attention_dropout``,
    ``hidden_dropout``, GPT-2's ``attn_pdrop``...)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    rates = vars(config).items() if config is not None and hasattr(config, "__dict__") else ()
    return any(("dropout" in key or key.endswith("pdrop")) and isinstance(value, (int, float))
               and not isinstance(value, bool) and value > 0 for key, value in rates)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up then constant: lr_t = lr * min(1, (t + 1) / warmup_steps) for training step
    t = 0, 1, ... (the first step already moves; verl's t / warmup would waste it at lr 0)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with linear warm-up (`warmup_factor`) and global-norm gradient clipping."""

    lr: float
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float = 1.0


class TorchBackend:
    """`LearnerBackend` of one process: the module itself, torch's AdamW and LambdaLR."""

    partitioned_weights = False
    partitioned_optimizer = False

    def __init__(self, model, settings: OptimizerSettings, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.settings = settings
        # a LoRA policy (dapo.model.lora) has a frozen base: only its adapters train and hold AdamW state
        self.lora = is_lora(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas,
                                           weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_factor(step, settings.warmup_steps))

    # -- rows: one process computes all of them
    def shard(self, rows: TrainBatch) -> TrainBatch:
        return rows

    def micro_batches(self, rows: TrainBatch, shard: TrainBatch, micro_batch_rows: int, *,
                      training: bool) -> list[TrainBatch]:
        return split_rows(shard, micro_batch_rows)

    def global_normalisers(self, rows: TrainBatch, shard: TrainBatch) -> tuple[float, float]:
        return mini_batch_normalisers(rows.response_mask)

    def reduce_metrics(self, stats, loss: float):
        return stats, loss

    def gather_rows(self, local: torch.Tensor, num_rows: int) -> torch.Tensor:
        return local

    # -- compute
    def forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs).logits

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        return float(self.clip_and_step())

    def clip_and_step(self) -> torch.Tensor:
        """Clip the global gradient norm and step AdamW; a non-finite norm skips the step.
        Returns the norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:  # a NaN/inf gradient would poison AdamW's moments for the rest of the run
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def advance_schedule(self) -> None:
        self.scheduler.step()

    # -- weights and state
    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter; with LoRA the adapters alone (the engine keeps its copy of the frozen base)."""
        named = adapter_parameters(self.model) if self.lora else self.model.named_parameters()
        for name, param in named:
            yield name, param.detach()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's own tensors, no copy; with LoRA the adapters alone (a checkpoint refers to the base)."""
        return adapter_state(self.model) if self.lora else self.model.state_dict()

    def load_model_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy full weights (LoRA: the saved adapters) into the module in place (the optimizer keeps
        holding the same parameters). ValueError names missing / unexpected tensors."""
        if self.lora:
            load_adapter_state(self.model, state)
            return
        check_weight_names(self.model, state.keys())
        aliases = parameter_aliases(self.model)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(weight_for(name, state, aliases))
            for name, buffer in persistent_buffers(self.model):
                buffer.copy_(state[name])

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.apply_schedule()

    def apply_schedule(self) -> None:
        """Set every group's lr from the schedule (base lr x warm-up at its position). The groups'
        saved lr already equals this on a resume of an unchanged run file; after a guardrail
        rollback or an edited spec.learner.lr changed the schedule's base lr (`with_learning_rate`)
        it is what makes the next update use it."""
        factor = warmup_factor(self.scheduler.last_epoch, self.settings.warmup_steps)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor


BackendFactory = Callable[[torch.nn.Module, OptimizerSettings, torch.device], LearnerBackend]


class TorchLearner:
    """The DAPO update over a `LearnerBackend`: mini-batches, micro-batches with the mini-batch's
    GLOBAL token count as the token-mean normaliser (DAPO's objective; the loss and gradient do
    not depend on micro_batch_rows nor on how many ranks share the rows), the policy loss through
    the `dapo.algo` registry, rollout correction, metrics.

    ``backend`` builds the backend from (model, `OptimizerSettings`, device); the default,
    `TorchBackend`, trains in this process. With a data-parallel backend every rank runs the same
    calls (`DistributedLearner` sees to that) and each computes its shard of the rows."""

    def __init__(
        self,
        model,
        *,
        lr: float,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        grad_clip: float = 1.0,
        mini_batch_rows: int,
        micro_batch_rows: int,
        ppo_epochs: int = 1,
        temperature: float = 1.0,
        device: str | torch.device = "cpu",
        policy_loss: str = "dapo",
        loss_config: PolicyLossConfig = PolicyLossConfig(),
        rollout_correction: RolloutCorrection = RolloutCorrection(),
        shuffle_seed: int | None = None,
        backend: BackendFactory = TorchBackend,
    ):
        self.mini_batch_rows = mini_batch_rows
        self.micro_batch_rows = micro_batch_rows
        self.ppo_epochs = ppo_epochs
        self.policy_loss = policy_loss
        self.loss_config = loss_config  # clip range, aggregation, L_max, the loss's own parameters
        check_policy_loss(policy_loss, self.loss_config)  # an unknown name or parameter fails before any work
        self.correction = rollout_correction
        self.shuffle_seed = shuffle_seed  # None: mini-batches of whole groups in the batch's order
        self.temperature = temperature
        settings = OptimizerSettings(lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                                     grad_clip=grad_clip)
        self.backend: LearnerBackend = backend(model, settings, torch.device(device))
        self.proximal_seconds = 0.0  # the last update's no-grad proximal pass (`proximal_pass_rows`)

    @classmethod
    def from_spec(cls, model, spec, device="cpu", **kwargs) -> "TorchLearner":
        """Build from a `DAPORunSpec`: mini/micro batch sizes in responses (prompts x n); the
        mini-batch is global (all ranks), the micro-batch per process."""
        return cls(model, device=device, **learner_kwargs_from_spec(spec), **kwargs)

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def optimizer(self):
        return self.backend.optimizer

    @property
    def lr(self) -> float:
        return self.backend.lr

    # ------------------------------------------------------------------ forward

    def response_logits(self, mb: TrainBatch) -> torch.Tensor:
        """Temperature-scaled logits predicting each response token: [b, R, V]."""
        width_r = mb.responses.shape[1]
        logits = self.backend.forward(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                      position_ids=mb.position_ids, use_cache=False, logits_to_keep=width_r + 1)
        # the last width_r + 1 positions are P - 1 .. P + R - 1; the final one predicts past the end
        return logits[:, :-1, :] / self.temperature

    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch) -> torch.Tensor:
        """log pi(response tokens) under the current weights, [B, R], micro-batch by micro-batch
        (each rank its shard of the rows, gathered into the whole batch)."""
        shard = self.backend.shard(batch)
        ordered, order = by_length(shard)
        was_training = self.model.training
        self.model.eval()  # no dropout in the behaviour-policy log-probs
        pieces = []
        for mb in self.backend.micro_batches(batch, ordered, self.micro_batch_rows, training=False):
            mb = mb.trimmed().to(self.device)
            log_prob = log_probs_from_logits(self.response_logits(mb), mb.responses).float().cpu()
            pieces.append(padded_columns(log_prob, batch.responses.shape[1]))
        self.model.train(was_training)
        if not pieces:  # a rank with no rows of a tiny batch
            return self.backend.gather_rows(torch.zeros((0, batch.responses.shape[1])), batch.num_rows)
        local = in_row_order(torch.cat(pieces)[: shard.num_rows], order)  # fillers of a padded rank drop off
        return self.backend.gather_rows(local * shard.response_mask, batch.num_rows)

    # ------------------------------------------------------------------ update

    def proximal_pass_rows(self, batch: TrainBatch) -> int:
        """How many rows `update` runs through a separate no-grad forward pass for their proximal
        log-probs (the weights at the start of the step) when ``batch.old_log_probs`` is None.

        The first optimizer step runs at exactly those weights, so its own forward pass gives
        the proximal log-probs (and the rollout-correction weights) of the first mini-batch, kept
        for every later epoch (PPO clips against the step's starting policy in each epoch); only the
        rows after the first mini-batch need the extra pass. One mini-batch needs no pass at all. Exception: a model with active dropout samples a different network
        in its training forward, so then every row goes through the eval-mode pass, as the
        rollout engine's forward does."""
        if batch.old_log_probs is not None:
            return 0
        if has_dropout(self.model):
            return batch.num_rows if (self.ppo_epochs > 1 or batch.num_rows > self.mini_batch_rows
                                      or self.needs_importance_weights(batch)) else 0
        return max(0, batch.num_rows - self.mini_batch_rows)

    def needs_importance_weights(self, batch: TrainBatch) -> bool:
        """Whether importance weights behaviour -> proximal enter the loss (behaviour log-probs
        with the correction on, or any stale row: stale rows are never trained as on-policy)."""
        return batch.behaviour_log_probs is not None and (self.correction.mode != "none"
                                                          or bool(batch.stale_rows().any()))

    def check_update_inputs(self, batch: TrainBatch) -> None:
        if batch.advantages is None:
            raise ValueError("update() needs batch.advantages")
        if batch.behaviour_log_probs is not None and batch.behaviour_log_probs.shape != batch.response_mask.shape:
            raise ValueError(f"batch.behaviour_log_probs has shape {tuple(batch.behaviour_log_probs.shape)}, the "
                             f"responses {tuple(batch.response_mask.shape)}")
        if batch.old_log_probs is not None and batch.old_log_probs.shape != batch.response_mask.shape:
            raise ValueError(f"batch.old_log_probs has shape {tuple(batch.old_log_probs.shape)}, the "
                             f"responses {tuple(batch.response_mask.shape)}")

    def importance_weights(self, proximal: torch.Tensor, rows: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Rollout-correction weights behaviour -> proximal of ``rows`` and the positions they
        truncated or rejected (`dapo.algo.rollout_correction_weights` with the run's correction;
        stale rows always weighted). The one place the learner computes them: for the whole
        batch in `correct_for_rollout`, for the first mini-batch inside its optimizer step."""
        return rollout_correction_weights(proximal.float(), rows.behaviour_log_probs.to(proximal.device),
                                          rows.response_mask.to(proximal.device), self.correction,
                                          rows.stale_rows())

    def correct_for_rollout(self, batch: TrainBatch) -> tuple[TrainBatch, dict[str, float]]:
        """The batch with its rollout-correction weights (`dapo.algo.rollout_correction_weights`,
        from the proximal and behaviour log-probs of the WHOLE batch, so sequence-level weights
        and the metrics see whole rows) and the correction metrics. Without behaviour log-probs
        the weights stay None = 1."""
        if batch.behaviour_log_probs is None or batch.old_log_probs is None:
            return batch, {}
        weights, rejected = self.importance_weights(batch.old_log_probs, batch)
        metrics = rollout_correction_metrics(batch.old_log_probs, batch.behaviour_log_probs, batch.response_mask,
                                             weights, rejected)
        return replace(batch, is_weights=weights.float()), metrics

    def shuffled(self, batch: TrainBatch) -> TrainBatch:
        """The batch's rows in a random order, so each mini-batch holds a random part of every
        group (``spec.learner.shuffle``). The permutation depends only on ``shuffle_seed`` and
        ``batch.policy_version`` (0 when unset): every rank draws the same one, and a resumed run
        repeats it."""
        if self.shuffle_seed is None or batch.num_rows < 2:
            return batch
        generator = torch.Generator().manual_seed(
            seed_for(int(self.shuffle_seed) + MINI_BATCH_ORDER, int(batch.policy_version or 0)))
        return batch.permuted(torch.randperm(batch.num_rows, generator=generator))

    def with_proximal_log_probs(self, batch: TrainBatch) -> tuple[TrainBatch, int]:
        """``batch`` with the proximal log-probs of every row `update` cannot take from its first
        optimizer step's forward pass (`proximal_pass_rows`), and how many leading rows that step
        still has to supply (their entries in ``old_log_probs`` are 0 until it does)."""
        if batch.old_log_probs is not None:
            return batch, 0
        pass_rows = self.proximal_pass_rows(batch)
        if pass_rows == batch.num_rows:
            return replace(batch, old_log_probs=self.compute_log_probs(batch)), 0
        head = batch.num_rows - pass_rows
        if pass_rows == 0 and self.ppo_epochs == 1 and not self.needs_importance_weights(batch):
            # one optimizer step in all, nothing to weigh: its forward is the proximal policy. With
            # more epochs the later ones must clip against these log-probs, so the first step keeps them
            return batch, 0
        tail = self.compute_log_probs(batch.rows(head, batch.num_rows)) if pass_rows else None
        old = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
        if tail is not None:
            old[head:] = tail
        return replace(batch, old_log_probs=old), head

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One training step: the rows `shuffled` (when ``shuffle_seed`` is set), then ppo_epochs x
        (B / mini_batch_rows) optimizer steps; then the lr schedule advances by one training
        step. Needs batch.advantages. Without
        batch.old_log_probs the update takes the proximal log-probs itself (`proximal_pass_rows`:
        the first mini-batch's from its own forward pass, the other rows' from a no-grad pass
        first, its seconds left in ``proximal_seconds``)."""
        self.check_update_inputs(batch)
        batch = self.shuffled(batch)
        t0 = time.perf_counter()
        batch, head = self.with_proximal_log_probs(batch)
        self.proximal_seconds = time.perf_counter() - t0
        correction_metrics: dict[str, float] = {}
        if not head:
            batch, correction_metrics = self.correct_for_rollout(batch)
        lr_now = self.backend.lr
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}

        def add(key: str, value: float, weight: float = 1.0) -> None:
            sums[key] = sums.get(key, 0.0) + value * weight
            weights[key] = weights.get(key, 0.0) + weight

        for _ in range(self.ppo_epochs):
            for start in range(0, batch.num_rows, self.mini_batch_rows):
                mini = batch.rows(start, start + self.mini_batch_rows)
                if head:  # the first optimizer step: its forward pass is the proximal policy of these rows
                    stats, proximal = self.optimizer_step(mini, proximal_from_forward=True)
                    old = batch.old_log_probs.clone()
                    old[:head] = proximal
                    batch, correction_metrics = self.correct_for_rollout(replace(batch, old_log_probs=old))
                    head = 0
                else:
                    stats, _ = self.optimizer_step(mini)
                for key, (value, weight) in stats.items():
                    add(key, value, weight)
        self.backend.advance_schedule()
        metrics = {key: sums[key] / weights[key] if weights[key] else 0.0 for key in sums}
        metrics["actor/lr"] = lr_now
        metrics.update(correction_metrics)
        return metrics

    def optimizer_step(self, mini: TrainBatch, *,
                       proximal_from_forward: bool = False) -> tuple[WeightedStats, torch.Tensor | None]:
        """Accumulate gradients over this rank's micro-batches of one mini-batch and take one
        optimizer step; returns the mini-batch's metrics as (value, weight) pairs and, with
        ``proximal_from_forward``, the mini-batch's proximal log-probs [rows, R] taken from the
        forward pass itself (the weights have not moved yet), whose rollout-correction weights
        this step applies.

        The token-mean normaliser is the whole mini-batch's valid token count (all ranks), so each
        micro loss is a partial sum and the accumulated (rank-summed) gradient equals the
        full-batch gradient."""
        shard = self.backend.shard(mini)
        num_tokens, num_seqs = self.backend.global_normalisers(mini, shard)
        ordered, order = by_length(shard)
        micros = self.backend.micro_batches(mini, ordered, self.micro_batch_rows, training=True)
        if proximal_from_forward:
            micros = [replace(m, old_log_probs=None, is_weights=None) for m in micros]
        self.backend.zero_grad()
        total_loss, stats, pieces = self._accumulate_gradients(micros, num_tokens, num_seqs)
        grad_norm = self.backend.step()
        stats, total_loss = self.backend.reduce_metrics(stats, total_loss)
        stats["actor/pg_loss"] = (total_loss, 1.0)
        stats["actor/grad_norm"] = (grad_norm, 1.0)
        if not proximal_from_forward:
            return stats, None
        local = in_row_order(torch.cat(pieces)[: shard.num_rows], order)  # fillers of a padded rank drop off the end
        return stats, self.backend.gather_rows(local, mini.num_rows)

    def _accumulate_gradients(self, micro_batches: list[TrainBatch], num_tokens: float,
                              num_seqs: float) -> tuple[float, WeightedStats, list[torch.Tensor]]:
        """Forward/backward every micro-batch with the given (global) normalisers; returns the
        summed loss (a partial sum of the mini-batch loss), token-weighted metric means as
        (value, weight) pairs, and each micro-batch's detached log-probs, 0 at padding (the
        proximal log-probs of micro-batches without ``old_log_probs``, which then also get
        their rollout-correction weights here). A micro-batch with no valid tokens adds 0 to loss
        and gradient."""
        total_loss = 0.0
        stats: WeightedStats = {}
        pieces: list[torch.Tensor] = []

        def acc(key: str, value: float, weight: float) -> None:
            old_v, old_w = stats.get(key, (0.0, 0.0))
            stats[key] = ((old_v * old_w + value * weight) / (old_w + weight) if old_w + weight else 0.0, old_w + weight)

        for micro in micro_batches:
            mb = micro.trimmed().to(self.device)
            mb_tokens = float(mb.response_mask.sum())
            logits = self.response_logits(mb)
            log_prob = log_probs_from_logits(logits, mb.responses)
            weights = mb.is_weights
            if mb.old_log_probs is None:  # this forward runs at the step's starting weights: the proximal policy
                # kept as float32 values, like every other row's proximal log-probs (`compute_log_probs`), so
                # this step and the later epochs that reuse them see the same proximal policy
                proximal = log_prob.detach().float()
                old = proximal.to(log_prob.dtype)
                pieces.append(padded_columns((proximal * mb.response_mask).cpu(), micro.responses.shape[1]))
                if self.needs_importance_weights(mb):
                    weights, _ = self.importance_weights(old, mb)
            else:
                old = mb.old_log_probs.to(log_prob.dtype)
            loss, m = compute_policy_loss(self.policy_loss, log_prob, old, mb.advantages, mb.response_mask,
                                          config=self.loss_config, weights=weights,
                                          num_tokens=max(num_tokens, 1.0), num_seqs=max(num_seqs, 1.0))
            self.backend.backward(loss)
            total_loss += float(loss.detach())
            with torch.no_grad():
                entropy = entropy_from_logits(logits.detach())
                ent = float((entropy * mb.response_mask).sum() / max(mb_tokens, 1.0))
            for key in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
                acc(f"actor/{key}", float(m[key]), mb_tokens)
            acc("actor/entropy", ent, mb_tokens)
        return total_loss, stats, pieces

    # ------------------------------------------------------------------ sync / state

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs the rollout engine loads with update_weights."""
        return self.backend.named_parameters_for_sync()

    def full_state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """The model's full weights by name (what ``save_pretrained(state_dict=...)`` writes)."""
        return self.backend.full_state_dict()

    def load_model_weights(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Copy full weights (a checkpoint's safetensors) into the model in place: the optimizer
        keeps holding the same parameters. ValueError names missing / unexpected tensors."""
        self.backend.load_model_weights(state)

    def state_dict(self) -> dict:
        return self.backend.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.backend.load_state_dict(state)


def with_learning_rate(learner_state: dict, lr: float) -> dict:
    """A learner state (`Learner.state_dict()`: every strategy keeps the torch LambdaLR state under
    "scheduler") whose schedule's base learning rate is ``lr``: loading it (`load_state_dict`, on
    every rank) makes the following updates use ``lr`` x warm-up at the saved position."""
    scheduler = dict(learner_state["scheduler"])
    scheduler["base_lrs"] = [float(lr)] * len(scheduler["base_lrs"])
    return {**learner_state, "scheduler": scheduler}


def learner_kwargs_from_spec(spec) -> dict:
    """`TorchLearner`'s keyword arguments from a `DAPORunSpec` (every learner class takes them):
    the mini-batch in responses (prompts x n), the loss and the optimizer settings."""
    ls, alg = spec.learner, spec.algorithm
    corr = alg.rollout_correction
    return dict(lr=ls.lr, weight_decay=ls.weight_decay, warmup_steps=ls.warmup_steps, grad_clip=ls.grad_clip,
                mini_batch_rows=ls.mini_batch_size * spec.rollout.n, micro_batch_rows=ls.micro_batch_size,
                ppo_epochs=ls.ppo_epochs, temperature=spec.rollout.temperature, policy_loss=alg.policy_loss,
                loss_config=PolicyLossConfig.from_spec(spec),
                rollout_correction=RolloutCorrection(mode=corr.mode, level=corr.level, threshold=corr.threshold),
                shuffle_seed=ls.seed if ls.shuffle else None)
