"""Helpers for the operator tests (tests/operator/, tests/faults/test_operator_faults.py): a fake
learner /status, polling, and the operator in-process (real kopf) against kmock's Kubernetes API
emulator over HTTP, with the kubelet's part played by the test (imported by name). Run files come
from tests/_run_files.py (preset "operator": the run "demo" in namespace ns1)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
from typing import Any, Awaitable, Callable

import aiohttp
import kopf
import pytest
from aiohttp import web

from _run_files import run_doc
import _run_files
from dapo.contracts import RUN_FILE
from dapo_operator.handlers import OperatorConfig, build_registry
from dapo_operator.reconcile import CreateObject, DeletePod, Observed, reconcile

NAMESPACE = "ns1"


class FakeLearner:
    """An aiohttp server answering GET /{run}/status with whatever the test sets."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.calls = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _status(self, request: web.Request) -> web.Response:
        self.calls += 1
        answer = self.answers.get(request.match_info["run"])
        if answer is None:
            return web.Response(status=503, text="not up")
        return web.json_response(answer)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{run}/status", self._status)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


@pytest.fixture
async def fake_learner(monkeypatch: pytest.MonkeyPatch):
    learner = FakeLearner()
    await learner.start()
    monkeypatch.setenv("DAPO_STATUS_URL_TEMPLATE", f"http://127.0.0.1:{learner.port}/{{name}}/status")
    yield learner
    await learner.stop()


def learner_answer(state: str, step: int = 3, total: int = 10) -> dict[str, Any]:
    return {
        "state": state, "step": step, "totalSteps": total, "weightVersion": step,
        "metrics": {"critic/score/mean": 0.25, "train/acc/mean": 0.6, "response_length/mean": 120.0, "val/acc/mean": None},
        "lastCheckpoint": {"step": 2, "uri": "s3://ckpt/demo/step-2"}, "message": "", "updatedAt": "2025-01-01T00:00:00Z",
    }


async def eventually(check, timeout: float = 10.0, interval: float = 0.05):
    """Await until ``check()`` (sync or async) returns a truthy value; return it or fail.

    The bound only matters when the check fails: on the shared 2-core CI machine, kopf's handling
    of a run (now with the check pod's round before the gang) took over 5 s under load."""
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- kmock: the API, the operator, pods

RUNS = f"/apis/dapo.dev/v1alpha1/namespaces/{NAMESPACE}/daporuns"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"


def declare_resources(kmock: Any) -> None:
    verbs = ["list", "watch", "get", "create", "patch", "update", "delete"]
    kmock.resources["dapo.dev/v1alpha1/daporuns"] = kmock.ResourceInfo(
        kind="DAPORun", singular="daporun", namespaced=True, verbs=verbs, subresources=["status"])
    for plural, kind in (("pods", "Pod"), ("configmaps", "ConfigMap"), ("services", "Service"), ("events", "Event")):
        kmock.resources[f"v1/{plural}"] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=verbs,
                                                             subresources=["status"] if plural == "pods" else [])
    # kopf's backbone waits for these to be discoverable even with scanning disabled.
    kmock.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=verbs)
    kmock.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=verbs)


CheckRunner = Callable[[dict[str, Any], str], Awaitable[tuple[int, str]]]


async def check_passes(pod: dict[str, Any], run_file: str) -> tuple[int, str]:
    """The default check pod: `dapo check` passes at once (the tests of other features)."""
    return 0, f"dapo check {RUN_FILE}: ok (0 warning(s)) in 0.0s"


def termination_message(log: str) -> str:
    """What FallbackToLogsOnError keeps of a failed container's log: the last 80 lines, at most 2048 bytes."""
    tail = "\n".join(log.splitlines()[-80:])
    return tail.encode()[-2048:].decode(errors="ignore")


