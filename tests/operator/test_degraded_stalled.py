"""The Degraded and Stalled conditions: pure reconcile passes with a fixed clock, then the
operator (real kopf) against kmock's API emulator with a fake learner /status."""

from __future__ import annotations

import datetime as dt

import pytest

from dapo_operator.reconcile import DeletePod, EmitEvent, reconcile
from operator_testkit import (
    EXPECTED, T0, all_running, apply, create_run, eventually, learner_answer, observe, phase_is, pods_named,
    run_obj, run_status, running_operator, declare_resources, no_pods, sent, set_phase, set_pod,
)


def _running(obj, step=3, now=T0):
    """The demo run's pods created and all ready, learner-0 training at ``step``: (pods, plan)."""
    pods = apply(obj, [], reconcile(obj, observe([], now=now)))
    for pod in pods:
        set_phase(pods, pod["metadata"]["name"], "Running", True)
    plan = reconcile(obj, observe(pods, learner_answer("running", step=step), now=now))
    return apply(obj, pods, plan), plan


def _condition(status, kind):
    return next(c for c in status["conditions"] if c["type"] == kind)


def _events(plan, reason):
    return [a for a in plan.actions if isinstance(a, EmitEvent) and a.reason == reason]


def _at(seconds):
    return T0 + dt.timedelta(seconds=seconds)


