"""The whole control logic as pure functions: `reconcile(run, observed) -> Plan`.

A pass parses the DAPORun, then runs its ordered phases (`PHASES`: finished, suspended, resumed,
training finished, guardrail stop, run-file error, gang restart, stall, config and services,
preflight check, evaluation pods, pods), each a pure
function of the pass state that either ends the pass with a plan or hands it on; each is tested
alone (tests/operator/test_builders_reconcile.py).

Idempotent by construction: it compares the wanted children with the observed ones and only
plans what is missing or wrong, so running it twice, or after an operator restart, never
duplicates a pod. Every counter it needs (gang generation, restarts) lives in the CR's status.
The handlers (handlers.py) observe, call this, and execute the actions in order.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from dapo.spec import DAPORun, SpecError, parse_run, refuse_lora_on_a_cluster

from . import naming as n
from .builders import (Owner, build_check_pod, build_config_map, build_eval_pod, build_pod, build_service,
                       desired_pod_names, gang_roles)
from .status import (
    FAILED, MAX_MESSAGE_CHARS, PENDING, SUSPENDED, TERMINAL, Outcome, Validation, compute_status, error_lines,
    guardrail_key, guardrail_line, learner_succeeded, parse_time, pod_exit, pod_failure, pod_generation,
    pod_guardrail_stop, pod_name_of, pod_phase, pod_run_file_error, pod_stuck, pod_terminating, current_pods,
    sanitize_learner_status, stall_message, stalled_seconds,
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


@dataclass(frozen=True)
class PatchRun:
    """A JSON merge patch of the DAPORun itself (not its status): a guardrail with action suspend
    sets spec.suspend, as Kueue does to the Jobs it suspends, so resuming is the usual
    spec.suspend=false."""

    patch: dict[str, Any]
    reason: str


Action = CreateObject | DeletePod | PatchObject | PatchStatus | EmitEvent | DeleteRun | PatchRun


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


GUARDRAIL_TRIPPED = "GuardrailTripped"  # the condition type, the event reason and a stopped run's reason

#: Conditions whose turning True posts a Warning event (reason: the type) and whose clearing posts
#: a Normal one (reason: the second name), each with the condition's message.
_WATCHED_CONDITIONS = {"Degraded": "Restored", "Stalled": "Progressing"}


def _condition_state(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), {})


def _transition_events(previous: dict[str, Any], status: dict[str, Any]) -> list[Action]:
    """An event per phase change, and per Degraded / Stalled condition turning True or clearing."""
    events: list[Action] = []
    before, after = previous.get("phase"), status.get("phase")
    if before != after:
        kind = "Warning" if after == FAILED else "Normal"
        events.append(EmitEvent(kind, after, f"phase {before or 'None'} -> {after}: {status.get('message', '')}"))
    for kind, cleared in _WATCHED_CONDITIONS.items():
        was, now = _condition_state(previous, kind), _condition_state(status, kind)
        if now.get("status") == "True" and was.get("status") != "True":
            events.append(EmitEvent("Warning", kind, now.get("message", "")))
        elif was.get("status") == "True" and now.get("status") != "True":
            events.append(EmitEvent("Normal", cleared, f"{kind} cleared: {now.get('message', '')}"))
    # Once per trip: a new trip (step, rollbacks, rule) from learner-0, or the condition turning
    # True or changing its action (a stop seen only through the learner's exit code).
    was, now = _condition_state(previous, "GuardrailTripped"), _condition_state(status, "GuardrailTripped")
    new_trip = status.get("guardrail") and guardrail_key(status.get("guardrail")) != guardrail_key(previous.get("guardrail"))
    if now.get("status") == "True" and (new_trip or was.get("status") != "True" or was.get("reason") != now.get("reason")):
        events.append(EmitEvent("Warning", "GuardrailTripped", now.get("message", "")))
    return events


@dataclass
class Pass:
    """One reconcile pass: what was observed and parsed, the counters it may move, and the
    actions planned so far. Each phase reads it, may add actions and move counters, and either
    ends the pass (returns a `Plan`) or hands it on (returns None)."""

    obj: dict[str, Any]
    run: DAPORun
    observed: Observed  # this run's pods only
    image: str | None
    previous: dict[str, Any]  # the status as it was
    work: dict[str, Any]  # the status counters as this pass moves them
    gen: int  # gang generation
    restarts: int
    created: int  # the newest gang generation whose pods were all created
    actions: list[Action] = field(default_factory=list)
    learner_status: dict[str, Any] | None = None
    validation: Validation | None = None  # the Validated condition this pass sets (None: kept as it was)

    @property
    def name(self) -> str:
        return self.run.metadata.name

    @property
    def namespace(self) -> str:
        return self.obj.get("metadata", {}).get("namespace") or "default"

    @property
    def pods(self) -> list[dict[str, Any]]:
        return self.observed.pods

    def by_name(self) -> dict[str, dict[str, Any]]:
        return {pod_name_of(p): p for p in self.pods}

    def finish(self, outcome: Outcome | None = None, learner_status: dict[str, Any] | None = None) -> Plan:
        """The pass's plan: its actions, a phase-transition event, the status patch."""
        status = compute_status(self.run, self.obj.get("metadata", {}).get("generation"), self.pods, learner_status,
                                self.work, self.observed.now, outcome, self.validation)
        actions = self.actions + _transition_events(self.previous, status)
        if status != self.previous:
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


