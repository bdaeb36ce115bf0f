"""The operator in-process (real kopf) against kmock's Kubernetes API emulator over HTTP."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
import yaml

from operator_testkit import (
    EXPECTED, NAMESPACE, PODS, RUNS, all_running, api, create_run, declare_resources, eventually, learner_answer,
    no_pods, phase_is, pods, pods_named, run_status, running_operator, sent, set_pod, start_running_run,
)

pytestmark = pytest.mark.integration  # kopf against kmock's API server and a fake learner, both over HTTP


async def test_create_children_status_running_and_succeeded(kmock, fake_learner, run_doc):
    declare_resources(kmock)
    async with running_operator(kmock):
        await create_run(kmock, run_doc(preset="operator"))
        found = await eventually(lambda: pods_named(kmock, EXPECTED))
        for pod in found.values():
            ref = pod["metadata"]["ownerReferences"][0]
            assert ref["uid"] == "uid-demo" and ref["controller"] and ref["blockOwnerDeletion"]
            assert pod["spec"]["containers"][0]["image"] == "img:test"
        _, cms = await api(kmock, "GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps")
        assert [c["metadata"]["name"] for c in cms["items"]] == ["demo-spec"]
        assert cms["items"][0]["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"
        _, svcs = await api(kmock, "GET", f"/api/v1/namespaces/{NAMESPACE}/services")
        assert {s["metadata"]["name"] for s in svcs["items"]} == {"demo-learner", "demo-rollout", "demo-reward"}
        assert (await eventually(lambda: phase_is(kmock, "Pending")))

        await all_running(kmock)
        fake_learner.answers["demo"] = learner_answer("running", step=4)
        status = await eventually(lambda: phase_is(kmock, "Running"))
        assert status["step"] == 4 and status["score"] == 0.25 and status["acc"] == 0.6  # carried through: exact
        assert status["learnerReady"] == "2/2" and status["rolloutReady"] == "2/2"
        assert status["lastCheckpoint"]["step"] == 2

        fake_learner.answers["demo"] = learner_answer("succeeded", step=10)
        status = await eventually(lambda: phase_is(kmock, "Succeeded"))
        assert status["completionTime"] and status["step"] == 10
        await eventually(lambda: no_pods(kmock))
        events = [r for r in sent(kmock, "POST", "/events") if r.data.get("reason") == "Succeeded"]
        assert events, "phase transitions must post Kubernetes Events"


async def test_learner_failure_restarts_gang_and_reward_failure_replaces_one_pod(kmock, fake_learner):
    declare_resources(kmock)
    async with running_operator(kmock):
        await start_running_run(kmock, fake_learner)

        # A reward pod dies: only it is recreated, the gang keeps generation 0.
        before = await pods(kmock)
        await set_pod(kmock, "demo-reward-0", "Failed", exit_code=1)

        async def reward_replaced():
            now = await pods(kmock)
            pod = now.get("demo-reward-0")
            return now if pod and (pod.get("status") or {}).get("phase") != "Failed" and set(now) == EXPECTED else None

        after = await eventually(reward_replaced)
        for name in EXPECTED - {"demo-reward-0"}:
            assert after[name]["metadata"]["labels"]["dapo.dev/gang-generation"] == "0"
            assert (after[name].get("status") or {}).get("phase") == "Running"  # untouched
        assert (await run_status(kmock))["restartCount"] == 0

        # A learner pod dies: every learner and rollout pod is recreated with generation 1.
        await set_pod(kmock, "demo-learner-1", "Failed", exit_code=137)

        async def gang_restarted():
            now = await pods(kmock)
            gens = {n: p["metadata"]["labels"]["dapo.dev/gang-generation"] for n, p in now.items() if "reward" not in n}
            return now if set(now) == EXPECTED and set(gens.values()) == {"1"} else None

        now = await eventually(gang_restarted)
        env = {e["name"]: e.get("value") for e in now["demo-learner-0"]["spec"]["containers"][0]["env"]}
        assert env["DAPO_GANG_GENERATION"] == "1"
        status = await eventually(lambda: _status_where(kmock, lambda s: s.get("restartCount") == 1))
        assert status["gangGeneration"] == 1
        assert before["demo-reward-0"]["metadata"]["name"] in now


async def _status_where(kmock, predicate):
    status = await run_status(kmock)
    return status if predicate(status) else None


async def test_backoff_limit_fails_the_run(kmock, fake_learner, run_doc):
    declare_resources(kmock)
    async with running_operator(kmock):
        await create_run(kmock, run_doc(preset="operator", backoffLimit=0))
        await eventually(lambda: pods_named(kmock, EXPECTED))
        await set_pod(kmock, "demo-rollout-0", "Failed", exit_code=1)
        status = await eventually(lambda: phase_is(kmock, "Failed"))
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
        assert "demo-rollout-0" in failed["message"]
        await eventually(lambda: no_pods(kmock))


async def test_suspend_resume_and_operator_restart(kmock, fake_learner):
    declare_resources(kmock)
    async with running_operator(kmock):
        await start_running_run(kmock, fake_learner, step=5)

    # Operator restarts mid-run: no duplicate pods, status kept, counters unchanged.
    created_before = len(sent(kmock, "POST", "/pods"))
    async with running_operator(kmock):
        await asyncio.sleep(1.0)  # several timer ticks and a resume handler
        assert set(await pods(kmock)) == EXPECTED
        created_after = len(sent(kmock, "POST", "/pods"))
        assert created_after == created_before
        status = await run_status(kmock)
        assert status["phase"] == "Running" and status["step"] == 5 and status["gangGeneration"] == 0

        # Suspend: pods deleted, status kept.
        code, _ = await api(kmock, "PATCH", f"{RUNS}/demo", {"spec": {"suspend": True}, "metadata": {"generation": 2}})
        assert code == 200
        status = await eventually(lambda: phase_is(kmock, "Suspended"))
        await eventually(lambda: no_pods(kmock))
        assert status["step"] == 5

        # Resume: a new gang generation.
        fake_learner.answers.pop("demo")
        code, _ = await api(kmock, "PATCH", f"{RUNS}/demo", {"spec": {"suspend": False}, "metadata": {"generation": 3}})
        assert code == 200
        now = await eventually(lambda: pods_named(kmock, EXPECTED))
        assert {p["metadata"]["labels"]["dapo.dev/gang-generation"] for p in now.values()} == {"1"}
        status = await eventually(lambda: phase_is(kmock, "Pending"))
        assert status["gangGeneration"] == 1 and status["restartCount"] == 0


async def test_delete_run_stops_reconciling(kmock, fake_learner, run_doc):
    declare_resources(kmock)
    async with running_operator(kmock):
        await create_run(kmock, run_doc(preset="operator"))
        await eventually(lambda: pods_named(kmock, EXPECTED))
        code, _ = await api(kmock, "DELETE", f"{RUNS}/demo")
        assert code == 200
        async def gone():
            code, _ = await api(kmock, "GET", f"{RUNS}/demo")
            return code == 404

        # kopf holds a finalizer for the polling timer and releases it on deletion.
        await eventually(gone)
        # kmock has no garbage collector; the API server's GC deletes the pods via ownerReferences.
        # The operator must not recreate anything for a run that is gone.
        for name in list(await pods(kmock)):
            await api(kmock, "DELETE", f"{PODS}/{name}")
        await asyncio.sleep(0.6)
        assert not await pods(kmock)


async def test_ttl_deletes_finished_run(kmock, fake_learner, run_doc):
    declare_resources(kmock)
    async with running_operator(kmock):
        await create_run(kmock, run_doc(preset="operator", ttlSecondsAfterFinished=0))
        await eventually(lambda: pods_named(kmock, EXPECTED))
        await set_pod(kmock, "demo-learner-0", "Succeeded")

        async def gone():
            code, _ = await api(kmock, "GET", f"{RUNS}/demo")
            return code == 404

        await eventually(gone)


def bump_resource_version_on_every_write(kmock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Play the part of the API server that kmock leaves out: every create and every update
    (spec, metadata or status) of an object stores a new metadata.resourceVersion."""
    from kmock._internal.enums import action

    versions = itertools.count(100)
    handle = type(kmock)._handle  # the emulator's class is slotted: patch the class, for this test

    async def bumping(self, request):
        if request.resource is not None and request.action in (action.CREATE, action.UPDATE) \
                and isinstance(request.data, dict):
            request.data.setdefault("metadata", {})["resourceVersion"] = str(next(versions))
        return await handle(self, request)

    monkeypatch.setattr(type(kmock), "_handle", bumping)


