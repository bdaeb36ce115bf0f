"""Where a training step's time goes, ours vs TRL, from a finished side-by-side output folder.

Reads OUT/runs/{ours,ours-nods,trl}-r*/ (our metrics.jsonl timings and trl.json's per-step
records) and prints, per system, the median over repeats of each run's median over steps
(first step dropped, as side_by_side does) of every phase:

  ours: gen (rollout engine), reward (scorer pool), old_log_prob (the extra forward pass the
        learner makes when a step has several optimizer steps), update_actor (forward +
        backward + optimizer steps), sync_weights (learner -> engine copy), other (the rest
        of the step: batching, dynamic-sampling bookkeeping, metrics);
  trl:  gen (its model.generate calls), reward (our reward function inside TRL), rest (step
        minus both: TRL's old-log-prob pass, the optimizer steps and its own bookkeeping).

Also the generated groups per step (dynamic sampling generates more than one batch).

    .venv/bin/python benchmarks/breakdown.py bench-results/side_by_side [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from side_by_side import read_metrics  # noqa: E402

OURS_PHASES = ("gen", "reward", "old_log_prob", "update_actor", "sync_weights")


def ours_phases(row: dict) -> dict:
    """Seconds per phase of one of our step lines; 'other' = step - the named phases."""
    phases = {p: float(row.get(f"timing_s/{p}", 0.0) or 0.0) for p in OURS_PHASES}
    phases["other"] = row["timing_s/step"] - sum(phases.values())
    phases["step"] = row["timing_s/step"]
    return phases


def trl_phases(record: dict) -> dict:
    """Seconds per phase of one trl_dapo step record; 'rest' = step - generation - scoring."""
    return {"gen": record["gen_s"], "reward": record["reward_s"],
            "rest": record["step_s"] - record["gen_s"] - record["reward_s"], "step": record["step_s"]}


def run_medians(per_step: list[dict]) -> dict:
    timed = per_step[1:] if len(per_step) > 2 else per_step
    return {key: common.median(s[key] for s in timed) for key in timed[0]} if timed else {}


def collect(out_dir: Path) -> dict[str, list[dict]]:
    """System -> per-repeat medians of every phase."""
    by_system: dict[str, list[dict]] = {}
    for run in sorted((out_dir / "runs").iterdir()):
        system = run.name.rsplit("-r", 1)[0]
        if system == "trl" and (run / "trl.json").is_file():
            records = json.loads((run / "trl.json").read_text())["steps"]
            by_system.setdefault(system, []).append(run_medians([trl_phases(r) for r in records]))
        elif (run / "run" / "metrics.jsonl").is_file():
            steps, _ = read_metrics(run / "run" / "metrics.jsonl")
            by_system.setdefault(system, []).append(run_medians([ours_phases(r) for r in steps]))
    return by_system


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    by_system = collect(args.out_dir)
    keys = ("gen", "reward", "old_log_prob", "update_actor", "sync_weights", "other", "rest", "step")
    summary = {s: {k: common.median(r.get(k) for r in runs) for k in keys if any(k in r for r in runs)}
               for s, runs in by_system.items()}
    rows = [[s, len(by_system[s])] + [summary[s].get(k, "-") for k in keys] for s in summary]
    print("median seconds per training step (median over repeats of per-run medians)")
    print(common.format_table(["system", "runs", "gen", "reward", "old log-prob", "update", "weight sync",
                               "other (ours)", "learner + rest (TRL)", "step"], rows))
    common.write_json(args.out or args.out_dir / "breakdown.json", {"per_repeat": by_system, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