# --------------------------------------------------------------------------- the phases, in order


def finished(p: Pass) -> Plan | None:
    """A Succeeded / Failed run keeps its phase: its pods go, and after ttlSecondsAfterFinished the run."""
    if p.previous.get("phase") not in TERMINAL:
        return None
    p.actions += _delete_all(p.pods, f"run {p.previous['phase']}")
    if _ttl_expired(p.run, p.previous, p.observed.now):
        p.actions.append(DeleteRun(f"ttlSecondsAfterFinished={p.run.spec.ttl_seconds_after_finished} elapsed"))
    return p.finish()


def suspended(p: Pass) -> Plan | None:
    """spec.suspend: no pods; status and checkpoints stay. A suspension a guardrail made keeps its
    reason (GuardrailTripped) and line until a person resumes the run."""
    if not p.run.spec.suspend:
        return None
    p.actions += _delete_all(p.pods, "spec.suspend is true")
    if p.previous.get("phase") == SUSPENDED and p.previous.get("reason") == GUARDRAIL_TRIPPED:
        return p.finish(outcome=Outcome(SUSPENDED, GUARDRAIL_TRIPPED, p.previous.get("message", "")))
    return p.finish()


def resumed(p: Pass) -> Plan | None:
    """Suspended before, not now: a fresh gang that continues from the last committed checkpoint."""
    if p.previous.get("phase") == SUSPENDED:
        p.gen += 1
        p.work["gangGeneration"] = p.gen
        p.actions.append(EmitEvent("Normal", "Resumed", f"spec.suspend is false: starting gang generation {p.gen}"))
    return None


def training_finished(p: Pass) -> Plan | None:
    """Learner-0 says (or its exit 0 shows) that training finished: Succeeded, pods deleted.
    Otherwise its /status (of the current gang) is what the later phases see."""
    live = current_pods(p.run, p.pods, p.gen)
    learner0 = live.get(n.pod_name(p.name, "learner", 0))
    p.learner_status = p.observed.learner_status if learner0 is not None else None
    if not learner_succeeded(p.run, live, p.learner_status):
        return None
    p.actions += _delete_all(p.pods, "training finished")
    return p.finish(learner_status=p.learner_status)


