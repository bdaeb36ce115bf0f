"""A busy neighbour: the quickstart's step time alone and beside one process that keeps a core busy.

A laptop always has something else running, and a pod under a CPU limit meets the same thing.
This runs the quickstart (`dapo run examples/quickstart.yaml`, evaluation off) for ``--steps``
steps in a child process, alternately quiet and beside ``python -c 'while 1: pass'`` (one
single-threaded busy process), ``--repeats`` times each, and prints the median step time
(``timing_s/step`` of steps 3 on, from metrics.jsonl) and steps/s of each, and their ratio.

On a 2-core machine the neighbour's fair share is one core out of two, so a run that degrades
gracefully takes at most 2x as long per step beside it.

``--variant LABEL[:REPO][:NAME=VALUE,...]`` (repeatable) measures several set-ups in the same
invocation, interleaved: another checkout's code (REPO, e.g. a worktree of an older commit) and
extra environment of the training process (e.g. ``OMP_WAIT_POLICY=ACTIVE``). Without it: this
checkout as it is.

    PYTHONPATH=runtime:operator python benchmarks/contention.py --steps 30 --repeats 3 \
        --variant before:/path/to/old-checkout --variant now
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_quickstart(steps: int, out: Path, repo: Path, env: dict[str, str]) -> list[float]:
    """Step times (s) of one quickstart run of ``steps`` steps of ``repo``'s code, from its metrics.jsonl."""
    command = [sys.executable, "-m", "dapo.cli", "run", "examples/quickstart.yaml", "--output-dir", str(out),
               "--set", f"spec.learner.totalSteps={steps}", "--set", "spec.eval.beforeTrain=false",
               "--set", "spec.eval.everySteps=0", "--set", "spec.checkpoint.everySteps=0"]
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "runtime"), str(repo / "operator")]), **env}
    done = subprocess.run(command, cwd=repo, env=child_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"quickstart run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["timing_s/step"] for line in lines if "timing_s/step" in line]


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    """'LABEL[:REPO][:NAME=VALUE,...]' -> (label, repo, env)."""
    label, *rest = text.split(":")
    repo, env = REPO, {}
    for part in rest:
        if "=" in part:
            env.update(item.split("=", 1) for item in part.split(",") if item)
        elif part:
            repo = Path(part).resolve()
    return label, repo, env


def measure(steps: int, repeats: int, variants: list[tuple[str, Path, dict[str, str]]]) -> dict[str, dict]:
    """Median step time per run, per variant, quiet and busy, interleaved (a slow phase of the
    machine hits every variant alike)."""
    result: dict[str, dict] = {label: {"quiet": [], "busy": []} for label, _, _ in variants}
    with tempfile.TemporaryDirectory() as scratch:
        for k in range(repeats):
            # every other repeat in the reverse order: no variant always runs right after a busy run
            for label, repo, env in (variants if k % 2 == 0 else variants[::-1]):
                for case in ("quiet", "busy"):
                    neighbour = (subprocess.Popen([sys.executable, "-c", "while 1: pass"])
                                 if case == "busy" else None)
                    try:
                        times = run_quickstart(steps, Path(scratch) / f"{label}-{case}-{k}", repo, env)
                    finally:
                        if neighbour is not None:
                            neighbour.kill()
                            neighbour.wait()
                    median = statistics.median(times[2:])  # steps 1-2: warm-up (allocator, first shapes)
                    result[label][case].append(median)
                    print(f"  {label:10s} {case:5s} run {k + 1}: median step {median:.3f} s over {len(times) - 2} steps",
                          flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL[:REPO][:NAME=VALUE,...]",
                        help="a set-up to measure (repeatable; default: this checkout as it is)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-run medians here")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant] or [("now", REPO, {})]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"quickstart, {args.steps} steps x {args.repeats} repeats, quiet vs one busy process; {cpus} CPUs "
          f"({time.strftime('%Y-%m-%d %H:%M')}); variants: "
          + "; ".join(f"{label} = {repo} {env or ''}" for label, repo, env in variants), flush=True)
    result = measure(args.steps, args.repeats, variants)
    print("| variant | quiet step (s) | steps/s | beside a busy process (s) | steps/s | busy / quiet |\n|---|---|---|---|---|---|")
    for label, cases in result.items():
        quiet, busy = statistics.median(cases["quiet"]), statistics.median(cases["busy"])
        print(f"| {label} | {quiet:.3f} | {1 / quiet:.2f} | {busy:.3f} | {1 / busy:.2f} | {busy / quiet:.2f}x |")
    print(f"fair share of {cpus} CPUs beside one busy process: {cpus / max(1, cpus - 1):.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "variants": {label: {"repo": str(repo), "env": env}
                                                                           for label, repo, env in variants},
                                         "medians": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
