"""Thin kopf handlers: observe, call the pure `reconcile`, execute the plan.

Every trigger (create, resume, update, the polling timer, an event on one of the run's pods)
runs the same `Operator.reconcile_run`, serialised per run by a lock, so handlers never race
each other and an operator restart simply observes and continues.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
import kopf

from dapo.spec import API_GROUP, API_VERSION, PLURAL

from . import metrics
from . import naming as n
from .kube import KubeClient, core_path, pod_path, run_path
from .reconcile import (
    GUARDRAIL_TRIPPED, CreateObject, DeletePod, DeleteRun, EmitEvent, Observed, PatchObject, PatchRun, PatchStatus,
    Plan, reconcile,
)
from .status import TERMINAL, pod_phase

log = logging.getLogger("dapo_operator")

STATUS_URL_ENV = "DAPO_STATUS_URL_TEMPLATE"


def status_url(name: str, namespace: str) -> str:
    """URL of learner-0's /status: its pod's DNS name and the services' port; the environment
    variable DAPO_STATUS_URL_TEMPLATE ({name}, {namespace}) overrides (an operator outside the
    cluster, tests)."""
    template = os.environ.get(STATUS_URL_ENV)
    if template:
        return template.format(name=name, namespace=namespace)
    return f"http://{n.pod_dns(name, 'learner', 0, namespace)}:{n.HTTP_PORT}/status"


@dataclass
class OperatorConfig:
    """Knobs of one operator instance (env defaults; tests pass their own)."""

    image: str | None = None
    poll_interval: float = field(default_factory=lambda: float(os.environ.get("DAPO_OPERATOR_POLL_INTERVAL", "10")))
    status_timeout: float = 2.0
    # Returns the API server connection; None means kopf's own login (service account, kubeconfig).
    connection: Callable[[], Awaitable[kopf.ConnectionInfo]] | None = None
    max_passes: int = 3


async def fetch_learner_status(url: str, timeout: float) -> dict[str, Any] | None:
    """GET learner-0's /status; None on any failure (the learner may simply not be up yet)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return None
                answer = await resp.json(content_type=None)
                return answer if isinstance(answer, dict) else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError):
        return None


async def _default_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig found; set KUBECONFIG")
    return info


