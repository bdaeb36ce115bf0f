"""Rollout correction (the decoupled objective) and the policy-loss / advantage-estimator
registries of dapo.algo, in float64 against independent per-element references.

The references are Python loops with the math module written from the papers' formulas
(DAPO arXiv 2503.14476 and docs/algorithm.md; GRPO arXiv 2402.03300; Dr. GRPO arXiv 2503.20783;
GSPO arXiv 2507.18071; CISPO arXiv 2506.13585; RLOO arXiv 2402.14740; decoupled PPO arXiv 2110.00641 with truncated /
masked importance sampling): they share no code with dapo.algo beyond the DAPO token term that
tests/test_algo.py already checks literally.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from dapo import algo
from dapo.spec import ADVANTAGE_ESTIMATOR_NAMES, POLICY_LOSS_NAMES, SpecError, parse_run
from _algo_refs import random_batch, ref_group_advantages, ref_token_terms, scores_by_group

L_MAX = 9  # Dr. GRPO's constant normaliser in these tests (>= every row length)
# A weight capped at C = 2 is exp(log 2): 2.0 when exp is correctly rounded (libm, this machine's SIMD
# exp), but a SIMD exp is only specified to 1 ulp (SLEEF u10), which may give 2 - 2.2e-16. rel 1e-15
# (~4 ulp) accepts that and no ratio that was not capped (those lie >= 0.03 away from 2 here)
CAP_REL = 1e-15


# ----------------------------------------------------------------- references


def ref_weights(prox, behav, mask, mode, level, cap, stale):
    """Per element: rho = pi_prox / pi_behav (token) or prod_t rho_t (sequence), clamped in log space
    to [-20, 20]; truncate min(rho, C); mask rho in [1/C, C] else 0; none 1, or min(rho, C) on stale rows."""
    out = []
    for i, row in enumerate(mask):
        seq_log = sum(prox[i][t] - behav[i][t] for t, ok in enumerate(row) if ok)
        weights = []
        for t, ok in enumerate(row):
            if not ok:
                weights.append(0.0)
                continue
            log_rho = seq_log if level == "sequence" else prox[i][t] - behav[i][t]
            rho = math.exp(min(max(log_rho, -20.0), 20.0))
            if mode == "truncate" or (mode == "none" and stale[i]):
                weights.append(min(rho, cap))
            elif mode == "mask":
                weights.append(rho if 1.0 / cap <= rho <= cap else 0.0)
            else:
                weights.append(1.0)
        out.append(weights)
    return out


def ref_loss(name, lp, old, adv, mask, weights, eps_low=0.2, eps_high=0.28, c=10.0, gspo_eps=(3e-4, 4e-4)):
    """(loss, {metric: value}, gradient w.r.t. lp) of policy loss ``name``, element by element,
    each token's loss and gradient multiplied by its importance weight."""
    rows, cols = len(lp), len(lp[0])
    lengths = [sum(1 for ok in row if ok) for row in mask]
    n_tok = max(sum(lengths), 1)
    n_seq = max(sum(1 for n in lengths if n), 1)
    loss, grad = 0.0, [[0.0] * cols for _ in range(rows)]
    clip, lower, kl = [], [], []
    for i in range(rows):
        if not lengths[i]:
            continue
        seq_ratio = math.exp(sum(lp[i][t] - old[i][t] for t in range(cols) if mask[i][t]) / lengths[i])
        for t in range(cols):
            if not mask[i][t]:
                continue
            a, d = adv[i][t], lp[i][t] - old[i][t]
            if name in ("dapo", "grpo", "dr-grpo"):
                term, g, clipped, low, k = ref_token_terms(d, a, eps_low, eps_high, c)
            elif name == "gspo":
                s = seq_ratio
                unclipped, clipped_loss = -a * s, -a * min(max(s, 1 - gspo_eps[0]), 1 + gspo_eps[1])
                clipped, low, k = clipped_loss > unclipped, False, -d
                # d s_it / d logp_it = s_i (the stop-gradient form): gradient only on the unclipped branch
                term, g = (clipped_loss, 0.0) if clipped else (unclipped, -a * s)
            else:  # cispo
                r = math.exp(d)
                r_hat = min(max(r, 1 - eps_low), 1 + eps_high)
                term, g = -r_hat * a * lp[i][t], -r_hat * a
                clipped, low, k = r > 1 + eps_high, r < 1 - eps_low, -d
            norm = {"dapo": n_tok, "cispo": n_tok, "grpo": n_seq * lengths[i], "gspo": n_seq * lengths[i],
                    "dr-grpo": n_seq * L_MAX}[name]
            w = weights[i][t]
            loss += w * term / norm
            grad[i][t] = w * g / norm
            clip.append(float(clipped))
            lower.append(float(low))
            kl.append(k)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return loss, {"pg_clipfrac": mean(clip), "pg_clipfrac_lower": mean(lower), "ppo_kl": mean(kl)}, grad


