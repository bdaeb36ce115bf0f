"""The quickstart's generation batch (32 prompts x 8 responses, <= 12 new tokens, its model
builtin:arith-tiny) through HFEngine variants (64 / 256 rows per decode chunk; preallocated vs
torch.cat KV cache) and plain `model.generate` (what TRL times), alternating in one process;
prints the median and fastest time of each. Run from the repository root:

    PYTHONPATH=runtime .venv/bin/python benchmarks/engine_variants.py [--threads 2] [--rounds 7]
        [--weights RUN/checkpoints/step-N/attempt-*/model/model.safetensors]

``--weights`` loads a trained quickstart policy: the untrained one ends nearly every answer after
5 tokens, a trained one spreads its lengths (a few long answers), which is where dropping
finished rows from the decode batch (``compact_finished``) pays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from dapo import wiring
from dapo.rollout.base import encode_prompt
from dapo.rollout.hf import HFEngine
from dapo.spec import load_run_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import left_padded  # noqa: E402

N, MAX_NEW = 8, 12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up")
    p.add_argument("--weights", help="a quickstart checkpoint's model.safetensors (a trained policy)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    spec = load_run_file("examples/quickstart.yaml", []).spec
    model, tokenizer = wiring.load_policy(spec, "cpu")
    if args.weights:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(args.weights), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:  # lm_head is tied to the embeddings
            raise SystemExit(f"{args.weights} is not a quickstart checkpoint: missing {missing}, unexpected {unexpected}")
    records = [json.loads(line) for line in open(spec.data.train)][:32]
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": r["problem"]}]) for r in records]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_padded([p for p in prompts for _ in range(N)], pad_id)  # N copies of every prompt
    engines = {
        "HFEngine, 64-row chunks, preallocated cache": HFEngine(model, tokenizer, max_batch_rows=64),
        "HFEngine, 256-row chunk, preallocated cache": HFEngine(model, tokenizer, max_batch_rows=256),
        "HFEngine, 256-row chunk, preallocated cache, finished rows decode pads":
            HFEngine(model, tokenizer, max_batch_rows=256, compact_finished=False),
        "HFEngine, 64-row chunks, torch.cat cache": HFEngine(model, tokenizer, max_batch_rows=64,
                                                             preallocate_cache=False),
        "HFEngine, 256-row chunk, torch.cat cache": HFEngine(model, tokenizer, max_batch_rows=256,
                                                             preallocate_cache=False),
    }
    calls = {name: (lambda seed, e=engine: e.generate(prompts, n=N, temperature=1.0, top_p=1.0,
                                                      max_new_tokens=MAX_NEW, seed=seed))
             for name, engine in engines.items()}

    def plain_generate(seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=MAX_NEW,
                                  top_p=1.0, temperature=1.0, pad_token_id=pad_id)

    calls["model.generate"] = plain_generate
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, call in calls.items():
            start = time.perf_counter()
            call(round_)
            if round_:
                times[name].append(time.perf_counter() - start)
    print(f"{len(prompts)} prompts x {N}, <= {MAX_NEW} new tokens, {args.threads} threads, {args.rounds} rounds")
    for name, values in times.items():
        print(f"| {name} | median {statistics.median(values) * 1000:.1f} ms | fastest {min(values) * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
