"""spec.guardrails: the rule checks (pure), and the trainer's rollback / suspend / fail on the tiny
policy in process. A guardrail on actor/lr makes the trip step exact: the warm-up raises the learning
rate by a known amount each step (lr 1e-3, warmupSteps 4: 2.5e-4, 5e-4, 7.5e-4, 1e-3)."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from _tiny_trainer import OverlapScorer, checkpoint_folder, tiny_trainer
from dapo.cli import run_command
from dapo.contracts import GUARDRAIL_FAIL_EXIT_CODE, GUARDRAIL_SUSPEND_EXIT_CODE, GuardrailTrip
from dapo.controller.guardrails import GuardrailStop, Guardrails, checked_value, out_of_bounds
from dapo.controller.trainer import Trainer
from dapo.spec import GuardrailSpec, SpecError


def rule(**fields) -> GuardrailSpec:
    return GuardrailSpec.model_validate({"metric": "actor/entropy", "action": "rollback", **fields})


# --------------------------------------------------------------------------- the checks (pure)


def test_bounds_and_non_finite_values():
    """above trips on a larger value, below on a smaller one, NaN / inf on either (a NaN entropy
    is a collapse); a missing or None metric is not checked at all."""
    above, below = rule(above=2.0), rule(below=0.1)
    assert out_of_bounds(above, 2.5) and not out_of_bounds(above, 2.0)
    assert out_of_bounds(below, 0.05) and not out_of_bounds(below, 0.1)
    for value in (float("nan"), float("inf")):
        checked = checked_value(above, {"actor/entropy": value}, {})
        assert math.isnan(checked) and out_of_bounds(above, checked) and out_of_bounds(below, checked)
    assert checked_value(below, {}, {}) is None and checked_value(below, {"actor/entropy": None}, {}) is None


def test_for_steps_needs_consecutive_breaches():
    """forSteps 3: two breaches, a step within bounds, then three breaches: the trip comes at the
    third breach in a row, and every breached step is reported as not held."""
    guards = Guardrails([rule(below=0.1, forSteps=3)])
    values = [0.05, 0.05, 0.5, 0.05, 0.05, 0.05]
    verdicts = [guards.observe(step, {"actor/entropy": v}) for step, v in enumerate(values, start=1)]
    assert [v.held for v in verdicts] == [False, False, True, False, False, False]
    assert [v.trip is not None for v in verdicts] == [False] * 5 + [True]
    trip = verdicts[-1].trip
    assert (trip.step, trip.value, trip.metric, verdicts[-1].trip_index) == (6, 0.05, "actor/entropy", 0)
    assert trip.rule == "actor/entropy below 0.1 for 3 steps"


def test_change_measure_compares_with_the_previous_reported_value():
    """measure change: the difference from the last step that reported the metric; the first step
    has nothing to compare with, and a step without the metric keeps the previous value."""
    guards = Guardrails([rule(metric="critic/score/mean", measure="change", below=-0.3, action="fail")])
    assert guards.observe(1, {"critic/score/mean": 0.6}).values == {}
    assert guards.observe(2, {"critic/score/mean": 0.5}).trip is None  # change -0.1
    assert guards.observe(3, {}).values == {}
    verdict = guards.observe(4, {"critic/score/mean": 0.1})  # change -0.4 from step 2's 0.5
    assert verdict.trip is not None and verdict.values[0] == pytest.approx(-0.4)


def test_val_metrics_are_checked_only_when_reported():
    guards = Guardrails([rule(metric="val/acc/mean", below=0.2, action="suspend")])
    assert guards.observe(1, {"actor/entropy": 1.0}).held and guards.observe(1, {}).trip is None
    assert guards.observe(2, {"val/acc/mean": 0.1}).trip.action == "suspend"


def test_rollback_budget_and_learning_rate_scale():
    """Each rollback multiplies the learning-rate scale by learningRateScale and counts against
    maxRollbacks; past it begin_rollback refuses. The state round-trips through JSON."""
    guards = Guardrails([rule(below=0.1, learningRateScale=0.3, maxRollbacks=2)])
    trip = GuardrailTrip(metric="actor/entropy", value=0.0, step=5, action="rollback", rule="r")
    assert guards.begin_rollback(0, trip).rollbacks == 1 and guards.begin_rollback(0, trip).rollbacks == 2
    assert guards.lr_scale == pytest.approx(0.09) and guards.begin_rollback(0, trip) is None
    copy = Guardrails(guards.rules)
    copy.load_state_dict(json.loads(json.dumps(guards.state_dict())))
    assert copy.state_dict() == guards.state_dict()


# --------------------------------------------------------------------------- the trainer


def lr_guardrail(**fields) -> dict:
    return {"metric": "actor/lr", "above": 6e-4, **fields}


def lr_run(tmp_path, guardrails, *, steps=6):
    return tiny_trainer(tmp_path, OverlapScorer("alternate"), learner={"totalSteps": steps, "warmupSteps": 4},
                        checkpoint={"everySteps": 1, "keep": 10}, eval={"beforeTrain": False, "everySteps": 0},
                        guardrails=guardrails)


def step_lines(trainer) -> list[dict]:
    lines = [json.loads(x) for x in trainer.metrics.path.read_text().splitlines()]
    return [x for x in lines if "actor/lr" in x]


@pytest.mark.integration
def test_rollback_restores_the_checkpoint_state_and_scales_the_learning_rate(tmp_path, monkeypatch):
    """actor/lr above 6e-4 trips at step 3 (7.5e-4). Right after the rollback the trainer holds
    checkpoint step 2 exactly: weights (learner and engine), AdamW moments, sampler position and
    RNG, with the schedule's base lr x learningRateScale; training then repeats steps 3-6 at half
    the learning rate, publishes higher weight versions, and finishes."""
    seen = {}
    original = Trainer._roll_back

    def spy(self, tripped):
        original(self, tripped)
        seen.update(step=self.step, weights={k: v.clone() for k, v in self.learner.model.state_dict().items()},
                    engine={k: v.clone() for k, v in self.engine.model.state_dict().items()},
                    learner=copy.deepcopy(self.learner.state_dict()), sampler=self.sampler.state_dict(),
                    rng=self.rng.getstate(), version=self.weight_version, engine_version=self.engine.weight_version)

    monkeypatch.setattr(Trainer, "_roll_back", spy)
    trainer = lr_run(tmp_path, [lr_guardrail(action="rollback", learningRateScale=0.5)])
    trainer.train()
    assert trainer.step == 6 and trainer.state == "succeeded"

    saved = checkpoint_folder(tmp_path / "out", 2)
    assert seen["step"] == 2
    weights = load_file(str(saved / "model" / "model.safetensors"))
    for name, tensor in weights.items():
        torch.testing.assert_close(seen["weights"][name], tensor, atol=0, rtol=0, msg=name)
        torch.testing.assert_close(seen["engine"][name], tensor, atol=0, rtol=0, msg=name)
    learner = torch.load(saved / "learner.pt", weights_only=False)
    moments = learner["optimizer"]["state"]
    assert moments, "the checkpoint holds AdamW moments"
    for index, state in moments.items():
        for key, tensor in state.items():
            torch.testing.assert_close(seen["learner"]["optimizer"]["state"][index][key], tensor, atol=0, rtol=0)
    assert seen["learner"]["scheduler"]["base_lrs"] == [learner["scheduler"]["base_lrs"][0] * 0.5]
    assert seen["learner"]["scheduler"]["last_epoch"] == learner["scheduler"]["last_epoch"] == 2
    trainer_state = json.loads((saved / "trainer_state.json").read_text())
    assert seen["sampler"] == trainer_state["sampler"]
    assert list(seen["rng"][1]) == trainer_state["python_random"][1]
    assert seen["version"] == seen["engine_version"] == 4  # step 3 had published version 3

    lines = step_lines(trainer)
    assert [x["step"] for x in lines] == [1, 2, 3, 3, 4, 5, 6]
    assert [x["actor/lr"] for x in lines] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 3.75e-4, 5e-4, 5e-4, 5e-4])
    assert trainer.status()["guardrail"]["message"].startswith("rolled back to checkpoint step 2")
    assert trainer.weight_version == 8


@pytest.mark.integration
def test_for_steps_rolls_back_to_before_the_breach_began(tmp_path):
    """forSteps 2: steps 3 and 4 breach, the trip is at step 4, and the checkpoint of step 3
    (committed, but not held) is skipped: training returns to step 2 and commits 3 again."""
    trainer = lr_run(tmp_path, [lr_guardrail(action="rollback", forSteps=2, learningRateScale=0.5)], steps=5)
    trainer.train()
    lines = step_lines(trainer)
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 3, 4, 5]
    assert trainer.guardrails.trips[0].step == 4 and "checkpoint step 2" in trainer.guardrails.trips[0].message
    meta = {c.step: c.manifest["meta"]["guardrails_held"] for c in trainer.checkpointer.store.list_committed()}
    assert meta[2] and meta[3] and meta[5]  # step 3 recommitted after the rollback, at the lower lr


@pytest.mark.integration
def test_a_rollback_guardrail_out_of_rollbacks_fails_the_run(tmp_path):
    """learningRateScale 1 cannot help: the second trip (maxRollbacks 1) fails the run, and the
    trainer reports state failed with the guardrail's line."""
    trainer = lr_run(tmp_path, [lr_guardrail(action="rollback", maxRollbacks=1)])
    with pytest.raises(GuardrailStop) as caught:
        trainer.train()
    assert caught.value.exit_code == GUARDRAIL_FAIL_EXIT_CODE and caught.value.trip.action == "fail"
    assert "maxRollbacks=1" in str(caught.value)
    assert trainer.state == "failed" and trainer.status()["guardrail"]["action"] == "fail"
    assert [x["step"] for x in step_lines(trainer)] == [1, 2, 3, 3]


