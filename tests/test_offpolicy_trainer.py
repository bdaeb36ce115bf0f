"""Stale (surplus) samples through the real Trainer on the tiny model: their behaviour log-probs
are the engine's (not recomputed), they survive the checkpointed state, and the importance
weight differs from 1 exactly where the sampling policy differs from the trained one.

Set-up (the ``tiny`` run file, tests/_run_files.py): trainBatchSize 2, genBatchSize 3, every group mixed, so
step 1 trains 2 of 3 generated groups and carries 1 over (sampled by weight version 0); step 2
trains that stale group next to 1 group freshly sampled by version 1.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from dapo.algo import log_probs_from_logits
from dapo.controller.trainer import Group
from _tiny_trainer import OverlapScorer, tiny_trainer

pytestmark = pytest.mark.integration  # the real Trainer and HFEngine in this process
torch.set_num_threads(2)


def _record(trainer):
    """Wrap engine.generate and learner.correct_for_rollout to keep what they returned."""
    generated, corrected = [], []
    gen, corr = trainer.engine.generate, trainer.learner.correct_for_rollout

    def generate(*args, **kwargs):
        out = gen(*args, **kwargs)
        generated.extend(out)
        return out

    def correct(batch):
        out = corr(batch)
        corrected.append((batch, out[0].is_weights))
        return out

    trainer.engine.generate, trainer.learner.correct_for_rollout = generate, correct
    return generated, corrected


@torch.no_grad()
def _log_probs(model, batch):
    """log pi(response tokens) under ``model`` (temperature 1), written out independently of the learner."""
    logits = model.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False).logits
    width = batch.responses.shape[1]
    predicting = logits[:, batch.prompt_width - 1: batch.prompt_width - 1 + width]
    return log_probs_from_logits(predicting, batch.responses) * batch.response_mask


@pytest.mark.parametrize("mode", ["none", "truncate"])
def test_stale_surplus_is_trained_with_the_engines_log_probs(tmp_path, mode):
    # maxStaleness 1 lets one-version-old surplus train (train_step collects in line, synchronously)
    trainer = tiny_trainer(tmp_path, OverlapScorer("alternate"), rollout={"genBatchSize": 3, "maxStaleness": 1},
                           eval={"beforeTrain": False, "everySteps": 0},
                           algorithm={"rolloutCorrection": {"mode": mode, "level": "token", "threshold": 2.0}},
                           learner={"shuffle": False})  # keep the stale rows first: the checks below index them
    generated, corrected = _record(trainer)
    version0 = copy.deepcopy(trainer.learner.model)
    trainer.train_step()
    (carried,) = trainer.surplus
    assert carried.weight_version == 0 and {s.weight_version for s in carried.samples} == {0}
    # the surplus keeps the engine's log-probs through the checkpointed (JSON) trainer state
    restored = Group.from_state(json.loads(json.dumps(trainer.state_dict()))["surplus"][0])
    assert [s.log_probs for s in restored.samples] == [s.log_probs for s in carried.samples]
    assert [s.weight_version for s in restored.samples] == [0] * len(carried.samples)
    trainer.surplus = [restored]

    metrics = trainer.train_step()
    batch, weights = corrected[-1]
    n = trainer.spec.rollout.n
    stale = batch.stale_rows()
    assert batch.policy_version == 1 and stale.tolist() == [True] * n + [False] * n
    assert metrics["async/lag_0_frac"] == 0.5 and metrics["async/lag_1_frac"] == 0.5  # n / 2n: exact fractions
    mask = batch.response_mask.bool()
    # every row's behaviour log-probs are the sampling engine's own numbers, bit for bit
    engine_rows = [s.log_probs for s in carried.samples] + [s.log_probs for s in generated[-3 * n:][:n]]
    for row, expected in enumerate(engine_rows):  # copied, never recomputed: exact by design
        assert batch.behaviour_log_probs[row, : len(expected)].tolist() == expected
    # ... which for the stale rows are the OLD policy's (version 0), not the recomputed proximal ones
    old_policy = _log_probs(version0, batch.rows(0, n))
    # float32 log-probs (|log p| < 8, ulp 4.8e-7), engine's KV-cache decode vs one padded forward: measured
    # <= 1 ulp (AVX2, scalar kernels); 2e-5 is ~40 ulp and 30x below the >= 6.2e-4 by which one step moved
    # them (the former 3e-5 + 1e-4 |log p|, up to 8e-4, could not tell version 0 from version 1)
    torch.testing.assert_close(batch.behaviour_log_probs[:n], old_policy, atol=2e-5, rtol=0)
    moved = (batch.old_log_probs[:n] - batch.behaviour_log_probs[:n]).abs()[mask[:n]]
    # one step (lr 1e-3) moved every stale token's log-prob by >= 6.2e-4 (measured); float noise is ~1e-6
    assert float(moved.min()) > 1e-4, "the proximal policy must differ from the one that sampled the stale rows"

    # the importance weight: != 1 exactly on the stale rows' tokens (mode none: exactly 1 on fresh rows)
    ratio = [[min(math.exp(p - b), 2.0) for p, b in zip(pr, br)]
             for pr, br in zip(batch.old_log_probs.tolist(), batch.behaviour_log_probs.tolist())]
    ratio = torch.tensor(ratio) * mask
    # the learner's float32 exp(old - behaviour) against math.exp of the same float32 inputs: the
    # difference's rounding (eps32 x |d|, |d| < 1) and exp's (1 ulp): <= ~3 ulp, 3.6e-7 relative (measured
    # 6e-8); rtol 1e-6
    torch.testing.assert_close(weights[:n], ratio[:n], rtol=1e-6, atol=0)
    assert bool((weights[:n][mask[:n]] != 1.0).all())
    fresh = weights[n:][mask[n:]]
    if mode == "none":
        assert bool((fresh == 1.0).all())  # written as ones, not computed: exactly 1
    else:  # the engine's and the learner's numerics only: within float32 noise of 1
        # their log-probs are <= 1 ulp (4.8e-7) apart (measured, as above): weights within ~5e-7 of 1; 1e-4 is
        # 200x that and 1/6 of the smallest stale-row move
        torch.testing.assert_close(fresh, torch.ones_like(fresh), atol=1e-4, rtol=0)
        torch.testing.assert_close(weights[n:], ratio[n:], rtol=1e-6, atol=0)
    for key in ("rollout_corr/is_weight_mean", "rollout_corr/is_weight_max", "training/rollout_probs_diff_max"):
        assert math.isfinite(metrics[key])
    assert metrics["training/rollout_probs_diff_max"] > 1e-4  # measured 8.9e-4 from the stale rows; noise ~1e-7
