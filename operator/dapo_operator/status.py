"""Pure status computation: what a DAPORun's status should say, from what was observed.

`compute_status(run, generation, pods, learner_status, previous, now, outcome)` has no I/O and no
clock of its own; the operator feeds it the listed pods and learner-0's /status JSON.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import typing

from dapo.contracts import (GUARDRAIL_FAIL_EXIT_CODE, GUARDRAIL_SUSPEND_EXIT_CODE, LEARNER_STATES, PHASES,
                            STATUS_METRIC_FIELDS, GuardrailTrip, LearnerMetrics, finite_or_none)
from dapo.spec import DAPORun

from . import naming as n
from .builders import desired_pod_names, role_spec, spec_warnings

PENDING, STARTING, RUNNING, SUSPENDED, SUCCEEDED, FAILED = PHASES
TERMINAL = (SUCCEEDED, FAILED)

# verl metric names in learner /status -> status field names (both from dapo.contracts)
METRIC_FIELDS = {LearnerMetrics.model_fields[name].alias: target for name, target in STATUS_METRIC_FIELDS.items()}

# The status object lands in etcd (1.5 MiB per object) and is repeated in 5 conditions: a
# learner message is a human line, so a long one is cut rather than breaking every patch.
MAX_MESSAGE_CHARS = 1024
MAX_URI_CHARS = 2048
MAX_NAME_CHARS = 256  # a guardrail's metric name and rule
GUARDRAIL_ACTIONS: tuple[str, ...] = typing.get_args(GuardrailTrip.model_fields["action"].annotation)
_INT64_MAX = 2**63 - 1


def _count(value: Any) -> int | None:
    """A non-negative int64 (step, version), or None for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
        return None
    return value


_finite = finite_or_none


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sanitize_learner_status(answer: Any) -> dict[str, Any] | None:
    """Only the /status fields of dapo.contracts.LearnerStatus, with their contract types; everything else dropped.

    The learner's reply is copied into the DAPORun status, which anyone who can read the CR
    sees: an unknown key (e.g. a debug dump of the environment) must never reach it, and a
    wrongly typed value must neither crash the operator nor make the API server reject the
    status patch on every poll.
    """
    if not isinstance(answer, dict):
        return None
    clean: dict[str, Any] = {}
    if answer.get("state") in LEARNER_STATES:
        clean["state"] = answer["state"]
    for key in ("step", "totalSteps", "weightVersion"):
        if _count(answer.get(key)) is not None:
            clean[key] = answer[key]
    metrics = answer.get("metrics")
    if isinstance(metrics, dict):
        clean["metrics"] = {k: _finite(metrics.get(k)) for k in METRIC_FIELDS if _finite(metrics.get(k)) is not None}
    checkpoint = answer.get("lastCheckpoint")
    if isinstance(checkpoint, dict) and _count(checkpoint.get("step")) is not None and isinstance(checkpoint.get("uri"), str):
        clean["lastCheckpoint"] = {"step": checkpoint["step"], "uri": _cut(checkpoint["uri"], MAX_URI_CHARS)}
    if isinstance(answer.get("message"), str):
        clean["message"] = _cut(answer["message"], MAX_MESSAGE_CHARS)
    if answer.get("runFileError") is True:
        clean["runFileError"] = True
    trip = sanitize_guardrail(answer.get("guardrail"))
    if trip is not None:
        clean["guardrail"] = trip
    return clean


def sanitize_guardrail(trip: Any) -> dict[str, Any] | None:
    """Only dapo.contracts.GuardrailTrip's fields, typed and cut; None when a required one
    (metric, step, action, rule) is missing or wrong (a half trip would show a misleading line).
    A non-finite value is left out rather than null: in a merge patch null deletes the key, so the
    status would never settle."""
    if not isinstance(trip, dict):
        return None
    metric, step, action, rule = trip.get("metric"), _count(trip.get("step")), trip.get("action"), trip.get("rule")
    if not isinstance(metric, str) or not metric or step is None or action not in GUARDRAIL_ACTIONS \
            or not isinstance(rule, str):
        return None
    clean: dict[str, Any] = {"metric": _cut(metric, MAX_NAME_CHARS), "step": step, "action": action,
                             "rule": _cut(rule, MAX_NAME_CHARS)}
    if _finite(trip.get("value")) is not None:
        clean["value"] = _finite(trip["value"])
    clean["message"] = _cut(trip["message"], MAX_MESSAGE_CHARS) if isinstance(trip.get("message"), str) else ""
    clean["rollbacks"] = _count(trip.get("rollbacks")) or 0
    return clean


