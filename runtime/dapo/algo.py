"""DAPO algorithm core: small pure tensor functions, no distributed plumbing.

Why one module of ~900 lines: it is the whole objective (log-probs, advantages, the policy-loss
registry, rollout correction, overlong shaping, dynamic sampling) read side by side with the
papers' formulas; every function is small, pure and tested alone, and `dapo.spec` reads the
registry names from this file's source (the operator image has no torch).

Formulas follow DAPO (arXiv 2503.14476) and verl's ``core_algos`` semantics; docs/algorithm.md
lists every loss, estimator and correction with its paper. Everything here is device- and
dtype-agnostic (float32 and float64 give the same formula) and never forces a host/device sync
in the loss path.

Global normalisation: DAPO's token-mean divides by the number of valid tokens of the
whole mini-batch (all micro-batches, all data-parallel ranks). The caller counts that
once per mini-batch and passes it as ``num_tokens`` (``num_seqs`` for the sequence
modes); each micro-batch loss is then a partial sum, and summing micro-batch losses
(and their gradients) over micro-batches and ranks gives exactly the full-batch value.
Data-parallel gradient *averaging* over R ranks would divide by R once more: the
caller multiplies the loss by R (or all-reduces with SUM) to undo it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "CORRECTION_LEVELS",
    "CORRECTION_MODES",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "DynamicSamplingResult",
    "PolicyLossConfig",
    "Registry",
    "RolloutCorrection",
    "agg_loss",
    "check_overlong",
    "compute_policy_loss",
    "dr_grpo_advantages",
    "dynamic_sampling_filter",
    "entropy_from_logits",
    "group_advantages",
    "log_probs_from_logits",
    "masked_mean",
    "masked_sum",
    "overlong_filter_mask",
    "overlong_penalty",
    "policy_loss",
    "register_advantage_estimator",
    "register_policy_loss",
    "rloo_advantages",
    "rollout_correction_metrics",
    "rollout_correction_weights",
]

# Bound on |log pi_new - log pi_old| before exp: exp(20) ~ 4.9e8 stays finite in
# float16/bfloat16 ranges and in float32 after multiplying by an advantage.
LOG_RATIO_CLAMP = 20.0

Normaliser = Union[int, float, torch.Tensor, None]


# --------------------------------------------------------------------------- masks


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Valid positions as a bool tensor: any non-zero entry counts as valid."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_{i: mask_i} x_i (over ``dim``, or everything when ``dim`` is None).

    Masked-out entries are *selected away* (``where``), not multiplied by 0, so a NaN or
    inf in a padded position cannot leak into the sum or its gradient.
    """
    selected = torch.where(_as_bool_mask(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_{mask} x / max(count(mask), 1): 0 (not NaN) when nothing is valid."""
    bool_mask = _as_bool_mask(mask)
    count = bool_mask.sum() if dim is None else bool_mask.sum(dim=dim)
    return masked_sum(x, bool_mask, dim) / count.clamp_min(1).to(x.dtype)


# ------------------------------------------------------------------ aggregation


def _check_normaliser(given: Normaliser, name: str) -> None:
    """A global normaliser is None, a finite count >= 0, or a one-element tensor."""
    if given is None:
        return
    if isinstance(given, (int, float)) and not isinstance(given, bool):
        if not math.isfinite(given) or given < 0:
            raise ValueError(
                f"{name} must be a finite count >= 0 (the global number over the whole "
                f"mini-batch, across micro-batches and ranks) or None, got {given!r}"
            )
    elif not isinstance(given, torch.Tensor):
        raise TypeError(f"{name} must be an int, float, one-element tensor or None, got {type(given).__name__}")
    elif given.numel() != 1:
        raise ValueError(f"{name} must be a scalar count, got a tensor of shape {tuple(given.shape)}")


def _normaliser(given: Normaliser, local_count: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The denominator as a 0-d tensor of ``like``'s dtype/device, clamped to >= 1.

    ``given`` None means the local batch is the whole batch (use ``local_count``).
    Clamping to 1 makes an all-empty batch give loss 0 with zero gradient. A tensor
    normaliser is not inspected on the host, so no device sync happens here.
    """
    denom = local_count if given is None else torch.as_tensor(given, device=like.device).reshape(())
    return denom.to(dtype=like.dtype, device=like.device).clamp_min(1)


def _agg_token_mean(loss_mat, mask, num_tokens, num_seqs):
    """token-mean: sum_{i,t} m_it l_it / N_tokens (DAPO's token-level loss)."""
    return masked_sum(loss_mat, mask) / _normaliser(num_tokens, mask.sum(), loss_mat)


def _agg_seq_mean_token_sum(loss_mat, mask, num_tokens, num_seqs):
    """seq-mean-token-sum: sum_i (sum_t m_it l_it) / N_seqs over non-empty responses."""
    non_empty = mask.any(dim=-1)
    seq_sums = masked_sum(loss_mat, mask, dim=-1)
    return masked_sum(seq_sums, non_empty) / _normaliser(num_seqs, non_empty.sum(), loss_mat)


def _agg_seq_mean_token_mean(loss_mat, mask, num_tokens, num_seqs):
    """seq-mean-token-mean: sum_i (sum_t m_it l_it / sum_t m_it) / N_seqs over non-empty responses."""
    non_empty = mask.any(dim=-1)
    seq_means = masked_mean(loss_mat, mask, dim=-1)
    return masked_sum(seq_means, non_empty) / _normaliser(num_seqs, non_empty.sum(), loss_mat)


AggFn = Callable[[torch.Tensor, torch.Tensor, Normaliser, Normaliser], torch.Tensor]

#: Loss aggregation modes by name (verl's names). Each takes (loss_mat, bool_mask, num_tokens, num_seqs).
LOSS_AGG_MODES: dict[str, AggFn] = {
    "token-mean": _agg_token_mean,
    "seq-mean-token-sum": _agg_seq_mean_token_sum,
    "seq-mean-token-mean": _agg_seq_mean_token_mean,
}


def _check_agg_mode(mode: str) -> AggFn:
    try:
        return LOSS_AGG_MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(
            f"loss_agg_mode {mode!r} is not supported; use one of {sorted(LOSS_AGG_MODES)} "
            f"(DAPO uses 'token-mean')"
        ) from None


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
) -> torch.Tensor:
    """Aggregate a [batch, response_len] loss matrix into a scalar.

    token-mean:          sum_{i,t} m_it l_it / N_tok
    seq-mean-token-sum:  sum_{i non-empty} sum_t m_it l_it / N_seq
    seq-mean-token-mean: sum_{i non-empty} (sum_t m_it l_it / sum_t m_it) / N_seq

    ``num_tokens`` (token-mean) / ``num_seqs`` (seq modes) are the global normalisers
    N_tok / N_seq of the whole mini-batch across micro-batches and ranks; None means the
    local count. The unused one is ignored. With zero valid tokens the result is 0.
    """
    agg = _check_agg_mode(mode)
    _check_normaliser(num_tokens, "num_tokens")
    _check_normaliser(num_seqs, "num_seqs")
    if loss_mat.dim() != 2 or mask.shape != loss_mat.shape:
        raise ValueError(
            f"agg_loss expects loss_mat and mask of the same shape [batch, response_len], got "
            f"{tuple(loss_mat.shape)} and {tuple(mask.shape)}"
        )
    return agg(loss_mat, _as_bool_mask(mask), num_tokens, num_seqs)


# --------------------------------------------------------------------- registries


class Registry(dict):
    """Name -> function, filled by a decorator (``@register_policy_loss("gspo")``); the code
    dispatches through it and the run file's allowed values are its keys (``dapo.spec`` reads
    the decorator calls from the source of this file and of the `dapo.plugins` algorithm modules,
    so the spec, the CRD enum and ``dapo crd`` never list a name that is not registered)."""

    def __init__(self, kind: str, spec_field: str):
        super().__init__()
        self.kind = kind
        self.spec_field = spec_field
        self.meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable], Callable]:
        def decorate(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name].__name__} and {fn.__name__})")
            self[name] = fn
            self.meta[name] = dict(meta)
            return fn

        return decorate

    def resolve(self, name: str) -> Callable:
        """The function registered as ``name`` (importing the `dapo.plugins` algorithm modules
        first when it is not registered yet); ValueError lists the registered names."""
        if name not in self:
            from dapo.plugins import load_algorithm_modules

            load_algorithm_modules()
        try:
            return self[name]
        except (KeyError, TypeError):
            raise ValueError(f"{self.spec_field}: unknown {self.kind} {name!r}; registered: "
                             f"{', '.join(sorted(self))}") from None


