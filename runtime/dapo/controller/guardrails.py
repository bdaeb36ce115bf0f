"""Guardrails: rules over the metrics a run writes that act when training collapses.

``spec.guardrails`` holds rules such as ``{metric: actor/entropy, below: 0.05, forSteps: 3,
action: rollback}``. After every training step (and its evaluation, if any) the trainer hands
the step's metrics to `Guardrails.observe`, which answers with a `Verdict`: did every guardrail
hold at this step (checkpoints record it: a rollback only returns to one that held), and did one
trip (out of bounds for ``forSteps`` checked steps in a row). The trainer carries out the action
(controller/trainer.py): rollback restores the newest checkpoint at which every guardrail held and
scales the learning rate; suspend and fail stop training with `GuardrailStop`, whose exit code
tells the operator which (dapo.contracts.GUARDRAIL_*_EXIT_CODE).

What survives a rollback (the rollback count per guardrail, the learning-rate scale so far, the
trips) is this object's state: saved in every checkpoint and kept, not restored, when a rollback
loads an older checkpoint.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from dapo.contracts import GUARDRAIL_FAIL_EXIT_CODE, GUARDRAIL_SUSPEND_EXIT_CODE, GuardrailTrip
from dapo.errors import DapoError


class GuardrailStop(DapoError, RuntimeError):
    """A guardrail with action suspend or fail stopped training (or a rollback guardrail ran out of
    rollbacks or of checkpoints to return to). ``trip`` is what the learner's /status reports;
    the CLI prints ``guardrail: ...`` and exits with `exit_code`."""

    label = "guardrail"

    def __init__(self, trip: GuardrailTrip):
        super().__init__(trip.line())
        self.trip = trip

    @property
    def suspend(self) -> bool:
        return self.trip.action == "suspend"

    @property
    def exit_code(self) -> int:
        return GUARDRAIL_SUSPEND_EXIT_CODE if self.suspend else GUARDRAIL_FAIL_EXIT_CODE


def checked_value(rule, metrics: Mapping[str, Any], previous: Mapping[str, float]) -> float | None:
    """What ``rule`` checks at this step: the metric (measure value) or its change since the last
    step that reported it (measure change); None when this step does not report it (val/...
    metrics exist only at evaluation steps; a change needs a previous value). A NaN or infinite
    metric is checked as NaN, which `out_of_bounds` counts as a breach: a NaN entropy is a collapse."""
    raw = metrics.get(rule.metric)
    if raw is None or isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    value = float(raw) if math.isfinite(raw) else math.nan
    if rule.measure == "value" or math.isnan(value):
        return value
    before = previous.get(rule.metric)
    return None if before is None else value - before


def unknown_metric_error(rules: Sequence, metrics: Mapping[str, Any]) -> str | None:
    """The run-file error for guardrails whose metric the first training step did not write
    (val/... metrics are written at evaluation steps only, so they are not judged here)."""
    problems = []
    for index, rule in enumerate(rules):
        if rule.metric.startswith("val/") or rule.metric in metrics:
            continue
        close = difflib.get_close_matches(rule.metric, [k for k in metrics if isinstance(k, str)], n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see metrics.jsonl for the names this run writes"
        problems.append(f"spec.guardrails[{index}].metric {rule.metric!r} is not a metric this run writes ({hint})")
    return "; ".join(problems) or None


def out_of_bounds(rule, value: float) -> bool:
    """above X: value > X; below X: value < X; NaN is out of bounds either way."""
    if math.isnan(value):
        return True
    return value > rule.above if rule.above is not None else value < rule.below


@dataclass
class Verdict:
    """What the guardrails say about one step."""

    held: bool  # every checked guardrail was within bounds at this step
    trip: GuardrailTrip | None = None  # the first guardrail (spec order) that tripped, if any
    trip_index: int | None = None  # which guardrail (position in spec.guardrails) tripped
    values: dict[int, float] = field(default_factory=dict)  # rule index -> checked value


class Guardrails:
    """The run's guardrails and what they remember across steps, checkpoints and rollbacks."""

    def __init__(self, rules: Sequence):
        self.rules = list(rules)
        self.streaks = [0] * len(self.rules)  # consecutive checked steps out of bounds
        self.previous: dict[str, float] = {}  # last reported value of each metric a change rule reads
        self.rollbacks = [0] * len(self.rules)
        self.lr_scale = 1.0  # product of every rollback's learningRateScale so far
        self.trips: list[GuardrailTrip] = []

    def __bool__(self) -> bool:
        return bool(self.rules)

    @property
    def can_roll_back(self) -> bool:
        return any(rule.action == "rollback" for rule in self.rules)

    @property
    def last_trip(self) -> GuardrailTrip | None:
        return self.trips[-1] if self.trips else None

    def observe(self, step: int, metrics: Mapping[str, Any]) -> Verdict:
        """Check every guardrail against ``metrics`` (the step's, with its evaluation's merged in)."""
        verdict = Verdict(held=True)
        for index, rule in enumerate(self.rules):
            value = checked_value(rule, metrics, self.previous)
            if value is None:
                continue  # not reported at this step: neither a breach nor a pass
            verdict.values[index] = value
            if out_of_bounds(rule, value):
                verdict.held = False
                self.streaks[index] += 1
                if self.streaks[index] >= rule.for_steps and verdict.trip is None:
                    verdict.trip = GuardrailTrip(
                        metric=rule.metric, value=value if math.isfinite(value) else None, step=step,
                        action=rule.action, rule=rule.describe(), rollbacks=sum(self.rollbacks))
                    verdict.trip_index = index
            else:
                self.streaks[index] = 0
        for rule in self.rules:
            raw = metrics.get(rule.metric)
            if rule.measure == "change" and isinstance(raw, (int, float)) and not isinstance(raw, bool) \
                    and math.isfinite(raw):
                self.previous[rule.metric] = float(raw)
        return verdict

    def record(self, trip: GuardrailTrip) -> GuardrailTrip:
        self.trips.append(trip)
        return trip

    def begin_rollback(self, index: int, trip: GuardrailTrip) -> GuardrailTrip | None:
        """Count a rollback for guardrail ``index``: the updated trip (its learning-rate scale
        applied), or None when the guardrail has used its maxRollbacks (the run must fail)."""
        rule = self.rules[index]
        if self.rollbacks[index] >= rule.max_rollbacks:
            return None
        self.rollbacks[index] += 1
        self.lr_scale *= rule.learning_rate_scale
        self.streaks = [0] * len(self.rules)
        self.previous = {}
        return trip.model_copy(update={"rollbacks": sum(self.rollbacks)})

    # -- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"streaks": list(self.streaks), "previous": dict(self.previous), "rollbacks": list(self.rollbacks),
                "lr_scale": self.lr_scale, "trips": [t.model_dump(mode="json") for t in self.trips]}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """A checkpoint's guardrail state; a checkpoint of a run with other guardrails (or none)
        starts them afresh (counters are per guardrail, by position)."""
        state = dict(state or {})
        n = len(self.rules)
        fits = len(state.get("rollbacks", [])) == n
        self.streaks = list(state["streaks"]) if fits else [0] * n
        self.rollbacks = list(state["rollbacks"]) if fits else [0] * n
        self.previous = dict(state.get("previous", {})) if fits else {}
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.trips = [GuardrailTrip.model_validate(t) for t in state.get("trips", [])]
