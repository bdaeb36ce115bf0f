"""Asynchronous rollout (spec.rollout.maxStaleness) against the synchronous loop, mirroring
separate pods on this machine: the quickstart task (examples/quickstart.yaml, builtin:arith-tiny)
with ONE torch / OpenMP thread per process (DAPO_TORCH_THREADS=1), by default through
`dapo run --launcher processes --cpus learner=0 --cpus rollout,reward=1` (a learner process on
core 0; a rollout and a reward process on core 1: what separate pods run, each on its own cores),
so the synchronous loop keeps one core busy at a time (rollout, then learner) and the pipeline can
keep two busy. ``--no-pin`` lets the kernel place the processes instead. ``--launcher inprocess``
runs the generator as a thread of one process instead (the tiny model's steps are mostly Python,
so the two threads then share one interpreter lock).

For maxStaleness 0, 1, 2 and each seed (runs interleaved, so load drifts hit every setting alike):

- trained samples per second = steps x trainBatchSize x n / training wall time, where training
  wall time = the steps' own time (timing_s/step) + the pipeline drains before evaluations
  (timing_s/eval_drain); evaluation time itself is excluded for every setting;
- held-out accuracy (avg@n on evalPrompts held-out sums) after the same number of steps (equal
  samples), and at equal training wall time: the last evaluation at or before the shortest run's
  training time (benchmarks/common.acc_at_time);
- the trained samples' mean version lag and the learner / rollout idle time per step.

    PYTHONPATH=runtime .venv/bin/python benchmarks/async_pipeline.py [--steps 40 --seeds 1 2 3]

Prints one table; writes bench-results/async/results.json and async.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def read_run(metrics: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in records if "actor/pg_loss" in r], [r for r in records if "val/acc/mean" in r]


def summarise(steps: list[dict], evals: list[dict], samples_per_step: int) -> dict:
    """Training-time axis (step time + drains before evaluations), rates and the eval curve on it."""
    drains = {e["step"]: e.get("timing_s/eval_drain", 0.0) for e in evals}
    clock, at_step = 0.0, {0: 0.0}
    for s in steps:
        clock += s["timing_s/step"] + drains.get(s["step"], 0.0)
        at_step[s["step"]] = clock
    return {
        "train_s": clock,
        "samples_per_s": len(steps) * samples_per_step / clock if clock else float("nan"),
        "time_curve": [(at_step[e["step"]], e["val/acc/mean"]) for e in evals if e["step"] in at_step],
        "val_curve": [(e["step"], e["val/acc/mean"]) for e in evals],
        "final_val_acc": evals[-1]["val/acc/mean"] if evals else None,
        "lag_mean": statistics.fmean(s.get("async/version_lag_mean", 0.0) for s in steps),
        "learner_idle_per_step": statistics.fmean(s.get("timing_s/learner_idle", 0.0) for s in steps),
        "rollout_idle_per_step": statistics.fmean(s.get("timing_s/rollout_idle", 0.0) for s in steps),
        "stale_dropped": sum(s.get("async/stale_samples_dropped", 0) for s in steps),
        "steps_done": len(steps),
    }


def run_one(k: int, seed: int, args) -> dict:
    run_dir = args.out_dir / "runs" / f"k{k}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # never read an earlier invocation's metrics
    run_dir.mkdir(parents=True)
    sets = {"spec.rollout.maxStaleness": k, "spec.learner.totalSteps": args.steps, "spec.learner.seed": seed,
            "spec.eval.everySteps": args.eval_every, "spec.eval.beforeTrain": "true", "spec.eval.n": args.eval_n,
            "spec.data.evalMaxPrompts": args.eval_prompts, "spec.checkpoint.everySteps": 0}
    cmd = [sys.executable, "-m", "dapo.cli", "run", str(REPO / "examples" / "quickstart.yaml"),
           "--output-dir", str(run_dir / "run")]
    if args.launcher == "processes":
        cmd += ["--launcher", "processes"]
        cmd += args.cpu_options
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    load_before = common.load_average()
    child = common.run_child(cmd, env=common.bench_env(1), log_path=run_dir / "log.txt")
    result = {"k": k, "seed": seed, "rc": child["rc"], "wall_s": child["wall_s"], "log": child["log"],
              "load_avg_before": load_before, "load_avg_after": common.load_average()}
    metrics = run_dir / "run" / "metrics.jsonl"
    if child["rc"] == 0 and metrics.is_file():
        steps, evals = read_run(metrics)
        result.update(summarise(steps, evals, args.samples_per_step))
    common.progress(f"maxStaleness {k} seed {seed}: rc {child['rc']}, {result.get('samples_per_s', float('nan')):.1f} "
                    f"samples/s, final acc {result.get('final_val_acc')} ({child['wall_s']:.0f}s)")
    return result


def paired_ratios(results: list[dict], k: int) -> list[float]:
    """samples/s at maxStaleness k over the synchronous run of the same seed, per seed."""
    sync = {r["seed"]: r["samples_per_s"] for r in results if r["k"] == 0 and "samples_per_s" in r}
    return [r["samples_per_s"] / sync[r["seed"]] for r in results
            if r["k"] == k and "samples_per_s" in r and r["seed"] in sync]


def table(results: list[dict], t_equal: float) -> list[list]:
    rows = []
    base = common.median(r["samples_per_s"] for r in results if r["k"] == 0 and "samples_per_s" in r)
    for k in sorted({r["k"] for r in results}):
        ok = [r for r in results if r["k"] == k and "samples_per_s" in r]
        rates = [r["samples_per_s"] for r in ok]
        finals = [r["final_val_acc"] for r in ok]
        at_t = [common.acc_at_time(r["time_curve"], t_equal) for r in ok]
        rows.append([
            k, len(ok), f"{common.median(rates):.1f} [{min(rates):.1f}-{max(rates):.1f}]",
            f"{common.median(rates) / base:.2f}x",
            " ".join(f"{r:.2f}x" for r in paired_ratios(results, k)),
            " ".join(f"{a:.3f}" for a in finals), " ".join(f"{a:.3f}" if a is not None else "-" for a in at_t),
            f"{statistics.fmean(r['lag_mean'] for r in ok):.2f}",
            f"{statistics.fmean(r['learner_idle_per_step'] for r in ok):.2f}",
            f"{statistics.fmean(r['rollout_idle_per_step'] for r in ok):.2f}",
            sum(r["stale_dropped"] for r in ok),
        ])
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {0: "tab:blue", 1: "tab:orange", 2: "tab:green"}
    for r in results:
        if "time_curve" not in r:
            continue
        label = f"maxStaleness {r['k']}" if r["seed"] == min(x["seed"] for x in results) else None
        xs, ys = zip(*r["time_curve"])
        axes[0].plot(xs, ys, marker="o", ms=3, color=colours.get(r["k"]), alpha=0.8, label=label)
        steps, accs = zip(*r["val_curve"])
        axes[1].plot(steps, accs, marker="o", ms=3, color=colours.get(r["k"]), alpha=0.8, label=label)
    axes[0].set(xlabel="training wall time (s)", ylabel="held-out acc (avg@n)", title="accuracy vs wall time")
    axes[1].set(xlabel="step (equal samples)", ylabel="held-out acc (avg@n)", title="accuracy vs samples")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-prompts", type=int, default=60)
    p.add_argument("--eval-n", type=int, default=2)
    p.add_argument("--launcher", choices=["processes", "inprocess"], default="processes")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="processes launcher: learner on one CPU, rollout and reward on another (dapo run --cpus, "
                        "the first two CPUs this process may use), as separate pods each get their own cores")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench-results" / "async")
    args = p.parse_args(argv)
    args.cpu_options = common.pod_cpus(1) if args.pin and args.launcher == "processes" else []  # fails before any run
    import yaml

    spec = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())["spec"]
    args.samples_per_step = spec["learner"]["trainBatchSize"] * spec["rollout"]["n"]
    # the settings' order rotates per seed, so a load drift during the invocation does not always
    # favour the setting that runs last
    results = [run_one(k, seed, args) for i, seed in enumerate(args.seeds)
               for k in args.staleness[i % len(args.staleness):] + args.staleness[:i % len(args.staleness)]]
    done = [r for r in results if "train_s" in r]
    t_equal = min(r["train_s"] for r in done)
    pinned = f" ({' '.join(args.cpu_options)})" if args.cpu_options else ""
    print(f"launcher {args.launcher}{pinned}, {args.steps} steps, {len(args.seeds)} seeds, one torch thread per process")
    headers = ["maxStaleness", "runs", "samples/s median [min-max]", "vs sync", "paired per seed", f"acc after {args.steps} steps",
               f"acc at {t_equal:.0f}s", "lag", "learner idle s/step", "rollout idle s/step", "stale dropped"]
    print(common.format_table(headers, table(done, t_equal)))
    failed = [(r["k"], r["seed"]) for r in results if r["rc"] != 0]
    if failed:
        print(f"failed runs (maxStaleness, seed): {failed}; logs under {args.out_dir / 'runs'}")
    plot(done, args.out_dir / "async.png")
    common.write_json(args.out_dir / "results.json", {"machine": common.machine_info(), "args": {
        k: str(v) for k, v in vars(args).items()}, "t_equal_s": t_equal, "results": results})
    print(f"wrote {args.out_dir / 'results.json'} and {args.out_dir / 'async.png'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