def guardrail_stopped(p: Pass) -> Plan | None:
    """Learner-0 stopped training on a guardrail (its /status: state suspended, or failed with a
    trip whose action is fail; or its pod exited GUARDRAIL_SUSPEND_EXIT_CODE /
    GUARDRAIL_FAIL_EXIT_CODE). No gang restart, which would train into the same trip: suspend sets
    the DAPORun's own spec.suspend (a person decides; spec.suspend=false resumes), fail ends it
    Failed. Either way the pods go."""
    learner0 = current_pods(p.run, p.pods, p.gen).get(n.pod_name(p.name, "learner", 0))
    if learner0 is None:
        return None
    status = sanitize_learner_status(p.learner_status) or {}
    trip = status.get("guardrail")
    stop = pod_guardrail_stop(learner0) if pod_phase(learner0) == "Failed" else None
    if status.get("state") == "suspended" or (stop and stop[0] == "suspend"):
        line = guardrail_line(trip) if trip else (stop[1] if stop else "learner-0 suspended the run on a guardrail")
        # The spec patch comes first: if it is refused, nothing else happens and the next pass retries.
        p.actions.append(PatchRun({"spec": {"suspend": True}}, f"guardrail: {line}"))
        p.actions += _delete_all(p.pods, "a guardrail suspended the run")
        return p.finish(outcome=Outcome(SUSPENDED, GUARDRAIL_TRIPPED, f"{line} (resume: set spec.suspend to false)"),
                        learner_status=p.learner_status)
    failed = status.get("state") == "failed" and trip and trip.get("action") == "fail"
    if failed or (stop and stop[0] == "fail"):
        line = guardrail_line(trip) if failed else stop[1]  # type: ignore[index]
        p.actions += _delete_all(p.pods, "a guardrail failed the run")
        return p.finish(outcome=Outcome(FAILED, GUARDRAIL_TRIPPED, line), learner_status=p.learner_status)
    return None


def run_file_failed(p: Pass) -> Plan | None:
    """A run-file error in any role: Failed at once (a restart would fail the same way)."""
    error = _run_file_error(p.run, p.by_name(), sanitize_learner_status(p.learner_status), p.gen)
    if error is None:
        return None
    p.actions += _delete_all(p.pods, "run-file error")
    return p.finish(outcome=Outcome(FAILED, "RunFileError", error))


def dead_gang_members(run: DAPORun, by_name: dict[str, dict[str, Any]], gen: int, created: int) -> list[str]:
    """Why each pod of the current gang counts as dead (failed, exited early, deleted)."""
    gang = gang_roles(run)
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
    return dead


def gang_restart(p: Pass) -> Plan | None:
    """A dead learner or rollout pod restarts the whole gang (a new generation), up to
    spec.backoffLimit restarts; past it, Failed."""
    dead = dead_gang_members(p.run, p.by_name(), p.gen, p.created)
    if not dead:
        return None
    why = "; ".join(dead)
    if p.restarts >= p.run.spec.backoff_limit:
        p.actions += _delete_all(p.pods, "backoff limit exceeded")
        return p.finish(outcome=Outcome(
            FAILED, "BackoffLimitExceeded",
            f"gang restarted {p.restarts} times (spec.backoffLimit={p.run.spec.backoff_limit}); last failure: {why}"))
    p.restarts += 1
    p.gen += 1
    p.learner_status = None  # it described the gang that just died
    p.work.update(restartCount=p.restarts, gangGeneration=p.gen)
    p.actions.append(EmitEvent("Warning", "GangRestart",
                               f"restart {p.restarts}/{p.run.spec.backoff_limit}, gang generation {p.gen}: {why}"))
    return None


def stalled_run_failed(p: Pass) -> Plan | None:
    """spec.stallAction fail: a run that was Running with no step finished for
    spec.stallTimeoutSeconds (and learner-0 still reports that step) is Failed, its pods deleted."""
    if p.run.spec.stall_action != "fail" or stalled_seconds(p.run, p.previous, p.observed.now) is None:
        return None
    step = (sanitize_learner_status(p.learner_status) or {}).get("step")
    if step is not None and step != p.previous.get("step"):
        return None  # a step finished since the last pass: compute_status restarts the clock
    p.actions += _delete_all(p.pods, "stalled")
    return p.finish(outcome=Outcome(FAILED, "Stalled", stall_message(p.run, p.previous)))