@pytest.mark.integration
@pytest.mark.parametrize("action,code,state", [("suspend", GUARDRAIL_SUSPEND_EXIT_CODE, "suspended"),
                                               ("fail", GUARDRAIL_FAIL_EXIT_CODE, "failed")])
def test_suspend_and_fail_stop_at_the_trip_without_a_checkpoint_of_it(tmp_path, action, code, state):
    trainer = lr_run(tmp_path, [lr_guardrail(action=action)])
    with pytest.raises(GuardrailStop) as caught:
        trainer.train()
    assert caught.value.exit_code == code and trainer.state == state and trainer.step == 3
    assert trainer.status()["state"] == state and trainer.status()["guardrail"]["step"] == 3
    assert [c.step for c in trainer.checkpointer.store.list_committed()] == [1, 2]
    trip_lines = [json.loads(x) for x in trainer.metrics.path.read_text().splitlines() if "guardrail/tripped" in x]
    assert [(x["step"], x["guardrail/action"], x["guardrail/value"]) for x in trip_lines] == [(3, action, 7.5e-4)]


@pytest.mark.integration
def test_a_guardrail_on_a_metric_the_run_does_not_write_is_a_run_file_error(tmp_path):
    trainer = lr_run(tmp_path, [{"metric": "actor/entropyy", "below": 0.1, "action": "fail"}])
    with pytest.raises(SpecError, match=r"spec.guardrails\[0\].metric 'actor/entropyy' is not a metric this run "
                                        r"writes \(did you mean actor/entropy"):
        trainer.train()


