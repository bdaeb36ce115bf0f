"""spec.eval.separatePod: evaluation pods for committed checkpoints, from the pure reconciler."""

from __future__ import annotations

import datetime as dt

import pytest

from dapo.spec import SpecError, parse_run
from dapo_operator.builders import build_eval_pod
from dapo_operator.reconcile import CreateObject, DeletePod, Observed, reconcile
from _run_files import run_doc
from operator_testkit import apply, learner_answer

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def eval_run(**spec):
    doc = run_doc(preset="operator", checkpoint={"uri": "s3://ckpt/demo", "everySteps": 10},
                   data={"train": "s3://data/train.parquet", "eval": "s3://data/aime.parquet"},
                   eval={"separatePod": True, "n": 8, "passK": [1, 4]}, **spec)
    doc["metadata"].update(uid="uid-1", generation=1)
    return doc


def _running(obj):
    """The gang created (the check pod passed: operator_testkit.apply plays it) and running."""
    return [dict(pod, status={"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]})
            for pod in apply(obj, [], reconcile(obj, Observed(now=T0)))]


def _observe(pods, checkpoint_step=None):
    answer = learner_answer("running", step=checkpoint_step or 3)
    answer["lastCheckpoint"] = {"step": checkpoint_step, "uri": f"s3://ckpt/demo/step-{checkpoint_step}"} \
        if checkpoint_step else None
    return Observed(pods=pods, config_maps={"demo-spec"}, services={"demo-learner", "demo-rollout", "demo-reward"},
                    learner_status=answer, now=T0)


def test_evaluation_pod_runs_dapo_eval_of_the_checkpoint_on_the_rollout_pool():
    run = parse_run(eval_run(rollout={"replicas": 2, "nodeSelector": {"pool": "gpu"}, "resources": {"gpus": 1}}))
    pod = build_eval_pod(run, 20, "ns1")
    container = pod["spec"]["containers"][0]
    assert pod["metadata"]["name"] == "demo-eval-20"
    assert pod["metadata"]["labels"]["dapo.dev/role"] == "eval" and pod["metadata"]["labels"]["dapo.dev/eval-step"] == "20"
    assert "dapo.dev/gang-generation" not in pod["metadata"]["labels"]
    assert container["command"] == ["dapo", "eval", "s3://ckpt/demo", "--step", "20", "--data", "s3://data/aime.parquet",
                                    "--run-file", "/etc/dapo/run.yaml", "--store-result", "--k", "1,4"]
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"} and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "hostname" not in pod["spec"] and "ports" not in container and "readinessProbe" not in container
    env = {e["name"] for e in container["env"]}
    assert "DAPO_CACHE_DIR" in env


def test_one_evaluation_pod_at_a_time_for_the_newest_checkpoint_and_finished_ones_are_removed():
    obj = eval_run()
    pods = _running(obj)
    assert not [a for a in reconcile(obj, _observe(pods)).of(CreateObject)]  # no checkpoint yet: no pod
    plan = reconcile(obj, _observe(pods, 10))
    created = [a.obj for a in plan.of(CreateObject)]
    assert [p["metadata"]["name"] for p in created] == ["demo-eval-10"]
    eval10 = dict(created[0], status={"phase": "Running"})
    pods += [eval10]
    plan = reconcile(obj, _observe(pods, 20))  # step 20 committed while 10 is evaluated: wait, do not pile up
    assert not plan.of(CreateObject) and not plan.of(DeletePod)  # nor is the running evaluation "unwanted"
    eval10["status"] = {"phase": "Succeeded"}
    plan = reconcile(obj, _observe(pods, 20))
    assert [a.obj["metadata"]["name"] for a in plan.of(CreateObject)] == ["demo-eval-20"]
    assert [a.name for a in plan.of(DeletePod)] == ["demo-eval-10"]
    assert plan.status["restartCount"] == 0  # an evaluation pod is never a gang member
    eval10["status"] = {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 2}}}]}
    plan = reconcile(obj, _observe(pods, 20))
    assert plan.status["phase"] != "Failed"  # a failed evaluation does not fail the run


def test_separate_pod_needs_an_s3_checkpoint_uri():
    doc = run_doc(preset="operator", eval={"separatePod": True}, checkpoint={"uri": "/cache/checkpoints"})  # a pod-local folder
    with pytest.raises(SpecError, match="spec.eval.separatePod needs an s3:// spec.checkpoint.uri"):
        parse_run(doc)


def test_the_api_server_checks_the_evaluation_rules_too():
    """The CEL twins of the two evaluation rules: separatePod needs an s3:// checkpoint uri,
    passK values must be <= n; valid files pass them."""
    from _crd_schema import cel_failures

    from dapo.spec import CROSS_FIELD_RULES

    messages = {rule.message for rule in CROSS_FIELD_RULES if "spec.eval" in rule.message}
    assert len(messages) == 2
    pod_rule = next(m for m in messages if "separatePod" in m)
    pass_rule = next(m for m in messages if "passK" in m)
    assert pod_rule in cel_failures(run_doc(preset="operator", eval={"separatePod": True}, checkpoint={"uri": "/cache/checkpoints"}))
    assert pod_rule not in cel_failures(eval_run())
    assert pass_rule in cel_failures(run_doc(preset="operator", eval={"n": 4, "passK": [1, 8]}))
    assert pass_rule not in cel_failures(run_doc(preset="operator", eval={"n": 8, "passK": [1, 8]}))
    with pytest.raises(SpecError, match="spec.eval.passK must hold values <= spec.eval.n"):
        parse_run(run_doc(preset="operator", eval={"n": 4, "passK": [1, 8]}))