def ensure_config_and_services(p: Pass) -> Plan | None:
    """The run-file ConfigMap (created, or patched after a spec edit) and one Service per role."""
    owner = Owner(p.name, p.obj.get("metadata", {}).get("uid", ""))
    spec_map = build_config_map(p.run, p.namespace, owner)
    map_name = n.config_map_name(p.name)
    if map_name not in p.observed.config_maps:
        p.actions.append(CreateObject(spec_map))
    elif p.observed.config_map_data is not None and \
            p.observed.config_map_data.get(map_name) not in (None, spec_map["data"]):
        # An edited DAPORun: pods started from now on (resume, gang restart, a replaced reward
        # pod) must read the edited run file, not the one of the first creation.
        p.actions.append(PatchObject("ConfigMap", map_name, {"data": spec_map["data"]}, "the DAPORun spec changed"))
    for role in n.ROLES:
        if n.service_name(p.name, role) not in p.observed.services:
            p.actions.append(CreateObject(build_service(p.run, role, p.namespace, owner)))
    return None


def preflight_check(p: Pass) -> Plan | None:
    """spec.preflight: `dapo check` in a CPU pod (RUN-check) before any gang pod. Until it passed
    the pass ends here (Pending, Validated=Unknown); it passing (Validated=True, kept in the
    status so no later pass, restart, resume or edit checks again) deletes it and hands on to the
    gang; a problem (exit RUN_FILE_ERROR_EXIT_CODE) fails the run with the check's lines
    (ValidationFailed), any other stop, or a container that cannot start (image pull back-off,
    a missing Secret key), with the pod's failure (ValidationError: not retried, the same image
    and run file would stop the same way, and a person should look), and a check still running
    after spec.preflight.timeoutSeconds with ValidationTimeout."""
    name = n.check_pod_name(p.name)
    check = p.by_name().get(name)
    validated = _condition_state(p.previous, "Validated").get("status") == "True"
    if not p.run.spec.preflight.enabled or validated:
        if check is not None and not pod_terminating(check):
            p.actions.append(DeletePod(name, "the run file was checked" if validated else "spec.preflight.enabled is false"))
        return None
    if check is None or pod_terminating(check):
        restart = check is None
        if restart:
            owner = Owner(p.name, p.obj.get("metadata", {}).get("uid", ""))
            p.actions.append(CreateObject(build_check_pod(p.run, p.namespace, p.image, owner)))
        return _checking(p, name, "created" if restart else "waiting for the previous check pod to go", restart)
    if any(isinstance(a, PatchObject) and a.kind == "ConfigMap" for a in p.actions):
        # The spec was edited while the check ran: its verdict is about the old run file.
        p.actions.append(DeletePod(name, "the run file changed while it was checked"))
        return _checking(p, name, "the run file changed: checking it again", False)
    phase = pod_phase(check)
    if phase == "Succeeded":
        p.validation = Validation("True", "CheckPassed", f"dapo check passed in {name}")
        p.actions.append(DeletePod(name, "the run file was checked"))
        p.actions.append(EmitEvent("Normal", "Validated", f"dapo check passed in {name}: creating the learner, "
                                                          "rollout and reward pods"))
        return None
    code, message = pod_exit(check)
    if phase == "Failed" and code == n.SPEC_ERROR_EXIT_CODE:
        tail = message.strip().splitlines()[-1:]
        lines = error_lines(message) or tail or [f"{name} exited with code {code} and no termination message"]
        return _validation_failed(p, "ValidationFailed", "\n".join(lines))
    timeout = p.run.spec.preflight.timeout_seconds
    reason = (check.get("status") or {}).get("reason")
    started = parse_time(_condition_state(p.previous, "Validated").get("lastTransitionTime"))
    timed_out = started is not None and (p.observed.now - started).total_seconds() >= timeout
    if reason == "DeadlineExceeded" or (phase != "Failed" and timed_out):
        return _validation_failed(p, "ValidationTimeout", (
            f"{name} did not finish dapo check within spec.preflight.timeoutSeconds={timeout} (pod phase {phase}): "
            "a check that long usually waits on storage or a scorer that hangs; raise the timeout or fix that"))
    stuck = pod_stuck(check) if phase == "Pending" else None
    if phase == "Failed" or stuck:
        tail = (message.strip().splitlines() or [""])[-1]
        return _validation_failed(p, "ValidationError", (
            f"{name} stopped without checking the run file: {stuck or pod_failure(check)}"
            + (f"; last line: {tail}" if tail else "")
            + "; fix that (image, memory, node) and create the run again, or set spec.preflight.enabled to false"))
    return _checking(p, name, f"pod phase {phase}", False)


