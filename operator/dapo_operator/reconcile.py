"""The whole control logic as one pure function: `reconcile(run, observed) -> Plan`.

Idempotent by construction: it compares the wanted children with the observed ones and only
plans what is missing or wrong, so running it twice, or after an operator restart, never
duplicates a pod. Every counter it needs (gang generation, restarts) lives in the CR's status.
The handlers (handlers.py) observe, call this, and execute the actions in order.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from dapo.spec import DAPORun, SpecError, parse_run

from . import naming as n
from .builders import Owner, build_config_map, build_pod, build_service, desired_pod_names, gang_roles
from .status import (
    FAILED, SUSPENDED, TERMINAL, Outcome, compute_status, learner_succeeded, parse_time,
    pod_failure, pod_generation, pod_name_of, pod_phase, pod_run_file_error, pod_terminating, current_pods,
    sanitize_learner_status,
)


@dataclass(frozen=True)
class CreateObject:
    obj: dict[str, Any]


@dataclass(frozen=True)
class DeletePod:
    name: str
    reason: str


@dataclass(frozen=True)
class PatchObject:
    """A JSON merge patch of one child object (e.g. the run-file ConfigMap after a spec edit)."""

    kind: str
    name: str
    patch: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class PatchStatus:
    status: dict[str, Any]


@dataclass(frozen=True)
class EmitEvent:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class DeleteRun:
    reason: str


Action = CreateObject | DeletePod | PatchObject | PatchStatus | EmitEvent | DeleteRun


@dataclass
class Observed:
    """What the handler saw: this run's pods, names of its ConfigMaps / Services, learner /status."""

    pods: list[dict[str, Any]] = field(default_factory=list)
    config_maps: set[str] = field(default_factory=set)
    services: set[str] = field(default_factory=set)
    learner_status: dict[str, Any] | None = None
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    # name -> data of this run's ConfigMaps, where the observer read them (None: not compared)
    config_map_data: dict[str, dict[str, str]] | None = None


@dataclass
class Plan:
    actions: list[Action]
    status: dict[str, Any]

    def of(self, kind: type) -> list[Any]:
        return [a for a in self.actions if isinstance(a, kind)]


def _delete_all(pods: list[dict[str, Any]], reason: str) -> list[Action]:
    return [DeletePod(pod_name_of(p), reason) for p in pods if not pod_terminating(p)]


def _transition_events(previous: dict[str, Any], status: dict[str, Any]) -> list[Action]:
    before, after = previous.get("phase"), status.get("phase")
    if before == after:
        return []
    kind = "Warning" if after == FAILED else "Normal"
    return [EmitEvent(kind, after, f"phase {before or 'None'} -> {after}: {status.get('message', '')}")]


def _finish(run: DAPORun, obj: dict[str, Any], previous: dict[str, Any], work: dict[str, Any], observed: Observed,
            actions: list[Action], outcome: Outcome | None = None, learner_status: dict[str, Any] | None = None) -> Plan:
    status = compute_status(run, obj.get("metadata", {}).get("generation"), observed.pods, learner_status, work,
                            observed.now, outcome)
    actions = actions + _transition_events(previous, status)
    if status != previous:
        actions.append(PatchStatus(status))
    return Plan(actions, status)


def _ttl_expired(run: DAPORun, status: dict[str, Any], now: dt.datetime) -> bool:
    ttl = run.spec.ttl_seconds_after_finished
    done = parse_time(status.get("completionTime"))
    return ttl is not None and done is not None and now >= done + dt.timedelta(seconds=ttl)


def _run_file_error(run: DAPORun, by_name: dict[str, dict[str, Any]], learner_status: dict[str, Any] | None,
                    gen: int) -> str | None:
    """Why the run cannot go on with this run file, or None: a pod of any role (of the current
    gang, for gang roles) stopped with the run-file error exit code, or learner-0 reports a failure
    it marks as a run-file error (before its pod exits)."""
    gang = gang_roles(run)
    for role, _, pod_name in desired_pod_names(run):
        pod = by_name.get(pod_name)
        if pod is None or pod_phase(pod) != "Failed" or (role in gang and pod_generation(pod) != gen):
            continue
        error = pod_run_file_error(pod)
        if error is not None:
            return f"{pod_name} stopped on a run-file error: {error}"
    if learner_status and learner_status.get("state") == "failed" and learner_status.get("runFileError"):
        return (f"{n.pod_name(run.metadata.name, 'learner', 0)} stopped on a run-file error: "
                f"{learner_status.get('message', '')}")
    return None


