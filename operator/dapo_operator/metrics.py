"""Prometheus metrics of the operator (served by `dapo-operator run` on --metrics-port)."""

from __future__ import annotations

from collections import Counter as _Tally

from prometheus_client import Counter, Gauge, Histogram

from .status import FAILED, PENDING, RUNNING, STARTING, SUCCEEDED, SUSPENDED

PHASES = (PENDING, STARTING, RUNNING, SUSPENDED, SUCCEEDED, FAILED)

RUNS = Gauge("dapo_operator_runs", "DAPORuns known to this operator, by phase", ["phase"])
GANG_RESTARTS = Counter("dapo_operator_gang_restarts_total", "Gang restarts after a learner or rollout pod died", ["namespace"])
GUARDRAIL_TRIPS = Counter("dapo_operator_guardrail_trips_total",
                          "GuardrailTripped events: a new guardrail trip of a run's learner", ["namespace"])
RECONCILE_ERRORS = Counter("dapo_operator_reconcile_errors_total", "Reconciles that raised", ["namespace"])
RECONCILE_SECONDS = Histogram(
    "dapo_operator_reconcile_seconds", "Time of one reconcile (observe, plan, act)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

_phases: dict[tuple[str, str], str] = {}


def record_phase(namespace: str, name: str, phase: str | None) -> None:
    """Remember a run's phase (None forgets it) and refresh the by-phase gauge."""
    if phase is None:
        _phases.pop((namespace, name), None)
    else:
        _phases[(namespace, name)] = phase
    tally = _Tally(_phases.values())
    for known in PHASES:
        RUNS.labels(phase=known).set(tally.get(known, 0))