class Operator:
    """State of one operator process: config, API client and per-run locks."""

    def __init__(self, config: OperatorConfig):
        self.config = config
        self.connection: kopf.ConnectionInfo | None = None
        self._client: KubeClient | None = None
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def client(self) -> KubeClient:
        if self._client is None:
            if self.connection is None:
                raise RuntimeError("the operator has not logged in yet")
            self._client = KubeClient(self.connection)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def observe(self, obj: dict[str, Any]) -> Observed:
        client = await self.client()
        meta = obj["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        selector = n.run_selector(name)

        def mine(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # Filter again: a label selector is a request, and the label is our contract.
            return [i for i in items if i.get("metadata", {}).get("labels", {}).get(n.LABEL_RUN) == name]

        pods = mine(await client.list(pod_path(namespace), selector))
        maps = mine(await client.list(core_path("ConfigMap", namespace), selector))
        config_maps = {c["metadata"]["name"] for c in maps}
        config_map_data = {c["metadata"]["name"]: dict(c.get("data") or {}) for c in maps}
        services = {s["metadata"]["name"] for s in mine(await client.list(core_path("Service", namespace), selector))}
        learner_status = None
        learner0 = next((p for p in pods if p["metadata"]["name"] == n.pod_name(name, "learner", 0)), None)
        if (obj.get("status") or {}).get("phase") not in TERMINAL and learner0 and pod_phase(learner0) == "Running":
            learner_status = await fetch_learner_status(status_url(name, namespace), self.config.status_timeout)
        return Observed(pods, config_maps, services, learner_status, dt.datetime.now(dt.timezone.utc), config_map_data)

    async def execute(self, obj: dict[str, Any], plan: Plan) -> dict[str, Any] | None:
        """Run the plan's actions in order (deletes/creates first, status last as planned)."""
        client = await self.client()
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        refreshed = None
        for action in plan.actions:
            if isinstance(action, CreateObject):
                kind = action.obj["kind"]
                await client.create(core_path(kind, namespace), action.obj)
                log.info("created %s %s/%s", kind, namespace, action.obj["metadata"]["name"])
            elif isinstance(action, DeletePod):
                await client.delete(pod_path(namespace, action.name))
                log.info("deleted pod %s/%s: %s", namespace, action.name, action.reason)
            elif isinstance(action, PatchObject):
                await client.merge_patch(core_path(action.kind, namespace, action.name), action.patch)
                log.info("patched %s %s/%s: %s", action.kind, namespace, action.name, action.reason)
            elif isinstance(action, PatchRun):
                await client.merge_patch(run_path(namespace, name), action.patch)
                log.warning("patched DAPORun %s/%s %s: %s", namespace, name, action.patch, action.reason)
            elif isinstance(action, PatchStatus):
                refreshed = await client.merge_patch(run_path(namespace, name, status=True), {"status": action.status})
            elif isinstance(action, EmitEvent):
                if action.reason == "GangRestart":
                    metrics.GANG_RESTARTS.labels(namespace=namespace).inc()
                elif action.reason == GUARDRAIL_TRIPPED:
                    metrics.GUARDRAIL_TRIPS.labels(namespace=namespace).inc()
                log.log(logging.WARNING if action.type == "Warning" else logging.INFO,
                        "run %s/%s: %s: %s", namespace, name, action.reason, action.message)
                try:
                    kopf.event(obj, type=action.type, reason=action.reason, message=action.message)
                except LookupError:
                    pass  # outside a kopf handler context (e.g. tests calling execute directly)
            elif isinstance(action, DeleteRun):
                await client.delete(run_path(namespace, name))
                log.info("deleted DAPORun %s/%s: %s", namespace, name, action.reason)
                metrics.record_phase(namespace, name, None)
                return None
        return refreshed

    async def reconcile_run(self, namespace: str, name: str) -> None:
        """Observe -> plan -> act, a few passes so deletions are followed by the recreation."""
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            started = time.monotonic()
            try:
                client = await self.client()
                obj = await client.get(run_path(namespace, name))
                for _ in range(self.config.max_passes):
                    if obj is None or obj.get("metadata", {}).get("deletionTimestamp"):
                        # Gone or going (the garbage collector removes the children): nothing to
                        # observe. Returning at once keeps the per-run lock short, so kopf's timer
                        # stops in time and it releases its finalizer without waiting a minute.
                        return
                    plan = reconcile(obj, await self.observe(obj), image=self.config.image)
                    refreshed = await self.execute(obj, plan)
                    metrics.record_phase(namespace, name, plan.status.get("phase"))
                    if refreshed is None and plan.of(DeleteRun):
                        return
                    if plan.of(PatchRun):
                        # the spec changed under this loop (a guardrail set spec.suspend): read it
                        # back, or the next pass would take the old spec for a resume
                        obj = await client.get(run_path(namespace, name))
                        if obj is None:
                            return
                    obj = dict(obj, status=plan.status)
                    if not plan.of(DeletePod) and not plan.of(CreateObject):
                        break
            except Exception:
                metrics.RECONCILE_ERRORS.labels(namespace=namespace).inc()
                raise
            finally:
                metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


def build_registry(config: OperatorConfig | None = None) -> tuple[kopf.OperatorRegistry, Operator]:
    """A fresh kopf registry with every handler of the DAPORun operator bound to one Operator."""
    config = config or OperatorConfig()
    op = Operator(config)
    registry = kopf.OperatorRegistry()
    runs = dict(group=API_GROUP, version=API_VERSION, plural=PLURAL, registry=registry)

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = await config.connection() if config.connection else await _default_login(**kwargs)
        if op.connection is not None and info is not None and info.server != op.connection.server:
            await op.close()
        op.connection = info
        return info

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Keep kopf's own bookkeeping in annotations: status belongs to the operator's schema.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"kopf.{API_GROUP}")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=f"kopf.{API_GROUP}")
        settings.posting.reporting_component = "dapo-operator"
        settings.scanning.disabled = True  # no CRD/namespace scanning: needs fewer RBAC rights
        settings.watching.server_timeout = 300
        # A DAPORun deleted while its poll timer runs a pass: kopf keeps its finalizer until the
        # timer exited and looks again only after this many seconds (default 60).
        settings.background.cancellation_polling = 1.0

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await op.close()

    @kopf.on.create(**runs)
    @kopf.on.resume(**runs)
    @kopf.on.update(**runs)
    async def changed(name: str, namespace: str, **_: Any) -> None:
        await op.reconcile_run(namespace, name)

    @kopf.on.delete(**runs, optional=True)
    async def deleted(name: str, namespace: str, **_: Any) -> None:
        # Children go with the DAPORun through ownerReferences (garbage collection).
        metrics.record_phase(namespace, name, None)

    @kopf.timer(**runs, interval=config.poll_interval, initial_delay=min(1.0, config.poll_interval))
    async def poll(name: str, namespace: str, **_: Any) -> None:
        await op.reconcile_run(namespace, name)

    @kopf.on.event("v1", "pods", labels={n.LABEL_RUN: kopf.PRESENT}, registry=registry)
    async def pod_event(body: kopf.Body, namespace: str, **_: Any) -> None:
        run_name = body.get("metadata", {}).get("labels", {}).get(n.LABEL_RUN)
        if run_name:
            await op.reconcile_run(namespace, run_name)

    return registry, op