def _checking(p: Pass, name: str, state: str, restart: bool) -> Plan:
    message = f"dapo check runs in {name} ({state}); no learner or rollout pod before it passes"
    p.validation = Validation("Unknown", "Checking", message, restart=restart)
    return p.finish(outcome=Outcome(PENDING, "Validating", message))


def _validation_failed(p: Pass, reason: str, message: str) -> Plan:
    message = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
    p.validation = Validation("False", reason, message)
    p.actions += _delete_all(p.pods, reason)
    return p.finish(outcome=Outcome(FAILED, reason, message))


def ensure_eval_pods(p: Pass) -> Plan | None:
    """spec.eval.separatePod: an evaluation pod for learner-0's newest committed checkpoint when no
    evaluation pod runs (checkpoints committed meanwhile are skipped: evaluation never queues up);
    finished evaluation pods of older checkpoints are deleted (the newest one stays, with its log)."""
    if not p.run.spec.eval.separate_pod or not p.run.spec.data.eval:
        return None
    evals = {int(pod["metadata"]["labels"][n.LABEL_EVAL_STEP]): pod for pod in p.pods
             if pod["metadata"].get("labels", {}).get(n.LABEL_ROLE) == n.EVAL_ROLE and not pod_terminating(pod)}
    checkpoint = (sanitize_learner_status(p.learner_status) or {}).get("lastCheckpoint")
    running = [step for step, pod in evals.items() if pod_phase(pod) not in ("Succeeded", "Failed")]
    if checkpoint and checkpoint["step"] not in evals and not running:
        owner = Owner(p.name, p.obj.get("metadata", {}).get("uid", ""))
        p.actions.append(CreateObject(build_eval_pod(p.run, checkpoint["step"], p.namespace, p.image, owner)))
        p.actions.append(EmitEvent("Normal", "EvaluationStarted",
                                   f"evaluating checkpoint step {checkpoint['step']} in its own pod"))
        newest = checkpoint["step"]
    else:
        newest = max(evals, default=None)
    for step, pod in evals.items():
        if step != newest and pod_phase(pod) in ("Succeeded", "Failed"):
            p.actions.append(DeletePod(pod_name_of(pod), f"evaluation of checkpoint step {step} finished"))
    return None


