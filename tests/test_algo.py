"""Tests for dapo.algo: DAPO loss, advantages, overlong shaping, dynamic sampling, logits helpers.

The float64 references (below and in tests/_algo_refs.py) are written independently and literally
from the DAPO paper (arXiv 2503.14476) and docs/algorithm.md (per-element Python loops with the math
module), so they share no code with dapo.algo.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _algo_refs import random_batch, ref_group_advantages, ref_token_terms
from dapo import algo

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
# derandomize: the same examples every run, so the project suite cannot flake on a new draw
FAST = settings(max_examples=25, deadline=None, derandomize=True)


# ----------------------------------------------------------------- references


def ref_policy_loss(lp, old, adv, mask, mode, eps_low=0.2, eps_high=0.28, c=10.0, n_tok=None, n_seq=None):
    """Python-loop reference: (loss, metrics dict, gradient w.r.t. lp as nested lists)."""
    rows, cols = len(lp), len(lp[0])
    terms = [[ref_token_terms(lp[i][t] - old[i][t], adv[i][t], eps_low, eps_high, c) for t in range(cols)] for i in range(rows)]
    valid = [[mask[i][t] for t in range(cols)] for i in range(rows)]
    tokens_local = sum(sum(1 for t in range(cols) if valid[i][t]) for i in range(rows))
    seqs_local = sum(1 for i in range(rows) if any(valid[i]))
    n_tok = max(tokens_local if n_tok is None else n_tok, 1)
    n_seq = max(seqs_local if n_seq is None else n_seq, 1)
    loss = 0.0
    grad = [[0.0] * cols for _ in range(rows)]
    for i in range(rows):
        row_len = sum(1 for t in range(cols) if valid[i][t])
        for t in range(cols):
            if not valid[i][t]:
                continue
            if mode == "token-mean":
                weight = 1.0 / n_tok
            elif mode == "seq-mean-token-sum":
                weight = 1.0 / n_seq
            else:
                weight = 1.0 / (n_seq * row_len)
            loss += weight * terms[i][t][0]
            grad[i][t] = weight * terms[i][t][1]
    def local_mean(k):
        vals = [float(terms[i][t][k]) for i in range(rows) for t in range(cols) if valid[i][t]]
        return sum(vals) / len(vals) if vals else 0.0
    metrics = {"pg_clipfrac": local_mean(2), "pg_clipfrac_lower": local_mean(3), "ppo_kl": local_mean(4)}
    return loss, metrics, grad


def full_adv(adv: torch.Tensor, rows: int, cols: int) -> list:
    return torch.broadcast_to(adv if adv.dim() == 2 else adv.unsqueeze(-1), (rows, cols)).tolist()


def run_loss(lp, old, adv, mask, **kw):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = algo.policy_loss(lp, old, adv, mask, **kw)
    loss.backward()
    return loss.detach(), metrics, lp.grad


# ------------------------------------------------------------ float64 parity


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    cols=st.integers(1, 9),
    mode=st.sampled_from(MODES),
    adv_shape=st.sampled_from(["row", "col", "full"]),
    eps_low=st.floats(0.05, 0.5),
    eps_high=st.floats(0.05, 0.6),
    c=st.floats(1.2, 4.0),
)
def test_policy_loss_matches_literal_reference_float64(seed, rows, cols, mode, adv_shape, eps_low, eps_high, c):
    lp, old, adv, mask = random_batch(seed, rows, cols, adv_shape=adv_shape)
    loss, metrics, grad = run_loss(
        lp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, clip_ratio_c=c, loss_agg_mode=mode
    )
    ref_loss, ref_metrics, ref_grad = ref_policy_loss(
        lp.tolist(), old.tolist(), full_adv(adv, rows, cols), mask.tolist(), mode, eps_low, eps_high, c
    )
    assert loss.dtype == torch.float64
    # float64 against the literal loops: sums of <= 54 terms and exp (SIMD or libm, <= 1 ulp apart), so
    # <= ~54 x eps64 (2.2e-16) ~ 1e-14 relative on any CPU (measured <= 1.6e-15); a formula error is >= 1e-3
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    for name, value in ref_metrics.items():
        assert metrics[name].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name
        assert not metrics[name].requires_grad
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_reference_sees_all_branches():
    """The randomised parity test must exercise clipping on both sides and the dual clip."""
    lp, old, adv, mask = random_batch(0, 64, 32)
    _, metrics, _ = run_loss(lp, old, adv, mask, clip_ratio_c=1.3)
    # coverage bounds, not precision: this fixed float64 batch gives 0.37 and 0.19
    assert 0.1 < metrics["pg_clipfrac"].item() < 0.9
    assert metrics["pg_clipfrac_lower"].item() > 0.01


def test_policy_loss_gradient_matches_finite_differences():
    lp, old, adv, mask = random_batch(3, 4, 5, adv_shape="full")
    lp = lp.clone().requires_grad_(True)

    def loss_of(x):
        return algo.policy_loss(x, old, adv, mask, loss_agg_mode="seq-mean-token-mean", clip_ratio_c=2.0)[0]

    # float64 central differences with h 1e-7: rounding eps64 x |loss| / h ~ 2e-9, truncation ~h^2;
    # measured 3e-10 (no clip kink within h of these points): atol 1e-7
    assert torch.autograd.gradcheck(loss_of, (lp,), eps=1e-7, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_float32_agrees_with_float64(mode):
    lp, old, adv, mask = random_batch(7, 8, 16)
    loss64, m64, g64 = run_loss(lp, old, adv, mask, loss_agg_mode=mode)
    loss32, m32, g32 = run_loss(lp.float(), old.float(), adv.float(), mask, loss_agg_mode=mode)
    assert loss32.dtype == torch.float32 and g32.dtype == torch.float32
    # float32 inputs (|log p| < 4) round by <= 1.2e-7 (half an ulp), so a log-ratio by <= 3e-7 and a ratio
    # or gradient element by ~3e-7 relative, plus a few ulp of arithmetic and a pairwise 128-term sum
    # (~7 x eps32): ~1e-6 relative (measured <= 3e-7): rel 1e-5; the absolute floors are for values near 0
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-7)
    for name in m64:
        assert m32[name].dtype == torch.float32
        assert m32[name].item() == pytest.approx(m64[name].item(), rel=1e-5, abs=1e-6)


# ------------------------------------------------- global normalisers (micro-batches)


def _global_normalisers(mask):
    return int(mask.sum()), int(mask.any(dim=-1).sum())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uneven_micro_batches_sum_to_full_batch_loss_and_gradient(mode, dtype):
    rows, cols = 11, 13
    lp, old, adv, mask = random_batch(11, rows, cols, dtype=dtype)
    mask[4, :2] = True
    mask[4, 2:] = False  # a short response next to long ones: token-mean must weigh by count
    full_loss, _, full_grad = run_loss(lp, old, adv, mask, loss_agg_mode=mode)
    n_tok, n_seq = _global_normalisers(mask)

    leaf = lp.clone().requires_grad_(True)
    total = torch.zeros((), dtype=dtype)
    start = 0
    for size in (3, 1, 5, 2):  # uneven, and row 1 (empty) sits in a micro-batch of its own
        rows_slice = slice(start, start + size)
        loss, _ = algo.policy_loss(
            leaf[rows_slice], old[rows_slice], adv[rows_slice], mask[rows_slice],
            loss_agg_mode=mode, num_tokens=n_tok, num_seqs=n_seq,
        )
        loss.backward()
        total += loss.detach()
        start += size
    assert start == rows
    # the micro-batch losses add the same <= 143 terms in another grouping: float64 <= 143 x eps64 ~ 3e-14
    # relative; float32 pairwise sums ~log2(143) x eps32 ~ 1e-6 (measured 1.7e-7). Gradients are
    # elementwise, each element from one micro-batch: equal (measured 0); atol for the masked zeros
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, full_loss, **tol)
    torch.testing.assert_close(leaf.grad, full_grad, **tol)


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_with_micro_batches_sum_to_full_batch(mode):
    """Rank-local gradients summed (all-reduce SUM) equal the full mini-batch gradient."""
    rows, cols = 10, 7
    lp, old, adv, mask = random_batch(5, rows, cols)
    full_loss, _, full_grad = run_loss(lp, old, adv, mask, loss_agg_mode=mode)
    # normalisers as tensors, as an all-reduce would produce them
    n_tok = torch.tensor(float(mask.sum()))
    n_seq = torch.tensor(float(mask.any(-1).sum()))
    rank_rows = [torch.tensor([0, 2, 4, 6, 8]), torch.tensor([1, 3, 5, 7, 9])]
    micro_splits = [(2, 3), (4, 1)]
    grad = torch.zeros_like(lp)
    total = torch.zeros((), dtype=lp.dtype)
    for rows_of_rank, splits in zip(rank_rows, micro_splits):
        leaf = lp[rows_of_rank].clone().requires_grad_(True)
        start = 0
        for size in splits:
            part = slice(start, start + size)
            idx = rows_of_rank[part]
            loss, _ = algo.policy_loss(leaf[part], old[idx], adv[idx], mask[idx],
                                       loss_agg_mode=mode, num_tokens=n_tok, num_seqs=n_seq)
            loss.backward()
            total += loss.detach()
            start += size
        grad[rows_of_rank] += leaf.grad
    # float64: the same <= 70 terms in another grouping, <= 70 x eps64 ~ 2e-14 relative (measured 2e-16)
    torch.testing.assert_close(total, full_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-14)


def test_per_micro_batch_normalisation_differs_from_global():
    """Guard: without global normalisers, averaging micro-batch token-means is NOT the batch loss."""
    lp, old, adv, mask = random_batch(2, 6, 10)
    mask[0] = True
    mask[3:, 5:] = False
    full, _, _ = run_loss(lp, old, adv, mask)
    halves = [algo.policy_loss(lp[s], old[s], adv[s], mask[s])[0] for s in (slice(0, 3), slice(3, 6))]
    assert abs((halves[0] + halves[1]).item() / 2 - full.item()) > 1e-6  # they differ by 0.04; float64 noise is ~1e-16


def test_token_mean_weighs_tokens_not_sequences():
    lp = torch.zeros(2, 4, dtype=torch.float64)
    old = torch.zeros_like(lp)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    token_mean, _ = algo.policy_loss(lp, old, adv, mask)
    seq_token_mean, _ = algo.policy_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-mean")
    seq_token_sum, _ = algo.policy_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-sum")
    # ratio exp(0) = 1 exactly: float64 sums of +-1 and one division, within an ulp; approx's rel 1e-6 is far above
    assert token_mean.item() == pytest.approx((-4 + 1) / 5)
    assert seq_token_mean.item() == pytest.approx((-1 + 1) / 2)
    assert seq_token_sum.item() == pytest.approx((-4 + 1) / 2)


# -------------------------------------------------------------- clip edge cases


def _one_token(d: float, a: float, **kw):
    lp = torch.tensor([[d]], dtype=torch.float64)
    return run_loss(lp, torch.zeros_like(lp), torch.tensor([a], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool), **kw)


def test_ratio_exactly_at_upper_clip_is_not_clipped():
    d = 0.1
    r = math.exp(d)
    eps_high = r - 1.0  # exact: 1 + (r - 1) == r for r in [1, 2]
    assert 1.0 + eps_high == r
    loss, metrics, grad = _one_token(d, 1.0, eps_high=eps_high)
    # one float64 exp on each side (torch's SIMD or libm vs math.exp): <= 1 ulp apart; rel 1e-15 is ~4 ulp
    assert loss.item() == pytest.approx(-r, rel=1e-15)
    assert metrics["pg_clipfrac"].item() == 0.0
    assert grad.item() == pytest.approx(-r, rel=1e-15)  # still on the unclipped branch
    # one step beyond: clipped, constant, zero gradient
    loss, metrics, grad = _one_token(d + 1e-9, 1.0, eps_high=eps_high)
    assert loss.item() == pytest.approx(-(1 + eps_high), rel=1e-15)
    assert metrics["pg_clipfrac"].item() == 1.0
    assert grad.item() == 0.0


def test_ratio_exactly_at_lower_clip_is_not_clipped():
    d = -0.1
    r = math.exp(d)
    eps_low = 1.0 - r  # exact for r in [0.5, 1]
    assert 1.0 - eps_low == r
    loss, metrics, grad = _one_token(d, -1.0, eps_low=eps_low)
    assert loss.item() == pytest.approx(r, rel=1e-15)  # one float64 exp each side: <= 1 ulp apart, rel 1e-15 ~4 ulp
    assert metrics["pg_clipfrac"].item() == 0.0
    assert grad.item() == pytest.approx(r, rel=1e-15)
    loss, metrics, grad = _one_token(d - 1e-9, -1.0, eps_low=eps_low)
    assert loss.item() == pytest.approx(1 - eps_low, rel=1e-15)
    assert metrics["pg_clipfrac"].item() == 1.0
    assert grad.item() == 0.0


def test_clip_higher_is_asymmetric():
    """r = 1.25 with A > 0: inside [0.8, 1.28] (not clipped); with symmetric 0.2 it is clipped."""
    d = math.log(1.25)
    _, m_dapo, g_dapo = _one_token(d, 1.0, eps_low=0.2, eps_high=0.28)
    _, m_sym, g_sym = _one_token(d, 1.0, eps_low=0.2, eps_high=0.2)
    assert m_dapo["pg_clipfrac"].item() == 0.0 and g_dapo.item() != 0.0
    assert m_sym["pg_clipfrac"].item() == 1.0 and g_sym.item() == 0.0


@pytest.mark.parametrize("d", [-30.0, -0.5, 0.0, 0.3, 50.0])
def test_zero_advantage_gives_zero_loss_and_gradient(d):
    loss, metrics, grad = _one_token(d, 0.0)
    assert loss.item() == 0.0 and grad.item() == 0.0
    assert metrics["pg_clipfrac"].item() == 0.0
    assert metrics["pg_clipfrac_lower"].item() == 0.0


def test_dual_clip_caps_huge_ratio_for_negative_advantage():
    loss, metrics, grad = _one_token(1000.0, -2.0, clip_ratio_c=10.0)  # log-ratio clamped to 20
    assert torch.isfinite(loss) and loss.item() == pytest.approx(20.0)  # -A * c: an exact product (approx: rel 1e-6)
    assert metrics["pg_clipfrac_lower"].item() == 1.0
    assert metrics["pg_clipfrac"].item() == 0.0  # l1 > l2 there: the upper clip does not bind
    assert metrics["ppo_kl"].item() == pytest.approx(-20.0)  # the clamped log-ratio
    assert grad.item() == 0.0


def test_no_dual_clip_for_positive_advantage():
    loss, metrics, grad = _one_token(math.log(50.0), 2.0, clip_ratio_c=10.0)
    assert loss.item() == pytest.approx(-2.0 * 1.28)  # one float64 product each side: within an ulp
    assert metrics["pg_clipfrac_lower"].item() == 0.0
    assert metrics["pg_clipfrac"].item() == 1.0


def test_dual_clip_boundary_at_c():
    d = math.log(3.0)
    c = math.exp(d)  # ratio exactly c
    loss, metrics, _ = _one_token(d, -1.0, clip_ratio_c=c)
    assert loss.item() == pytest.approx(c, rel=1e-15)  # exp(d) against math.exp(d): <= 1 ulp apart, rel 1e-15 ~4 ulp
    assert metrics["pg_clipfrac_lower"].item() == 0.0  # strict >, as verl
    loss, metrics, grad = _one_token(d + 1e-6, -1.0, clip_ratio_c=c)
    assert loss.item() == pytest.approx(c, rel=1e-15)
    assert metrics["pg_clipfrac_lower"].item() == 1.0
    assert grad.item() == 0.0
    loss, metrics, grad = _one_token(d - 1e-6, -1.0, clip_ratio_c=c)
    assert metrics["pg_clipfrac_lower"].item() == 0.0
    assert grad.item() == pytest.approx(math.exp(d - 1e-6))  # float64 exp each side: <= 1 ulp, far under rel 1e-6


# ---------------------------------------------------------- empty and masking


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalisers", [(None, None), (0, 0), (17, 4)])
def test_zero_valid_tokens_gives_zero_loss_and_zero_gradient(mode, normalisers):
    lp, old, adv, _ = random_batch(1, 3, 5, dtype=torch.float32)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    loss, metrics, grad = run_loss(lp, old, adv, mask, loss_agg_mode=mode,
                                   num_tokens=normalisers[0], num_seqs=normalisers[1])
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.equal(grad, torch.zeros_like(grad))  # every term is selected away: exactly 0
    assert all(v.item() == 0.0 for v in metrics.values())


def test_garbage_in_padded_positions_does_not_leak():
    lp, old, adv, mask = random_batch(4, 3, 6, adv_shape="full")
    clean, _, clean_grad = run_loss(lp, old, adv, mask)
    lp2, adv2 = lp.clone(), adv.clone()
    lp2[~mask] = float("nan")
    adv2[~mask] = float("inf")
    dirty, dirty_metrics, dirty_grad = run_loss(lp2, old, adv2, mask)
    # the garbage is selected away: the same valid values through the same ops, equal (measured 0)
    torch.testing.assert_close(dirty, clean)
    torch.testing.assert_close(dirty_grad, clean_grad)
    assert all(torch.isfinite(v) for v in dirty_metrics.values())


def test_mask_dtypes_are_equivalent():
    lp, old, adv, mask = random_batch(9, 4, 6)
    ref = run_loss(lp, old, adv, mask)[0]
    for m in (mask.long(), mask.float(), mask.double()):
        # every mask becomes the same bool mask: the same arithmetic, equal (measured 0); rel 1e-15 ~4 ulp
        assert run_loss(lp, old, adv, m)[0].item() == pytest.approx(ref.item(), rel=1e-15)


# -------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_agg_mode": "token-sum"}, "token-mean"),
        ({"eps_low": 0.0}, "eps_low"),
        ({"eps_low": 1.0}, "eps_low"),
        ({"eps_high": -0.1}, "eps_high"),
        ({"clip_ratio_c": 1.0}, "clip_ratio_c"),
        ({"num_tokens": -3}, "num_tokens"),
        ({"num_seqs": float("nan")}, "num_seqs"),
    ],
)
def test_invalid_arguments_name_the_fix(kwargs, message):
    lp, old, adv, mask = random_batch(0, 2, 3)
    with pytest.raises(ValueError, match=message):
        algo.policy_loss(lp, old, adv, mask, **kwargs)


def test_shape_errors():
    lp, old, adv, mask = random_batch(0, 2, 3)
    with pytest.raises(ValueError, match="advantages"):
        algo.policy_loss(lp, old, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="old_log_prob"):
        algo.policy_loss(lp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="response_mask"):
        algo.policy_loss(lp, old, adv, mask[:1])
    with pytest.raises(ValueError, match="token-mean"):
        algo.agg_loss(lp, mask, "mean")


def test_registry_lists_the_three_modes():
    assert set(algo.LOSS_AGG_MODES) == set(MODES)
    assert algo.ADVANTAGE_ESTIMATORS["grpo"] is algo.group_advantages


def test_agg_loss_matches_hand_values():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # small integers summed and divided once in float64: within an ulp of the fractions (approx: rel 1e-6)
    assert algo.agg_loss(loss_mat, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert algo.agg_loss(loss_mat, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert algo.agg_loss(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert algo.agg_loss(loss_mat, mask, "token-mean", num_tokens=8).item() == pytest.approx(10 / 8)
    assert algo.agg_loss(loss_mat, mask, "seq-mean-token-sum", num_seqs=5).item() == pytest.approx(10 / 5)


# ------------------------------------------------------------------ advantages


@FAST
@given(
    scores=st.lists(st.sampled_from([-1.0, 1.0, -0.5, 0.75, 1.0]) | st.floats(-5, 5), min_size=1, max_size=40),
    num_groups=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_group_advantages_match_reference(scores, num_groups, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = [f"q{int(i)}" for i in torch.randint(0, num_groups, (len(scores),), generator=gen)]
    got = algo.group_advantages(torch.tensor(scores, dtype=torch.float64), ids)
    ref = ref_group_advantages(scores, ids)
    # float64: sums of <= 40 scores (|s| <= 5) in another order than statistics', divided by std + 1e-6
    # (>= 1e-6): at most ~40 x eps64 x 5 / 1e-6 ~ 4e-8 when a group's scores nearly coincide, ~1e-15
    # otherwise; the draws are derandomized (the same on every machine), measured <= 5e-16
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_group_advantages_special_groups():
    scores = torch.tensor([1.0, -1.0, 1.0, 0.5, 0.5, 0.5, -1.0, 1.0], dtype=torch.float64)
    ids = ["a", "b", "a", "eq", "eq", "eq", "a", ("tuple", 3)]  # interleaved; a hashable tuple
    adv = algo.group_advantages(scores, ids)
    # group a = [1, 1, -1]: mean 1/3, unbiased std sqrt(4/3)
    std_a = math.sqrt(((2 / 3) ** 2 * 2 + (4 / 3) ** 2) / 2)
    # float64 of three scores, grouped differently from the literal formula: a few ulp (rel 1e-12 ~ 5000 ulp);
    # the singleton's -1 / (1 + 1e-6) is the same two operations on both sides: rel 1e-15 ~4 ulp
    assert adv[0].item() == pytest.approx((2 / 3) / (std_a + 1e-6), rel=1e-12)
    assert adv[6].item() == pytest.approx((-4 / 3) / (std_a + 1e-6), rel=1e-12)
    assert adv[1].item() == pytest.approx(-1.0 / (1 + 1e-6), rel=1e-15)  # singleton: mean 0, std 1
    assert adv[7].item() == pytest.approx(1.0 / (1 + 1e-6), rel=1e-15)
    assert torch.equal(adv[3:6], torch.zeros(3, dtype=torch.float64))  # all-equal group


def test_group_advantages_accepts_tensor_ids_and_int_scores():
    scores = torch.tensor([1, -1, 1, 1, -1, -1])
    ids_list = [7, 7, 3, 3, 9, 7]
    a = algo.group_advantages(scores, ids_list)
    b = algo.group_advantages(scores, torch.tensor(ids_list))
    assert a.dtype == torch.get_default_dtype()
    # list and tensor ids give the same group index: the same float32 arithmetic, equal (measured 0); the
    # float64 reference rounded to float32 is within a few ulp (measured 1 ulp), inside the float32 default
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, torch.tensor(ref_group_advantages(scores.tolist(), ids_list), dtype=a.dtype))


def test_group_advantages_dapo_sized_groups_have_zero_mean_unit_std():
    gen = torch.Generator().manual_seed(0)
    scores = torch.where(torch.rand(512 * 16, generator=gen) > 0.5, 1.0, -1.0).double()
    ids = [i // 16 for i in range(512 * 16)]
    adv = algo.group_advantages(scores, ids).view(512, 16)
    varied = adv.std(dim=1) > 0
    # a float64 mean of 16 advantages of size ~1: off by <= 16 x eps64 ~ 4e-15 (measured 1e-16)
    torch.testing.assert_close(adv[varied].mean(dim=1), torch.zeros(int(varied.sum()), dtype=torch.float64), atol=1e-12, rtol=0)
    # the eps in (std + 1e-6) shrinks each group's std by 1e-6 / std, and 16 scores of +-1 with both signs
    # have std >= 0.5: <= 2e-6 (measured 1.5e-6), under rtol 1e-5
    torch.testing.assert_close(adv[varied].std(dim=1), torch.full((int(varied.sum()),), 1.0, dtype=torch.float64), rtol=1e-5, atol=0)


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="one group id per score"):
        algo.group_advantages(torch.zeros(3), ["a", "b"])
    with pytest.raises(ValueError, match="1-D"):
        algo.group_advantages(torch.zeros(2, 2), ["a", "b"])
    assert algo.group_advantages(torch.zeros(0), []).numel() == 0


# --------------------------------------------------------------- overlong


def test_overlong_penalty_boundaries():
    l_max, l_cache = 20480, 4096
    start = l_max - l_cache
    lengths = torch.tensor([0, start, start + 1, start + 2048, l_max, l_max + 1, 10**6])
    pen = algo.overlong_penalty(lengths, l_max, l_cache)
    expected = [0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0, -1.0]
    # multiples of 1/4096 are exact in float32: equal (measured 0); rtol 1e-7 is under one ulp
    torch.testing.assert_close(pen, torch.tensor(expected, dtype=pen.dtype), rtol=1e-7, atol=0)
    assert (pen <= 0).all()
    half = algo.overlong_penalty(lengths, l_max, l_cache, factor=0.5)
    torch.testing.assert_close(half, pen * 0.5)  # the same ramp times 0.5, an exact scaling: equal
    zero = algo.overlong_penalty(lengths, l_max, l_cache, factor=0.0)
    assert (zero == 0).all()


def test_overlong_penalty_keeps_float64_and_validates():
    pen = algo.overlong_penalty(torch.tensor([9.0, 10.0], dtype=torch.float64), 10, 3)
    # (7 - 9) / 3 is one correctly rounded division, as is -2 / 3: equal; rel 1e-15 ~4 ulp
    assert pen.dtype == torch.float64 and pen.tolist() == pytest.approx([-2 / 3, -1.0], rel=1e-15)
    with pytest.raises(ValueError, match="buffer_length"):
        algo.overlong_penalty(torch.tensor([1]), 10, 0)
    with pytest.raises(ValueError, match="buffer_length"):
        algo.overlong_penalty(torch.tensor([1]), 10, 11)
    with pytest.raises(ValueError, match="factor"):
        algo.overlong_penalty(torch.tensor([1]), 10, 5, factor=-1)
    with pytest.raises(ValueError, match="1-D"):
        algo.overlong_penalty(torch.tensor([[1]]), 10, 5)


def test_overlong_filter_mask_zeroes_truncated_rows():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    out = algo.overlong_filter_mask(mask, torch.tensor([False, True, False]))
    assert out.dtype == mask.dtype
    assert out.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert mask[1].sum() == 3  # input not modified
    with pytest.raises(ValueError, match="one flag per response"):
        algo.overlong_filter_mask(mask, torch.tensor([True]))


# --------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_filter_groups():
    ids = ["p1", "p2", "p1", "p3", "p2", "p4", "p3"]
    acc = [True, True, False, False, True, True, False]
    res = algo.dynamic_sampling_filter(acc, ids)
    assert res.keep.tolist() == [True, False, True, False, False, True, False]
    assert res.kept_groups == ["p1", "p4"]  # p4 is a group of one: kept, as verl keeps it
    assert res.all_correct_groups == ["p2"]
    assert res.all_wrong_groups == ["p3"]


def test_dynamic_sampling_keeps_groups_of_one_so_an_n1_batch_fills():
    res = algo.dynamic_sampling_filter([True, False, False], ["a", "b", "c"])
    assert res.keep.tolist() == [True, True, True] and res.kept_groups == ["a", "b", "c"]
    assert res.all_correct_groups == [] and res.all_wrong_groups == []


def test_dynamic_sampling_uses_accuracy_not_shaped_score():
    # scores differ only by the overlong penalty inside an all-correct group: must be dropped
    acc = torch.tensor([1, 1, 0, 1])
    res = algo.dynamic_sampling_filter(acc, torch.tensor([5, 5, 6, 6]))
    assert res.kept_groups == [6] and res.all_correct_groups == [5]
    with pytest.raises(ValueError, match="0/1"):
        algo.dynamic_sampling_filter(torch.tensor([1.0, 0.7]), ["a", "a"])
    with pytest.raises(ValueError, match="one group id per sample"):
        algo.dynamic_sampling_filter([True], ["a", "b"])


def test_dynamic_sampling_on_scores_keeps_graded_groups_that_accuracy_would_drop():
    """A graded scorer: [0.2, 0.5, 0.9, 0.4] are all 'correct' (score > 0) yet differ; filtering on
    scores keeps that group, drops a constant-score one, and still classifies dropped groups by acc."""
    ids = ["g", "g", "g", "g", "c", "c", "w", "w", "u", "u"]
    scores = [0.2, 0.5, 0.9, 0.4, 0.7, 0.7, 0.0, 0.0, 0.5, 0.5]
    acc = [True, True, True, True, True, True, False, False, True, False]
    by_acc = algo.dynamic_sampling_filter(acc, ids)
    assert by_acc.kept_groups == ["u"] and by_acc.all_correct_groups == ["g", "c"]
    by_score = algo.dynamic_sampling_filter(acc, ids, scores=scores)
    assert by_score.kept_groups == ["g"]
    assert by_score.all_correct_groups == ["c"] and by_score.all_wrong_groups == ["w"]
    assert by_score.uniform_groups == ["u"]  # mixed acc, one score: no advantage either
    assert by_score.keep.tolist() == [True] * 4 + [False] * 6
    with pytest.raises(ValueError, match="one score per sample"):
        algo.dynamic_sampling_filter(acc, ids, scores=scores[:3])


# ------------------------------------------------------------ logits helpers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_probs_from_logits_matches_log_softmax(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=gen) * 4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    got = algo.log_probs_from_logits(logits, labels)
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # two formulas (logsumexp vs log_softmax) a few ulp apart (measured <= 1 ulp, |log p| <= 17: ulp 1.9e-6
    # in float32); the dtype's default tolerance (float32: 1e-5 + 1.3e-6 |x|) is >= 5 ulp
    torch.testing.assert_close(got, ref)
    g_got = torch.autograd.grad(got.sum(), logits)[0]
    g_ref = torch.autograd.grad(ref.sum(), logits)[0]
    torch.testing.assert_close(g_got, g_ref)


def test_log_probs_from_bfloat16_logits_are_float32():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=gen).bfloat16()
    labels = torch.randint(0, 9, (2, 4), generator=gen)
    got = algo.log_probs_from_logits(logits, labels)
    assert got.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, ref)  # both float32 after the upcast: a few ulp apart (measured <= 1), float32 default
    with pytest.raises(ValueError, match="labels"):
        algo.log_probs_from_logits(logits, labels[:, :2])


def test_entropy_matches_naive_formula_and_gradient():
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 3, 17, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    got = algo.entropy_from_logits(logits)
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    naive = -(p * torch.log(p)).sum(-1)
    # float64 sums of 17 terms with exp/log: ~17 x eps64 ~ 4e-15 relative apart (measured 5e-16 values,
    # 4e-15 gradients): 1e-12 and 1e-10 leave a wide margin
    torch.testing.assert_close(got, naive, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), logits)[0], torch.autograd.grad(naive.sum(), logits)[0], rtol=1e-10, atol=1e-12
    )


def test_entropy_of_uniform_logits_is_log_vocab():
    for vocab in (2, 151936):
        ent = algo.entropy_from_logits(torch.full((1, 2, vocab), 3.5))
        # float32 pairwise sums of 151936 terms: ~log2(151936) x eps32 ~ 2e-6 relative of log(V) = 11.9
        # (measured 1.9e-6 absolute); 1e-5 + 1e-5 x 11.9 = 1.3e-4
        torch.testing.assert_close(ent, torch.full((1, 2), math.log(vocab)), rtol=1e-5, atol=1e-5)
    peaked = torch.tensor([[[0.0, 1e4, 0.0]]])
    # exp(-1e4) underflows to 0: logsumexp is exactly 1e4 and the entropy exactly 0
    assert algo.entropy_from_logits(peaked).abs().item() < 1e-6


def test_masked_helpers():
    x = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    mask = torch.tensor([[True, False], [True, False]])
    # small integers: sums and halves are exact in float32
    assert algo.masked_sum(x, mask).item() == 4.0
    assert algo.masked_mean(x, mask).item() == 2.0
    assert algo.masked_mean(x, mask, dim=-1).tolist() == [1.0, 3.0]
    assert algo.masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_logits_helpers_chunking_is_exact(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 13, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 13, (3, 7), generator=gen)
    whole_lp = algo.log_probs_from_logits(logits, labels)
    whole_ent = algo.entropy_from_logits(logits)
    monkeypatch.setattr(algo, "LOGITS_CHUNK_ELEMENTS", 13 * 4)  # 4 rows per chunk, 21 rows: uneven
    # chunks split the rows, never a row's reduction: every row runs the same kernels on the same
    # machine either way, so chunking is bit-exact by design
    torch.testing.assert_close(algo.log_probs_from_logits(logits, labels), whole_lp, rtol=0, atol=0)
    torch.testing.assert_close(algo.entropy_from_logits(logits), whole_ent, rtol=0, atol=0)
    leaf = logits.clone().requires_grad_(True)
    chunked_grad = torch.autograd.grad(algo.entropy_from_logits(leaf).sum(), leaf)[0]
    monkeypatch.setattr(algo, "LOGITS_CHUNK_ELEMENTS", 1 << 22)
    whole_grad = torch.autograd.grad(algo.entropy_from_logits(leaf).sum(), leaf)[0]
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=0, atol=0)  # row chunks: bit-exact by design, as above
    assert not logits.isnan().any()  # the no-grad path multiplies in place: not into the input


def test_logits_helpers_edge_shapes_and_half_precision():
    empty = torch.zeros(0, 5, 9)
    assert algo.entropy_from_logits(empty).shape == (0, 5)
    assert algo.log_probs_from_logits(empty, torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 50, generator=gen).bfloat16()
    ent = algo.entropy_from_logits(logits)
    assert ent.dtype == torch.float32
    # bfloat16 logits are upcast first: the same float32 arithmetic, equal (measured 0), float32 default
    torch.testing.assert_close(ent, algo.entropy_from_logits(logits.float()))
    with pytest.raises(ValueError, match="vocab"):
        algo.entropy_from_logits(torch.zeros(4))
