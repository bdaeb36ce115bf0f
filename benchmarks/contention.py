"""A busy neighbour: the quickstart's step time alone and beside one process that keeps a core busy.

A laptop always has something else running, and a pod under a CPU limit meets the same thing.
This runs the quickstart (`dapo run examples/quickstart.yaml`, evaluation off) for ``--steps``
steps in a child process, alternately quiet and beside ``python -c 'while 1: pass'`` (one
single-threaded busy process), ``--repeats`` times each, and prints the median step time
(``timing_s/step`` of steps 3 on, from metrics.jsonl) and steps/s of each, and their ratio.

On a 2-core machine the neighbour's fair share is one core out of two, so a run that degrades
gracefully takes at most 2x as long per step beside it.

``--env NAME=VALUE`` adds a variable to the training process (e.g. to compare OpenMP settings:
``--env OMP_WAIT_POLICY=ACTIVE`` brings back what ``dapo`` used to inherit).

    PYTHONPATH=runtime:operator python benchmarks/contention.py --steps 30 --repeats 3
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


def run_quickstart(steps: int, out: Path, env: dict[str, str]) -> list[float]:
    """Step times (s) of one quickstart run of ``steps`` steps, from its metrics.jsonl."""
    command = [sys.executable, "-m", "dapo.cli", "run", "examples/quickstart.yaml", "--output-dir", str(out),
               "--set", f"spec.learner.totalSteps={steps}", "--set", "spec.eval.beforeTrain=false",
               "--set", "spec.eval.everySteps=0", "--set", "spec.checkpoint.everySteps=0"]
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(["runtime", "operator", os.environ.get("PYTHONPATH", "")]),
                 **env}
    done = subprocess.run(command, cwd=REPO, env=child_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"quickstart run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["timing_s/step"] for line in lines if "timing_s/step" in line]


def measure(steps: int, repeats: int, env: dict[str, str]) -> dict[str, list[float]]:
    """Median step time per run, quiet and busy, alternating (a slow phase of the machine hits both)."""
    result: dict[str, list[float]] = {"quiet": [], "busy": []}
    with tempfile.TemporaryDirectory() as scratch:
        for k in range(repeats):
            for case in ("quiet", "busy"):
                neighbour = (subprocess.Popen([sys.executable, "-c", "while 1: pass"])
                             if case == "busy" else None)
                try:
                    times = run_quickstart(steps, Path(scratch) / f"{case}-{k}", env)
                finally:
                    if neighbour is not None:
                        neighbour.kill()
                        neighbour.wait()
                median = statistics.median(times[2:])  # steps 1-2: warm-up (allocator, first shapes)
                result[case].append(median)
                print(f"  {case:5s} run {k + 1}: median step {median:.3f} s over {len(times) - 2} steps", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the training process (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-run medians here")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    print(f"quickstart, {args.steps} steps x {args.repeats} repeats, quiet vs one busy process; "
          f"{os.cpu_count()} CPUs; env {env or '{}'} ({time.strftime('%Y-%m-%d %H:%M')})", flush=True)
    result = measure(args.steps, args.repeats, env)
    quiet, busy = statistics.median(result["quiet"]), statistics.median(result["busy"])
    print(f"| case | median step (s) | steps/s |\n|---|---|---|\n| quiet | {quiet:.3f} | {1 / quiet:.2f} |\n"
          f"| beside a busy process | {busy:.3f} | {1 / busy:.2f} |\n"
          f"busy / quiet step time: {busy / quiet:.2f}x (fair share on {os.cpu_count()} CPUs: "
          f"{os.cpu_count() / max(1, os.cpu_count() - 1):.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "steps": args.steps, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