#: Policy losses by name: fn(log_prob, old_log_prob, advantages, mask, config, **params) -> (loss_mat, metrics).
POLICY_LOSSES = Registry("policy loss", "spec.algorithm.policyLoss")
#: Advantage estimators by name: fn(scores, group_ids, eps=1e-6) -> 1-D advantages.
ADVANTAGE_ESTIMATORS = Registry("advantage estimator", "spec.algorithm.advantageEstimator")


def register_policy_loss(name: str, *, aggregation: str | None = None) -> Callable[[Callable], Callable]:
    """Register a policy loss under ``name`` (the value of ``spec.algorithm.policyLoss``).

    How to add a loss -- one function plus this decorator, in this file or in a module of your
    own package named in the ``dapo.algorithms`` entry-point group (dapo.plugins), nothing else:

        @register_policy_loss("my-loss", aggregation="token-mean")
        def my_loss(log_prob, old_log_prob, advantages, mask, config, *, my_param: float = 0.5):
            \"\"\"Cite the paper's formula here.\"\"\"
            ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
            loss_mat = -advantages * ratio * my_param
            return loss_mat, {"ppo_kl": masked_mean(old_log_prob - log_prob, mask).detach()}

    The function returns the PER-TOKEN loss matrix [B, T] (to minimise) and detached metrics
    (any of ``pg_clipfrac``, ``pg_clipfrac_lower``, ``ppo_kl``; masked means over ``mask``).
    Everything else is done once for every loss by :func:`compute_policy_loss`: the rollout
    importance weights are multiplied into the matrix and it is aggregated with the global
    normalisers (token-mean across micro-batches and ranks). ``advantages`` arrive [B, 1] or
    [B, T]; ``mask`` is bool; ``config`` is a :class:`PolicyLossConfig`. Keyword-only
    parameters with defaults are the loss's own hyperparameters, set from the run file with
    ``spec.algorithm.policyLossParams``. ``aggregation`` fixes the loss's normalisation (one of
    ``LOSS_AGG_MODES``) when the paper defines it; None uses ``spec.algorithm.lossAggMode``.
    The name must be a string literal and the decorator applied at the module's top level: the
    run-file spec reads both (and the keyword-only parameters) from the source, without importing
    torch. Then regenerate the CRD (``dapo crd > crds/daporun.yaml``): it lists the new name.
    """
    if aggregation is not None and aggregation not in LOSS_AGG_MODES:
        raise ValueError(f"aggregation {aggregation!r} of policy loss {name!r} is not one of {sorted(LOSS_AGG_MODES)}")
    return POLICY_LOSSES.register(name, aggregation=aggregation)


def register_advantage_estimator(name: str) -> Callable[[Callable], Callable]:
    """Register ``fn(scores, group_ids, eps=1e-6) -> advantages`` as ``spec.algorithm.advantageEstimator`` ``name``."""
    return ADVANTAGE_ESTIMATORS.register(name)


