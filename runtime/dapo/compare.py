"""`dapo compare RUN... [--metric val/acc/mean ...] [--out compare.png]`: several runs side by side.

Each RUN is a run folder (its metrics.jsonl and run.yaml) or a checkpoint prefix, local or
s3:// (the newest committed checkpoint's metrics.jsonl and run.yaml: every checkpoint carries
both, read without fetching the weights, sha256-checked). The runs are labelled by the run-file
fields in which they differ (``learner.lr=0.0005``), so ten runs of a GitOps sweep that change
one field read as that field. One PNG overlays every run's curve of each metric (x: training
step); the terminal gets a table of each metric's final and best value per run.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dapo.spec import SpecError

log = logging.getLogger("dapo.compare")

DEFAULT_METRICS = ("val/acc/mean",)
# Run-file fields that say where a run ran and kept its files, not what it learned: left out of
# the labels (fnmatch patterns over the dotted paths below spec)
WHERE_NOT_WHAT = ("checkpoint.*", "storage.*", "tracking.*", "image", "*.image", "*.resources.*", "*.nodeSelector.*",
                  "*.tolerations", "*.affinity*", "*.priorityClassName", "suspend", "backoffLimit",
                  "ttlSecondsAfterFinished")


@dataclass
class RunRecord:
    """One run as compare sees it: where it is, its run file (parsed YAML) and its metric lines."""

    ref: str
    run_file: dict
    lines: list[dict]
    label: str = ""


def read_run(ref: str) -> RunRecord:
    """The metrics and run file of a run folder or a checkpoint prefix (module docstring)."""
    from dapo.storage.checkpoints import CheckpointStore
    from dapo.storage.s3 import is_s3

    path = Path(ref).expanduser()
    if not is_s3(ref) and (path / "metrics.jsonl").exists():
        metrics_text = (path / "metrics.jsonl").read_text()
        run_text = (path / "run.yaml").read_text() if (path / "run.yaml").exists() else ""
    else:
        store = CheckpointStore(ref)
        info = store.latest()
        if info is None:
            raise SpecError(f"{ref}: neither a run folder (metrics.jsonl) nor a checkpoint prefix with a committed "
                            "checkpoint")
        try:
            metrics_text = store.read_file(info, "metrics.jsonl").decode()
            run_text = store.read_file(info, "run.yaml").decode()
        except FileNotFoundError as exc:
            raise SpecError(f"{ref}: {exc} (checkpoints written before they carried the run's metrics cannot be "
                            "compared from the prefix; use the run folder)") from None
    lines = [json.loads(line) for line in metrics_text.splitlines() if line.strip()]
    return RunRecord(ref=ref, run_file=yaml.safe_load(run_text) or {}, lines=lines)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(node) if isinstance(node, list) else node}


def label_runs(runs: list[RunRecord]) -> None:
    """Each run's label: the spec fields whose values differ between the runs (``learner.lr=0.001``;
    where a run kept its files does not count: WHERE_NOT_WHAT), else its metadata.name, else its
    reference."""
    flat = [_flatten(r.run_file.get("spec", {})) for r in runs]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1
                 and not any(fnmatch.fnmatchcase(k, pattern) for pattern in WHERE_NOT_WHAT)]
    for run, fields in zip(runs, flat):
        parts = [f"{k}={fields.get(k)}" for k in differing]
        name = (run.run_file.get("metadata") or {}).get("name")
        run.label = ", ".join(parts) if parts else (name or run.ref)
    if len({r.label for r in runs}) < len(runs):  # identical run files: tell them apart by where they are
        for run in runs:
            run.label = f"{run.label} ({run.ref})"


def series(run: RunRecord, metric: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for line in run.lines:
        value = line.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(int(line.get("step", len(xs))))
            ys.append(float(value))
    return xs, ys


def table(runs: list[RunRecord], metrics: list[str]) -> str:
    """Final and best value (and the best's step) of each metric per run, as markdown."""
    header = "| run | " + " | ".join(f"{m} final | {m} best (step)" for m in metrics) + " |"
    rows = [header, "|" + "---|" * (1 + 2 * len(metrics))]
    for run in runs:
        cells = []
        for metric in metrics:
            xs, ys = series(run, metric)
            if not ys:
                cells += ["-", "-"]
                continue
            best = max(range(len(ys)), key=lambda i: (ys[i], -i))
            cells += [f"{ys[-1]:.4f}", f"{ys[best]:.4f} ({xs[best]})"]
        rows.append(f"| {run.label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(runs: list[RunRecord], metrics: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 3.2 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for run in runs:
            xs, ys = series(run, metric)
            if ys:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=run.label)
        ax.set_title(metric)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(args) -> int:
    """Entry point of `dapo compare` (see dapo.cli)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if len(args.runs) < 2:
        raise SpecError("dapo compare: give at least two runs")
    metrics = list(args.metric) or list(DEFAULT_METRICS)
    runs = [read_run(ref) for ref in args.runs]
    label_runs(runs)
    missing = [m for m in metrics if not any(series(r, m)[1] for r in runs)]
    if missing:
        raise SpecError(f"--metric {missing}: no run has values of it (metrics.jsonl names, e.g. val/acc/mean, "
                        "critic/score/mean, actor/entropy)")
    out = Path(args.out)
    plot(runs, metrics, out)
    print(table(runs, metrics))
    print(f"curves: {out}")
    return 0