def guardrail_line(trip: dict[str, Any]) -> str:
    """The trip's one line (GuardrailTrip.line: rule, step, metric and value, what was done)."""
    return _cut(GuardrailTrip.model_validate(trip).line(), MAX_MESSAGE_CHARS)


def guardrail_key(trip: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """What makes a trip a new one (its event is posted once): the step, the rollback count, the rule."""
    if not trip:
        return None
    return trip.get("step"), trip.get("rollbacks"), trip.get("action"), trip.get("metric"), trip.get("rule")


@dataclass(frozen=True)
class Validation:
    """The Validated condition a pass sets (spec.preflight): True / False / Unknown, and whether
    its clock restarts (a new check pod: the timeout counts from its creation)."""

    status: str
    reason: str
    message: str
    restart: bool = False


@dataclass(frozen=True)
class Outcome:
    """A phase decided by the reconciler rather than by observation (e.g. backoff exhausted)."""

    phase: str
    reason: str
    message: str


def rfc3339(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- pod facts


def pod_name_of(pod: dict[str, Any]) -> str:
    return pod.get("metadata", {}).get("name", "")


def pod_phase(pod: dict[str, Any]) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_generation(pod: dict[str, Any]) -> int:
    try:
        return int(pod.get("metadata", {}).get("labels", {}).get(n.LABEL_GANG, "0"))
    except ValueError:
        return -1


def pod_terminating(pod: dict[str, Any]) -> bool:
    return bool(pod.get("metadata", {}).get("deletionTimestamp"))


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term
    return None


def pod_failure(pod: dict[str, Any]) -> str:
    """Why a pod stopped, for messages: container exit code / reason, or the pod's reason."""
    status = pod.get("status") or {}
    term = _terminated(pod)
    if term:
        return f"exit code {term.get('exitCode')} ({term.get('reason', 'Error')})"
    return status.get("reason") or status.get("message") or "no reason reported"


def pod_exit(pod: dict[str, Any]) -> tuple[int | None, str]:
    """The exit code and termination message (the log tail) of a pod's stopped container."""
    term = _terminated(pod)
    if not term:
        return None, ""
    code = term.get("exitCode")
    return (code if isinstance(code, int) and not isinstance(code, bool) else None), str(term.get("message") or "")


#: Container waiting reasons that do not clear on their own: the image cannot be pulled (after the
#: kubelet's retry), its name is invalid, or the container cannot be configured (e.g. a Secret key
#: it names does not exist).
STUCK_WAITING_REASONS = ("ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError")


def pod_stuck(pod: dict[str, Any]) -> str | None:
    """Why a pod's container cannot start (a STUCK_WAITING_REASONS reason and its message), or None."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING_REASONS:
            return _cut(f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": "), MAX_MESSAGE_CHARS)
    return None


def labelled_lines(message: str, label: str) -> list[str]:
    """The ``LABEL: ...`` lines of a log tail (how `dapo` prints a problem or a guardrail stop), label removed."""
    return [line.strip().removeprefix(f"{label}:").strip() for line in message.splitlines()
            if line.strip().startswith(f"{label}:")]


def error_lines(message: str) -> list[str]:
    """The ``error: ...`` lines of a log tail (how `dapo` prints each problem), prefix removed."""
    return labelled_lines(message, "error")


def pod_guardrail_stop(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(action, line) of a learner pod that stopped on a guardrail (exit GUARDRAIL_FAIL_EXIT_CODE
    or GUARDRAIL_SUSPEND_EXIT_CODE; its last log line starts "guardrail:"), or None."""
    code, message = pod_exit(pod)
    action = {GUARDRAIL_FAIL_EXIT_CODE: "fail", GUARDRAIL_SUSPEND_EXIT_CODE: "suspend"}.get(code)  # type: ignore[arg-type]
    if action is None:
        return None
    lines = labelled_lines(message, "guardrail")
    line = lines[-1] if lines else \
        f"{pod_name_of(pod)} exited with code {code}: a guardrail with action {action} tripped"
    return action, _cut(line, MAX_MESSAGE_CHARS)


def pod_run_file_error(pod: dict[str, Any]) -> str | None:
    """The error line of a pod that stopped on a run-file error (`dapo` exits
    SPEC_ERROR_EXIT_CODE after printing ``error: ...``), or None. Read from the container's
    termination message (the log tail: terminationMessagePolicy FallbackToLogsOnError)."""
    term = _terminated(pod)
    if not term or term.get("exitCode") != n.SPEC_ERROR_EXIT_CODE:
        return None
    text = str(term.get("message") or "")
    errors = error_lines(text)
    line = errors[-1] if errors else (text.strip().splitlines() or ["(no termination message)"])[-1].strip()
    return _cut(line, MAX_MESSAGE_CHARS)


def current_pods(run: DAPORun, pods: list[dict[str, Any]], gang_generation: int) -> dict[str, dict[str, Any]]:
    """Pods of this run that count for the current gang (reward pods of any generation count)."""
    from .builders import gang_roles

    gang = gang_roles(run)
    out = {}
    for pod in pods:
        labels = pod.get("metadata", {}).get("labels", {})
        if labels.get(n.LABEL_RUN) != run.metadata.name or pod_terminating(pod):
            continue
        if labels.get(n.LABEL_ROLE) in gang and pod_generation(pod) != gang_generation:
            continue
        out[pod_name_of(pod)] = pod
    return out


def ready_counts(run: DAPORun, pods: dict[str, dict[str, Any]]) -> dict[str, str]:
    """'ready/replicas' per role, e.g. {'learner': '2/2'}."""
    out = {}
    for role in n.ROLES:
        replicas = role_spec(run, role).replicas
        ready = sum(1 for i in range(replicas) if (p := pods.get(n.pod_name(run.metadata.name, role, i))) and pod_ready(p))
        out[role] = f"{ready}/{replicas}"
    return out


def missing_replicas(run: DAPORun, pods: dict[str, dict[str, Any]], roles: tuple[str, ...] = ("rollout", "reward")
                     ) -> list[str]:
    """The wanted pods of ``roles`` that are not ready (absent, starting, stopped), by name."""
    return [name for role, _, name in desired_pod_names(run)
            if role in roles and not ((pod := pods.get(name)) and pod_ready(pod))]


def progress_time(phase: str, step: Any, previous: dict[str, Any], stamp: str) -> str | None:
    """When training last moved (status.lastProgressTime): ``stamp`` when the run enters Running or
    its step advances, else the previous value. Outside Running the value is kept, not cleared (a
    merge patch cannot drop a key by leaving it out); entering Running restarts the clock."""
    if phase != RUNNING:
        return previous.get("lastProgressTime")
    if previous.get("phase") != RUNNING or previous.get("step") != step or not previous.get("lastProgressTime"):
        return stamp
    return previous["lastProgressTime"]


def stalled_seconds(run: DAPORun, status: dict[str, Any], now: dt.datetime) -> float | None:
    """Seconds since training last moved, when the run is Running and that reaches
    spec.stallTimeoutSeconds; None otherwise (not running, no timeout set, or within it)."""
    timeout = run.spec.stall_timeout_seconds
    since = parse_time(status.get("lastProgressTime"))
    if timeout is None or status.get("phase") != RUNNING or since is None:
        return None
    waited = (now - since).total_seconds()
    return waited if waited >= timeout else None


def stall_message(run: DAPORun, status: dict[str, Any]) -> str:
    """The Stalled condition's / event's line (no clock in it, so the condition settles)."""
    return (f"no training step finished since {status.get('lastProgressTime')} (step {status.get('step')}; "
            f"spec.stallTimeoutSeconds={run.spec.stall_timeout_seconds}): check learner-0's log and the "
            f"rollout / reward pods it waits on")


def learner_succeeded(run: DAPORun, pods: dict[str, dict[str, Any]], learner_status: dict[str, Any] | None) -> bool:
    """Training finished: learner-0 says so, or learner-0 exited 0."""
    learner0 = pods.get(n.pod_name(run.metadata.name, "learner", 0))
    if learner0 is not None and pod_phase(learner0) == "Succeeded":
        return True
    return learner0 is not None and bool(learner_status) and learner_status.get("state") == "succeeded"


# --------------------------------------------------------------------------- status


def observed_phase(run: DAPORun, pods: dict[str, dict[str, Any]], learner_status: dict[str, Any] | None) -> str:
    """Pending (pods missing / unscheduled), Starting (all running, training not yet), Running."""
    wanted = [name for _, _, name in desired_pod_names(run)]
    if any(name not in pods or pod_phase(pods[name]) == "Pending" for name in wanted):
        return PENDING
    if learner_status is not None:
        return RUNNING if learner_status.get("state") == "running" else STARTING
    # No /status answer (e.g. an operator outside the cluster): all pods ready is the best signal.
    return RUNNING if all(pod_ready(pods[name]) for name in wanted) else STARTING


def _condition(previous: list[dict[str, Any]], kind: str, true: bool | str, reason: str, message: str, now: str,
               restart: bool = False) -> dict[str, Any]:
    status = true if isinstance(true, str) else ("True" if true else "False")
    before = next((c for c in previous if c.get("type") == kind), None)
    kept = before and before.get("status") == status and before.get("lastTransitionTime") and not restart
    since = before["lastTransitionTime"] if kept else now
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}


def compute_status(
    run: DAPORun,
    generation: int | None,
    pods: list[dict[str, Any]],
    learner_status: dict[str, Any] | None,
    previous: dict[str, Any] | None,
    now: dt.datetime,
    outcome: Outcome | None = None,
    validation: Validation | None = None,
) -> dict[str, Any]:
    """The new status. Terminal phases are sticky; ``outcome`` forces a phase (reconciler's call).

    ``previous`` carries the counters the reconciler owns (gangGeneration, restartCount,
    createdGangGeneration); everything else is recomputed or carried forward. ``validation`` sets
    the Validated condition (spec.preflight); without it the previous one, if any, is kept.
    """
    prev = dict(previous or {})
    stamp = rfc3339(now)
    learner_status = sanitize_learner_status(learner_status)
    gang_generation = int(prev.get("gangGeneration", 0))
    live = current_pods(run, pods, gang_generation)
    reason, message = "", ""
    if prev.get("phase") in TERMINAL:
        phase = prev["phase"]
        reason, message = prev.get("reason", phase), prev.get("message", "")
    elif outcome is not None:
        phase, reason, message = outcome.phase, outcome.reason, outcome.message
    elif run.spec.suspend:
        phase, reason, message = SUSPENDED, "Suspended", "spec.suspend is true: pods stopped, status and checkpoints kept"
    elif learner_succeeded(run, live, learner_status):
        phase, reason, message = SUCCEEDED, "TrainingFinished", "the learner finished training"
    else:
        phase = observed_phase(run, live, learner_status)
        reason = {PENDING: "PodsPending", STARTING: "PodsStarting", RUNNING: "Training"}[phase]
        message = (learner_status or {}).get("message") or {
            PENDING: "waiting for pods to be created and scheduled",
            STARTING: "pods are starting; waiting for the learner to report training",
            RUNNING: "training",
        }[phase]

    status = dict(prev)
    status.update({
        "phase": phase,
        "reason": reason,
        "message": message,
        "observedGeneration": generation if generation is not None else prev.get("observedGeneration", 0),
        "gangGeneration": gang_generation,
        "restartCount": int(prev.get("restartCount", 0)),
        "createdGangGeneration": int(prev.get("createdGangGeneration", -1)),
        "warnings": spec_warnings(run),
    })
    counts = ready_counts(run, live)
    status["learnerReady"], status["rolloutReady"], status["rewardReady"] = counts["learner"], counts["rollout"], counts["reward"]
    if phase in TERMINAL or phase == SUSPENDED:
        # Pods are gone (or going); a stale "2/2" would mislead.
        status["learnerReady"], status["rolloutReady"], status["rewardReady"] = (
            f"0/{role_spec(run, r).replicas}" for r in n.ROLES)
    status.setdefault("step", 0)
    if learner_status:
        status["learnerState"] = learner_status.get("state", "")
        for key in ("step", "totalSteps", "weightVersion"):
            if learner_status.get(key) is not None:
                status[key] = learner_status[key]
        metrics = learner_status.get("metrics") or {}
        for source, target in METRIC_FIELDS.items():
            # None is skipped: in a merge patch null deletes the key, so it would never settle.
            if metrics.get(source) is not None:
                status[target] = metrics[source]
        if learner_status.get("lastCheckpoint"):
            status["lastCheckpoint"] = learner_status["lastCheckpoint"]
        if learner_status.get("guardrail"):
            # the newest trip is kept after the learner that reported it is gone (restart, resume)
            status["guardrail"] = learner_status["guardrail"]
    if not status.get("startTime") and (live or phase not in (PENDING,)) and phase != SUSPENDED:
        status["startTime"] = stamp
    if phase in TERMINAL and not status.get("completionTime"):
        status["completionTime"] = stamp
    status["lastProgressTime"] = progress_time(phase, status.get("step"), prev, stamp)
    if status["lastProgressTime"] is None:
        del status["lastProgressTime"]  # never Running yet: no key rather than null (see METRIC_FIELDS)
    missing = missing_replicas(run, live) if phase == RUNNING else []
    stalled = stalled_seconds(run, status, now) is not None
    previous_conditions = list(prev.get("conditions") or [])
    status["conditions"] = [
        _condition(previous_conditions, "Ready", phase == RUNNING, reason, message, stamp),
        _condition(previous_conditions, "Progressing", phase in (PENDING, STARTING, RUNNING), reason, message, stamp),
        _condition(previous_conditions, "Succeeded", phase == SUCCEEDED, reason, message, stamp),
        _condition(previous_conditions, "Failed", phase == FAILED, reason, message, stamp),
        _condition(previous_conditions, "Suspended", phase == SUSPENDED, reason, message, stamp),
        _condition(previous_conditions, "Degraded", bool(missing),
                   "ReplicasNotReady" if missing else "AllReplicasReady",
                   f"training below the asked size; not ready: {', '.join(missing)}" if missing
                   else "every rollout and reward replica is ready, or the run is not training", stamp),
        _condition(previous_conditions, "Stalled", stalled, "NoStepFinished" if stalled else "StepsFinishing",
                   stall_message(run, status) if stalled else "training steps finish within "
                   "spec.stallTimeoutSeconds, or the run is not training", stamp),
    ]
    if validation is not None:
        status["conditions"].append(_condition(previous_conditions, "Validated", validation.status, validation.reason,
                                               validation.message, stamp, restart=validation.restart))
    elif (validated := _find(previous_conditions, "Validated")) is not None:
        status["conditions"].append(validated)
    tripped = _guardrail_condition(status.get("guardrail"), prev.get("guardrail"), outcome, previous_conditions, stamp)
    if tripped is not None:
        status["conditions"].append(tripped)
    return status


def _find(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def _guardrail_condition(trip: dict[str, Any] | None, trip_before: dict[str, Any] | None, outcome: Outcome | None,
                         previous: list[dict[str, Any]], stamp: str) -> dict[str, Any] | None:
    """GuardrailTripped (True, reason the action: Rollback / Suspend / Fail, message the trip's
    line) from learner-0's newest trip; the condition stays as it is until a new trip. When the
    operator stopped the run on the learner's exit code alone (its /status not read after the
    trip), the reason and line come from that outcome."""
    before = _find(previous, "GuardrailTripped")
    if outcome is not None and outcome.reason == "GuardrailTripped":
        action = "fail" if outcome.phase == FAILED else "suspend"
        if not trip or trip.get("action") != action:
            return _condition(previous, "GuardrailTripped", True, action.capitalize(), outcome.message, stamp)
    if trip and (before is None or guardrail_key(trip) != guardrail_key(trip_before)):
        return _condition(previous, "GuardrailTripped", True, str(trip["action"]).capitalize(), guardrail_line(trip),
                          stamp)
    return before
