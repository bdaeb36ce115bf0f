"""`dapo plot RUN_DIR`: the training curves of a run as one PNG grid, like the DAPO paper's figures
(score, accuracy train + validation, entropy, response length, clip fractions, gradient norm), plus
the off-policy panels: rollout-correction importance weights, version lag of the trained samples and
the rollout-vs-learner probability difference."""

from __future__ import annotations

import sys
from pathlib import Path

from dapo.controller.metrics import read_metrics

# (title, [(metric key, label, which records)]) per panel
PANELS = [
    ("reward (critic/score/mean)", [("critic/score/mean", "train score", "train"), ("val/score/mean", "val score", "eval")]),
    ("accuracy", [("train/acc/mean", "train acc (kept groups)", "train"),
                  ("train/acc/generated_mean", "train acc (all generated)", "train"),
                  ("val/acc/mean", "val acc (avg@n)", "eval")]),
    ("entropy (actor/entropy)", [("actor/entropy", "entropy", "train")]),
    ("response length", [("response_length/mean", "mean", "train"), ("response_length/max", "max", "train"),
                         ("val/response_length/mean", "val mean", "eval")]),
    ("clip fractions", [("actor/pg_clipfrac", "pg_clipfrac", "train"),
                        ("actor/pg_clipfrac_lower", "pg_clipfrac_lower (dual clip)", "train"),
                        ("response_length/clip_ratio", "truncated responses", "train")]),
    ("grad norm / generation batches", [("actor/grad_norm", "grad norm", "train"),
                                        ("train/num_gen_batches", "generation batches", "train")]),
    ("rollout correction (importance weights)", [("rollout_corr/is_weight_mean", "weight mean", "train"),
                                                 ("rollout_corr/is_weight_max", "weight max", "train"),
                                                 ("rollout_corr/rejected_frac", "truncated / masked tokens", "train")]),
    ("off-policy: lag and rollout vs learner", [("async/lag_1_frac", "samples 1 version stale", "train"),
                                                ("training/rollout_probs_diff_mean", "|p_rollout - p_learner| mean", "train"),
                                                ("training/rollout_probs_diff_max", "|p_rollout - p_learner| max", "train")]),
    ("async: version lag of trained samples", [("async/version_lag_mean", "mean lag (versions)", "train"),
                                                ("async/lag_0_frac", "share lag 0", "train"),
                                                ("async/lag_1_frac", "share lag 1", "train"),
                                                ("async/lag_2_frac", "share lag 2", "train")]),
    ("idle time per step (s)", [("timing_s/learner_idle", "learner waited for rollout", "train"),
                                ("timing_s/rollout_idle", "rollout waited for learner", "train"),
                                ("timing_s/step", "step", "train")]),
]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(record.get("step", len(xs)))
            ys.append(value)
    return xs, ys


def run_name(run_dir: Path) -> str:
    """metadata.name from the run.yaml `dapo run` writes beside the metrics (a run directory can
    be called anything: --output-dir), else the folder's name."""
    import yaml

    try:
        name = (yaml.safe_load((run_dir / "run.yaml").read_text()) or {}).get("metadata", {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        name = None
    return str(name) if name else run_dir.name


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the grid of curves of ``run_dir``'s metrics.jsonl to ``out`` (default RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    if not train and not evals:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no records yet: run some training steps first")
    out = Path(out) if out else run_dir / "curves.png"
    rows = -(-len(PANELS) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.25 * rows))
    for ax, (title, lines) in zip(axes.flat, PANELS):
        drawn = 0
        for key, label, kind in lines:
            xs, ys = series(train if kind == "train" else evals, key)
            if xs:
                ax.plot(xs, ys, marker="o" if kind == "eval" else None, markersize=4, label=label)
                drawn += 1
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in axes.flat[len(PANELS):]:
        ax.set_visible(False)
    fig.suptitle(f"DAPO run {run_name(run_dir)}: {len(train)} steps, {len(evals)} evaluations")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(args) -> int:
    out = plot_run(args.run_dir, getattr(args, "out", None))
    print(f"wrote {out}", file=sys.stderr)
    return 0