# ------------------------------------------------------------------ policy loss


def _check_clip_args(eps_low: float, eps_high: float, clip_ratio_c: float) -> None:
    if not 0 < eps_low < 1:
        raise ValueError(f"eps_low must be in (0, 1) so that 1 - eps_low > 0, got {eps_low!r} (DAPO: 0.2)")
    if not eps_high > 0:
        raise ValueError(f"eps_high must be > 0, got {eps_high!r} (DAPO clip-higher: 0.28)")
    if not clip_ratio_c > 1:
        raise ValueError(f"clip_ratio_c must be > 1 (the dual-clip bound on -A*r for A < 0), got {clip_ratio_c!r} (DAPO: 10)")


def _broadcast_advantages(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Accept [B], [B, 1] or [B, T] advantages; return a tensor broadcastable to [B, T]."""
    batch, length = shape
    if advantages.dim() == 1 and advantages.shape[0] == batch:
        return advantages.unsqueeze(-1)
    if advantages.dim() == 2 and advantages.shape[0] == batch and advantages.shape[1] in (1, length):
        return advantages
    raise ValueError(
        f"advantages must have shape [{batch}], [{batch}, 1] or [{batch}, {length}] to match "
        f"log_prob {tuple(shape)}, got {tuple(advantages.shape)}"
    )


@dataclass(frozen=True)
class PolicyLossConfig:
    """The run file's settings every policy loss may read (spec.algorithm and spec.rollout).

    ``max_response_length`` is L_max, Dr. GRPO's constant normaliser; ``params`` are the
    selected loss's own hyperparameters (``spec.algorithm.policyLossParams``)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_ratio_c: float = 10.0
    loss_agg_mode: str = "token-mean"
    max_response_length: int | None = None
    params: dict = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec) -> "PolicyLossConfig":
        """The config a run file (a `dapo.spec.DAPORunSpec`) asks for: spec.algorithm's clip range,
        aggregation and policyLossParams, spec.rollout.maxResponseLength."""
        alg = spec.algorithm
        return cls(eps_low=alg.eps_low, eps_high=alg.eps_high, clip_ratio_c=alg.clip_ratio_c,
                   loss_agg_mode=alg.loss_agg_mode, max_response_length=spec.rollout.max_response_length,
                   params=dict(alg.policy_loss_params))


def check_policy_loss(name: str, config: PolicyLossConfig) -> Callable:
    """The registered loss ``name`` after checking ``config`` against it (clip range, the
    aggregation mode, its own parameters); ValueError names the run-file field to fix."""
    fn = POLICY_LOSSES.resolve(name)
    _check_clip_args(config.eps_low, config.eps_high, config.clip_ratio_c)
    _check_agg_mode(config.loss_agg_mode)
    accepted = {p.name: p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(config.params) - set(accepted))
    if unknown:
        raise ValueError(f"spec.algorithm.policyLossParams: policy loss {name!r} has no parameter(s) {unknown}; "
                         f"it accepts {sorted(accepted) or 'none'}")
    return fn