async def test_run_file_config_map_holds_name_and_spec_and_is_rewritten_only_on_a_spec_edit(kmock, fake_learner,
                                                                                            monkeypatch):
    declare_resources(kmock)
    bump_resource_version_on_every_write(kmock, monkeypatch)
    config_map = f"/api/v1/namespaces/{NAMESPACE}/configmaps/demo-spec"
    async with running_operator(kmock):
        await start_running_run(kmock, fake_learner, step=3)
        first_version = (await api(kmock, "GET", f"{RUNS}/demo"))[1]["metadata"]["resourceVersion"]
        # the learner makes progress: the operator writes the status (a new resourceVersion) each time
        for step in range(4, 8):
            fake_learner.answers["demo"] = learner_answer("running", step=step)
            await eventually(lambda: _status_where(kmock, lambda s, step=step: s.get("step") == step))
        run = (await api(kmock, "GET", f"{RUNS}/demo"))[1]
        assert int(run["metadata"]["resourceVersion"]) >= int(first_version) + 4, "the emulator must bump versions"
        assert sent(kmock, "PATCH", "/configmaps/demo-spec") == [], "ConfigMap rewritten without a spec edit"
        doc = yaml.safe_load((await api(kmock, "GET", config_map))[1]["data"]["run.yaml"])
        assert doc["metadata"] == {"name": "demo"}
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}

        # a real spec edit: exactly one rewrite, with the new value
        code, _ = await api(kmock, "PATCH", f"{RUNS}/demo", {"spec": {"learner": {"lr": 3e-6}},
                                                             "metadata": {"generation": 2}})
        assert code == 200
        await eventually(lambda: sent(kmock, "PATCH", "/configmaps/demo-spec"))
        for step in range(8, 11):  # more status writes after the edit
            fake_learner.answers["demo"] = learner_answer("running", step=step)
            await eventually(lambda: _status_where(kmock, lambda s, step=step: s.get("step") == step))
        assert len(sent(kmock, "PATCH", "/configmaps/demo-spec")) == 1
        doc = yaml.safe_load((await api(kmock, "GET", config_map))[1]["data"]["run.yaml"])
        assert doc["spec"]["learner"]["lr"] == 3e-6 and doc["metadata"] == {"name": "demo"}
