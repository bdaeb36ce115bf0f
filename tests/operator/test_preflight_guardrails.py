"""spec.preflight (the check pod and the Validated condition) and spec.guardrails on a cluster (the
GuardrailTripped condition, suspend and fail): pure reconcile passes with a fixed clock, then the
operator (real kopf) against kmock's API emulator, where the test plays the kubelet."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest

from dapo.contracts import GUARDRAIL_FAIL_EXIT_CODE, GUARDRAIL_SUSPEND_EXIT_CODE
from dapo.spec import parse_run
from dapo_operator.builders import build_check_pod
from dapo_operator.reconcile import CreateObject, DeletePod, EmitEvent, Observed, PatchRun, reconcile
from dapo_operator.status import sanitize_learner_status
from _run_files import run_doc, write_tiny_prompts
from operator_testkit import (
    EXPECTED, RUNS, T0, all_running, api, apply, check_done, create_run, declare_resources, eventually,
    learner_answer, no_pods, observe, phase_is, pods_named, run_check_command, run_obj, run_status,
    running_operator, sent, set_phase, start_running_run,
)

GANG = sorted(EXPECTED)


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), None)


def _events(plan, reason: str) -> list[EmitEvent]:
    return [a for a in plan.actions if isinstance(a, EmitEvent) and a.reason == reason]


def _created_pods(plan) -> list[str]:
    return [a.obj["metadata"]["name"] for a in plan.of(CreateObject) if a.obj["kind"] == "Pod"]


def _at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


# --------------------------------------------------------------------------- the check pod


def test_check_pod_is_a_cpu_pod_with_the_reward_pods_code_and_data_but_no_other_secret():
    run = parse_run(run_doc(
        preset="operator", storage={"credentialsSecret": "s3-creds"},
        tracking={"wandb": {"project": "p"}, "credentialsSecret": "tracker-keys"},
        learner={"resources": {"gpus": 8}, "nodeSelector": {"pool": "gpu"}},
        rollout={"resources": {"gpus": 1}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
        reward={"replicas": 1, "image": "img:scorers", "scorerConfigMap": "my-scorers",
                "nodeSelector": {"pool": "gpu"}, "remote": {"url": "https://judge.example", "headersSecret": "hdr"},
                "scorers": [{"dataSource": "*", "function": "/etc/dapo/scorers/judge.py:score"}]},
        preflight={"timeoutSeconds": 120}))
    pod = build_check_pod(run, "ns1", image="img:op")
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert pod["metadata"]["name"] == "demo-check" and pod["metadata"]["labels"]["dapo.dev/role"] == "check"
    assert "dapo.dev/gang-generation" not in pod["metadata"]["labels"]
    assert container["command"] == ["dapo", "check", "/etc/dapo/run.yaml"] and container["image"] == "img:scorers"
    assert "nvidia.com/gpu" not in str(container["resources"]) and container["resources"]["requests"]["cpu"] == "1"
    for key in ("nodeSelector", "tolerations", "affinity", "hostname", "subdomain", "schedulingGates"):
        assert key not in spec, key
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["activeDeadlineSeconds"] == 120 and container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"run-file": "/etc/dapo", "tmp": "/tmp", "cache": "/cache", "scorers": "/etc/dapo/scorers"}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["DAPO_CACHE_DIR"] == "/cache"
    assert "envFrom" not in container and "tracker-keys" not in str(pod) and "hdr" not in str(pod)


def _checking(**spec):
    """The first pass of a new run: ConfigMap, Services and the check pod only. (obj, pods, plan)"""
    obj = run_obj(**spec)
    plan = reconcile(obj, Observed(now=T0))
    assert _created_pods(plan) == ["demo-check"]
    return obj, apply(obj, [], plan, check_exit=None), plan


def test_no_gang_pod_before_the_check_passed_and_validated_survives_restarts_resumes_and_edits():
    obj, pods, plan = _checking()
    validated = _condition(plan.status, "Validated")
    assert validated["status"] == "Unknown" and validated["reason"] == "Checking"
    assert plan.status["phase"] == "Pending" and plan.status["reason"] == "Validating"
    set_phase(pods, "demo-check", "Running")
    plan = reconcile(obj, observe(pods, now=_at(60)))  # still checking: nothing else is created
    assert plan.of(CreateObject) == [] and plan.of(DeletePod) == []
    pods = apply(obj, pods, plan, check_exit=None)

    pods[0]["status"] = check_done(0)
    plan = reconcile(obj, observe(pods, now=_at(70)))
    assert _condition(plan.status, "Validated")["status"] == "True"
    assert sorted(_created_pods(plan)) == GANG and [a.name for a in plan.of(DeletePod)] == ["demo-check"]
    assert [e.type for e in _events(plan, "Validated")] == ["Normal"]
    pods = apply(obj, pods, plan)

    # A gang restart, a spec edit, a suspend / resume and an operator restart (a pass from the
    # stored status alone) never create the check pod again.
    set_phase(pods, "demo-rollout-0", "Failed")
    obj["spec"]["learner"]["lr"] = 3e-6
    obj["metadata"]["generation"] = 2
    for _ in range(2):
        plan = reconcile(obj, observe(pods, now=_at(80)))
        assert "demo-check" not in _created_pods(plan)
        pods = apply(obj, pods, plan)
    assert obj["status"]["gangGeneration"] == 1
    obj["spec"]["suspend"] = True
    pods = apply(obj, pods, reconcile(obj, observe(pods, now=_at(90))))
    obj["spec"]["suspend"] = False
    plan = reconcile(dict(obj, status=dict(obj["status"])), observe(pods, now=_at(100)))
    assert sorted(_created_pods(plan)) == GANG
    assert _condition(plan.status, "Validated")["status"] == "True"


def test_a_spec_edit_while_the_check_runs_checks_the_edited_run_file():
    obj, pods, _ = _checking()
    pods[0]["status"] = check_done(0)  # a verdict about the run file before the edit
    obj["spec"]["learner"]["lr"] = 3e-6
    cms, svcs = {"demo-spec"}, {"demo-learner", "demo-rollout", "demo-reward"}
    stale = {"demo-spec": {"run.yaml": "the run file before the edit"}}
    plan = reconcile(obj, Observed(pods=pods, config_maps=cms, services=svcs, now=_at(5), config_map_data=stale))
    assert [a.name for a in plan.of(DeletePod)] == ["demo-check"] and _created_pods(plan) == []
    assert _condition(plan.status, "Validated")["status"] == "Unknown"
    pods = apply(obj, pods, plan, check_exit=None)
    plan = reconcile(obj, observe(pods, now=_at(6)))  # the new check pod, on the edited file
    assert _created_pods(plan) == ["demo-check"]
    assert _condition(plan.status, "Validated")["lastTransitionTime"] == "2025-01-01T00:00:06Z"  # its own clock


@pytest.mark.parametrize("case", ["problems", "oom", "image", "timeout"])
def test_a_failed_check_fails_the_run_without_a_gang_pod(case):
    obj, pods, _ = _checking()
    now = _at(30)
    if case == "problems":  # dapo check's exit 2: its error lines become the message
        pods[0]["status"] = check_done(2, "  schema: demo is a valid DAPORun\nwarning: w\n"
                                          "error: spec.reward.scorers[0].function: cannot import 'nope'\n"
                                          "error: spec.data.train: not found\ndapo check x: 2 problem(s) in 1.0s")
    elif case == "oom":
        pods[0]["status"] = check_done(137, "")
        pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] = "OOMKilled"
    elif case == "image":  # a container that cannot start keeps the pod Pending: not a wait until the timeout
        pods[0]["status"] = {"phase": "Pending", "containerStatuses": [{"name": "check", "state": {"waiting": {
            "reason": "ImagePullBackOff", "message": "Back-off pulling image \"img:typo\""}}}]}
    else:  # still running past spec.preflight.timeoutSeconds (default 900)
        set_phase(pods, "demo-check", "Running")
        assert reconcile(obj, observe(pods, now=_at(899))).status["phase"] == "Pending"
        now = _at(900)
    plan = reconcile(obj, observe(pods, now=now))
    reason = {"problems": "ValidationFailed", "oom": "ValidationError", "image": "ValidationError",
              "timeout": "ValidationTimeout"}[case]
    message = {"problems": "spec.reward.scorers[0].function: cannot import 'nope'\nspec.data.train: not found",
               "oom": "demo-check stopped without checking the run file: exit code 137 (OOMKilled)",
               "image": 'demo-check stopped without checking the run file: ImagePullBackOff: Back-off pulling image "img:typo"',
               "timeout": "within spec.preflight.timeoutSeconds=900"}[case]
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == reason and message in plan.status["message"]
    validated = _condition(plan.status, "Validated")
    assert validated["status"] == "False" and validated["reason"] == reason and message in validated["message"]
    assert _created_pods(plan) == [] and [a.name for a in plan.of(DeletePod)] == ["demo-check"]
    assert [e.type for e in plan.actions if isinstance(e, EmitEvent) and e.reason == "Failed"] == ["Warning"]
    pods = apply(obj, pods, plan)
    again = reconcile(obj, observe(pods, now=_at(2000)))  # terminal: stays Failed, nothing created
    assert again.status["phase"] == "Failed" and _condition(again.status, "Validated")["status"] == "False"
    assert again.of(CreateObject) == []


def test_preflight_disabled_creates_the_gang_at_once_and_sets_no_validated_condition():
    obj = run_obj(preflight={"enabled": False})
    plan = reconcile(obj, Observed(now=T0))
    assert sorted(_created_pods(plan)) == GANG
    assert _condition(plan.status, "Validated") is None and plan.status["reason"] == "PodsPending"


# --------------------------------------------------------------------------- guardrails


def trip(action: str, step: int = 7, rollbacks: int = 0, value: float = 0.01) -> dict[str, Any]:
    return {"metric": "actor/entropy", "value": value, "step": step, "action": action,
            "rule": "actor/entropy below 0.05 for 2 steps", "message": f"{action} at step {step}",
            "rollbacks": rollbacks}


def _training(step: int = 5):
    obj = run_obj()
    pods = apply(obj, [], reconcile(obj, Observed(now=T0)))
    for pod in pods:
        set_phase(pods, pod["metadata"]["name"], "Running", True)
    pods = apply(obj, pods, reconcile(obj, observe(pods, learner_answer("running", step=step))))
    assert obj["status"]["phase"] == "Running"
    return obj, pods


def _answer(state: str, guardrail: dict[str, Any] | None, step: int = 7) -> dict[str, Any]:
    return dict(learner_answer(state, step=step), guardrail=guardrail)


def test_sanitized_guardrail_keeps_only_the_trips_fields_typed_and_cut():
    dirty = dict(trip("fail"), value=math.nan, secret="x" * 10, message="m" * 5000)
    clean = sanitize_learner_status({"state": "failed", "guardrail": dirty})["guardrail"]
    assert set(clean) == {"metric", "step", "action", "rule", "message", "rollbacks"}  # no value: not finite
    assert len(clean["message"]) == 1024
    for bad in ({**trip("fail"), "action": "explode"}, {**trip("fail"), "step": -1}, {"metric": "m"}, "text"):
        assert "guardrail" not in sanitize_learner_status({"state": "running", "guardrail": bad})


def test_a_rollback_trip_sets_the_condition_and_one_event_per_trip_and_training_goes_on():
    obj, pods = _training()
    plan = reconcile(obj, observe(pods, _answer("running", trip("rollback"))))
    tripped = _condition(plan.status, "GuardrailTripped")
    assert tripped["status"] == "True" and tripped["reason"] == "Rollback"
    assert "actor/entropy below 0.05 for 2 steps tripped at step 7 (actor/entropy 0.01)" in tripped["message"]
    assert len(_events(plan, "GuardrailTripped")) == 1 and _events(plan, "GuardrailTripped")[0].type == "Warning"
    assert plan.status["phase"] == "Running" and plan.of(DeletePod) == [] and plan.of(PatchRun) == []
    pods = apply(obj, pods, plan)
    again = reconcile(obj, observe(pods, _answer("running", trip("rollback"), step=8)))
    assert not _events(again, "GuardrailTripped")  # the same trip: no second event
    assert _condition(again.status, "GuardrailTripped") == tripped  # kept as it was
    pods = apply(obj, pods, again)
    later = reconcile(obj, observe(pods, _answer("running", trip("rollback", step=7, rollbacks=1))))
    assert len(_events(later, "GuardrailTripped")) == 1  # a new trip (one more rollback)
    assert later.status["guardrail"]["rollbacks"] == 1


@pytest.mark.parametrize("through", ["status", "exit code"])
def test_a_fail_trip_fails_the_run_without_a_gang_restart(through):
    obj, pods = _training()
    if through == "status":
        observed = observe(pods, _answer("failed", trip("fail")))
        line = "guardrail actor/entropy below 0.05 for 2 steps tripped at step 7 (actor/entropy 0.01): fail at step 7"
    else:  # the learner exited before the operator read its /status
        for pod in pods:
            if pod["metadata"]["name"] == "demo-learner-0":
                pod["status"] = check_done(GUARDRAIL_FAIL_EXIT_CODE, "step 7 done\nguardrail: entropy fell: fail")
        observed = observe(pods)
        line = "entropy fell: fail"
    plan = reconcile(obj, observed)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "GuardrailTripped"
    assert plan.status["message"] == line
    assert plan.status["restartCount"] == 0 and plan.status["gangGeneration"] == 0
    assert _created_pods(plan) == [] and len(plan.of(DeletePod)) == 5 and not _events(plan, "GangRestart")
    tripped = _condition(plan.status, "GuardrailTripped")
    assert tripped["reason"] == "Fail" and tripped["message"] == line
    assert len(_events(plan, "GuardrailTripped")) == 1
    pods = apply(obj, pods, plan)
    later = reconcile(obj, observe(pods))  # Failed is sticky, and so is the trip's condition
    assert later.status["reason"] == "GuardrailTripped" and _condition(later.status, "GuardrailTripped") == tripped
    assert not _events(later, "GuardrailTripped") and later.of(CreateObject) == []


def test_a_suspend_exit_code_suspends_the_run_through_its_spec():
    obj, pods = _training()
    for pod in pods:
        if pod["metadata"]["name"] == "demo-learner-0":
            pod["status"] = check_done(GUARDRAIL_SUSPEND_EXIT_CODE, "guardrail: score cliff: suspended")
    plan = reconcile(obj, observe(pods))
    assert [a.patch for a in plan.of(PatchRun)] == [{"spec": {"suspend": True}}]
    assert isinstance(plan.actions[0], PatchRun)  # before any deletion: a refused patch changes nothing
    assert plan.status["phase"] == "Suspended" and plan.status["reason"] == "GuardrailTripped"
    assert "score cliff: suspended" in plan.status["message"] and plan.status["restartCount"] == 0
    assert _condition(plan.status, "GuardrailTripped")["reason"] == "Suspend"
    pods = apply(obj, pods, plan)
    obj["spec"]["suspend"] = True  # what the patch did
    again = reconcile(obj, observe(pods))
    assert again.status["reason"] == "GuardrailTripped" and again.of(CreateObject) == []


# --------------------------------------------------------------------------- black box (kopf + kmock)


@pytest.mark.integration
async def test_a_scorer_that_does_not_import_fails_the_run_before_any_gang_pod(kmock, fake_learner, tmp_path):
    """The check pod really runs `dapo check` on the ConfigMap's run file (operator_testkit plays
    the kubelet with the container's command, in a child process): a scorer module that does not
    exist ends the run Failed with Validated=False, and no learner, rollout or reward pod was ever
    created. (The passing check, Validated=True then the gang, is the next test's start.)"""
    declare_resources(kmock)
    train = write_tiny_prompts(tmp_path, 4, "train.jsonl")
    async with running_operator(kmock, check=run_check_command):
        await create_run(kmock, run_doc(preset="operator", data={"train": str(train)}, reward={"scorers": [
            {"dataSource": "*", "function": "dapo_test_no_such_scorer_module:compute_score"}]}))
        status = await eventually(lambda: phase_is(kmock, "Failed"), timeout=60)
        assert status["reason"] == "ValidationFailed"
        assert "spec.reward.scorers[0].function: cannot import 'dapo_test_no_such_scorer_module'" in status["message"]
        validated = _condition(status, "Validated")
        assert validated["status"] == "False" and validated["message"] == status["message"]
        await eventually(lambda: no_pods(kmock))
        failed_events = [r.data for r in sent(kmock, "POST", "/events") if r.data.get("reason") == "Failed"]
        assert failed_events and failed_events[0]["type"] == "Warning"
        assert [r.data["metadata"]["name"] for r in sent(kmock, "POST", "/pods")] == ["demo-check"]


@pytest.mark.integration
async def test_a_suspend_guardrail_suspends_the_run_and_spec_suspend_false_resumes_it(kmock, fake_learner):
    declare_resources(kmock)
    async with running_operator(kmock):  # its kubelet: check pods exit 0
        await start_running_run(kmock, fake_learner, step=6)
        # the check pod came first, passed (Validated=True) and is gone
        created = [r.data["metadata"]["name"] for r in sent(kmock, "POST", "/pods")]
        assert created[0] == "demo-check" and sorted(created[1:]) == sorted(EXPECTED)
        assert _condition(await run_status(kmock), "Validated")["status"] == "True"
        fake_learner.answers["demo"] = _answer("suspended", trip("suspend", step=6, value=-0.4))
        status = await eventually(lambda: phase_is(kmock, "Suspended"))
        assert status["reason"] == "GuardrailTripped" and "resume: set spec.suspend to false" in status["message"]
        tripped = _condition(status, "GuardrailTripped")
        assert tripped["status"] == "True" and tripped["reason"] == "Suspend"
        assert "tripped at step 6 (actor/entropy -0.4)" in tripped["message"]
        assert status["guardrail"]["metric"] == "actor/entropy" and status["guardrail"]["step"] == 6
        assert (await api(kmock, "GET", f"{RUNS}/demo"))[1]["spec"]["suspend"] is True
        await eventually(lambda: no_pods(kmock))
        events = [r.data for r in sent(kmock, "POST", "/events") if r.data.get("reason") == "GuardrailTripped"]
        assert len(events) == 1 and events[0]["type"] == "Warning"
        assert (await run_status(kmock))["reason"] == "GuardrailTripped"  # not the plain suspend reason

        fake_learner.answers.pop("demo")
        code, _ = await api(kmock, "PATCH", f"{RUNS}/demo", {"spec": {"suspend": False}, "metadata": {"generation": 3}})
        assert code == 200
        now = await eventually(lambda: pods_named(kmock, EXPECTED))
        assert {p["metadata"]["labels"]["dapo.dev/gang-generation"] for p in now.values()} == {"1"}
        await all_running(kmock)
        fake_learner.answers["demo"] = learner_answer("running", step=7)
        status = await eventually(lambda: phase_is(kmock, "Running"))
        assert status["gangGeneration"] == 1 and status["restartCount"] == 0
        assert _condition(status, "GuardrailTripped")["status"] == "True"  # the last trip is kept
        assert len([r for r in sent(kmock, "POST", "/events") if r.data.get("reason") == "GuardrailTripped"]) == 1
        assert not [r for r in sent(kmock, "POST", "/pods") if r.data["metadata"]["name"] == "demo-check"][1:]

