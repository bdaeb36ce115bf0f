"""Policy losses and rollout-correction modes side by side on the quickstart task, several seeds.

Configurations (everything else is the run file's DAPO: dynamic sampling with surplus carry-over,
overlong shaping, the same steps and batch sizes for all):

  policy losses   dapo | gspo | cispo | grpo (eps 0.2/0.2) | dr-grpo (+ dr-grpo advantages)
                  (rolloutCorrection truncate/token/2, the default)
  correction      dapo with rolloutCorrection none | mask (truncate is the "dapo" row above)

``--suite offpolicy`` instead trains stale samples with and without the correction, in process:

  sync, corrected          maxStaleness 0 (stale rows = surplus carried over), truncate/token/2
  sync, as on-policy       the same, stale rows trained as if on-policy (the behaviour before
                           rollout correction: benchmarks/stale_as_onpolicy.py)
  async 2, corrected       maxStaleness 2 (samples up to two versions old), truncate
  async 2, as on-policy    the same, stale rows as if on-policy
  async 2, mask            maxStaleness 2, rolloutCorrection mask

Reports final held-out accuracy (avg@n) per configuration (median, min-max, mean, std over seeds),
the share of trained samples that were stale surplus, and the importance-weight diagnostics;
writes OUT/SUITE.json and docs/img/bench-SUITE-acc.png.

    .venv/bin/python benchmarks/losses.py --seeds 3 --steps 25 --jobs 2
    .venv/bin/python benchmarks/losses.py --suite offpolicy --seeds 3 --steps 40 --jobs 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from ablation import mean_curve, run_one  # noqa: E402
from side_by_side import base_run_doc, read_metrics  # noqa: E402

CONFIGS = [  # (label, --set overrides[, the Python entry that runs `dapo run`])
    ("dapo", {}),
    ("gspo", {"spec.algorithm.policyLoss": "gspo"}),
    ("cispo", {"spec.algorithm.policyLoss": "cispo"}),
    ("grpo", {"spec.algorithm.policyLoss": "grpo", "spec.algorithm.epsHigh": "0.2"}),
    ("dr-grpo", {"spec.algorithm.policyLoss": "dr-grpo", "spec.algorithm.advantageEstimator": "dr-grpo",
                 "spec.algorithm.epsHigh": "0.2"}),
    ("dapo, correction none", {"spec.algorithm.rolloutCorrection.mode": "none"}),
    ("dapo, correction mask", {"spec.algorithm.rolloutCorrection.mode": "mask"}),
]
AS_ON_POLICY = (str(Path(__file__).resolve().parent / "stale_as_onpolicy.py"),)
OFFPOLICY_CONFIGS = [
    ("sync, corrected", {}),
    ("sync, as on-policy", {}, AS_ON_POLICY),
    ("async 2, corrected", {"spec.rollout.maxStaleness": "2"}),
    ("async 2, as on-policy", {"spec.rollout.maxStaleness": "2"}, AS_ON_POLICY),
    ("async 2, mask", {"spec.rollout.maxStaleness": "2", "spec.algorithm.rolloutCorrection.mode": "mask"}),
]
SUITES = {"losses": CONFIGS, "offpolicy": OFFPOLICY_CONFIGS}


def off_policy_stats(result: dict, args) -> None:
    """Mean over steps of the stale share and the importance-weight diagnostics of one run."""
    slug = result["label"].strip("+ ").split(" (")[0].replace(" ", "-")
    metrics = args.out_dir / "runs" / f"{slug}-s{result['seed']}" / "run" / "metrics.jsonl"
    if result["rc"] != 0 or not metrics.is_file():
        return
    steps, _ = read_metrics(metrics)
    for key in ("async/lag_1_frac", "rollout_corr/is_weight_mean", "rollout_corr/rejected_frac",
                "training/rollout_probs_diff_max"):
        values = [s[key] for s in steps if isinstance(s.get(key), (int, float))]
        result[key] = statistics.fmean(values) if values else None


def aggregate(results: list[dict], configs: list[tuple]) -> list[dict]:
    table = []
    for label, *_ in configs:
        mine = [r for r in results if r["label"] == label]
        finals = [r["final_val_acc"] for r in mine if r.get("final_val_acc") is not None]
        mean_of = lambda key: (statistics.fmean(v) if (v := [r[key] for r in mine if r.get(key) is not None])  # noqa: E731
                               else float("nan"))
        table.append({
            "label": label, "seeds": len(finals), "failed_seeds": [r["seed"] for r in mine if r["rc"] != 0],
            "initial": common.median(r["val_curve"][0][1] for r in mine if r.get("val_curve")),
            "median": common.median(finals), "min": common.spread(finals)[0], "max": common.spread(finals)[1],
            "mean": statistics.fmean(finals) if finals else float("nan"),
            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "stale_share": mean_of("async/lag_1_frac"), "is_weight_mean": mean_of("rollout_corr/is_weight_mean"),
            "rejected_frac": mean_of("rollout_corr/rejected_frac"),
            "probs_diff_max": mean_of("training/rollout_probs_diff_max"),
        })
    return table


def plot(results: list[dict], configs: list[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for label, *_ in configs:
        steps, values = mean_curve(results, label, "val_curve")
        if steps:
            dashed = "correction" in label or "on-policy" in label
            ax.plot(steps, values, marker="o", ms=3, label=label, linestyle="--" if dashed else "-")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy (avg@n, T=1)")
    ax.set_title(f"{path.stem.removeprefix('bench-')} (quickstart; mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="losses")
    p.add_argument("--run-file", type=Path, default=None)
    p.add_argument("--set", action="append", help="extra PATH=VALUE for every configuration")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--mini-batch", type=int, default=0, help="prompts per optimizer step (0 = the run file's)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-n", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=None, help="default bench-results/SUITE")
    p.add_argument("--plot", type=str, default=None, help="default docs/img/bench-SUITE-acc.png ('' = none)")
    args = p.parse_args(argv)
    configs = SUITES[args.suite]
    args.out_dir = args.out_dir or Path("bench-results") / args.suite
    if args.plot is None:
        args.plot = str(common.REPO / f"docs/img/bench-{args.suite}-acc.png")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    run_file = args.out_dir / "run-file.yaml"
    run_file.write_text(yaml.safe_dump(base_run_doc(args.run_file)))
    threads = max(1, args.threads // max(1, args.jobs))
    work = [(config, seed) for seed in range(1, args.seeds + 1) for config in configs]
    common.progress(f"{args.suite}: {len(work)} runs ({len(configs)} configurations x {args.seeds} seeds), "
                    f"{args.steps} steps each, {args.jobs} at a time")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda w: run_one(w[0][0], w[0][1], w[1], args, run_file, threads, *w[0][2:]), work))
    for result in results:
        off_policy_stats(result, args)
    table = aggregate(results, configs)
    common.write_json(args.out_dir / f"{args.suite}.json", {"machine": common.machine_info(),
                                                     "args": {k: str(v) for k, v in vars(args).items()},
                                                     "configs": configs, "table": table, "runs": results})
    print(common.format_table(
        ["configuration", "seeds ok", "acc before", "final acc median", "min", "max", "mean", "std", "stale share",
         "IS weight mean", "truncated/masked", "|dp| max"],
        [[t["label"], t["seeds"], t["initial"], t["median"], t["min"], t["max"], t["mean"], t["std"], t["stale_share"],
          t["is_weight_mean"], t["rejected_frac"], t["probs_diff_max"]] for t in table]))
    failed = [(r["label"], r["seed"], r["log"]) for r in results if r["rc"] != 0]
    for label, seed, log in failed:
        print(f"FAILED: {label} seed {seed}: see {log}")
    if args.plot:
        plot(results, configs, Path(args.plot))
    print(f"wrote {args.out_dir / (args.suite + '.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