def test_stalled_turns_true_at_the_timeout_and_clears_when_a_step_finishes():
    obj = run_obj(stallTimeoutSeconds=60)
    pods, plan = _running(obj, step=3)
    assert plan.status["lastProgressTime"] == "2025-01-01T00:00:00Z"
    assert _condition(plan.status, "Stalled")["status"] == "False"

    plan = reconcile(obj, observe(pods, learner_answer("running", step=3), now=_at(59)))
    pods = apply(obj, pods, plan)
    assert _condition(plan.status, "Stalled")["status"] == "False" and not _events(plan, "Stalled")

    plan = reconcile(obj, observe(pods, learner_answer("running", step=3), now=_at(60)))
    pods = apply(obj, pods, plan)
    stalled = _condition(plan.status, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "NoStepFinished"
    assert "since 2025-01-01T00:00:00Z (step 3; spec.stallTimeoutSeconds=60)" in stalled["message"]
    assert [e.type for e in _events(plan, "Stalled")] == ["Warning"]
    assert plan.status["phase"] == "Running" and plan.of(DeletePod) == []  # stallAction report keeps the pods

    # the condition settles: the next pass changes nothing and posts no second event
    again = reconcile(obj, observe(pods, learner_answer("running", step=3), now=_at(90)))
    assert again.status == plan.status and not _events(again, "Stalled")

    plan = reconcile(obj, observe(pods, learner_answer("running", step=4), now=_at(95)))
    assert _condition(plan.status, "Stalled")["status"] == "False"
    assert plan.status["lastProgressTime"] == "2025-01-01T00:01:35Z"
    assert [e.type for e in _events(plan, "Progressing")] == ["Normal"]


def test_without_a_stall_timeout_a_run_never_stalls():
    obj = run_obj()
    pods, _ = _running(obj, step=3)
    plan = reconcile(obj, observe(pods, learner_answer("running", step=3), now=_at(10 * 86400)))
    assert _condition(plan.status, "Stalled")["status"] == "False"


def test_the_stall_clock_restarts_when_the_run_enters_running_again():
    """A run that was Starting (a gang restart, a resume) does not count that time as a stall."""
    obj = run_obj(stallTimeoutSeconds=60)
    pods, _ = _running(obj, step=3)
    plan = reconcile(obj, observe(pods, learner_answer("starting", step=3), now=_at(30)))
    pods = apply(obj, pods, plan)
    assert plan.status["phase"] == "Starting"
    plan = reconcile(obj, observe(pods, learner_answer("running", step=3), now=_at(100)))
    assert plan.status["lastProgressTime"] == "2025-01-01T00:01:40Z"
    assert _condition(plan.status, "Stalled")["status"] == "False"


def test_stall_action_fail_fails_the_run_and_deletes_its_pods():
    obj = run_obj(stallTimeoutSeconds=60, stallAction="fail")
    pods, _ = _running(obj, step=3)
    plan = reconcile(obj, observe(pods, learner_answer("running", step=3), now=_at(59)))
    pods = apply(obj, pods, plan)
    assert plan.status["phase"] == "Running"
    plan = reconcile(obj, observe(pods, learner_answer("running", step=3), now=_at(61)))
    pods = apply(obj, pods, plan)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "Stalled"
    assert "spec.stallTimeoutSeconds=60" in plan.status["message"]
    assert pods == [] and len(plan.of(DeletePod)) == len(EXPECTED)


def test_stall_action_fail_spares_a_run_whose_step_just_advanced():
    obj = run_obj(stallTimeoutSeconds=60, stallAction="fail")
    pods, _ = _running(obj, step=3)
    plan = reconcile(obj, observe(pods, learner_answer("running", step=4), now=_at(61)))
    assert plan.status["phase"] == "Running" and plan.of(DeletePod) == []


def test_degraded_names_the_replicas_that_are_not_ready_and_clears():
    obj = run_obj()
    pods, plan = _running(obj)
    assert _condition(plan.status, "Degraded")["status"] == "False"
    set_phase(pods, "demo-reward-0", "Running", False)
    plan = reconcile(obj, observe(pods, learner_answer("running", step=4), now=_at(10)))
    pods = apply(obj, pods, plan)
    degraded = _condition(plan.status, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ReplicasNotReady"
    assert degraded["message"].endswith("not ready: demo-reward-0")
    assert [e.type for e in _events(plan, "Degraded")] == ["Warning"] and plan.status["rewardReady"] == "0/1"
    set_phase(pods, "demo-reward-0", "Running", True)
    plan = reconcile(obj, observe(pods, learner_answer("running", step=5), now=_at(20)))
    assert _condition(plan.status, "Degraded")["status"] == "False"
    assert [e.type for e in _events(plan, "Restored")] == ["Normal"]


# --------------------------------------------------------------------------- against the API emulator


def _condition_is(kind, value):
    async def check(kmock):
        status = await run_status(kmock)
        found = [c for c in status.get("conditions") or [] if c["type"] == kind]
        return status if found and found[0]["status"] == value else None
    return check


def _posted(kmock, reason):
    return [r.data for r in sent(kmock, "POST", "/events") if r.data.get("reason") == reason]


@pytest.mark.integration
async def test_operator_sets_and_clears_degraded_and_stalled_with_events(kmock, fake_learner, run_doc):
    declare_resources(kmock)
    async with running_operator(kmock):  # polls every 0.2 s
        await create_run(kmock, run_doc(preset="operator", stallTimeoutSeconds=1))
        await eventually(lambda: pods_named(kmock, EXPECTED))
        await all_running(kmock)
        fake_learner.answers["demo"] = learner_answer("running", step=3)
        await eventually(lambda: phase_is(kmock, "Running"))

        status = await eventually(lambda: _condition_is("Stalled", "True")(kmock), timeout=5.0)
        assert status["phase"] == "Running" and status["step"] == 3
        assert "spec.stallTimeoutSeconds=1" in _posted(kmock, "Stalled")[0]["message"]
        fake_learner.answers["demo"] = learner_answer("running", step=4)
        await eventually(lambda: _condition_is("Stalled", "False")(kmock))
        assert _posted(kmock, "Progressing")

        fake_learner.answers["demo"] = learner_answer("running", step=5)
        await set_pod(kmock, "demo-rollout-1", "Running", ready=False)
        status = await eventually(lambda: _condition_is("Degraded", "True")(kmock))
        assert "demo-rollout-1" in [c for c in status["conditions"] if c["type"] == "Degraded"][0]["message"]
        assert status["rolloutReady"] == "1/2" and _posted(kmock, "Degraded")
        await set_pod(kmock, "demo-rollout-1", "Running", ready=True)
        await eventually(lambda: _condition_is("Degraded", "False")(kmock))
        assert _posted(kmock, "Restored")


@pytest.mark.integration
async def test_operator_fails_a_stalled_run_when_told_to(kmock, fake_learner, run_doc):
    declare_resources(kmock)
    async with running_operator(kmock):
        await create_run(kmock, run_doc(preset="operator", stallTimeoutSeconds=1, stallAction="fail"))
        await eventually(lambda: pods_named(kmock, EXPECTED))
        await all_running(kmock)
        fake_learner.answers["demo"] = learner_answer("running", step=3)
        status = await eventually(lambda: phase_is(kmock, "Failed"), timeout=5.0)
        assert status["reason"] == "Stalled"
        await eventually(lambda: no_pods(kmock))
