"""Helpers for the operator tests: run files, a fake learner /status, polling (imported by name)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from aiohttp import web

NAMESPACE = "ns1"


def good_run(name: str = "demo", **spec_updates: Any) -> dict[str, Any]:
    """A small valid DAPORun document (2 learners, 2 rollouts, 1 reward)."""
    doc = {
        "apiVersion": "dapo.dev/v1alpha1",
        "kind": "DAPORun",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"path": "builtin:arith-tiny"},
            "data": {"train": "s3://data/train.parquet"},
            "rollout": {"replicas": 2, "maxResponseLength": 256, "genBatchSize": 8},
            "algorithm": {"overlong": {"bufferLength": 64}},
            "learner": {"replicas": 2, "trainBatchSize": 8, "miniBatchSize": 4},
            "reward": {"replicas": 1},
            "checkpoint": {"uri": "s3://ckpt/demo"},
            "backoffLimit": 2,
        },
    }
    doc["spec"].update(copy.deepcopy(spec_updates))
    return doc


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


async def eventually(check, timeout: float = 5.0, interval: float = 0.05):
    """Await until ``check()`` (sync or async) returns a truthy value; return it or fail."""
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