def compute_policy_loss(
    name: str,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: PolicyLossConfig = PolicyLossConfig(),
    weights: torch.Tensor | None = None,
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss of the registered policy loss ``name``, the way every loss is finished:

        L = agg( w_it * l_it )     l = the loss's per-token matrix, w = rollout importance weights

    ``weights`` [B, T] (None = 1) come from :func:`rollout_correction_weights`; they are
    constants (no gradient). ``agg`` is the loss's registered aggregation, or
    ``config.loss_agg_mode``, with the global normalisers ``num_tokens`` / ``num_seqs`` of the
    whole mini-batch (see :func:`agg_loss`), so micro-batch and rank splits sum to the full
    batch for every loss. ``old_log_prob`` is the proximal policy's (the weights at the start of
    the training step).
    """
    fn = check_policy_loss(name, config)
    _check_normaliser(num_tokens, "num_tokens")
    _check_normaliser(num_seqs, "num_seqs")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be [batch, response_len], got shape {tuple(log_prob.shape)}")
    for label, tensor in (("old_log_prob", old_log_prob), ("response_mask", response_mask), ("weights", weights)):
        if tensor is not None and tensor.shape != log_prob.shape:
            raise ValueError(f"{label} must have log_prob's shape {tuple(log_prob.shape)}, got {tuple(tensor.shape)}")
    adv = _broadcast_advantages(advantages, log_prob.shape).to(log_prob.dtype)
    mask = _as_bool_mask(response_mask)
    loss_mat, metrics = fn(log_prob, old_log_prob.to(log_prob.dtype), adv, mask, config, **config.params)
    if weights is not None:
        loss_mat = loss_mat * weights.detach().to(loss_mat.dtype)
    mode = POLICY_LOSSES.meta[name].get("aggregation") or config.loss_agg_mode
    return LOSS_AGG_MODES[mode](loss_mat, mask, num_tokens, num_seqs), metrics


def _clipped_surrogate(log_prob, old_log_prob, adv, mask, eps_low, eps_high, clip_ratio_c):
    """PPO clipped surrogate with decoupled clip and dual clip, per token (DAPO eq. 8 + dual clip):

        d = clamp(logp - logp_old, -20, 20), r = exp(d)
        l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  l = min(l, -A c) where A < 0
    """
    log_ratio = torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual_bound = -adv * clip_ratio_c
    negative_adv = adv < 0
    loss_mat = torch.where(negative_adv, torch.minimum(loss_ppo, loss_dual_bound), loss_ppo)
    with torch.no_grad():
        # Counting bool masks (no float copies, no where) keeps the metrics cheap next to the loss.
        valid_count = torch.count_nonzero(mask).clamp_min(1).to(log_prob.dtype)
        clipped = torch.count_nonzero((loss_clipped > loss_unclipped) & mask)
        clipped_lower = torch.count_nonzero((loss_ppo > loss_dual_bound) & negative_adv & mask)
        metrics = {
            "pg_clipfrac": clipped.to(log_prob.dtype) / valid_count,
            "pg_clipfrac_lower": clipped_lower.to(log_prob.dtype) / valid_count,
            "ppo_kl": -masked_sum(log_ratio, mask) / valid_count,
        }
    return loss_mat, metrics


@register_policy_loss("dapo")
def dapo_loss(log_prob, old_log_prob, advantages, mask, config):
    """DAPO (arXiv 2503.14476, eq. 8): clip-higher PPO surrogate, aggregated token-mean by default.

        l_it = max(-A_i r_it, -A_i clip(r_it, 1 - eps_low, 1 + eps_high)),  r_it = pi/pi_old
        (plus the dual clip min(l, -A c) for A < 0; eps_low 0.2, eps_high 0.28, c 10)
        L = sum_{i,t} l_it / sum_i |o_i|                       (spec.algorithm.lossAggMode)
    """
    return _clipped_surrogate(log_prob, old_log_prob, advantages, mask, config.eps_low, config.eps_high,
                              config.clip_ratio_c)


@register_policy_loss("grpo", aggregation="seq-mean-token-mean")
def grpo_loss(log_prob, old_log_prob, advantages, mask, config):
    """GRPO (DeepSeekMath, arXiv 2402.03300, eq. 3, without the KL term as in DAPO):

        L = 1/G sum_i 1/|o_i| sum_t max(-A_i r_it, -A_i clip(r_it, 1 - eps, 1 + eps))

    The per-sequence mean is the defining difference from DAPO's token-mean. The clip range is
    the run file's (epsLow / epsHigh / clipRatioC); the paper's symmetric eps = 0.2 is
    epsHigh: 0.2."""
    return _clipped_surrogate(log_prob, old_log_prob, advantages, mask, config.eps_low, config.eps_high,
                              config.clip_ratio_c)


@register_policy_loss("dr-grpo", aggregation="seq-mean-token-sum")
def dr_grpo_loss(log_prob, old_log_prob, advantages, mask, config):
    """Dr. GRPO (Liu et al., "Understanding R1-Zero-Like Training", arXiv 2503.20783, eq. 3):
    no 1/|o_i| length normalisation; every token's clipped surrogate is divided by the same
    constant L_max (spec.rollout.maxResponseLength) and summed:

        L = 1/G sum_i sum_t l_it / L_max

    (with the seq-mean-token-sum aggregation over G = the mini-batch's non-empty responses).
    Pair it with advantageEstimator dr-grpo (no std normalisation)."""
    if not config.max_response_length or config.max_response_length < 1:
        raise ValueError("policy loss dr-grpo needs max_response_length (spec.rollout.maxResponseLength), its "
                         "constant normaliser L_max")
    loss_mat, metrics = _clipped_surrogate(log_prob, old_log_prob, advantages, mask, config.eps_low, config.eps_high,
                                           config.clip_ratio_c)
    return loss_mat / float(config.max_response_length), metrics


@register_policy_loss("gspo", aggregation="seq-mean-token-mean")
def gspo_loss(log_prob, old_log_prob, advantages, mask, config, *, eps_low: float = 3e-4, eps_high: float = 4e-4):
    """GSPO-token (Zheng et al., arXiv 2507.18071, eqs. 5-7 and 12-13): one length-normalised
    SEQUENCE ratio, clipped with GSPO's own small range (paper: 3e-4 / 4e-4):

        s_i   = exp( 1/|o_i| sum_t (log pi(o_it) - log pi_old(o_it)) )
        s_it  = sg[s_i] * pi(o_it) / sg[pi(o_it)]          (value s_i, gradient of log pi(o_it))
        L     = 1/G sum_i 1/|o_i| sum_t max(-A_i s_it, -A_i clip(s_it, 1 - eps_low, 1 + eps_high))

    ``eps_low`` / ``eps_high`` are set with spec.algorithm.policyLossParams (the run file's
    epsLow / epsHigh are token-ratio ranges, three orders of magnitude wider)."""
    if not (0 < eps_low < 1 and eps_high > 0):
        raise ValueError(f"spec.algorithm.policyLossParams: gspo needs 0 < eps_low < 1 and eps_high > 0, got "
                         f"{eps_low!r} / {eps_high!r} (paper: 3e-4 / 4e-4)")
    token_log_ratio = torch.where(mask, log_prob - old_log_prob, torch.zeros((), dtype=log_prob.dtype,
                                                                                device=log_prob.device))
    lengths = mask.sum(dim=-1, keepdim=True).clamp_min(1).to(log_prob.dtype)
    seq_log_ratio = torch.clamp(token_log_ratio.sum(dim=-1, keepdim=True) / lengths, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # sg[log s_i] + log pi - sg[log pi], summed in this order so that the value stays s_i exactly
    log_token_ratio = log_prob - log_prob.detach() + seq_log_ratio.detach()
    ratio = torch.exp(torch.clamp(log_token_ratio, max=LOG_RATIO_CLAMP))
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    with torch.no_grad():
        valid = torch.count_nonzero(mask).clamp_min(1).to(log_prob.dtype)
        metrics = {
            "pg_clipfrac": torch.count_nonzero((loss_clipped > loss_unclipped) & mask).to(log_prob.dtype) / valid,
            "pg_clipfrac_lower": torch.zeros((), dtype=log_prob.dtype, device=log_prob.device),
            "ppo_kl": -masked_sum(token_log_ratio, mask) / valid,
        }
    return loss_mat, metrics


@register_policy_loss("cispo", aggregation="token-mean")
def cispo_loss(log_prob, old_log_prob, advantages, mask, config):
    """CISPO (MiniMax-M1, arXiv 2506.13585, eqs. 4-5): clip the importance-sampling WEIGHT under a
    stop-gradient instead of the surrogate, so every token keeps its gradient:

        r_hat_it = clip(r_it, 1 - eps_low, 1 + eps_high)
        L = - 1/sum_i |o_i| sum_{i,t} sg[r_hat_it] A_i log pi(o_it)

    (token-mean over all tokens of the batch, as the paper normalises). eps_low / eps_high are
    the run file's epsLow / epsHigh (the paper leaves the lower bound effectively open: set
    epsLow close to 1 for that)."""
    log_ratio = torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio.detach())
    clipped_ratio = torch.clamp(ratio, 1.0 - config.eps_low, 1.0 + config.eps_high)
    loss_mat = -clipped_ratio * advantages * log_prob
    with torch.no_grad():
        valid = torch.count_nonzero(mask).clamp_min(1).to(log_prob.dtype)
        metrics = {
            "pg_clipfrac": torch.count_nonzero((ratio > 1.0 + config.eps_high) & mask).to(log_prob.dtype) / valid,
            "pg_clipfrac_lower": torch.count_nonzero((ratio < 1.0 - config.eps_low) & mask).to(log_prob.dtype) / valid,
            "ppo_kl": -masked_sum(log_ratio, mask) / valid,
        }
    return loss_mat, metrics


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_ratio_c: float = 10.0,
    loss_agg_mode: str = "token-mean",
    num_tokens: Normaliser = None,
    num_seqs: Normaliser = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO clipped policy-gradient loss with clip-higher and dual clip (the ``dapo`` entry of
    :data:`POLICY_LOSSES`, no importance weights).

    Per token, with d = clamp(logp - logp_old, -20, 20), r = exp(d):

        l1 = -A r
        l2 = -A clip(r, 1 - eps_low, 1 + eps_high)
        l  = max(l1, l2)
        l  = min(l, -A c)    where A < 0   (dual clip, c = clip_ratio_c)

    aggregated by :func:`agg_loss` (``loss_agg_mode``, global ``num_tokens`` / ``num_seqs``).

    Metrics (detached 0-d tensors, masked means over the *local* valid tokens):
    ``pg_clipfrac`` = mean(l2 > l1), ``pg_clipfrac_lower`` = mean(max(l1, l2) > -A c and A < 0),
    ``ppo_kl`` = mean(-d).

    Args:
        log_prob, old_log_prob: [batch, response_len] log-probabilities of the sampled tokens
            under the current and the behaviour (old) policy.
        advantages: [batch], [batch, 1] or [batch, response_len].
        response_mask: [batch, response_len], bool or 0/1: which positions are real tokens.
    """
    _check_clip_args(eps_low, eps_high, clip_ratio_c)
    _check_agg_mode(loss_agg_mode)
    config = PolicyLossConfig(eps_low=eps_low, eps_high=eps_high, clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode)
    return compute_policy_loss("dapo", log_prob, old_log_prob, advantages, response_mask, config=config,
                               num_tokens=num_tokens, num_seqs=num_seqs)