def ensure_pods(p: Pass) -> Plan | None:
    """Every wanted pod of the current gang: missing ones created, other generations' deleted, a
    stopped reward pod replaced alone, unwanted ones (replicas lowered) deleted. Always ends the
    pass with the observed status."""
    owner = Owner(p.name, p.obj.get("metadata", {}).get("uid", ""))
    gang = gang_roles(p.run)
    by_name = p.by_name()
    wanted = {pod_name for _, _, pod_name in desired_pod_names(p.run)}
    gang_complete = True
    for role, index, pod_name in desired_pod_names(p.run):
        pod = by_name.get(pod_name)
        if pod is None:
            p.actions.append(CreateObject(build_pod(p.run, role, index, p.namespace, p.gen, p.image, owner)))
        elif pod_terminating(pod):
            gang_complete = gang_complete and role not in gang  # the name frees up soon; create next pass
        elif role in gang and pod_generation(pod) != p.gen:
            p.actions.append(DeletePod(pod_name, f"gang generation {pod_generation(pod)} replaced by {p.gen}"))
            gang_complete = False
        elif role not in gang and pod_phase(pod) in ("Failed", "Succeeded"):
            p.actions.append(DeletePod(pod_name, f"reward pod stopped ({pod_failure(pod)}); replacing it alone"))
            p.actions.append(EmitEvent("Warning", "RewardPodReplaced",
                                       f"{pod_name} stopped ({pod_failure(pod)}); recreating it"))
    for pod in p.pods:
        # evaluation pods are ensure_eval_pods' own, the check pod preflight_check's
        own_phase = pod["metadata"].get("labels", {}).get(n.LABEL_ROLE) in (n.EVAL_ROLE, n.CHECK_ROLE)
        if pod_name_of(pod) not in wanted and not pod_terminating(pod) and not own_phase:
            p.actions.append(DeletePod(pod_name_of(pod), "no longer wanted by the spec (replicas lowered)"))
    if gang_complete and p.created < p.gen:
        p.work["createdGangGeneration"] = p.gen
    return p.finish(learner_status=p.learner_status)


#: The phases of a pass, in order; the first that returns a plan ends it (`ensure_pods` always does).
PHASES = (finished, suspended, resumed, training_finished, guardrail_stopped, run_file_failed, gang_restart,
          stalled_run_failed, ensure_config_and_services, preflight_check, ensure_eval_pods, ensure_pods)


def invalid_spec(obj: dict[str, Any], pods: list[dict[str, Any]], error: SpecError) -> Plan:
    """A DAPORun that does not parse: Failed (InvalidSpec), its pods deleted."""
    previous = dict(obj.get("status") or {})
    status = dict(previous, phase=FAILED, reason="InvalidSpec", message=str(error),
                  observedGeneration=obj.get("metadata", {}).get("generation", 0))
    actions: list[Action] = _delete_all(pods, "invalid spec")
    if previous.get("phase") != FAILED:
        actions.append(EmitEvent("Warning", "InvalidSpec", str(error)))
    if status != previous:
        actions.append(PatchStatus(status))
    return Plan(actions, status)


def reconcile(obj: dict[str, Any], observed: Observed, image: str | None = None) -> Plan:
    """Plan the actions that move the cluster toward what the DAPORun ``obj`` asks for: parse it,
    then run `PHASES` in order until one ends the pass.

    ``obj`` is the DAPORun as the API server returns it (metadata, spec, status).
    """
    previous = dict(obj.get("status") or {})
    meta = obj.get("metadata", {})
    name, namespace = meta.get("name", ""), meta.get("namespace") or "default"
    if meta.get("deletionTimestamp"):
        return Plan([], previous)  # the garbage collector removes the children via ownerReferences
    own = [p for p in observed.pods if p.get("metadata", {}).get("labels", {}).get(n.LABEL_RUN) == name]
    observed = Observed(own, observed.config_maps, observed.services, observed.learner_status, observed.now,
                        observed.config_map_data)
    try:
        run = parse_run({k: v for k, v in obj.items() if k != "status"}, source=f"DAPORun {namespace}/{name}")
        refuse_lora_on_a_cluster(run.spec)
    except SpecError as exc:
        return invalid_spec(obj, own, exc)
    work = dict(previous)
    state = Pass(obj=obj, run=run, observed=observed, image=image, previous=previous, work=work,
                 gen=int(work.get("gangGeneration", 0)), restarts=int(work.get("restartCount", 0)),
                 created=int(work.get("createdGangGeneration", -1)))
    for phase in PHASES:
        plan = phase(state)
        if plan is not None:
            return plan
    raise AssertionError("the last phase always ends the pass")  # ensure_pods returns a plan