async def run_check_command(pod: dict[str, Any], run_file: str) -> tuple[int, str]:
    """Really run the check pod's container command (`dapo check /etc/dapo/run.yaml`), as a
    child process (in this one, the operator and the check would share the GIL: twice as slow),
    on a copy of the run file the ConfigMap holds; returns its exit code and termination message
    (the output's tail)."""
    import sys
    import tempfile

    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["dapo", "check"], command
    with tempfile.TemporaryDirectory(prefix="dapo-check-pod-") as folder:
        path = os.path.join(folder, "run.yaml")
        with open(path, "w") as fh:
            fh.write(run_file)
        args = [path if arg == RUN_FILE else arg for arg in command[1:]]
        child = await asyncio.create_subprocess_exec(sys.executable, "-m", "dapo.cli", *args,
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await child.communicate()
    return int(child.returncode or 0), termination_message(out.decode(errors="replace"))


async def play_check_pods(kmock: Any, runner: CheckRunner, interval: float = 0.2) -> None:
    """The kubelet's part for check pods (role "check"): each new one is run by ``runner`` on its
    run file (the ConfigMap's run.yaml) and gets the terminated state: phase, exit code, message."""
    busy: set[str] = set()
    while True:
        for name, pod in (await pods(kmock)).items():
            labels = pod["metadata"].get("labels", {})
            if labels.get("dapo.dev/role") != "check" or name in busy or pod["metadata"].get("deletionTimestamp") \
                    or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            busy.add(name)
            try:
                config_map = pod["spec"]["volumes"][0]["configMap"]["name"]
                _, answer = await api(kmock, "GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps/{config_map}")
                code, message = await runner(pod, answer["data"]["run.yaml"])
                await api(kmock, "PATCH", f"{PODS}/{name}/status", {"status": check_done(code, message)})
            finally:
                busy.discard(name)
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running_operator(kmock: Any, check: CheckRunner | None = check_passes):
    """The operator (real kopf) against kmock, and the kubelet for check pods: ``check`` decides
    their result (default: they pass at once; None: nothing plays them)."""
    async def connection() -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=str(kmock.url).rstrip("/"), insecure=True)

    registry, _ = build_registry(OperatorConfig(image="img:test", poll_interval=0.2, status_timeout=0.5, connection=connection))
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    task = asyncio.create_task(kopf.operator(registry=registry, settings=settings, standalone=True,
                                             namespaces=[NAMESPACE], clusterwide=False))
    kubelet = asyncio.create_task(play_check_pods(kmock, check)) if check is not None else None
    try:
        yield task
    finally:
        for running in (kubelet, task):
            if running is not None:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running


async def api(kmock: Any, method: str, path: str, body: Any = None, content_type: str = "application/merge-patch+json"):
    headers = {"Content-Type": content_type} if body is not None else {}
    # A short-lived session per call: kmock's shared test client can stall after an operator
    # restart (its pooled keep-alive connections); a fresh one keeps the tests independent.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.request(method, str(kmock.url).rstrip("/") + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


async def pods(kmock: Any) -> dict[str, dict[str, Any]]:
    _, answer = await api(kmock, "GET", PODS)
    return {p["metadata"]["name"]: p for p in answer.get("items", [])}


async def run_status(kmock: Any, name: str = "demo") -> dict[str, Any]:
    status, answer = await api(kmock, "GET", f"{RUNS}/{name}")
    return (answer.get("status") or {}) if status == 200 else {}


async def set_pod(kmock: Any, name: str, phase: str, ready: bool = False, exit_code: int | None = None) -> None:
    """Play the kubelet: write a pod's status."""
    status: dict[str, Any] = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "c", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]
    code, _ = await api(kmock, "PATCH", f"{PODS}/{name}/status", {"status": status})
    assert code == 200


async def all_running(kmock: Any) -> None:
    for name in list(await pods(kmock)):
        await set_pod(kmock, name, "Running", ready=True)


def sent(kmock: Any, method: str, path_suffix: str) -> list[Any]:
    """Requests kmock received (its DSL iterates them) with this method and URL path ending."""
    return [r for r in list(kmock) if getattr(r.method, "value", r.method) == method
            and r.url.path.endswith(path_suffix)]


