"""The DAPO paper's Table 1 at toy scale: each technique added in turn, several seeds each.

Configurations (cumulative, as in the paper's Table 1), all through `dapo run` on one run file
(default examples/quickstart.yaml) with ``--set`` overrides:

  1. naive GRPO             eps 0.2/0.2, seq-mean-token-mean loss, no overlong anything, no dynamic sampling
  2. + overlong filtering   truncated responses masked out of the loss
  3. + clip-higher          eps_high 0.28
  4. + soft overlong punish the length penalty ramp on the reward
  5. + token-level loss     token-mean
  6. + dynamic sampling     = DAPO

Reports final held-out accuracy (avg@n) per configuration as median and min-max over seeds,
and writes accuracy and entropy curves (mean over seeds, per step) as PNG. Whatever ordering
comes out is the result: at this scale (a ~1M-parameter model, responses of a few tokens) the
length-related techniques have little to act on, and docs/benchmarks.md says so.

    .venv/bin/python benchmarks/ablation.py --seeds 3 --steps 15 [--jobs 2]

Writes OUT/ablation.json and docs/img/bench-ablation-{acc,entropy}.png.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from side_by_side import base_run_doc, read_metrics  # noqa: E402

NAIVE = {
    "spec.algorithm.epsLow": "0.2", "spec.algorithm.epsHigh": "0.2",
    "spec.algorithm.lossAggMode": "seq-mean-token-mean", "spec.algorithm.overlong.enabled": "false",
    "spec.algorithm.overlong.filtering": "false", "spec.algorithm.dynamicSampling.enabled": "false",
}
STAGES = [
    ("naive GRPO", {}),
    ("+ overlong filtering", {"spec.algorithm.overlong.filtering": "true"}),
    ("+ clip-higher", {"spec.algorithm.epsHigh": "0.28"}),
    ("+ soft overlong punishment", {"spec.algorithm.overlong.enabled": "true"}),
    ("+ token-level loss", {"spec.algorithm.lossAggMode": "token-mean"}),
    ("+ dynamic sampling (DAPO)", {"spec.algorithm.dynamicSampling.enabled": "true"}),
]


def stage_overrides() -> list[tuple[str, dict[str, str]]]:
    """(label, full override dict) per configuration: each stage keeps the ones before it."""
    current = dict(NAIVE)
    out = []
    for label, change in STAGES:
        current = {**current, **change}
        out.append((label, dict(current)))
    return out


def run_one(label: str, sets: dict[str, str], seed: int, args, run_file: Path, threads: int,
            entry: tuple[str, ...] = ("-m", "dapo.cli")) -> dict:
    """One `dapo run` of the run file with ``sets`` (``entry``: what Python runs, the CLI by default)."""
    slug = label.strip("+ ").split(" (")[0].replace(" ", "-")
    run_dir = args.out_dir / "runs" / f"{slug}-s{seed}"
    # a fresh folder per invocation: a run left by an earlier one would make `dapo run` refuse
    # (committed checkpoints), and its metrics must never be read as this run's
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    common_sets = {"spec.learner.totalSteps": str(args.steps), "spec.learner.seed": str(seed),
                   "spec.eval.everySteps": str(args.eval_every), "spec.eval.beforeTrain": "true",
                   "spec.eval.n": str(args.eval_n), "spec.eval.topP": "1.0",
                   "spec.data.evalMaxPrompts": str(args.eval_prompts), "spec.checkpoint.everySteps": "0"}
    if args.mini_batch:
        # Several optimizer steps per rollout step (the paper: 16). With one, the policy ratio is
        # exactly 1 and clip-higher cannot change anything.
        common_sets["spec.learner.miniBatchSize"] = str(args.mini_batch)
    cmd = [sys.executable, *entry, "run", str(run_file), "--output-dir", str(run_dir / "run")]
    for key, value in {**common_sets, **sets}.items():
        cmd += ["--set", f"{key}={value}"]
    for extra in args.set or []:
        cmd += ["--set", extra]
    load_before = common.load_average()
    child = common.run_child(cmd, env=common.bench_env(threads), log_path=run_dir / "log.txt")
    result = {"label": label, "seed": seed, "rc": child["rc"], "wall_s": child["wall_s"], "log": child["log"],
              "load_avg_before": load_before, "load_avg_after": common.load_average()}
    metrics = run_dir / "run" / "metrics.jsonl"
    if child["rc"] == 0 and metrics.is_file():
        steps, evals = read_metrics(metrics)
        result.update({
            "val_curve": [(e["step"], e["val/acc/mean"]) for e in evals],
            "entropy_curve": [(s["step"], s.get("actor/entropy")) for s in steps],
            "score_curve": [(s["step"], s.get("critic/score/mean")) for s in steps],
            "final_val_acc": evals[-1]["val/acc/mean"] if evals else None,
            "train_wall_s": sum(s["timing_s/step"] for s in steps),
            "steps_done": len(steps),
        })
    common.progress(f"{label} seed {seed}: rc {child['rc']}, final acc {result.get('final_val_acc')} "
                    f"({child['wall_s']:.0f}s)")
    return result


def aggregate(results: list[dict]) -> list[dict]:
    """Per configuration: median, min, max, mean and sample std of the final accuracy over seeds."""
    table = []
    for label, _ in STAGES:
        finals = [r["final_val_acc"] for r in results if r["label"] == label and r.get("final_val_acc") is not None]
        failed = [r["seed"] for r in results if r["label"] == label and r["rc"] != 0]
        table.append({
            "label": label, "seeds": len(finals), "failed_seeds": failed,
            "median": common.median(finals), "min": common.spread(finals)[0], "max": common.spread(finals)[1],
            "mean": statistics.fmean(finals) if finals else float("nan"),
            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "initial": common.median(r["val_curve"][0][1] for r in results if r["label"] == label and r.get("val_curve")),
        })
    return table


def mean_curve(results: list[dict], label: str, key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for r in results:
        if r["label"] == label:
            for step, value in r.get(key, []):
                if value is not None:
                    by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def plot(results: list[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, name in (("val_curve", "held-out accuracy (avg@n, T=1)", "acc"),
                              ("entropy_curve", "policy entropy (nats/token)", "entropy")):
        fig, ax = plt.subplots(figsize=(6.8, 4.2))
        for label, _ in STAGES:
            steps, values = mean_curve(results, label, key)
            if steps:
                ax.plot(steps, values, marker="o" if key == "val_curve" else None, ms=3, label=label)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"ablation ({name}; mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        folder.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(folder / f"bench-ablation-{name}.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-file", type=Path, default=None)
    p.add_argument("--set", action="append", help="extra PATH=VALUE for every configuration")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--mini-batch", type=int, default=0,
                   help="prompts per optimizer step (must divide the run file's trainBatchSize; 0 = keep the file's)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-n", type=int, default=4)
    p.add_argument("--jobs", type=int, default=1, help="runs at once (threads are split between them)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=Path("bench-results/ablation"))
    p.add_argument("--plots", type=str, default=str(common.REPO / "docs/img"))
    args = p.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    run_file = args.out_dir / "run-file.yaml"
    run_file.write_text(yaml.safe_dump(base_run_doc(args.run_file)))
    threads = max(1, args.threads // max(1, args.jobs))
    work = [(label, sets, seed) for seed in range(1, args.seeds + 1) for label, sets in stage_overrides()]
    common.progress(f"ablation: {len(work)} runs ({len(STAGES)} configurations x {args.seeds} seeds), "
                    f"{args.steps} steps each, {args.jobs} at a time")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda w: run_one(w[0], w[1], w[2], args, run_file, threads), work))
    table = aggregate(results)
    common.write_json(args.out_dir / "ablation.json", {"machine": common.machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                                                       "stages": stage_overrides(), "table": table, "runs": results})
    print(common.format_table(["configuration", "seeds ok", "acc before", "final acc median", "min", "max",
                               "mean", "std"],
                              [[t["label"], t["seeds"], t["initial"], t["median"], t["min"], t["max"], t["mean"], t["std"]]
                               for t in table]))
    failed = [(r["label"], r["seed"], r["log"]) for r in results if r["rc"] != 0]
    for label, seed, log in failed:
        print(f"FAILED: {label} seed {seed}: see {log}")
    if args.plots:  # '' = no plots (a Path('') would mean the current folder)
        plot(results, Path(args.plots))
    print(f"wrote {args.out_dir / 'ablation.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