def test_the_cli_prints_the_guardrail_line_and_exits_with_its_code(capsys):
    trip = GuardrailTrip(metric="actor/entropy", value=0.01, step=7, action="suspend", rule="actor/entropy below 0.05",
                         message="training suspended")

    def stop(_args):
        raise GuardrailStop(trip)

    assert run_command(SimpleNamespace(func=stop)) == GUARDRAIL_SUSPEND_EXIT_CODE
    assert capsys.readouterr().err.strip() == (
        "guardrail: guardrail actor/entropy below 0.05 tripped at step 7 (actor/entropy 0.01): training suspended")


@pytest.mark.integration
def test_a_resume_trains_at_the_edited_learning_rate_times_the_guardrail_scale(tmp_path):
    """After a rollback at learningRateScale 0.5 (step 3, lr 7.5e-4 -> checkpoint 2), the run is
    resumed from its last checkpoint with spec.learner.lr edited from 1e-3 to 4e-4: the resumed
    steps train at 4e-4 x 0.5 x warm-up (a person's edit after a suspend must apply; the scale the
    guardrail chose too), and the rollback count survives the resume."""
    from _dapo_tiny import tiny_policy
    from _run_files import run_doc
    from dapo.entry.inprocess import build_embedded_run
    from dapo.spec import parse_run

    guard = [lr_guardrail(action="rollback", learningRateScale=0.5)]
    first = lr_run(tmp_path, guard, steps=4)
    first.train()
    assert [x["actor/lr"] for x in step_lines(first)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 3.75e-4, 5e-4])
    doc = run_doc(preset="tiny", folder=tmp_path, learner={"totalSteps": 6, "warmupSteps": 4, "lr": 4e-4},
                  checkpoint={"everySteps": 1, "keep": 10}, eval={"beforeTrain": False, "everySteps": 0},
                  guardrails=guard)
    resumed = build_embedded_run(parse_run(doc), tmp_path / "out", resume=True, scorer=OverlapScorer("alternate"),
                                 policy=tiny_policy(32, 2, 0)).trainer
    assert resumed.step == 4 and resumed.guardrails.rollbacks == [1] and resumed.guardrails.lr_scale == 0.5
    resumed.train()
    assert [x["actor/lr"] for x in step_lines(resumed)][-2:] == pytest.approx([2e-4, 2e-4])
