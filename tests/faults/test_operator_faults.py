"""Fault injection on the operator (real kopf against kmock's Kubernetes API over HTTP):

- the operator restarted mid-run, three times, with a learner pod failing while it is down:
  exactly one gang restart, no pod created twice, the status (step, counters) kept;
- a DAPORun edited, suspended and resumed repeatedly: every resume starts exactly one new gang
  generation whose pods resume from the checkpoint (DAPO_GANG_GENERATION = generation) and read
  the edited run file; the status keeps the step throughout.

"Data lost" here counts what a training would lose or repeat: pods created twice or missing,
gang generations skipped or repeated, a resumed gang without DAPO_GANG_GENERATION > 0 (it would
start from step 0), a stale run file, or a status that lost the step.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import yaml

from operator_testkit import (
    EXPECTED, RUNS, all_running, api, create_run, declare_resources, eventually, learner_answer, no_pods, phase_is,
    pods, pods_named, run_status, running_operator, sent, set_pod, start_running_run,
)
from report import FaultResult, record

pytestmark = [pytest.mark.faults, pytest.mark.integration]

GANG = {name for name in EXPECTED if "reward" not in name}


def env_of(pod: dict) -> dict:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


async def config_map_run(kmock) -> dict:
    _, answer = await api(kmock, "GET", "/api/v1/namespaces/ns1/configmaps/demo-spec")
    return yaml.safe_load(answer["data"]["run.yaml"])


async def test_operator_restarted_mid_run_with_a_failure_while_down(kmock, fake_learner):
    declare_resources(kmock)
    async with running_operator(kmock):
        await start_running_run(kmock, fake_learner, step=5)
    created = len(sent(kmock, "POST", "/pods"))
    lost = 0

    # two plain restarts: nothing may change
    for _ in range(2):
        async with running_operator(kmock):
            await asyncio.sleep(0.8)  # the resume handler and several timer ticks
            lost += len(sent(kmock, "POST", "/pods")) - created
            status = await run_status(kmock)
            lost += int(status.get("gangGeneration") != 0) + int(status.get("step") != 5)

    # a learner dies while no operator runs; the next operator restarts the gang exactly once
    await set_pod(kmock, "demo-learner-1", "Failed", exit_code=137)
    fake_learner.answers.pop("demo")
    started = time.monotonic()
    async with running_operator(kmock):
        async def regrouped():
            now = await pods(kmock)
            gens = {p["metadata"]["labels"]["dapo.dev/gang-generation"] for n, p in now.items() if n in GANG}
            return now if set(now) == EXPECTED and gens == {"1"} else None

        now = await eventually(regrouped, timeout=10)
        recovered_s = time.monotonic() - started
        await asyncio.sleep(0.8)  # more ticks: no second restart
        status = await run_status(kmock)
    lost += abs(status["gangGeneration"] - 1) + abs(status["restartCount"] - 1)
    lost += len(sent(kmock, "POST", "/pods")) - created - len(GANG)  # only the gang is recreated, once
    lost += sum(env_of(now[n])["DAPO_GANG_GENERATION"] != "1" for n in GANG)
    lost += int(status.get("step") != 5)
    record(FaultResult("operator restarted mid-run",
                       "operator stopped and started 3 times while Running; learner-1 failed (137) while it was down",
                       "kopf operator task cancelled and restarted in-process; pod phase patched in the kmock "
                       "Kubernetes API emulator (no real pod or process)",
                       "plain restarts changed nothing (no pod created, status kept); after the failure exactly one "
                       "gang restart (generation 1, restartCount 1) with DAPO_GANG_GENERATION=1", None, recovered_s,
                       "operator start -> new gang's pods created", None,
                       f"{lost} discrepancies in pods created, gang generation, restart count, step", "operator restart"))
    assert lost == 0


async def test_run_edited_suspended_and_resumed_repeatedly(kmock, fake_learner, run_doc):
    declare_resources(kmock)
    lost, recover = 0, []
    async with running_operator(kmock):
        await create_run(kmock, run_doc(preset="operator"))
        await eventually(lambda: pods_named(kmock, EXPECTED))
        generation = 1
        for cycle in range(1, 4):
            await all_running(kmock)
            fake_learner.answers["demo"] = learner_answer("running", step=2 * cycle)
            await eventually(lambda: phase_is(kmock, "Running"))
            created = len(sent(kmock, "POST", "/pods"))

            # edit a field the runtime reads (the learning rate), then suspend
            lr = 1e-6 * (cycle + 1)
            generation += 1
            code, _ = await api(kmock, "PATCH", f"{RUNS}/demo", {"spec": {"learner": {"lr": lr}},
                                                                 "metadata": {"generation": generation}})
            assert code == 200
            generation += 1
            code, _ = await api(kmock, "PATCH", f"{RUNS}/demo", {"spec": {"suspend": True},
                                                                 "metadata": {"generation": generation}})
            assert code == 200
            status = await eventually(lambda: phase_is(kmock, "Suspended"))
            await eventually(lambda: no_pods(kmock))
            lost += int(status.get("step") != 2 * cycle)
            fake_learner.answers.pop("demo")

            generation += 1
            started = time.monotonic()
            code, _ = await api(kmock, "PATCH", f"{RUNS}/demo", {"spec": {"suspend": False},
                                                                 "metadata": {"generation": generation}})
            assert code == 200
            now = await eventually(lambda: pods_named(kmock, EXPECTED))
            recover.append(time.monotonic() - started)
            await asyncio.sleep(0.5)
            status = await run_status(kmock)
            lost += abs(status["gangGeneration"] - cycle) + int(status["restartCount"] != 0)
            lost += abs(len(sent(kmock, "POST", "/pods")) - created - len(EXPECTED))
            lost += sum(env_of(p)["DAPO_GANG_GENERATION"] != str(cycle) for p in now.values())
            stale = (await config_map_run(kmock))["spec"]["learner"]["lr"] != lr
            assert not stale, f"cycle {cycle}: the run file ConfigMap still holds the old spec.learner.lr"
    record(FaultResult("DAPORun edited, suspended and resumed repeatedly",
                       "3 cycles: edit spec.learner.lr, suspend, resume",
                       "PATCHes to the DAPORun in the kmock Kubernetes API emulator; pod phases patched there",
                       "each suspend deleted every pod and kept the status; each resume started exactly one new gang "
                       "generation (DAPO_GANG_GENERATION = 1, 2, 3) reading the edited run file", None, max(recover),
                       "resume -> every pod recreated (slowest cycle)", None,
                       f"{lost} discrepancies in pods, gang generations, status step, run file", "edit/suspend/resume"))
    assert lost == 0
