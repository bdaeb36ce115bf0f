"""Micro benchmarks: rollout-engine overhead and dynamic-sampling efficiency.

1. ``engine``: our HF rollout engine (dapo.rollout.hf.HFEngine: batched sampling with per-token
   log-probs and per-row EOS) against raw ``model.generate`` (sampling, no log-probs) on the
   same randomly initialised Qwen2 model, the same prompts and lengths, and the same engine with
   the model's own KV cache (grown by torch.cat, the engine before the preallocated cache). The
   three are timed in rotation; figures are medians over repeats, per wall second and per CPU
   second of this process (the latter is steadier on a shared machine). A random model over a 4k vocabulary almost
   never samples EOS, so both decode the full length and do the same work.
   Overhead = engine time per generated token / generate's time per token - 1 (target <= 10%).
2. ``dynamic-sampling``: from one or more `dapo run` metrics files (or a short run of the
   quickstart that this script starts), groups generated versus groups used per step:
   generated = all-correct + all-wrong + kept groups, efficiency = used / generated, and how
   many surplus groups were carried to the next step instead of being thrown away.

3. ``learner-padding``: one learner update (forward/backward of every micro-batch, AdamW) on
   a batch whose response lengths have a long tail, as reasoning traces do: micro-batches of
   rows grouped by length and trimmed to their own longest row (the learner today) against
   consecutive rows padded to the whole batch's widths (the learner before; the script patches
   `dapo.learner.batch.by_length` and `TrainBatch.trimmed` back to that). Timed in
   rotation on copies of one model; also prints the share of forward token positions that are
   padding in each.

policy_loss / advantages and scorer throughput have their own scripts
(benchmarks/bench_algo.py, benchmarks/bench_reward.py); run_all.sh runs all four.

    .venv/bin/python benchmarks/micro.py engine [--rows 64 --new-tokens 64 --repeats 5]
    .venv/bin/python benchmarks/micro.py learner-padding [--rows 32 --micro-rows 8 --repeats 5]
    .venv/bin/python benchmarks/micro.py dynamic-sampling [--metrics RUN/metrics.jsonl ...] [--steps 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


# --------------------------------------------------------------------------- engine overhead


def random_qwen2(hidden: int, layers: int, vocab: int, seed: int = 0):
    """A randomly initialised Qwen2 causal LM (no download), eval mode."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         intermediate_size=hidden * 3, max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, use_sliding_window=False)
    return Qwen2ForCausalLM(config).eval()


