"""Independent references of dapo.algo's math, shared by tests/test_algo.py and tests/test_offpolicy.py:
the DAPO token term and GRPO group advantages written literally from the notes (Python floats, the
math and statistics modules), and the seeded random batches both modules test with."""

from __future__ import annotations

import math
import statistics

import torch


def ref_token_terms(d_raw: float, adv: float, eps_low: float, eps_high: float, c: float):
    """One token, literally from the notes: (loss, dloss/dlogp, clipped?, clipped_lower?, kl)."""
    d = min(max(d_raw, -20.0), 20.0)
    r = math.exp(d)
    dr = r if -20.0 < d_raw < 20.0 else 0.0  # the clamp kills the gradient outside
    l1 = -adv * r
    r_clip = min(max(r, 1 - eps_low), 1 + eps_high)
    l2 = -adv * r_clip
    if l2 > l1:
        loss, grad = l2, 0.0  # l2 only exceeds l1 when r was clipped: constant in logp
    else:
        loss, grad = l1, -adv * dr
    clipped = l2 > l1
    bound = -adv * c
    lower = adv < 0 and loss > bound
    if adv < 0 and loss > bound:
        loss, grad = bound, 0.0
    return loss, grad, clipped, lower, -d


def scores_by_group(scores, ids) -> dict:
    """group id -> the scores of its responses, in order."""
    groups: dict = {}
    for s, g in zip(scores, ids):
        groups.setdefault(g, []).append(s)
    return groups


def ref_group_advantages(scores, ids, eps=1e-6):
    """Literal GRPO advantages with statistics.mean / statistics.stdev (Bessel)."""
    groups = scores_by_group(scores, ids)
    out = []
    for s, g in zip(scores, ids):
        vals = groups[g]
        mean, std = (0.0, 1.0) if len(vals) == 1 else (statistics.fmean(vals), statistics.stdev(vals))
        out.append((s - mean) / (std + eps))
    return out


def random_batch(seed: int, rows: int, cols: int, dtype=torch.float64, adv_shape="row", empty_rows=True):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, cols, generator=gen, dtype=dtype) * 3
    # log-ratios spread over [-0.8, 0.8] so that both clip sides and the in-range case occur
    lp = old + (torch.rand(rows, cols, generator=gen, dtype=dtype) - 0.5) * 1.6
    if adv_shape == "row":
        adv = torch.randn(rows, generator=gen, dtype=dtype)
    elif adv_shape == "col":
        adv = torch.randn(rows, 1, generator=gen, dtype=dtype)
    else:
        adv = torch.randn(rows, cols, generator=gen, dtype=dtype)
    mask = torch.rand(rows, cols, generator=gen) > 0.3
    if empty_rows and rows > 2:
        mask[1] = False
    return lp, old, adv, mask
