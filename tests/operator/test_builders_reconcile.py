"""Pure unit tests: builders, status, reconcile (no cluster, no clock)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml

from dapo.spec import parse_run
from dapo_operator.builders import Owner, build_all, build_pod, spec_warnings
from dapo_operator.reconcile import CreateObject, DeletePod, DeleteRun, EmitEvent, Observed, reconcile
from dapo_operator.render import render_objects
from dapo_operator.status import compute_status
from _run_files import Replace
from operator_testkit import T0, apply, learner_answer, observe, run_obj, set_phase

OWNER = Owner("demo", "uid-1")


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_pod_contract_env_security_and_owner(run_doc):
    run = parse_run(run_doc(preset="operator",
                            storage={"credentialsSecret": "s3-creds", "endpointUrl": "http://minio:9000"}))
    pod = build_pod(run, "learner", 1, "ns1", gang_generation=2, image="img:op", owner=OWNER)
    env = env_of(pod)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["MASTER_PORT"] == "29500"
    assert env["MASTER_ADDR"] == "demo-learner-0.demo-learner.ns1.svc"
    assert env["DAPO_WEIGHT_SYNC_ADDR"] == "demo-learner-0.demo-learner.ns1.svc:29600"
    assert env["DAPO_ROLLOUT_URLS"] == "http://demo-rollout-0.demo-rollout.ns1.svc:8000,http://demo-rollout-1.demo-rollout.ns1.svc:8000"
    assert env["DAPO_GANG_GENERATION"] == "2" and env["DAPO_RUN_FILE"] == "/etc/dapo/run.yaml"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["hostname"] == "demo-learner-1" and spec["subdomain"] == "demo-learner"
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = spec["containers"][0]
    assert container["command"] == ["dapo", "role", "learner"] and container["image"] == "img:op"
    assert container["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/cache", "/etc/dapo"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["metadata"]["ownerReferences"] == [OWNER.reference()]
    assert pod["metadata"]["labels"]["dapo.dev/gang-generation"] == "2"


def test_only_reward_pods_get_a_liveness_probe(run_doc):
    """A frozen reward replica is killed by the kubelet and replaced alone (stateless); a liveness
    kill of a learner or rollout pod would restart the whole gang, so they have none. Evaluation
    and check pods (one-shot) have none either."""
    from dapo_operator.builders import build_check_pod

    run = parse_run(run_doc(preset="operator"))
    reward = build_pod(run, "reward", 0, "ns1", 0)["spec"]["containers"][0]
    assert reward["livenessProbe"] == {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                                       "timeoutSeconds": 5, "failureThreshold": 3}
    assert reward["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert reward["startupProbe"]["periodSeconds"] * reward["startupProbe"]["failureThreshold"] >= 600
    for role in ("learner", "rollout"):
        container = build_pod(run, role, 0, "ns1", 0)["spec"]["containers"][0]
        assert "livenessProbe" not in container and "startupProbe" not in container
    check = build_check_pod(run, "ns1", None, OWNER)["spec"]["containers"][0]
    assert "livenessProbe" not in check and "startupProbe" not in check


def test_image_precedence_resources_and_placement(monkeypatch, run_doc):
    monkeypatch.setenv("DAPO_DEFAULT_IMAGE", "img:env")
    run = parse_run(run_doc(preset="operator", image="img:spec", rollout={
        "replicas": 1, "maxResponseLength": 256, "genBatchSize": 8, "image": "img:role",
        "resources": {"gpus": 2, "requests": {"cpu": 4}}, "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}], "priorityClassName": "high",
        "affinity": {"nodeAffinity": {}}}))
    rollout = build_pod(run, "rollout", 0, "ns", 0)
    learner = build_pod(run, "learner", 0, "ns", 0)
    assert rollout["spec"]["containers"][0]["image"] == "img:role"
    assert learner["spec"]["containers"][0]["image"] == "img:spec"
    reward = build_pod(parse_run(run_doc(preset="operator")), "reward", 0, "ns", 0)
    assert reward["spec"]["containers"][0]["image"] == "img:env"
    res = rollout["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2" and res["requests"]["cpu"] == "4"
    assert rollout["spec"]["nodeSelector"] == {"pool": "gpu"} and rollout["spec"]["priorityClassName"] == "high"
    assert rollout["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert rollout["spec"]["affinity"] == {"nodeAffinity": {}}
    assert "secretKeyRef" not in str(learner)  # no secret unless asked for


def test_kueue_gang_hints(run_doc):
    doc = run_doc(preset="operator")
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "q"}
    run = parse_run(doc)
    pods = [o for o in build_all(run, "ns", gang_generation=3) if o["kind"] == "Pod"]
    assert len(pods) == 5
    for pod in pods:
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "demo-g3"
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "5"
        assert pod["spec"]["schedulingGates"] == [{"name": "kueue.x-k8s.io/admission"}]
    assert "schedulingGates" not in build_pod(parse_run(run_doc(preset="operator")), "learner", 0, "ns", 0)["spec"]


def test_render_uses_builders(tmp_path, run_doc):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_doc(preset="operator")))
    objects = render_objects(str(path), namespace="ignored-because-file-sets-ns1", image="img:x")
    kinds = [o["kind"] for o in objects]
    assert kinds == ["ConfigMap", "Service", "Service", "Service", "Pod", "Pod", "Pod", "Pod", "Pod", "Pod"]
    assert objects[4]["metadata"]["name"] == "demo-check"  # what the operator creates first
    assert parse_run(yaml.safe_load(objects[0]["data"]["run.yaml"])).spec.learner.replicas == 2


def test_render_bad_file_raises_spec_error(tmp_path, run_doc):
    from dapo.spec import SpecError
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(run_doc(preset="operator", learner=Replace({"replicas": 0}))))
    with pytest.raises(SpecError, match="replicas"):
        render_objects(str(path))


# --------------------------------------------------------------------------- reconcile


def test_first_reconcile_creates_config_services_and_the_check_pod_then_the_gang_then_nothing():
    obj = run_obj()
    plan = reconcile(obj, Observed(now=T0))
    created = [a.obj["metadata"]["name"] for a in plan.of(CreateObject)]
    assert created == ["demo-spec", "demo-learner", "demo-rollout", "demo-reward", "demo-check"]
    assert plan.status["phase"] == "Pending" and plan.status["reason"] == "Validating"
    pods = apply(obj, [], plan)  # the check pod passes (apply plays the kubelet); the next pass makes the gang
    assert sorted(p["metadata"]["name"] for p in pods) == sorted(
        ["demo-learner-0", "demo-learner-1", "demo-rollout-0", "demo-rollout-1", "demo-reward-0"])
    assert obj["status"]["createdGangGeneration"] == 0
    again = reconcile(obj, observe(pods))
    assert again.of(CreateObject) == [] and again.of(DeletePod) == []


def test_reconcile_running_then_succeeded_deletes_pods():
    obj = run_obj()
    pods = apply(obj, [], reconcile(obj, Observed(now=T0)))
    for p in pods:
        set_phase(pods, p["metadata"]["name"], "Running", True)
    plan = reconcile(obj, observe(pods, learner_answer("running", step=7)))
    assert plan.status["phase"] == "Running" and plan.status["step"] == 7 and plan.status["rolloutReady"] == "2/2"
    assert any(isinstance(a, EmitEvent) and a.reason == "Running" for a in plan.actions)
    pods = apply(obj, pods, plan)
    plan = reconcile(obj, observe(pods, learner_answer("succeeded", step=10), now=T0 + dt.timedelta(minutes=5)))
    assert plan.status["phase"] == "Succeeded" and len(plan.of(DeletePod)) == 5
    assert plan.status["completionTime"] == "2025-01-01T00:05:00Z"


def test_gang_restart_then_backoff_limit():
    obj = run_obj(backoffLimit=1)
    pods = apply(obj, [], reconcile(obj, Observed(now=T0)))
    set_phase(pods, "demo-rollout-1", "Failed")
    plan = reconcile(obj, observe(pods))
    deleted = {a.name for a in plan.of(DeletePod)}
    assert deleted == {"demo-learner-0", "demo-learner-1", "demo-rollout-0", "demo-rollout-1"}
    assert plan.status["restartCount"] == 1 and plan.status["gangGeneration"] == 1
    pods = apply(obj, pods, plan)
    plan = reconcile(obj, observe(pods))  # names are free now: the new gang is created
    assert {a.obj["metadata"]["labels"]["dapo.dev/gang-generation"] for a in plan.of(CreateObject)} == {"1"}
    pods = apply(obj, pods, plan)
    assert obj["status"]["createdGangGeneration"] == 1
    # A deleted (not failed) learner pod counts as dead too; the limit is reached now.
    pods = [p for p in pods if p["metadata"]["name"] != "demo-learner-0"]
    plan = reconcile(obj, observe(pods))
    assert plan.status["phase"] == "Failed"
    failed = next(c for c in plan.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "demo-learner-0 was deleted" in failed["message"]
    assert any(isinstance(a, EmitEvent) and a.type == "Warning" and a.reason == "Failed" for a in plan.actions)


def test_reward_failure_replaces_only_that_pod():
    obj = run_obj()
    pods = apply(obj, [], reconcile(obj, Observed(now=T0)))
    set_phase(pods, "demo-reward-0", "Failed")
    plan = reconcile(obj, observe(pods))
    assert [a.name for a in plan.of(DeletePod)] == ["demo-reward-0"] and plan.status["restartCount"] == 0
    pods = apply(obj, pods, plan)
    plan = reconcile(obj, observe(pods))
    assert [a.obj["metadata"]["name"] for a in plan.of(CreateObject)] == ["demo-reward-0"]


def test_suspend_and_resume():
    obj = run_obj()
    pods = apply(obj, [], reconcile(obj, Observed(now=T0)))
    obj["spec"]["suspend"] = True
    plan = reconcile(obj, observe(pods))
    assert len(plan.of(DeletePod)) == 5 and plan.status["phase"] == "Suspended"
    suspended = next(c for c in plan.status["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "True"
    pods = apply(obj, pods, plan)
    obj["spec"]["suspend"] = False
    plan = reconcile(obj, observe(pods))
    assert plan.status["gangGeneration"] == 1 and plan.status["restartCount"] == 0
    assert len(plan.of(CreateObject)) == 5


def test_terminal_ttl_and_invalid_spec():
    obj = run_obj(ttlSecondsAfterFinished=60)
    obj["status"] = {"phase": "Succeeded", "completionTime": "2025-01-01T00:00:00Z"}
    assert reconcile(obj, observe([], now=T0 + dt.timedelta(seconds=30))).of(DeleteRun) == []
    assert reconcile(obj, observe([], now=T0 + dt.timedelta(seconds=61))).of(DeleteRun)
    bad = run_obj(learner={"replicas": 2, "trainBatchSize": 8, "miniBatchSize": 3})
    plan = reconcile(bad, Observed(now=T0))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
    assert plan.of(CreateObject) == []


def test_compute_status_conditions_keep_transition_time(run_doc):
    run = parse_run(run_doc(preset="operator"))
    first = compute_status(run, 1, [], None, {}, T0)
    later = compute_status(run, 1, [], None, first, T0 + dt.timedelta(minutes=1))
    progressing = [c for c in later["conditions"] if c["type"] == "Progressing"][0]
    assert progressing["status"] == "True" and progressing["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    assert {c["type"] for c in later["conditions"]} == {"Ready", "Progressing", "Succeeded", "Failed", "Suspended",
                                                        "Degraded", "Stalled"}
    assert later["warnings"] == []
    no_ckpt = parse_run(run_doc(preset="operator", checkpoint=Replace({})))
    assert "checkpoint.uri" in compute_status(no_ckpt, 1, [], None, {}, T0)["warnings"][0]


# --------------------------------------------------------------------------- run-file scorers, remote reward, trackers


def test_scorer_config_map_is_mounted_in_reward_pods_only(run_doc):
    """spec.reward.scorerConfigMap: its files appear read-only at /etc/dapo/scorers in every reward
    pod (where a scorers[i].function '/etc/dapo/scorers/FILE.py:NAME' is loaded), nowhere else."""
    run = parse_run(run_doc(preset="operator", reward={"replicas": 2, "scorerConfigMap": "my-scorers", "scorers": [
        {"dataSource": "*", "function": "/etc/dapo/scorers/judge.py:compute_score"}]}))
    objects = build_all(run, "ns1", owner=OWNER)
    pods = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Pod"}
    for name, pod in pods.items():
        container = pod["spec"]["containers"][0]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        if "-reward-" in name:
            assert mounts["scorers"] == {"name": "scorers", "mountPath": "/etc/dapo/scorers", "readOnly": True}
            assert volumes["scorers"] == {"name": "scorers", "configMap": {"name": "my-scorers"}}
        else:
            assert "scorers" not in mounts and "scorers" not in volumes
    assert sum("-reward-" in name for name in pods) == 2
    # The rendered run file the pods read names the mounted file.
    config = next(o for o in objects if o["kind"] == "ConfigMap")
    scorers = yaml.safe_load(config["data"]["run.yaml"])["spec"]["reward"]["scorers"]
    assert scorers == [{"dataSource": "*", "function": "/etc/dapo/scorers/judge.py:compute_score"}]


def test_remote_headers_and_tracker_credentials_come_from_secrets(run_doc):
    run = parse_run(run_doc(
        preset="operator",
        reward={"replicas": 1, "remote": {"url": "https://judge.example/score", "headersSecret": "judge-headers"}},
        tracking={"wandb": {"project": "p"}, "credentialsSecret": "tracker-keys"}))
    reward = build_pod(run, "reward", 0, "ns1", gang_generation=0)
    learner = build_pod(run, "learner", 0, "ns1", gang_generation=0)
    rollout = build_pod(run, "rollout", 0, "ns1", gang_generation=0)
    assert env_of(reward)["DAPO_REWARD_REMOTE_HEADERS"] == {"secretKeyRef": {"name": "judge-headers", "key": "headers"}}
    assert "DAPO_REWARD_REMOTE_HEADERS" not in env_of(learner)
    assert learner["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "tracker-keys"}}]
    assert "envFrom" not in reward["spec"]["containers"][0] and "envFrom" not in rollout["spec"]["containers"][0]
    # Nothing secret is in the run file the ConfigMap carries: only the Secrets' names.
    text = build_all(run, "ns1")[0]["data"]["run.yaml"]
    assert "judge-headers" in text and "tracker-keys" in text


def _fail_reward_pod(pods, exit_code: int, message: str):
    for p in pods:
        if p["metadata"]["name"] == "demo-reward-0":
            p["status"] = {"phase": "Failed", "containerStatuses": [{"name": "reward", "state": {"terminated": {
                "exitCode": exit_code, "reason": "Error", "message": message}}}]}


def test_reward_pod_run_file_error_fails_the_run_with_the_message():
    """A reward pod that exits with dapo's run-file error code (its scorer does not import) fails
    the DAPORun at once, with the pod's error line in status and the Failed condition."""
    obj = run_obj()
    pods = apply(obj, [], reconcile(obj, Observed(now=T0)))
    log_tail = ("12:00:01 INFO reward-0 dapo.entry.roles: starting\n"
                "error: spec.reward.scorers[0].function: cannot import 'acme_rewards' for 'acme_rewards:judge' "
                "(ModuleNotFoundError: No module named 'acme_rewards'); install the package\n")
    _fail_reward_pod(pods, 2, log_tail)
    plan = reconcile(obj, observe(pods))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "RunFileError"
    failed = next(c for c in plan.status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "RunFileError"
    assert failed["message"].startswith("demo-reward-0 stopped on a run-file error: spec.reward.scorers[0].function: "
                                        "cannot import 'acme_rewards'")
    assert len(plan.of(DeletePod)) == 5 and plan.of(CreateObject) == []
    assert any(isinstance(a, EmitEvent) and a.type == "Warning" and "acme_rewards" in a.message for a in plan.actions)


def test_reward_pod_crash_without_run_file_error_is_still_replaced_alone():
    obj = run_obj()
    pods = apply(obj, [], reconcile(obj, Observed(now=T0)))
    _fail_reward_pod(pods, 137, "")
    plan = reconcile(obj, observe(pods))
    assert plan.status["phase"] != "Failed" and [a.name for a in plan.of(DeletePod)] == ["demo-reward-0"]


@pytest.mark.parametrize("pod_name", ["demo-learner-0", "demo-learner-1", "demo-rollout-1"])
def test_a_run_file_error_exit_of_any_role_fails_the_run_without_a_gang_restart(pod_name):
    """Exit 2 (a run-file or configuration error) from a learner or rollout pod fails the DAPORun
    at once, like a reward pod's, instead of restarting the gang backoffLimit times."""
    obj = run_obj(backoffLimit=3)
    pods = apply(obj, [], reconcile(obj, Observed(now=T0)))
    for p in pods:
        if p["metadata"]["name"] == pod_name:
            p["status"] = {"phase": "Failed", "containerStatuses": [{"name": "x", "state": {"terminated": {
                "exitCode": 2, "reason": "Error",
                "message": "error: spec.rollout.engine: vllm needs the vllm package in this environment\n"}}}]}
    plan = reconcile(obj, observe(pods))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "RunFileError"
    assert plan.status["restartCount"] == 0 and plan.status["message"].startswith(f"{pod_name} stopped on a run-file error")
    assert plan.of(CreateObject) == []


def test_learner_status_run_file_error_fails_the_run_before_the_pod_exits():
    """Learner-0 serves state failed with runFileError while its pod still runs (the grace period):
    the run fails then, with its message; a failure without the flag does not fail the run."""
    obj = run_obj()
    pods = apply(obj, [], reconcile(obj, Observed(now=T0)))
    for p in pods:
        set_phase(pods, p["metadata"]["name"], "Running", True)
    answer = learner_answer("failed", step=0)
    answer.update(message="SpecError: spec.data.train: no usable rows", runFileError=True)
    plan = reconcile(obj, observe(pods, answer))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "RunFileError"
    assert "spec.data.train: no usable rows" in plan.status["message"] and len(plan.of(DeletePod)) == 5
    other = learner_answer("failed", step=3)
    other.update(message="RuntimeError: boom")
    obj2 = run_obj()
    pods2 = apply(obj2, [], reconcile(obj2, Observed(now=T0)))
    assert reconcile(obj2, observe(pods2, other)).status["phase"] != "Failed"


def test_zero_with_one_learner_replica_is_a_status_warning(run_doc):
    """strategy deepspeed-zero3 with one learner pod trains with plain torch: the status says so."""
    one = parse_run(run_doc(preset="operator", learner={"replicas": 1, "strategy": "deepspeed-zero3",
                                                        "trainBatchSize": 8, "miniBatchSize": 4}))
    assert any("spec.learner.strategy deepspeed-zero3 with spec.learner.replicas 1" in w for w in spec_warnings(one))
    two = parse_run(run_doc(preset="operator", learner={"replicas": 2, "strategy": "deepspeed-zero3",
                                                        "trainBatchSize": 8, "miniBatchSize": 4}))
    assert not any("spec.learner.strategy" in w for w in spec_warnings(two))


# --------------------------------------------------------------------------- the phases, one at a time


def _pass(obj, pods, status=None, learner=None, now=T0):
    """A reconcile pass over ``obj`` (with ``status``) and ``pods``, before any phase ran."""
    from dapo_operator.reconcile import Pass

    obj = dict(obj, status=dict(status or {}))
    previous = dict(obj["status"])
    return Pass(obj=obj, run=parse_run({k: v for k, v in obj.items() if k != "status"}),
                observed=observe(pods, learner, now), image=None, previous=previous, work=dict(previous),
                gen=int(previous.get("gangGeneration", 0)), restarts=int(previous.get("restartCount", 0)),
                created=int(previous.get("createdGangGeneration", -1)))


def _pods_of(obj) -> list[dict[str, Any]]:
    return apply(dict(obj), [], reconcile(dict(obj), Observed(now=T0)))


def test_phase_finished_keeps_a_terminal_run_and_expires_it_after_its_ttl():
    from dapo_operator.reconcile import finished

    obj = run_obj(ttlSecondsAfterFinished=60)
    pods = _pods_of(obj)
    assert finished(_pass(obj, pods, {"phase": "Running"})) is None
    done = {"phase": "Succeeded", "completionTime": "2025-01-01T00:00:00Z"}
    plan = finished(_pass(obj, pods, done, now=T0 + dt.timedelta(seconds=30)))
    assert plan.status["phase"] == "Succeeded" and len(plan.of(DeletePod)) == 5 and not plan.of(DeleteRun)
    assert finished(_pass(obj, [], done, now=T0 + dt.timedelta(seconds=61))).of(DeleteRun)


def test_phase_suspended_and_resumed():
    from dapo_operator.reconcile import resumed, suspended

    pods = _pods_of(run_obj())
    plan = suspended(_pass(run_obj(suspend=True), pods, {"phase": "Running"}))
    assert plan.status["phase"] == "Suspended" and len(plan.of(DeletePod)) == 5
    assert suspended(_pass(run_obj(), pods, {"phase": "Running"})) is None
    state = _pass(run_obj(), [], {"phase": "Suspended", "gangGeneration": 2})
    assert resumed(state) is None and state.gen == 3 and state.work["gangGeneration"] == 3
    assert [a.reason for a in state.actions] == ["Resumed"]


def test_phase_training_finished_reads_learner_0_of_the_current_gang():
    from dapo_operator.reconcile import training_finished

    pods = _pods_of(run_obj())
    state = _pass(run_obj(), pods, {"phase": "Running"}, learner=learner_answer("succeeded", step=10))
    assert training_finished(state).status["phase"] == "Succeeded"
    later = _pass(run_obj(), pods, {"phase": "Running", "gangGeneration": 1}, learner=learner_answer("succeeded"))
    assert training_finished(later) is None and later.learner_status is None  # learner-0 of gang 0 is gone


def test_phase_gang_restart_counts_then_fails_past_the_backoff_limit():
    from dapo_operator.reconcile import gang_restart

    obj = run_obj(backoffLimit=1)
    pods = _pods_of(obj)
    set_phase(pods, "demo-learner-1", "Failed")
    status = {"phase": "Running", "createdGangGeneration": 0}
    state = _pass(obj, pods, status)
    assert gang_restart(state) is None and (state.gen, state.restarts) == (1, 1)
    assert state.actions[0].reason == "GangRestart" and "demo-learner-1 failed" in state.actions[0].message
    plan = gang_restart(_pass(obj, pods, {**status, "restartCount": 1}))
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "BackoffLimitExceeded"
    assert gang_restart(_pass(obj, _pods_of(obj), status)) is None  # nothing dead: the pass goes on


def test_phase_ensure_children_creates_patches_and_replaces():
    from dapo_operator.reconcile import PatchObject, ensure_config_and_services, ensure_pods

    obj = run_obj()
    state = _pass(obj, [])
    state.observed.config_maps, state.observed.services = set(), set()
    assert ensure_config_and_services(state) is None
    assert [a.obj["kind"] for a in state.actions] == ["ConfigMap", "Service", "Service", "Service"]
    edited = _pass(obj, [])
    edited.observed.config_map_data = {"demo-spec": {"run.yaml": "an older run file"}}
    ensure_config_and_services(edited)
    assert [type(a) for a in edited.actions] == [PatchObject]
    pods = _pods_of(obj)
    plan = ensure_pods(_pass(obj, pods, {"gangGeneration": 1}))  # gang 1 wanted, gang 0 running
    assert {a.name for a in plan.of(DeletePod)} == {"demo-learner-0", "demo-learner-1", "demo-rollout-0",
                                                   "demo-rollout-1"}
    assert plan.status["createdGangGeneration"] == -1  # not all of gang 1 exists yet
    plan = ensure_pods(_pass(obj, []))
    assert len(plan.of(CreateObject)) == 5 and plan.status["createdGangGeneration"] == 0


def test_operator_command_renders_in_process_and_refuses_a_bad_file(tmp_path, capsys, run_doc):
    """`dapo-operator render FILE --set ...` (dapo_operator.cli, in this process): the pods of the
    run file with the override applied, in the file's namespace (--namespace is for files without
    one); a bad file is one line naming the field, exit 2."""
    from dapo_operator.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_doc(preset="operator")))
    assert main(["render", str(path), "--namespace", "ns2", "--set", "spec.rollout.replicas=3"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    pods = sorted(o["metadata"]["name"] for o in objects if o and o["kind"] == "Pod")
    assert pods == ["demo-check", "demo-learner-0", "demo-learner-1", "demo-reward-0", "demo-rollout-0",
                    "demo-rollout-1", "demo-rollout-2"]
    assert {o["metadata"]["namespace"] for o in objects if o} == {"ns1"}  # the file's own
    assert main(["render", str(path), "--set", "spec.learner.lr=fast"]) == 2
    assert "spec.learner.lr" in capsys.readouterr().err