EXPECTED = {"demo-learner-0", "demo-learner-1", "demo-rollout-0", "demo-rollout-1", "demo-reward-0"}


async def create_run(kmock: Any, doc: dict[str, Any], uid: str = "uid-demo") -> None:
    # kmock assigns no uid / resourceVersion; kopf's patches test resourceVersion.
    doc = dict(doc, metadata=dict(doc["metadata"], uid=uid, generation=1, resourceVersion="1"))
    code, _ = await api(kmock, "POST", RUNS, doc, content_type="application/json")
    assert code in (200, 201)


async def pods_named(kmock, wanted):
    found = await pods(kmock)
    return found if set(found) == wanted else None


async def phase_is(kmock, phase, name="demo"):
    status = await run_status(kmock, name)
    return status if status.get("phase") == phase else None


async def no_pods(kmock):
    return not await pods(kmock)


async def start_running_run(kmock, fake_learner, step: int = 3) -> dict:
    """Create the demo run, let the operator create its pods, mark them all Running and have
    learner-0 report training at ``step``; returns the status once the phase is Running.
    Call inside ``running_operator``."""
    await create_run(kmock, run_doc(preset="operator"))
    await eventually(lambda: pods_named(kmock, EXPECTED))
    await all_running(kmock)
    fake_learner.answers["demo"] = learner_answer("running", step=step)
    return await eventually(lambda: phase_is(kmock, "Running"))


# --------------------------------------------------------------------------- pure reconcile passes (no API server)

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def run_obj(**spec) -> dict[str, Any]:
    doc = _run_files.run_doc(preset="operator", **spec)
    doc["metadata"].update(uid="uid-1", generation=1)
    return doc


def check_done(exit_code: int = 0, message: str = "") -> dict[str, Any]:
    """A check pod's status after `dapo check` exited (what the kubelet writes)."""
    return {"phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": [
        {"name": "check", "state": {"terminated": {"exitCode": exit_code, "message": message,
                                                   "reason": "Completed" if exit_code == 0 else "Error"}}}]}


def apply(obj: dict[str, Any], observed_pods: list[dict[str, Any]], plan, check_exit: int | None = 0
          ) -> list[dict[str, Any]]:
    """Play the API server for a plan: apply creates/deletes to the pod list, store status.

    And the kubelet for the check pod (spec.preflight, on by default): a check pod the plan
    created exits ``check_exit`` at once and the next pass (same clock) is applied too, so a
    first pass followed by `apply` leaves the gang created as before the check existed. None
    leaves the check pod as created (tests of the check itself)."""
    pods = {p["metadata"]["name"]: p for p in observed_pods}
    for action in plan.actions:
        if isinstance(action, CreateObject) and action.obj["kind"] == "Pod":
            assert action.obj["metadata"]["name"] not in pods, "duplicate pod created"
            pods[action.obj["metadata"]["name"]] = action.obj
        elif isinstance(action, DeletePod):
            pods.pop(action.name)
    obj["status"] = plan.status
    checks = [a.obj["metadata"]["name"] for a in plan.of(CreateObject)
              if a.obj["metadata"]["labels"].get("dapo.dev/role") == "check"]
    if checks and check_exit is not None:
        pods[checks[0]] = dict(pods[checks[0]], status=check_done(check_exit))
        validated = next(c for c in plan.status["conditions"] if c["type"] == "Validated")
        now = dt.datetime.fromisoformat(validated["lastTransitionTime"].replace("Z", "+00:00"))
        return apply(obj, list(pods.values()), reconcile(obj, observe(list(pods.values()), now=now)), check_exit)
    return list(pods.values())


def all_children():
    return {"demo-spec"}, {"demo-learner", "demo-rollout", "demo-reward"}


def observe(pods, learner=None, now=T0):
    cms, svcs = all_children()
    return Observed(pods=pods, config_maps=cms, services=svcs, learner_status=learner, now=now)


def set_phase(pods, name, phase, ready=False):
    for p in pods:
        if p["metadata"]["name"] == name:
            p["status"] = {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]}


