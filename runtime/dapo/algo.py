"""DAPO algorithm core: small pure tensor functions, no distributed plumbing.

Formulas follow DAPO (arXiv 2503.14476) and verl's ``core_algos`` semantics; see
``DAPO-NOTES.md`` in the design notes. Everything here is device- and dtype-agnostic
(float32 and float64 give the same formula) and never forces a host/device sync
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

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "LOSS_AGG_MODES",
    "DynamicSamplingResult",
    "agg_loss",
    "dynamic_sampling_filter",
    "entropy_from_logits",
    "group_advantages",
    "log_probs_from_logits",
    "masked_mean",
    "masked_sum",
    "overlong_filter_mask",
    "overlong_penalty",
    "policy_loss",
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
    """DAPO clipped policy-gradient loss with clip-higher and dual clip.

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
    agg = _check_agg_mode(loss_agg_mode)
    _check_normaliser(num_tokens, "num_tokens")
    _check_normaliser(num_seqs, "num_seqs")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be [batch, response_len], got shape {tuple(log_prob.shape)}")
    for name, tensor in (("old_log_prob", old_log_prob), ("response_mask", response_mask)):
        if tensor.shape != log_prob.shape:
            raise ValueError(f"{name} must have log_prob's shape {tuple(log_prob.shape)}, got {tuple(tensor.shape)}")
    adv = _broadcast_advantages(advantages, log_prob.shape).to(log_prob.dtype)
    mask = _as_bool_mask(response_mask)

    log_ratio = torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual_bound = -adv * clip_ratio_c
    negative_adv = adv < 0
    loss_mat = torch.where(negative_adv, torch.minimum(loss_ppo, loss_dual_bound), loss_ppo)

    loss = agg(loss_mat, mask, num_tokens, num_seqs)

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
    return loss, metrics


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


def group_advantages(scores: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantages: A_i = (R_i - mean_g) / (std_g + eps).

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
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    if len(group_ids) != scores.shape[0]:
        raise ValueError(f"group_ids has {len(group_ids)} entries but scores has {scores.shape[0]}; give one group id per score")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    values = scores if scores.is_floating_point() else scores.to(torch.get_default_dtype())
    if values.numel() == 0:
        return values.clone()
    index, distinct = _group_index(group_ids, values.device)
    num_groups = len(distinct)

    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, torch.ones_like(values))
    means = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values) / counts
    # Two-pass variance (sum of squared deviations) is stable where E[x^2] - E[x]^2 is not.
    deviations = values - means[index]
    sq_dev = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, deviations * deviations)
    singleton = counts == 1
    stds = torch.sqrt(sq_dev / (counts - 1).clamp_min(1))
    means = torch.where(singleton, torch.zeros_like(means), means)
    stds = torch.where(singleton, torch.ones_like(stds), stds)
    return (values - means[index]) / (stds[index] + eps)


#: Advantage estimators by name: fn(scores, group_ids, eps=...) -> 1-D advantages.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {"grpo": group_advantages}


# --------------------------------------------------------------------- overlong


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
    if not max_response_length > 0:
        raise ValueError(f"max_response_length must be > 0, got {max_response_length!r}")
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(
            f"overlong buffer_length must be in (0, max_response_length={max_response_length}], got "
            f"{buffer_length!r}; to turn soft overlong punishment off, disable it instead of setting 0"
        )
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"overlong penalty factor must be a finite number >= 0, got {factor!r}")
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

    keep: bool tensor, one per sample: True for samples of kept groups (accuracy varies, or a
    group of one).
    kept_groups / all_correct_groups / all_wrong_groups: group ids in first-seen order (the
    last two list only dropped groups).
    """

    keep: torch.Tensor
    kept_groups: list = field(default_factory=list)
    all_correct_groups: list = field(default_factory=list)
    all_wrong_groups: list = field(default_factory=list)


def dynamic_sampling_filter(acc: torch.Tensor | Sequence[bool], group_ids: Sequence[Hashable] | torch.Tensor) -> DynamicSamplingResult:
    """Keep the groups whose (unshaped) accuracy varies: some right and some wrong.

    A group of two or more with all acc = 1 or all acc = 0 has zero advantage for every sample
    and gives no gradient, so DAPO drops it: keep group g iff std(acc_g) > 0 or |g| = 1. A
    group of one (rollout.n = 1) is kept, as the reference implementation (verl's DAPO
    trainer) keeps it: it has no spread to test, and dropping it would make a batch of n = 1
    groups impossible to fill. Filter on ``acc``, never on the shaped score: overlong shaping
    can make scores differ inside a group that is uniformly right or wrong.
    """
    acc_tensor = torch.as_tensor(acc)
    if acc_tensor.dim() != 1:
        raise ValueError(f"acc must be 1-D (one accuracy per sample), got shape {tuple(acc_tensor.shape)}")
    if len(group_ids) != acc_tensor.shape[0]:
        raise ValueError(f"group_ids has {len(group_ids)} entries but acc has {acc_tensor.shape[0]}; give one group id per sample")
    if acc_tensor.dtype != torch.bool:
        if not bool(((acc_tensor == 0) | (acc_tensor == 1)).all()):
            raise ValueError("acc must be boolean or 0/1 (the unshaped accuracy), not a shaped score")
        acc_tensor = acc_tensor != 0
    index, distinct = _group_index(group_ids, acc_tensor.device)
    num_groups = len(distinct)
    correct = torch.zeros(num_groups, dtype=torch.long, device=acc_tensor.device).index_add_(0, index, acc_tensor.long())
    total = torch.zeros(num_groups, dtype=torch.long, device=acc_tensor.device).index_add_(0, index, torch.ones_like(index))
    varies = ((correct > 0) & (correct < total)) | (total == 1)
    all_correct = correct == total
    result = DynamicSamplingResult(keep=varies[index])
    for gid, v, c in zip(distinct, varies.tolist(), all_correct.tolist()):
        if v:
            result.kept_groups.append(gid)
        elif c:
            result.all_correct_groups.append(gid)
        else:
            result.all_wrong_groups.append(gid)
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