# ------------------------------------------------------------ rollout correction

#: spec.algorithm.rolloutCorrection.mode / .level values.
CORRECTION_MODES = ("none", "truncate", "mask")
CORRECTION_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class RolloutCorrection:
    """spec.algorithm.rolloutCorrection: how the behaviour policy (the engine that sampled) is
    corrected towards the proximal policy (the learner's weights at the start of the step)."""

    mode: str = "truncate"
    level: str = "token"
    threshold: float = 2.0

    def __post_init__(self):
        if self.mode not in CORRECTION_MODES:
            raise ValueError(f"spec.algorithm.rolloutCorrection.mode {self.mode!r}: use one of {CORRECTION_MODES}")
        if self.level not in CORRECTION_LEVELS:
            raise ValueError(f"spec.algorithm.rolloutCorrection.level {self.level!r}: use one of {CORRECTION_LEVELS}")
        if not (math.isfinite(self.threshold) and self.threshold > 1):
            raise ValueError(f"spec.algorithm.rolloutCorrection.threshold must be a finite number > 1, got "
                             f"{self.threshold!r} (2.0 is the usual cap)")


def _log_importance_ratio(proximal_log_prob, behaviour_log_prob, mask, level):
    """log rho at ``level`` over valid tokens (0 elsewhere), clamped to [-20, 20]:

        token:    log rho_it = log pi_prox(o_it) - log pi_behav(o_it)
        sequence: log rho_i  = sum_t log rho_it   (the product of token ratios, kept in log space
                  so a long response cannot overflow; broadcast to every token of the row)
    """
    zero = torch.zeros((), dtype=proximal_log_prob.dtype, device=proximal_log_prob.device)
    token = torch.where(mask, proximal_log_prob - behaviour_log_prob.to(proximal_log_prob.dtype), zero)
    if level == "sequence":
        token = torch.where(mask, token.sum(dim=-1, keepdim=True).expand_as(token), zero)
    return torch.clamp(token, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


@torch.no_grad()
def rollout_correction_weights(
    proximal_log_prob: torch.Tensor,
    behaviour_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    correction: RolloutCorrection = RolloutCorrection(),
    stale_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights behaviour -> proximal of the decoupled objective (Hilton et al.,
    "Batch size-invariance for policy optimization", arXiv 2110.00641, eq. 4; truncated IS as in
    Yao et al. "Your efficient RL framework secretly brings you off-policy RL training" (TIS)):

        J = E_{o ~ pi_behav} [ w(o) * clipped_surrogate(pi_theta / pi_prox, A) ]
        rho = pi_prox / pi_behav     per token, or per sequence (prod_t rho_t = exp(sum_t log rho_t))
        truncate: w = min(rho, C)
        mask:     w = rho if 1/C <= rho <= C else 0      (the sample/token is rejected)
        none:     w = 1, EXCEPT rows in ``stale_rows`` (sampled by older weights), which get the
                  truncated weight: a stale row is never trained as if it were on-policy.

    C = ``correction.threshold``. Both log-prob inputs are constants: the weights carry no
    gradient. Returns (weights [B, T], 0 at invalid positions; rejected [B, T] bool: valid
    positions whose weight was truncated (truncate) or zeroed (mask)).
    """
    mask = _as_bool_mask(response_mask)
    log_rho = _log_importance_ratio(proximal_log_prob, behaviour_log_prob, mask, correction.level)
    log_cap = math.log(correction.threshold)
    zero = torch.zeros((), dtype=log_rho.dtype, device=log_rho.device)
    truncated_w = torch.exp(torch.clamp(log_rho, max=log_cap))
    if correction.mode == "mask":
        keep = (log_rho <= log_cap) & (log_rho >= -log_cap)
        weights, rejected = torch.where(keep, torch.exp(log_rho), zero), ~keep
    else:
        weights, rejected = truncated_w, log_rho > log_cap
        if correction.mode == "none":
            stale = (torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device) if stale_rows is None
                     else _as_bool_mask(stale_rows).to(mask.device))
            weights = torch.where(stale[:, None], truncated_w, torch.ones_like(truncated_w))
            rejected = rejected & stale[:, None]
    return torch.where(mask, weights, zero), rejected & mask


@torch.no_grad()
def rollout_correction_metrics(
    proximal_log_prob: torch.Tensor,
    behaviour_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor,
    rejected: torch.Tensor,
) -> dict[str, float]:
    """Per-step diagnostics over the valid tokens of the whole batch (verl's names where they exist):

        training/rollout_probs_diff_{mean,max,std}  |pi_prox(o_t) - pi_behav(o_t)|  (probabilities; std with n - 1)
        rollout_corr/log_ratio_mean                  mean of log pi_prox - log pi_behav
        rollout_corr/is_weight_{mean,max,min}        the weights actually multiplied in
        rollout_corr/rejected_frac                   share of tokens truncated (truncate) / zeroed (mask)
    """
    mask = _as_bool_mask(response_mask)
    count = int(mask.sum())
    if count == 0:
        return {}
    prox = proximal_log_prob.double()[mask]
    behav = behaviour_log_prob.double()[mask]
    diff = (prox.exp() - behav.exp()).abs()
    w = weights.double()[mask]
    return {
        "training/rollout_probs_diff_mean": float(diff.mean()),
        "training/rollout_probs_diff_max": float(diff.max()),
        # verl's definition: torch.std, the sample standard deviation (n - 1); 0 for a single token
        "training/rollout_probs_diff_std": float(diff.std()) if count > 1 else 0.0,
        "rollout_corr/log_ratio_mean": float((prox - behav).mean()),
        "rollout_corr/is_weight_mean": float(w.mean()),
        "rollout_corr/is_weight_max": float(w.max()),
        "rollout_corr/is_weight_min": float(w.min()),
        "rollout_corr/rejected_frac": float(rejected[mask].double().mean()),
    }


# ------------------------------------------------------------------- advantages


def _group_index(group_ids: Sequence[Hashable] | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, list]:
    """Dense group index per sample (0..G-1, first-seen order) and the distinct ids in that order."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
        uniques, inverse = torch.unique(group_ids, sorted=True, return_inverse=True)
        # torch.unique sorts; renumber to first-seen order so reports are stable and intuitive.
        first_pos = torch.full((uniques.numel(),), inverse.numel(), dtype=torch.long, device=inverse.device)
        first_pos.scatter_reduce_(0, inverse, torch.arange(inverse.numel(), device=inverse.device), "amin")
        order = torch.argsort(first_pos)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        return rank[inverse].to(device), uniques[order].tolist()
    index_of: dict[Hashable, int] = {}
    dense = [index_of.setdefault(gid, len(index_of)) for gid in group_ids]
    return torch.tensor(dense, dtype=torch.long, device=device), list(index_of)


def _check_advantage_inputs(scores, group_ids, eps):
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    if len(group_ids) != scores.shape[0]:
        raise ValueError(f"group_ids has {len(group_ids)} entries but scores has {scores.shape[0]}; give one group id per score")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return scores if scores.is_floating_point() else scores.to(torch.get_default_dtype())


def _group_stats(values: torch.Tensor, group_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: (dense group index, group size n_g, group sum, group unbiased std with n_g - 1).

    Vectorised with index_add; the variance is two-pass (sum of squared deviations), stable
    where E[x^2] - E[x]^2 is not. A group of one gets std 0 here (callers decide its convention)."""
    index, distinct = _group_index(group_ids, values.device)
    num_groups = len(distinct)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, torch.ones_like(values))
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    deviations = values - (sums / counts)[index]
    sq_dev = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, deviations * deviations)
    stds = torch.sqrt(sq_dev / (counts - 1).clamp_min(1))
    return index, counts[index], sums[index], stds[index]


@register_advantage_estimator("grpo")
def group_advantages(scores: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantages (DeepSeekMath, arXiv 2402.03300, sec. 4.1.2): A_i = (R_i - mean_g) / (std_g + eps).

    mean_g and std_g are over the responses of sample i's group g (same prompt);
    std is unbiased (Bessel, divide by n_g - 1). A group of one gets mean 0 and std 1,
    so A_i = R_i / (1 + eps) (verl's convention). A group whose scores are all equal
    gets A = 0. Vectorised with index_add (no Python loop over samples beyond mapping
    hashable ids to dense indices).

    Args:
        scores: 1-D tensor of sequence-level rewards R_i.
        group_ids: a sequence of hashables (or a 1-D integer tensor), one per score.
    Returns:
        1-D advantages of ``scores``' floating dtype (the default dtype for integer scores).
    """
    values = _check_advantage_inputs(scores, group_ids, eps)
    if values.numel() == 0:
        return values.clone()
    _, counts, sums, stds = _group_stats(values, group_ids)
    singleton = counts == 1
    means = torch.where(singleton, torch.zeros_like(sums), sums / counts)
    stds = torch.where(singleton, torch.ones_like(stds), stds)
    return (values - means) / (stds + eps)


@register_advantage_estimator("dr-grpo")
def dr_grpo_advantages(scores: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO advantages (arXiv 2503.20783, eq. 3): A_i = R_i - mean_g, no division by std_g
    (the std removes the question-difficulty bias the paper describes). A group of one gets
    mean 0 (A_i = R_i), as in ``grpo``. ``eps`` is accepted for a common signature and unused."""
    values = _check_advantage_inputs(scores, group_ids, eps)
    if values.numel() == 0:
        return values.clone()
    _, counts, sums, _ = _group_stats(values, group_ids)
    return values - torch.where(counts == 1, torch.zeros_like(sums), sums / counts)


@register_advantage_estimator("rloo")
def rloo_advantages(scores: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al., arXiv 2402.14740, eq. 6; Kool et al. 2019):

        A_i = R_i - 1/(n_g - 1) sum_{j in g, j != i} R_j  =  n_g / (n_g - 1) (R_i - mean_g)

    A group of one has no other sample: baseline 0, A_i = R_i. ``eps`` is unused."""
    values = _check_advantage_inputs(scores, group_ids, eps)
    if values.numel() == 0:
        return values.clone()
    _, counts, sums, _ = _group_stats(values, group_ids)
    others = (sums - values) / (counts - 1).clamp_min(1)
    return values - torch.where(counts == 1, torch.zeros_like(others), others)


# --------------------------------------------------------------------- overlong


def check_overlong(max_response_length, buffer_length, factor: float = 1.0) -> None:
    """ValueError unless L_max > 0, 0 < L_cache <= L_max and the factor is finite and >= 0: the
    one check of the soft overlong punishment's settings (the reward side's shaping uses it too)."""
    if max_response_length is None or buffer_length is None:
        raise ValueError("overlong shaping is enabled: give max_response_length and buffer_length "
                         "(spec.rollout.maxResponseLength, spec.algorithm.overlong.bufferLength), or turn it off "
                         "(spec.algorithm.overlong.enabled: false)")
    if not max_response_length > 0:
        raise ValueError(f"max_response_length (spec.rollout.maxResponseLength) must be > 0, got {max_response_length!r}")
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(
            f"overlong buffer_length (spec.algorithm.overlong.bufferLength) must be in (0, max_response_length="
            f"{max_response_length}], got {buffer_length!r}; to turn soft overlong punishment off, disable it "
            "instead of setting 0"
        )
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"overlong penalty factor (spec.algorithm.overlong.penaltyFactor) must be a finite number "
                         f">= 0, got {factor!r}")


def overlong_penalty(
    lengths: torch.Tensor, max_response_length: int, buffer_length: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment (added to the correctness reward).

    With L_max = max_response_length and L_cache = buffer_length:

        penalty(len) = 0                                   if len <= L_max - L_cache
                     = ((L_max - L_cache) - len) / L_cache if L_max - L_cache < len <= L_max
                     = -1                                  if len > L_max
        times ``factor``.

    Returns a 1-D float tensor (<= 0 for factor >= 0) of ``lengths``' float dtype
    (the default dtype for integer lengths).
    """
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        raise ValueError(f"lengths must be a 1-D tensor of response lengths, got {getattr(lengths, 'shape', type(lengths).__name__)}")
    check_overlong(max_response_length, buffer_length, factor)
    values = lengths if lengths.is_floating_point() else lengths.to(torch.get_default_dtype())
    expected = max_response_length - buffer_length
    # The linear ramp reaches exactly -1 at len = L_max; clamping extends -1 beyond it.
    ramp = torch.clamp((expected - values) / buffer_length, min=-1.0, max=0.0)
    return ramp * factor


def overlong_filter_mask(response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Overlong filtering: response_mask with the rows of truncated responses zeroed.

    ``truncated`` is a [batch] bool (or 0/1) tensor; the result keeps ``response_mask``'s dtype.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [batch, response_len], got shape {tuple(response_mask.shape)}")
    if truncated.shape != response_mask.shape[:1]:
        raise ValueError(f"truncated must have shape [{response_mask.shape[0]}] (one flag per response), got {tuple(truncated.shape)}")
    keep_row = ~_as_bool_mask(truncated).to(response_mask.device)
    return torch.where(keep_row.unsqueeze(-1), response_mask, torch.zeros_like(response_mask))


# ------------------------------------------------------------- dynamic sampling


@dataclass
class DynamicSamplingResult:
    """Outcome of DAPO's dynamic-sampling filter on one generation batch.

    keep: bool tensor, one per sample: True for samples of kept groups (the metric varies, or a
    group of one).
    kept_groups / all_correct_groups / all_wrong_groups / uniform_groups: group ids in first-seen
    order; the last three list only dropped groups: all acc = 1, all acc = 0, or (filtering on
    scores) a constant score with mixed acc.
    """

    keep: torch.Tensor
    kept_groups: list = field(default_factory=list)
    all_correct_groups: list = field(default_factory=list)
    all_wrong_groups: list = field(default_factory=list)
    uniform_groups: list = field(default_factory=list)


def _as_acc(acc: torch.Tensor | Sequence[bool]) -> torch.Tensor:
    acc_tensor = torch.as_tensor(acc)
    if acc_tensor.dim() != 1:
        raise ValueError(f"acc must be 1-D (one accuracy per sample), got shape {tuple(acc_tensor.shape)}")
    if acc_tensor.dtype != torch.bool:
        if not bool(((acc_tensor == 0) | (acc_tensor == 1)).all()):
            raise ValueError("acc must be boolean or 0/1 (the unshaped accuracy), not a shaped score")
        acc_tensor = acc_tensor != 0
    return acc_tensor


def dynamic_sampling_filter(acc: torch.Tensor | Sequence[bool], group_ids: Sequence[Hashable] | torch.Tensor,
                            scores: torch.Tensor | Sequence[float] | None = None) -> DynamicSamplingResult:
    """Keep the groups whose metric varies: the (unshaped) accuracy, some right and some wrong;
    or, given ``scores``, the scorer's unshaped score (a graded scorer: [0.2, 0.5, 0.9, 0.4] are
    all "correct" yet their advantages are not zero).

    A group of two or more whose metric is constant has zero advantage for every sample and gives
    no gradient, so DAPO drops it: keep group g iff std(metric_g) > 0 or |g| = 1 (verl's
    filter_groups with metric acc or score). A group of one (rollout.n = 1) is kept, as the
    reference implementation (verl's DAPO trainer) keeps it: it has no spread to test, and
    dropping it would make a batch of n = 1 groups impossible to fill. Never filter on the shaped
    score: overlong shaping can make scores differ inside a group that is uniformly right or wrong.
    """
    acc_tensor = _as_acc(acc)
    if len(group_ids) != acc_tensor.shape[0]:
        raise ValueError(f"group_ids has {len(group_ids)} entries but acc has {acc_tensor.shape[0]}; give one group id per sample")
    index, distinct = _group_index(group_ids, acc_tensor.device)
    num_groups = len(distinct)
    correct = torch.zeros(num_groups, dtype=torch.long, device=acc_tensor.device).index_add_(0, index, acc_tensor.long())
    total = torch.zeros(num_groups, dtype=torch.long, device=acc_tensor.device).index_add_(0, index, torch.ones_like(index))
    if scores is None:
        varies = (correct > 0) & (correct < total)
    else:
        values = torch.as_tensor(scores, dtype=torch.float64, device=acc_tensor.device)
        if values.shape != acc_tensor.shape:
            raise ValueError(f"scores has shape {tuple(values.shape)}, acc {tuple(acc_tensor.shape)}: one score per sample")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("scores must be finite")
        low = torch.full((num_groups,), math.inf, dtype=torch.float64, device=values.device).scatter_reduce(
            0, index, values, "amin")
        high = torch.full((num_groups,), -math.inf, dtype=torch.float64, device=values.device).scatter_reduce(
            0, index, values, "amax")
        varies = high > low
    varies = varies | (total == 1)
    result = DynamicSamplingResult(keep=varies[index])
    for gid, v, c, t in zip(distinct, varies.tolist(), correct.tolist(), total.tolist()):
        if v:
            result.kept_groups.append(gid)
        elif c == t:
            result.all_correct_groups.append(gid)
        elif c == 0:
            result.all_wrong_groups.append(gid)
        else:
            result.uniform_groups.append(gid)
    return result


# ----------------------------------------------------------------- from logits

# Rows of [N, V] logits processed at once: bounds every temporary (logsumexp's exp, the
# float32 upcast of half-precision logits, softmax * logits) to ~this many elements
# instead of a full logits-sized copy (8192 tokens x 152k vocab is 5 GB in float32).
LOGITS_CHUNK_ELEMENTS = 1 << 22


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., vocab], got shape {tuple(logits.shape)}")


def _row_chunks(num_rows: int, vocab: int):
    rows_per_chunk = max(1, LOGITS_CHUNK_ELEMENTS // max(vocab, 1))
    if num_rows == 0:
        yield slice(0, 0)
    for start in range(0, num_rows, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, num_rows))


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # logsumexp in half precision loses the small differences log-ratios depend on.
    return logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) = z[label] - logsumexp(z), per position; [..., V] logits, [...] labels.

    gather + logsumexp, row chunk by row chunk, never builds a log_softmax copy of the
    logits. float16/bfloat16 logits are upcast per chunk and the result is float32.
    """
    _check_logits(logits)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (logits without the vocab dim), got {tuple(labels.shape)}")
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1, 1).long()
    dtype = _compute_dtype(logits)
    pieces = []
    for rows in _row_chunks(flat_logits.shape[0], vocab):
        chunk = flat_logits[rows].to(dtype)
        picked = torch.gather(chunk, -1, flat_labels[rows]).squeeze(-1)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(pieces).reshape(labels.shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy per position: H = logsumexp(z) - sum_v softmax(z)_v z_v.

    The identity follows from log p_v = z_v - logsumexp(z). Computed row chunk by row
    chunk, so temporaries stay chunk-sized; when a gradient is needed autograd keeps
    softmax(z) per chunk, which adds up to the one extra logits-sized tensor. The sum
    uses torch's pairwise reduction: a BLAS dot (matmul) lost 1e-3 relative accuracy
    in float32 at a 152k vocab. Returns float32 for half-precision logits.
    """
    _check_logits(logits)
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    dtype = _compute_dtype(logits)
    track_grad = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for rows in _row_chunks(flat_logits.shape[0], vocab):
        chunk = flat_logits[rows].to(dtype)
        probs = torch.softmax(chunk, dim=-1)
        weighted = probs * chunk if track_grad else probs.mul_(chunk)
        pieces.append(torch.logsumexp(chunk, dim=-1) - weighted.sum(dim=-1))
    return torch.cat(pieces).reshape(logits.shape[:-1])