def reconcile(obj: dict[str, Any], observed: Observed, image: str | None = None) -> Plan:
    """Plan the actions that move the cluster toward what the DAPORun ``obj`` asks for.

    ``obj`` is the DAPORun as the API server returns it (metadata, spec, status).
    """
    previous = dict(obj.get("status") or {})
    meta = obj.get("metadata", {})
    name, namespace = meta.get("name", ""), meta.get("namespace") or "default"
    if meta.get("deletionTimestamp"):
        return Plan([], previous)  # the garbage collector removes the children via ownerReferences
    pods = [p for p in observed.pods if p.get("metadata", {}).get("labels", {}).get(n.LABEL_RUN) == name]
    observed = Observed(pods, observed.config_maps, observed.services, observed.learner_status, observed.now,
                        observed.config_map_data)
    try:
        run = parse_run({k: v for k, v in obj.items() if k != "status"}, source=f"DAPORun {namespace}/{name}")
    except SpecError as exc:
        status = dict(previous, phase=FAILED, reason="InvalidSpec", message=str(exc),
                      observedGeneration=meta.get("generation", 0))
        actions: list[Action] = _delete_all(pods, "invalid spec")
        if previous.get("phase") != FAILED:
            actions.append(EmitEvent("Warning", "InvalidSpec", str(exc)))
        if status != previous:
            actions.append(PatchStatus(status))
        return Plan(actions, status)

    owner = Owner(name, meta.get("uid", ""))
    work = dict(previous)
    gen = int(work.get("gangGeneration", 0))
    restarts = int(work.get("restartCount", 0))
    created = int(work.get("createdGangGeneration", -1))
    actions = []

    if previous.get("phase") in TERMINAL:
        actions += _delete_all(pods, f"run {previous['phase']}")
        if _ttl_expired(run, previous, observed.now):
            actions.append(DeleteRun(f"ttlSecondsAfterFinished={run.spec.ttl_seconds_after_finished} elapsed"))
        return _finish(run, obj, previous, work, observed, actions)

    if run.spec.suspend:
        return _finish(run, obj, previous, work, observed, _delete_all(pods, "spec.suspend is true"))

    if previous.get("phase") == SUSPENDED:
        # Resume: a fresh gang that continues from the last committed checkpoint.
        gen += 1
        work["gangGeneration"] = gen
        actions.append(EmitEvent("Normal", "Resumed", f"spec.suspend is false: starting gang generation {gen}"))

    live = current_pods(run, pods, gen)
    learner0 = live.get(n.pod_name(name, "learner", 0))
    learner_status = observed.learner_status if learner0 is not None else None
    if learner_succeeded(run, live, learner_status):
        actions += _delete_all(pods, "training finished")
        return _finish(run, obj, previous, work, observed, actions, learner_status=learner_status)

    gang = gang_roles(run)
    by_name = {pod_name_of(p): p for p in pods}
    run_file_error = _run_file_error(run, by_name, sanitize_learner_status(learner_status), gen)
    if run_file_error is not None:
        # e.g. spec.reward.scorers[0].function does not import, or a learner setting the runtime
        # refuses: every restart or replacement would fail the same way
        actions += _delete_all(pods, "run-file error")
        outcome = Outcome(FAILED, "RunFileError", run_file_error)
        return _finish(run, obj, previous, work, observed, actions, outcome=outcome)
    dead: list[str] = []
    for role, index, pod_name in desired_pod_names(run):
        if role not in gang:
            continue
        pod = by_name.get(pod_name)
        same_gang = pod is not None and pod_generation(pod) == gen
        if same_gang and pod_phase(pod) == "Failed":
            dead.append(f"{pod_name} failed: {pod_failure(pod)}")
        elif same_gang and pod_phase(pod) == "Succeeded" and not (role == "learner" and index > 0):
            dead.append(f"{pod_name} exited before training finished")
        elif (pod is None or (same_gang and pod_terminating(pod))) and created >= gen:
            dead.append(f"{pod_name} was deleted")
    if dead:
        why = "; ".join(dead)
        if restarts >= run.spec.backoff_limit:
            actions += _delete_all(pods, "backoff limit exceeded")
            outcome = Outcome(FAILED, "BackoffLimitExceeded",
                              f"gang restarted {restarts} times (spec.backoffLimit={run.spec.backoff_limit}); last failure: {why}")
            return _finish(run, obj, previous, work, observed, actions, outcome=outcome)
        restarts += 1
        gen += 1
        learner_status = None  # it described the gang that just died
        work.update(restartCount=restarts, gangGeneration=gen)
        actions.append(EmitEvent("Warning", "GangRestart",
                                 f"restart {restarts}/{run.spec.backoff_limit}, gang generation {gen}: {why}"))

    spec_map = build_config_map(run, namespace, owner)
    if n.config_map_name(name) not in observed.config_maps:
        actions.append(CreateObject(spec_map))
    elif observed.config_map_data is not None and \
            observed.config_map_data.get(n.config_map_name(name)) not in (None, spec_map["data"]):
        # An edited DAPORun: pods started from now on (resume, gang restart, a replaced reward
        # pod) must read the edited run file, not the one of the first creation.
        actions.append(PatchObject("ConfigMap", n.config_map_name(name), {"data": spec_map["data"]},
                                   "the DAPORun spec changed"))
    for role in n.ROLES:
        if n.service_name(name, role) not in observed.services:
            actions.append(CreateObject(build_service(run, role, namespace, owner)))

    wanted = {pod_name for _, _, pod_name in desired_pod_names(run)}
    gang_complete = True
    for role, index, pod_name in desired_pod_names(run):
        pod = by_name.get(pod_name)
        if pod is None:
            actions.append(CreateObject(build_pod(run, role, index, namespace, gen, image, owner)))
        elif pod_terminating(pod):
            gang_complete = gang_complete and role not in gang  # the name frees up soon; create next pass
        elif role in gang and pod_generation(pod) != gen:
            actions.append(DeletePod(pod_name, f"gang generation {pod_generation(pod)} replaced by {gen}"))
            gang_complete = False
        elif role not in gang and pod_phase(pod) in ("Failed", "Succeeded"):
            actions.append(DeletePod(pod_name, f"reward pod stopped ({pod_failure(pod)}); replacing it alone"))
            actions.append(EmitEvent("Warning", "RewardPodReplaced", f"{pod_name} stopped ({pod_failure(pod)}); recreating it"))
    for pod in pods:
        if pod_name_of(pod) not in wanted and not pod_terminating(pod):
            actions.append(DeletePod(pod_name_of(pod), "no longer wanted by the spec (replicas lowered)"))
    if gang_complete and created < gen:
        work["createdGangGeneration"] = gen
    return _finish(run, obj, previous, work, observed, actions, learner_status=learner_status)
