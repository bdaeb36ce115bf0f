"""What a failed response scores, how failures are counted, and when a broken scorer stops the run.

A response whose scorer fails (exception, non-finite or wrongly typed result, time bound, worker
crash) scores ``failed_score`` with ``acc`` False and ``error`` set; failures are counted per
(scorer, data_source) and logged. A run-file or remote scorer that fails every response of
``stop_after_failed_rows`` data rows in a row raises :class:`ScorerFailedError` naming it: it is
broken, and training on nothing but failure scores would be silent garbage. Rows, not responses:
the n responses of one prompt arrive together (consecutive, with one ground truth and data
source), so one poisoned row (a ground truth that makes the scorer raise) counts once and can
never stop a run, whatever n is. Built-in scorers never stop a run this way (a hostile response
that times out fails alone).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from dapo.errors import DapoError
from dapo.reward.routing import ScorerRoutes
from dapo.reward.workers import Verdict

__all__ = ["FailurePolicy", "ScorerFailedError"]

log = logging.getLogger("dapo.reward")


class ScorerFailedError(DapoError, RuntimeError):
    """A run-file or remote scorer failed every response of its last data rows; names the scorer."""


def row_outcomes(verdicts: Sequence[Verdict], scorer_names, sources, ground_truths) -> list[tuple[str, bool]]:
    """(scorer, every response failed) per data row, in order: a row is a run of consecutive
    responses with the same scorer, data source and ground truth (a prompt's n responses)."""
    rows: list[tuple[str, bool]] = []
    previous = None
    for verdict, name, source, truth in zip(verdicts, scorer_names, sources, ground_truths):
        if previous is not None and previous == (name, source, truth):
            rows[-1] = (name, rows[-1][1] and verdict.failed)
        else:
            rows.append((name, verdict.failed))
        previous = (name, source, truth)
    return rows


class FailurePolicy:
    """Counts failed responses and stops on a broken run-file / remote scorer (module docstring)."""

    def __init__(self, routes: ScorerRoutes, failed_score: float = -1.0, stop_after_failed_rows: int = 8):
        self.routes = routes
        self.failed_score = float(failed_score)
        self.stop_after_failed_rows = int(stop_after_failed_rows)
        self.streaks: Counter[str] = Counter()
        self.failures: Counter[tuple[str, str]] = Counter()  # (scorer, data_source) -> failed responses

    def account(self, verdicts: Sequence[Verdict], scorer_names: Sequence[str], sources: Sequence[str | None],
                ground_truths: Sequence) -> None:
        """Count and log one batch's failures; raise ScorerFailedError on a scorer that failed
        every response of its last ``stop_after_failed_rows`` rows (run-file and remote scorers)."""
        failed: Counter[tuple[str, str]] = Counter()
        seen: Counter[tuple[str, str]] = Counter()
        first_error: dict[tuple[str, str], str] = {}
        for verdict, name, source in zip(verdicts, scorer_names, sources):
            key = (name, source if source is not None else "")
            seen[key] += 1
            if verdict.failed:
                failed[key] += 1
                first_error.setdefault(key, str(verdict.error))
        for name, row_failed in row_outcomes(verdicts, scorer_names, sources, ground_truths):
            self.streaks[name] = self.streaks[name] + 1 if row_failed else 0
        for key, count in failed.items():
            self.failures[key] += count
            log.warning("reward: %d of %d responses of data_source %r failed in scorer %s (scored %g); first: %s",
                        count, seen[key], key[1], key[0], self.failed_score, first_error[key])
        for name, streak in self.streaks.items():
            where = self.routes.field(name)
            if streak < self.stop_after_failed_rows or where is None:
                continue  # built-in scorers fail on hostile rows by design (time bound): no stop
            errors = "; ".join(sorted({first_error[k] for k in first_error if k[0] == name}))[:1000]
            raise ScorerFailedError(
                f"reward scorer {name} ({where}) failed every response of each of its last {streak} data rows: "
                f"{errors}. Call it by hand on a row of your data to find the bug (it gets keyword arguments "
                "solution_str, ground_truth, data_source, extra_info and must return a float or "
                "{'score': float, ...})")