def mixed_batch(seed, rows=8, cols=7):
    """A batch whose first rows are STALE (behaviour far from proximal: older weights) and whose
    other rows are fresh (behaviour = proximal + engine-sized numeric noise)."""
    lp, prox, adv, mask = random_batch(seed, rows, cols)
    gen = torch.Generator().manual_seed(seed + 1)
    stale = torch.zeros(rows, dtype=torch.bool)
    stale[: rows // 2] = True
    noise = torch.where(stale[:, None], 0.9 * torch.randn(rows, cols, generator=gen, dtype=torch.float64),
                        1e-3 * torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return lp, prox, prox + noise, adv, mask, stale


def cfg(**kw):
    return algo.PolicyLossConfig(max_response_length=L_MAX, **kw)


def loss_and_grad(name, lp, old, adv, mask, weights=None, config=None, **norms):
    leaf = lp.clone().requires_grad_(True)
    loss, metrics = algo.compute_policy_loss(name, leaf, old, adv, mask, config=config or cfg(), weights=weights,
                                             **norms)
    loss.backward()
    return loss.detach(), metrics, leaf.grad


# ----------------------------------------------------------------- correction weights


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", algo.CORRECTION_MODES)
@pytest.mark.parametrize("level", algo.CORRECTION_LEVELS)
def test_correction_weights_match_reference_float64(seed, mode, level):
    _, prox, behav, _, mask, stale = mixed_batch(seed)
    corr = algo.RolloutCorrection(mode=mode, level=level, threshold=2.0)
    weights, rejected = algo.rollout_correction_weights(prox, behav, mask, corr, stale)
    expected = ref_weights(prox.tolist(), behav.tolist(), mask.tolist(), mode, level, 2.0, stale.tolist())
    assert weights.dtype == torch.float64 and not weights.requires_grad
    # float64 exp of one log-ratio (token) or of a <= 7-term sum (sequence): within ~8 ulp of math.exp's
    # (measured 1.2e-16 relative); rtol 1e-12 is far above that and far below any wrong branch or cap
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # rejected = valid positions whose weight is not the plain ratio (capped by truncate, zeroed by mask)
    if mode == "mask":
        assert bool((rejected == (mask & (weights == 0))).all())
    elif mode == "truncate":
        capped = torch.isclose(weights, torch.tensor(2.0, dtype=torch.float64), rtol=CAP_REL, atol=0)
        assert bool((rejected == (mask & capped)).all()) and bool(rejected.any())
    else:
        assert not bool(rejected[~stale].any())


def test_mode_none_trains_stale_rows_off_policy_and_fresh_rows_with_weight_one():
    """Whatever the mode, a stale row never gets the on-policy weight 1 (where the policies differ)."""
    _, prox, behav, _, mask, stale = mixed_batch(4)
    weights, _ = algo.rollout_correction_weights(prox, behav, mask, algo.RolloutCorrection(mode="none"), stale)
    assert bool((weights[~stale][mask[~stale]] == 1.0).all())  # written as ones, not computed: exactly 1
    assert bool((weights[stale][mask[stale]] != 1.0).all())
    # without the stale flag mode none is plain PPO against the proximal policy: weight 1 everywhere
    plain, _ = algo.rollout_correction_weights(prox, behav, mask, algo.RolloutCorrection(mode="none"))
    assert bool((plain[mask] == 1.0).all())


def test_sequence_weight_of_a_long_response_stays_finite():
    """prod_t rho_t over 4,000 tokens overflows float64 directly (exp(4000 * 0.5)); kept in log space it caps."""
    prox = torch.zeros(2, 4000, dtype=torch.float64)
    behav = torch.full_like(prox, -0.5)
    behav[1] = 0.5  # the other direction: prod -> 0
    mask = torch.ones_like(prox, dtype=torch.bool)
    for mode, top, bottom in (("truncate", 2.0, math.exp(-20)), ("mask", 0.0, 0.0)):
        w, _ = algo.rollout_correction_weights(prox, behav, mask, algo.RolloutCorrection(mode, "sequence", 2.0))
        assert torch.isfinite(w).all()
        # top: 2.0 = exp(log 2) (CAP_REL) or an exact 0; bottom exp(-20): one float64 exp each side, <= 1 ulp
        assert w[0, 0].item() == pytest.approx(top, rel=CAP_REL, abs=0)
        assert w[1, 0].item() == pytest.approx(bottom, rel=1e-12)


def test_correction_settings_are_validated():
    with pytest.raises(ValueError, match="rolloutCorrection.mode"):
        algo.RolloutCorrection(mode="clip")
    with pytest.raises(ValueError, match="rolloutCorrection.level"):
        algo.RolloutCorrection(level="geometric")
    with pytest.raises(ValueError, match="threshold"):
        algo.RolloutCorrection(threshold=1.0)


def test_correction_metrics_match_reference():
    _, prox, behav, _, mask, stale = mixed_batch(5)
    corr = algo.RolloutCorrection(mode="mask", level="token", threshold=2.0)
    weights, rejected = algo.rollout_correction_weights(prox, behav, mask, corr, stale)
    m = algo.rollout_correction_metrics(prox, behav, mask, weights, rejected)
    pairs = [(p, b) for pr, br, mr in zip(prox.tolist(), behav.tolist(), mask.tolist())
             for p, b, ok in zip(pr, br, mr) if ok]
    diffs = [abs(math.exp(p) - math.exp(b)) for p, b in pairs]
    ws = [w for wr, mr in zip(weights.tolist(), mask.tolist()) for w, ok in zip(wr, mr) if ok]
    # float64 means, max and std of <= 56 values against statistics' (exact-rational fmean/pstdev):
    # <= ~56 x eps64 ~ 1e-14 relative (measured <= 1e-15); the std's two passes and sqrt: rel 1e-9
    assert m["training/rollout_probs_diff_mean"] == pytest.approx(statistics.fmean(diffs), rel=1e-12)
    assert m["training/rollout_probs_diff_max"] == pytest.approx(max(diffs), rel=1e-12)
    # verl's torch.std: the sample standard deviation (n - 1), not the population one
    assert m["training/rollout_probs_diff_std"] == pytest.approx(statistics.stdev(diffs), rel=1e-9)
    assert statistics.stdev(diffs) != pytest.approx(statistics.pstdev(diffs), rel=1e-6)
    assert m["rollout_corr/log_ratio_mean"] == pytest.approx(statistics.fmean(p - b for p, b in pairs), rel=1e-12)
    assert m["rollout_corr/is_weight_mean"] == pytest.approx(statistics.fmean(ws), rel=1e-12)
    assert m["rollout_corr/is_weight_max"] == pytest.approx(max(ws), rel=1e-12)
    assert m["rollout_corr/rejected_frac"] == pytest.approx(sum(1 for w in ws if w == 0) / len(ws), rel=1e-12)
    assert 0 < m["rollout_corr/rejected_frac"] < 1


# ----------------------------------------------------------------- every loss, with and without the correction


@pytest.mark.parametrize("name", POLICY_LOSS_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("corrected", [False, True])
def test_policy_losses_match_reference_float64(name, seed, corrected):
    """Loss, gradient and metrics of every registered loss on a batch mixing fresh and stale rows."""
    lp, prox, behav, adv, mask, stale = mixed_batch(seed)
    if name == "gspo":  # GSPO's range is ~1e-4: bring the sequence ratios near it so both branches occur
        lp = prox + (lp - prox) * 2e-3
    weights = None
    if corrected:
        weights, _ = algo.rollout_correction_weights(prox, behav, mask, algo.RolloutCorrection("truncate", "token"),
                                                     stale)
    loss, metrics, grad = loss_and_grad(name, lp, prox, adv, mask, weights)
    rows, cols = lp.shape
    w = weights.tolist() if corrected else [[1.0] * cols for _ in range(rows)]
    ref, ref_metrics, ref_grad = ref_loss(name, lp.tolist(), prox.tolist(), torch.broadcast_to(adv[:, None], lp.shape).tolist(),
                                          mask.tolist(), w)
    assert loss.dtype == torch.float64
    # float64 against the literal loops: sums of <= 56 terms and exp, <= ~56 x eps64 ~ 1e-14 relative on
    # any CPU (measured <= 3e-15); a formula error is >= 1e-3
    assert loss.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    for key, value in ref_metrics.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_reference_comparison_sees_clipping_for_every_loss():
    """The parity tests above exercise the clipped branches (not only the identity region)."""
    lp, prox, _, adv, mask, _ = mixed_batch(0, rows=32, cols=16)
    for name in POLICY_LOSS_NAMES:
        x = prox + (lp - prox) * 2e-3 if name == "gspo" else lp
        _, metrics, _ = loss_and_grad(name, x, prox, adv, mask)
        assert 0.05 < metrics["pg_clipfrac"].item() < 0.95, name


def test_dapo_entry_is_the_policy_loss_contract():
    lp, prox, _, adv, mask, _ = mixed_batch(3)
    for mode in algo.LOSS_AGG_MODES:
        a, ma = algo.policy_loss(lp, prox, adv, mask, loss_agg_mode=mode)
        b, mb = algo.compute_policy_loss("dapo", lp, prox, adv, mask, config=algo.PolicyLossConfig(loss_agg_mode=mode))
        # one code path reached two ways: the same arithmetic on the same machine, bit-equal by design
        assert a.item() == b.item() and all(ma[k].item() == mb[k].item() for k in ma)


@pytest.mark.parametrize("name", POLICY_LOSS_NAMES)
def test_micro_batches_and_two_ranks_sum_to_full_batch_with_correction(name):
    """Global normalisation unchanged: every loss x importance weights, split into uneven micro-batches
    over 2 ranks with the global counts, sums to the full-batch loss and gradient (float64)."""
    lp, prox, behav, adv, mask, stale = mixed_batch(6, rows=10, cols=7)
    weights, _ = algo.rollout_correction_weights(prox, behav, mask, algo.RolloutCorrection("truncate", "sequence"),
                                                 stale)
    full, _, full_grad = loss_and_grad(name, lp, prox, adv, mask, weights)
    n_tok = torch.tensor(float(mask.sum()))
    n_seq = torch.tensor(float(mask.any(-1).sum()))
    grad, total = torch.zeros_like(lp), torch.zeros((), dtype=lp.dtype)
    for rows_of_rank, splits in ((torch.tensor([0, 2, 4, 6, 8]), (2, 3)), (torch.tensor([1, 3, 5, 7, 9]), (4, 1))):
        start = 0
        for size in splits:
            idx = rows_of_rank[start:start + size]
            loss, _, g = loss_and_grad(name, lp[idx], prox[idx], adv[idx], mask[idx], weights[idx],
                                       num_tokens=n_tok, num_seqs=n_seq)
            total += loss
            grad[idx] += g
            start += size
    # float64: the same <= 70 terms in another grouping, <= 70 x eps64 ~ 2e-14 relative (measured 2e-15)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-14)


def test_weights_carry_no_gradient_and_stale_rows_change_the_update():
    lp, prox, behav, adv, mask, stale = mixed_batch(7)
    weights, _ = algo.rollout_correction_weights(prox.requires_grad_(True), behav, mask, stale_rows=stale)
    assert not weights.requires_grad
    _, _, corrected = loss_and_grad("dapo", lp, prox.detach(), adv, mask, weights)
    _, _, plain = loss_and_grad("dapo", lp, prox.detach(), adv, mask)
    assert not torch.allclose(corrected[stale], plain[stale])  # they differ by up to 0.05: far outside allclose


# ----------------------------------------------------------------- advantage estimators


def ref_advantages(name, scores, ids):
    """grpo: tests/test_algo.py's literal reference; dr-grpo: R - group mean; rloo: R - mean of the others."""
    if name == "grpo":
        return ref_group_advantages(scores, ids)
    groups = scores_by_group(scores, ids)
    out = []
    for s, g in zip(scores, ids):
        vals = groups[g]
        if name == "dr-grpo":
            out.append(s - (0.0 if len(vals) == 1 else statistics.fmean(vals)))
        else:
            out.append(s if len(vals) == 1 else s - (sum(vals) - s) / (len(vals) - 1))
    return out


@pytest.mark.parametrize("name", ADVANTAGE_ESTIMATOR_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_advantage_estimators_match_reference(name, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = [0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3]  # a group of one, pairs, and larger groups
    scores = torch.randn(len(ids), generator=gen, dtype=torch.float64)
    scores[4:6] = 0.5  # a uniform group: every estimator gives 0 there
    fn = algo.ADVANTAGE_ESTIMATORS.resolve(name)
    got = fn(scores, ids)
    # float64 group sums of <= 5 scores of size ~1: a few ulp (measured 4.4e-16); 1e-12 is far above
    torch.testing.assert_close(got, torch.tensor(ref_advantages(name, scores.tolist(), ids), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    assert got[4].item() == 0.0 and got[5].item() == 0.0


# ----------------------------------------------------------------- registries


def test_spec_choices_are_exactly_the_registries():
    """One source of truth: the spec reads the decorators of dapo/algo.py without importing torch;
    the names it reads are the imported registries' keys, in order."""
    assert POLICY_LOSS_NAMES == tuple(algo.POLICY_LOSSES) == ("dapo", "grpo", "dr-grpo", "gspo", "cispo")
    assert ADVANTAGE_ESTIMATOR_NAMES == tuple(algo.ADVANTAGE_ESTIMATORS) == ("grpo", "dr-grpo", "rloo")
    assert algo.ADVANTAGE_ESTIMATORS["grpo"] is algo.group_advantages


def test_unknown_names_are_run_file_errors_listing_the_registered_ones(run_doc):
    with pytest.raises(SpecError) as err:
        parse_run(run_doc("t", data={"train": "x.jsonl"}, algorithm={"policyLoss": "ppo"}))
    assert "spec.algorithm.policyLoss" in str(err.value) and all(n in str(err.value) for n in POLICY_LOSS_NAMES)
    with pytest.raises(SpecError) as err:
        parse_run(run_doc("t", data={"train": "x.jsonl"}, algorithm={"advantageEstimator": "gae"}))
    assert "spec.algorithm.advantageEstimator" in str(err.value) and "rloo" in str(err.value)
    with pytest.raises(ValueError, match="registered: cispo, dapo, dr-grpo, grpo, gspo"):
        algo.compute_policy_loss("ppo", *mixed_batch(0)[:3], torch.ones(8, 7, dtype=torch.bool))
    spec = parse_run(run_doc("t", data={"train": "x.jsonl"}, algorithm={
        "policyLoss": "gspo", "policyLossParams": {"eps_low": 1e-4}, "advantageEstimator": "rloo",
        "rolloutCorrection": {"mode": "mask", "level": "sequence", "threshold": 3}})).spec
    assert spec.algorithm.policy_loss == "gspo" and spec.algorithm.rollout_correction.level == "sequence"


def test_unknown_loss_parameter_names_the_field_and_accepted_ones():
    with pytest.raises(ValueError, match=r"policyLossParams: policy loss 'gspo' has no parameter\(s\) \['eps'\]; "
                                         r"it accepts \['eps_high', 'eps_low'\]"):
        algo.check_policy_loss("gspo", algo.PolicyLossConfig(params={"eps": 0.1}))
    lp, prox, _, adv, mask, _ = mixed_batch(1)
    wide = algo.compute_policy_loss("gspo", lp, prox, adv, mask, config=cfg(params={"eps_low": 0.5, "eps_high": 0.5}))
    narrow = algo.compute_policy_loss("gspo", lp, prox, adv, mask, config=cfg())
    assert wide[1]["pg_clipfrac"].item() < narrow[1]["pg_clipfrac"].item()


def test_a_loss_added_with_one_decorator_is_dispatched():
    """The documented way to add a loss: one function plus @register_policy_loss, nothing else."""

    @algo.register_policy_loss("test-reinforce", aggregation="token-mean")
    def reinforce(log_prob, old_log_prob, advantages, mask, config, *, scale: float = 1.0):
        return -scale * advantages * log_prob, {"ppo_kl": algo.masked_mean(old_log_prob - log_prob, mask).detach()}

    try:
        lp, prox, _, adv, mask, _ = mixed_batch(2)
        loss, _, grad = loss_and_grad("test-reinforce", lp, prox, adv, mask, config=cfg(params={"scale": 2.0}))
        n = mask.sum()
        # float64, the same few operations per token and one sum: within a few ulp; the float64 default
        # (1e-7) and approx's rel 1e-6 are far above
        torch.testing.assert_close(grad, torch.where(mask, -2.0 * adv[:, None] / n, 0.0))
        assert loss.item() == pytest.approx(float((-2.0 * adv[:, None] * lp)[mask].sum() / n))
        with pytest.raises(ValueError, match="registered twice"):
            algo.register_policy_loss("test-reinforce")(reinforce)
    finally:
        del algo.POLICY_LOSSES["test-reinforce"], algo.POLICY_LOSSES.meta["test-reinforce"]
