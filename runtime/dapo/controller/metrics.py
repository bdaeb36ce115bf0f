"""Run outputs a person or a tool reads: metrics.jsonl, run.log and the per-step progress line.

metrics.jsonl holds one JSON object per line: a training-step line (``step`` plus verl's metric
names, e.g. ``actor/pg_loss``) or an evaluation line (``step`` plus ``val/...``). Lines are
flushed as they are written so `tail -f` and `dapo plot` see a running training.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from dapo.controller.tracking import numeric_metrics

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "run.log"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends metric records to RUN_DIR/metrics.jsonl and hands each one to the experiment
    trackers (``dapo.controller.tracking``: TensorBoard, MLflow, W&B) at the record's step.

    A tracker that raises is logged once and skipped from then on: metrics.jsonl is the record of
    the run, and a tracking server outage must not stop a training."""

    def __init__(self, run_dir: str | Path, trackers: list | tuple = ()):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = list(trackers)
        self._dropped: list = []  # failed while logging: still closed at the end (best effort)
        self._latest: dict[str, float] = {}  # the last value of every numeric metric (GET /metrics)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=False)
        with self.path.open("a") as fh:
            fh.write(line + "\n")
        values, step = numeric_metrics(record), int(record.get("step") or 0)
        self._latest.update(values)
        for tracker in list(self.trackers):
            try:
                tracker.log(values, step)
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                logging.getLogger("dapo.controller.metrics").warning(
                    "tracker %s failed at step %d (%s: %s); it gets no more metrics, metrics.jsonl continues",
                    getattr(tracker, "name", tracker), step, type(exc).__name__, exc)
                self.trackers.remove(tracker)
                self._dropped.append(tracker)

    def latest_values(self) -> dict[str, float]:
        """The latest value of every numeric metric written so far (train and eval records)."""
        return dict(self._latest)

    def close(self, final_checkpoint: dict | None = None, succeeded: bool = True) -> None:
        """Finish every tracker (the final checkpoint, if any, goes to them as a reference)."""
        trackers, self.trackers, self._dropped = self.trackers + self._dropped, [], []
        for tracker in trackers:
            try:
                tracker.close(final_checkpoint=final_checkpoint, succeeded=succeeded)
            except Exception as exc:  # noqa: BLE001 - closing is best effort at the end of a run
                logging.getLogger("dapo.controller.metrics").warning("closing tracker %s failed: %s",
                                                          getattr(tracker, "name", tracker), exc)

    def truncate_after(self, step: int) -> int:
        """Drop lines whose step is > ``step`` (a resumed run re-does those steps); returns how many."""
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record_step = json.loads(line).get("step", 0)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                dropped += 1
                continue
            if record_step is not None and record_step > step:
                dropped += 1
            else:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        return dropped


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training-step records, evaluation records) of a run directory."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a run directory written by `dapo run`?)")
    train, evals = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if any(key.startswith("val/") for key in record):
            evals.append(record)
        else:
            train.append(record)
    return train, evals


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressLog:
    """One human line per step: step/total, s/step, ETA, score, acc, val acc and what dynamic
    sampling did. The rate is the mean of the steps run in this process (a resumed run does not
    count the steps it skipped)."""

    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger or logging.getLogger("dapo.progress")
        self._started = time.perf_counter()
        self._steps_done = 0

    def step(self, metrics: dict[str, Any], total_steps: int, val_acc: float | None = None) -> str:
        self._steps_done += 1
        rate = (time.perf_counter() - self._started) / self._steps_done
        remaining = max(0, total_steps - int(metrics["step"]))
        val = f"{val_acc:.3f}" if val_acc is not None else "-"
        line = (
            f"step {metrics['step']}/{total_steps} | {rate:.2f} s/step | ETA {format_duration(rate * remaining)} | "
            f"score {metrics.get('critic/score/mean', float('nan')):+.3f} | acc {metrics.get('train/acc/mean', float('nan')):.3f} | "
            f"val acc {val} | len {metrics.get('response_length/mean', float('nan')):.1f} | "
            f"entropy {metrics.get('actor/entropy', float('nan')):.3f} | "
            f"gen batches {metrics.get('train/num_gen_batches', 0)}, kept {metrics.get('train/num_groups_kept', 0)} groups, "
            f"surplus {metrics.get('train/surplus_groups', 0)}"
        )
        self.logger.info(line)
        return line


def setup_run_logging(run_dir: str | Path, level: int = logging.INFO) -> list[logging.Handler]:
    """Send the `dapo` loggers to RUN_DIR/run.log and stderr; returns the handlers to remove."""
    path = Path(run_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    stream_handler = logging.StreamHandler(sys.stderr)
    stream_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("dapo")
    logger.setLevel(level)
    for handler in (file_handler, stream_handler):
        logger.addHandler(handler)
    return [file_handler, stream_handler]


def remove_handlers(handlers: list[logging.Handler]) -> None:
    logger = logging.getLogger("dapo")
    for handler in handlers:
        logger.removeHandler(handler)
        handler.close()
