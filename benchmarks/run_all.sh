#!/usr/bin/env bash
# The CPU benchmark suite in one command (target: < 30 min on 2 idle cores).
#
#   benchmarks/run_all.sh [OUT_DIR]          # default OUT_DIR: bench-results
#   BENCH_QUICK=1 benchmarks/run_all.sh      # a smoke pass (fewer repeats and steps)
#   BENCH_THREADS=2 benchmarks/run_all.sh    # torch threads per side-by-side run (default 1: steadier on a shared machine)
#
# Runs, in order: policy-loss/advantage micro benchmark, scorer throughput, rollout-engine
# overhead vs model.generate, ours vs TRL side by side (3 repeats x 3 systems x 100 steps of the
# quickstart) with the per-phase breakdown, dynamic-sampling efficiency from the side-by-side
# runs, the Table-1 ablation (6 configurations x 3 seeds x 60 steps, 2 runs at a time).
# Weight-sync and S3 throughput (bench_weight_sync.py, bench_s3.py) are not in it: they move
# ~1 GB per trial and measure transports, not the trainer (docs/benchmarks.md has their commands).
# Every script prints a Markdown table and writes JSON under OUT_DIR; plots go to docs/img/.
# The long SmolLM2-135M benchmark is separate: benchmarks/smollm2_real.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="runtime:operator${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
if [[ -n "${BENCH_QUICK:-}" ]]; then
  REPEATS=1; SBS_STEPS=10; ABL_SEEDS=1; ABL_STEPS=10; MICRO_REPEATS=3; EVAL_EVERY=5
else
  REPEATS=3; SBS_STEPS=100; ABL_SEEDS=3; ABL_STEPS=60; MICRO_REPEATS=7; EVAL_EVERY=10
fi
$PY -c "import trl" 2>/dev/null || { echo "trl is not installed: .venv/bin/pip install -c constraints-cpu.txt trl (docs/benchmarks.md)"; exit 2; }
stamp() { echo "=== $(date +%H:%M:%S) $*" >&2; }
started=$(date +%s)

stamp "policy_loss / group_advantages"
$PY benchmarks/bench_algo.py --batch 64 --length 2048 --repeats "$MICRO_REPEATS" | tee "$OUT/algo.txt"
stamp "scorer throughput"
if [[ -d ../shared/data ]]; then $PY benchmarks/bench_reward.py --out "$OUT/reward.json" | tee "$OUT/reward.txt"
else echo "skipped: ../shared/data (the real DAPO-Math / AIME answers) is not present" | tee "$OUT/reward.txt"; fi
stamp "rollout engine vs model.generate"
$PY benchmarks/micro.py engine --repeats "$MICRO_REPEATS" --out "$OUT/micro-engine.json" | tee "$OUT/micro-engine.txt"
stamp "side by side with TRL"
$PY benchmarks/side_by_side.py --repeats "$REPEATS" --steps "$SBS_STEPS" --eval-every "$EVAL_EVERY" --eval-prompts 200 --threads "${BENCH_THREADS:-1}" \
  --out-dir "$OUT/side_by_side" | tee "$OUT/side_by_side.txt"
$PY benchmarks/breakdown.py "$OUT/side_by_side" | tee "$OUT/breakdown.txt"
stamp "dynamic-sampling efficiency (from the side-by-side DAPO runs)"
$PY benchmarks/micro.py dynamic-sampling --metrics "$OUT"/side_by_side/runs/ours-r*/run/metrics.jsonl \
  --out "$OUT/micro-ds.json" | tee "$OUT/micro-ds.txt"
stamp "ablation (paper Table 1 at toy scale)"
$PY benchmarks/ablation.py --seeds "$ABL_SEEDS" --steps "$ABL_STEPS" --eval-every "$EVAL_EVERY" --eval-prompts 200 --jobs 2 \
  --out-dir "$OUT/ablation" | tee "$OUT/ablation.txt"
stamp "done in $(( ($(date +%s) - started) / 60 )) min; results in $OUT, plots in docs/img"