def engine_overhead(args) -> dict:
    import torch

    from dapo.rollout.hf import HFEngine

    torch.set_num_threads(args.threads)
    model = random_qwen2(args.hidden, args.layers, args.vocab)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    engine = HFEngine(model, tokenizer, max_batch_rows=args.rows, copy_model=False)
    # the same engine with the model's own KV cache (grown by torch.cat every token): before / after
    engine_cat = HFEngine(model, tokenizer, max_batch_rows=args.rows, copy_model=False, preallocate_cache=False)
    g = torch.Generator().manual_seed(0)
    prompts_n = max(1, args.rows // args.n)
    prompts = [torch.randint(2, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(prompts_n)]
    rows = torch.tensor([p for p in prompts for _ in range(args.n)])

    def run_engine(seed):
        samples = engine.generate(prompts, args.n, 1.0, 1.0, args.new_tokens, seed)
        return sum(len(s.response_ids) for s in samples)

    def run_engine_cat(seed):
        samples = engine_cat.generate(prompts, args.n, 1.0, 1.0, args.new_tokens, seed)
        return sum(len(s.response_ids) for s in samples)

    def run_generate(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=1)
        new = out[:, rows.shape[1]:]
        # tokens up to and including the first EOS of each row (what a caller would keep)
        ended = (new == 1).int().cumsum(-1)
        return int(((ended == 0) | ((ended == 1) & (new == 1))).sum())

    paths = [("engine", run_engine), ("engine_cat", run_engine_cat), ("generate", run_generate)]
    for seed in range(2):  # warm-up all
        for _, fn in paths:
            fn(seed)
    times = {name: [] for name, _ in paths}
    cpu_times = {name: [] for name, _ in paths}  # CPU seconds of this process: less sensitive to a shared machine
    tokens = {name: [] for name, _ in paths}
    for rep in range(args.repeats):
        for name, fn in paths[rep % 3:] + paths[:rep % 3]:  # rotate the order
            t0, c0 = time.perf_counter(), time.process_time()
            count = fn(100 + rep)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
            tokens[name].append(count)
    per_token = {k: common.median(t / max(c, 1) for t, c in zip(times[k], tokens[k])) for k in times}
    cpu_per_token = {k: common.median(t / max(c, 1) for t, c in zip(cpu_times[k], tokens[k])) for k in times}
    profiles = profile_both(run_engine, run_generate, args.profile_rows) if args.profile_rows else {}
    result = {
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6},
        "rows": len(rows), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "engine_tokens_per_s": 1 / per_token["engine"], "generate_tokens_per_s": 1 / per_token["generate"],
        "engine_cat_tokens_per_s": 1 / per_token["engine_cat"],
        "cpu_tokens_per_s": {k: 1 / v for k, v in cpu_per_token.items()}, "raw_cpu_times": cpu_times,
        "overhead": per_token["engine"] / per_token["generate"] - 1, "raw_times": times, "raw_tokens": tokens,
        "load_avg_after": common.load_average(), "profiles": profiles,
    }
    labels = {"engine": "dapo HFEngine, preallocated KV cache (with log-probs)",
              "engine_cat": "dapo HFEngine, model's torch.cat cache (before)",
              "generate": "model.generate (no log-probs)"}
    print(common.format_table(["path", "tokens/s wall (median)", "tokens/s per CPU-second (median)", "tokens per call"],
                              [[labels[k], 1 / per_token[k], 1 / cpu_per_token[k], common.median(tokens[k])]
                               for k in labels]))
    verdict = "within" if result["overhead"] <= 0.10 else "OVER"
    print(f"engine overhead vs model.generate: {result['overhead']:+.1%} ({verdict} the 10% target)")
    for name, table in profiles.items():
        print(f"\n{name}: torch profiler, one call, top ops by self CPU time\n{table}")
    return result


def long_tailed_batch(args):
    """Rows of n responses per prompt: prompt lengths uniform in [8, 32], response lengths
    log-normal (median ``--median-len``) capped at ``--max-len``; advantages of both signs."""
    import torch

    from dapo.learner.batch import make_batch

    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for i in range(args.rows):
        if i % args.n == 0:
            prompt = torch.randint(2, args.vocab, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g).tolist()
        length = int(min(args.max_len, max(1, args.median_len * torch.exp(torch.randn(1, generator=g)))))
        prompts.append(prompt)
        responses.append(torch.randint(2, args.vocab, (length,), generator=g).tolist())
    batch = make_batch(prompts, responses, pad_id=0)
    batch.advantages = torch.randn(args.rows, generator=g)
    return batch


def learner_padding(args) -> dict:
    import copy
    from unittest import mock

    import torch

    from dapo.learner import torch_learner
    from dapo.learner.torch_learner import TorchLearner

    torch.set_num_threads(args.threads)
    model = random_qwen2(args.hidden, args.layers, args.vocab).train()
    batch = long_tailed_batch(args)
    positions = {"grouped": 0, "padded": 0}

    def counting(learner, name):
        forward = learner.backend.forward

        def counted(**inputs):
            positions[name] += inputs["input_ids"].numel()
            return forward(**inputs)
        learner.backend.forward = counted
        return learner

    def build(name):
        return counting(TorchLearner(copy.deepcopy(model), lr=1e-5, weight_decay=0.0, warmup_steps=0, grad_clip=1.0,
                                     mini_batch_rows=args.rows, micro_batch_rows=args.micro_rows), name)

    learners = {"grouped": build("grouped"), "padded": build("padded")}
    unpadded = mock.patch.multiple(torch_learner, by_length=lambda rows: (rows, torch.arange(rows.num_rows)))
    untrimmed = mock.patch.object(torch_learner.TrainBatch, "trimmed", lambda self: self)

    def run(name):
        t0 = time.perf_counter()
        if name == "padded":
            with unpadded, untrimmed:
                learners[name].update(batch)
        else:
            learners[name].update(batch)
        return time.perf_counter() - t0

    names = list(learners)
    for name in names:  # warm-up
        run(name)
    times = {name: [] for name in names}
    for rep in range(args.repeats):
        for name in names[rep % 2:] + names[:rep % 2]:
            times[name].append(run(name))
    calls = args.repeats + 1
    real = int(batch.attention_mask.sum())
    result = {
        "rows": args.rows, "micro_rows": args.micro_rows, "padded_width": batch.input_ids.shape[1],
        "real_tokens": real, "seconds": {k: common.median(v) for k, v in times.items()}, "raw_times": times,
        "padding_share": {k: 1 - real * calls / v for k, v in positions.items()},
        "load_avg_after": common.load_average(),
    }
    result["speedup"] = result["seconds"]["padded"] / result["seconds"]["grouped"]
    print(common.format_table(
        ["learner", "update s (median)", "padding share of forward positions"],
        [["rows grouped by length, micro-batches trimmed (today)", result["seconds"]["grouped"],
          result["padding_share"]["grouped"]],
         ["consecutive rows at the batch's widths (before)", result["seconds"]["padded"],
          result["padding_share"]["padded"]]]))
    print(f"update time before / today: {result['speedup']:.2f}x ({args.rows} rows, micro-batches of "
          f"{args.micro_rows}, widest row {batch.input_ids.shape[1]} tokens)")
    return result


def profile_both(run_engine, run_generate, row_limit: int) -> dict[str, str]:
    """torch.profiler tables (self CPU time per op, one call each): where a decode step's time
    goes in our sampling loop versus in model.generate's."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, fn in (("engine", run_engine), ("generate", run_generate)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(7)
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
    return tables


# --------------------------------------------------------------------------- dynamic sampling


def ds_efficiency(rows: list[dict]) -> dict:
    """Groups generated vs used over the steps of a run (step lines of metrics.jsonl)."""
    generated = used = carried_used = dropped = wasted = batches = 0
    for row in rows:
        kept = row.get("train/num_groups_kept", 0) or 0
        same = (row.get("train/groups_all_correct", 0) or 0) + (row.get("train/groups_all_wrong", 0) or 0)
        generated += kept + same
        wasted += same
        used += kept
        carried_used += row.get("train/surplus_used", 0) or 0
        dropped += row.get("train/surplus_dropped", 0) or 0
        batches += row.get("train/num_gen_batches", 0) or 0
    steps = len(rows)
    return {"steps": steps, "gen_batches_per_step": batches / steps if steps else None,
            "groups_generated": generated, "groups_all_same": wasted, "groups_kept": used,
            "surplus_used": carried_used, "surplus_dropped": dropped,
            "efficiency": used / generated if generated else None}


def dynamic_sampling(args) -> dict:
    from side_by_side import base_run_doc, read_metrics

    paths = [Path(p) for p in args.metrics or []]
    if not paths:
        import yaml

        out = args.out.parent / "micro-ds-run"
        out.mkdir(parents=True, exist_ok=True)
        run_file = out / "run-file.yaml"
        run_file.write_text(yaml.safe_dump(base_run_doc(None)))
        cmd = [sys.executable, "-m", "dapo.cli", "run", str(run_file), "--output-dir", str(out / "run"),
               "--set", f"spec.learner.totalSteps={args.steps}", "--set", "spec.eval.everySteps=0",
               "--set", "spec.eval.beforeTrain=false", "--set", "spec.checkpoint.everySteps=0",
               "--set", "spec.algorithm.dynamicSampling.enabled=true"]
        child = common.run_child(cmd, env=common.bench_env(args.threads), log_path=out / "log.txt")
        if child["rc"] != 0:
            raise SystemExit(f"the dynamic-sampling run failed (rc {child['rc']}); see {out / 'log.txt'}")
        paths = [out / "run" / "metrics.jsonl"]
    per_run = {}
    for path in paths:
        steps, _ = read_metrics(path)
        per_run[str(path)] = ds_efficiency(steps)
    print(common.format_table(
        ["run", "steps", "gen batches/step", "groups generated", "all-same (dropped)", "kept", "surplus reused",
         "surplus dropped", "used / generated"],
        [[Path(k).parent.parent.name, v["steps"], v["gen_batches_per_step"], v["groups_generated"], v["groups_all_same"],
          v["groups_kept"], v["surplus_used"], v["surplus_dropped"], v["efficiency"]] for k, v in per_run.items()]))
    return per_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--hidden", type=int, default=256)
    e.add_argument("--layers", type=int, default=5)
    e.add_argument("--vocab", type=int, default=4096)
    e.add_argument("--rows", type=int, default=64)
    e.add_argument("--n", type=int, default=8)
    e.add_argument("--prompt-len", type=int, default=16)
    e.add_argument("--new-tokens", type=int, default=64)
    e.add_argument("--repeats", type=int, default=5)
    e.add_argument("--profile-rows", type=int, default=12, help="rows of the profiler tables (0 = no profiling)")
    lp = sub.add_parser("learner-padding")
    lp.add_argument("--hidden", type=int, default=128)
    lp.add_argument("--layers", type=int, default=2)
    lp.add_argument("--vocab", type=int, default=1024)
    lp.add_argument("--rows", type=int, default=32)
    lp.add_argument("--n", type=int, default=8, help="responses per prompt")
    lp.add_argument("--micro-rows", type=int, default=8)
    lp.add_argument("--median-len", type=float, default=40.0)
    lp.add_argument("--max-len", type=int, default=256)
    lp.add_argument("--repeats", type=int, default=5)
    d = sub.add_parser("dynamic-sampling")
    d.add_argument("--metrics", nargs="*", help="metrics.jsonl files of finished runs (default: run the quickstart)")
    d.add_argument("--steps", type=int, default=8)
    for sp, name in ((e, "engine"), (lp, "learner-padding"), (d, "ds")):
        sp.add_argument("--threads", type=int, default=2)
        sp.add_argument("--out", type=Path, default=Path(f"bench-results/micro-{name}.json"))
    args = p.parse_args(argv)
    run = {"engine": engine_overhead, "learner-padding": learner_padding, "dynamic-sampling": dynamic_sampling}
    result = run[args.what](args)
    common.write_json(args.out, {"machine": common.machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                                 "result": result})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
