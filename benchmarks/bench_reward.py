"""Reward scorer throughput: direct calls on one core, and the worker pool with 1 and 2 workers.

Inputs: the real ground truths of DAPO-Math-17k and AIME 2024 (../shared/data), each with a
synthetic ~1.5 KB response (distinct random reasoning text, then ``Answer: ...``; half right,
half wrong). MATH-500's LaTeX answers are measured for math_verify as well, since symbolic
parsing costs more on them than on integers.

    .venv/bin/python benchmarks/bench_reward.py [--data-dir ../shared/data] [--out FILE.json]

Prints a table (answers/s) and writes the numbers as JSON. Timings on a shared machine are
noisy; each line is the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

WORDS = "we note that the sum of terms gives a factor so by symmetry each case then let compute check".split()


def synthetic_response(rng: random.Random, answer: str, target_chars: int) -> str:
    """Random reasoning-like text with numbers, ~target_chars long, ending in an Answer line."""
    parts, size = [], 0
    while size < target_chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(8)) + f" = {rng.randint(0, 9999)}."
        parts.append(sentence)
        size += len(sentence) + 1
    return " ".join(parts) + f"\nTherefore the final result follows.\nAnswer: {answer}"


def load_cases(data_dir: Path, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """name -> [(response, ground_truth)], half right, half wrong."""
    import pyarrow.parquet as pq

    def build(ground_truths):
        cases = []
        for i, gt in enumerate(ground_truths):
            answer = gt if i % 2 == 0 else (str(int(gt) + 1) if gt.lstrip("-").isdigit() else gt + "1")
            cases.append((synthetic_response(rng, answer, rng.randint(1000, 2000)), gt))
        return cases

    out = {}
    for label, name in (("dapo-math-17k", "dapo-math-17k.parquet"), ("aime-2024", "aime-2024.parquet")):
        rows = pq.read_table(data_dir / name, columns=["reward_model"]).column("reward_model").to_pylist()
        out[label] = build([r["ground_truth"] for r in rows])
    math500 = data_dir / "math500.jsonl"
    if math500.is_file():
        out["math500"] = build([json.loads(line)["answer"] for line in math500.open()])
    return out


def best_rate(fn, count: int, repeats: int) -> float:
    """Best answers/s over ``repeats`` runs of ``fn()`` scoring ``count`` answers."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("bench_reward.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--verify-n", type=int, default=1000, help="answers per math_verify measurement")
    parser.add_argument("--pool-n", type=int, default=4000, help="answers per math_dapo pool measurement")
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        print(f"data folder {args.data_dir} not found: pass --data-dir pointing at the shared data sets", file=sys.stderr)
        return 2

    from dapo.reward import RewardScorer, score_math_dapo, score_math_verify

    rng = random.Random(0)
    cases = load_cases(args.data_dir, rng)
    rows: list[dict] = []

    def record(scorer, mode, data, count, rate):
        rows.append({"scorer": scorer, "mode": mode, "data": data, "answers": count, "answers_per_s": round(rate, 1)})
        print(f"{scorer:12s} {mode:18s} {data:14s} {count:7d} {rate:12.0f}", flush=True)

    print(f"{'scorer':12s} {'mode':18s} {'data':14s} {'answers':>7s} {'answers/s':>12s}")
    # Direct calls in this process: one core.
    for data in ("dapo-math-17k", "aime-2024"):
        batch = cases[data]
        record("math_dapo", "direct (1 core)", data, len(batch),
               best_rate(lambda: [score_math_dapo(r, g) for r, g in batch], len(batch), args.repeats))
    for data in ("dapo-math-17k", "aime-2024", "math500"):
        if data not in cases:
            continue
        batch = cases[data][: args.verify_n]
        score_math_verify(*batch[0])  # import sympy outside the timing
        # One repeat only: math-verify caches parses, so later repeats would be flattered.
        record("math_verify", "direct (1 core)", data, len(batch),
               best_rate(lambda: [score_math_verify(r, g) for r, g in batch], len(batch), 1))

    # The pool: per-item IPC and process isolation on top of the scorer.
    for workers in (1, 2):
        with RewardScorer(timeout_s=5.0, workers=workers, overlong_enabled=False) as pool:
            pool.score_batch(["Answer: 1"] * workers * 2, ["1"] * workers * 2)  # start workers
            batch = cases["dapo-math-17k"][: args.pool_n]
            responses, gts = [r for r, _ in batch], [g for _, g in batch]
            record("math_dapo", f"pool, {workers} worker(s)", "dapo-math-17k", len(batch),
                   best_rate(lambda: pool.score_batch(responses, gts, ["math_dapo"] * len(batch)), len(batch), args.repeats))
            offset = 1000 + workers * args.verify_n  # rows the direct run did not warm any cache with
            batch = cases["dapo-math-17k"][offset : offset + args.verify_n]
            responses, gts = [r for r, _ in batch], [g for _, g in batch]
            record("math_verify", f"pool, {workers} worker(s)", "dapo-math-17k", len(batch),
                   best_rate(lambda: pool.score_batch(responses, gts, ["MATH-500"] * len(batch)), len(batch), 1))
            assert pool.stats["timed_out"] == 0, pool.stats

    args.out.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
