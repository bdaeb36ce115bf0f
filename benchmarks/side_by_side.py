"""Our trainer (`dapo run`) side by side with TRL's GRPOTrainer configured as DAPO, on CPU.

Same tiny model, same data, same prompts per step, responses per prompt, max lengths, learning
rate recipe, micro-batch and seed: every shared setting is read from ONE run file (default:
examples/quickstart.yaml, else a built-in equivalent) after the ``--set`` overrides below, and
passed to TRL from there (benchmarks/trl_dapo.py), so the two cannot drift apart.

Each repeat runs every system once in a fresh process, the order alternating between repeats
(a busy machine slows both alike); figures are medians over repeats of per-run medians over
steps (first step dropped), and comparisons are ratios of two runs of the same repeat.
Systems: ``ours`` (full DAPO: dynamic sampling on), ``ours-nods`` (dynamic sampling off: the
same work per step as TRL, i.e. the framework overhead alone), ``ours-async`` (full DAPO with
``maxStaleness: 1`` through ``--launcher processes``: rollout and learner in separate processes,
as in separate pods, each with half of ``--threads`` (at least one) and, unless ``--no-pin``, its
own CPUs (learner on the first half, rollout and reward on the second: ``dapo run --cpus``), so
the two together use as many threads and cores as TRL's one process) and ``trl``.

Measured per run: wall time per training step, generated tokens/s (generation time only),
learner tokens/s (prompt + response tokens of the batch over old-log-prob + update time),
peak RSS of the process (os.wait4), held-out avg@n accuracy against training wall time
(evaluation time excluded on both sides; both evaluate at temperature 1.0, top_p 1.0).

    .venv/bin/python benchmarks/side_by_side.py --repeats 3 --steps 20   # ~10-15 min on 2 idle cores
    .venv/bin/python benchmarks/side_by_side.py --quick                  # 1 repeat, 6 steps: a smoke run

Writes OUT/side_by_side.json, OUT/runs/*, and docs/img/bench-side-by-side-*.png (``--plots``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SYSTEMS = ("ours", "ours-nods", "ours-async", "trl")


def base_run_doc(run_file: Path | None) -> dict:
    """The run file both systems are configured from (the quickstart when it exists)."""
    path = run_file or (common.REPO / "examples/quickstart.yaml")
    if path.is_file():
        return yaml.safe_load(path.read_text())
    train, held_out = common.arith_data_paths()
    return {
        "apiVersion": "dapo.dev/v1alpha1", "kind": "DAPORun", "metadata": {"name": "bench-arith"},
        "spec": {
            "model": {"path": "builtin:arith-tiny"},
            "data": {"train": str(train), "eval": str(held_out), "promptTemplate": "none"},
            "algorithm": {"overlong": {"enabled": True, "bufferLength": 4, "filtering": True},
                          "dynamicSampling": {"enabled": True, "maxGenBatches": 10}},
            "rollout": {"engine": "hf", "n": 8, "maxResponseLength": 16, "maxPromptLength": 32, "genBatchSize": 8},
            "learner": {"strategy": "torch", "trainBatchSize": 8, "miniBatchSize": 8, "microBatchSize": 64,
                        "lr": 1e-3, "warmupSteps": 0, "weightDecay": 0.0, "totalSteps": 20},
        },
    }


def matched_overrides(args, doc: dict) -> list[str]:
    """--set overrides that pin everything the comparison must hold equal. Generation batches
    hold exactly the training batch's prompts (TRL generates one batch of prompts per step), so
    extra generation on our side comes only from dynamic sampling and shows as num_gen_batches.
    The optimizer steps per training step (trainBatchSize / miniBatchSize) are the run file's
    unless --mini-batch overrides them; TRL is given the same count (trl_command)."""
    sets = [
        f"spec.learner.totalSteps={args.steps}", f"spec.learner.seed={args.seed}",
        "spec.learner.strategy=torch", "spec.rollout.engine=hf", "spec.rollout.temperature=1.0", "spec.rollout.topP=1.0",
        f"spec.eval.everySteps={args.eval_every}", "spec.eval.beforeTrain=true", f"spec.eval.n={args.eval_n}",
        "spec.eval.temperature=1.0", "spec.eval.topP=1.0", f"spec.data.evalMaxPrompts={args.eval_prompts}",
        "spec.checkpoint.everySteps=0", "spec.algorithm.epsLow=0.2", "spec.algorithm.epsHigh=0.28",
        "spec.algorithm.lossAggMode=token-mean", "spec.algorithm.overlong.filtering=true",
    ]
    prompts = args.prompts_per_step or doc.get("spec", {}).get("learner", {}).get("trainBatchSize", 512)
    mini = args.mini_batch or min(prompts, doc.get("spec", {}).get("learner", {}).get("miniBatchSize", prompts))
    sets += [f"spec.learner.trainBatchSize={prompts}", f"spec.learner.miniBatchSize={mini}",
             f"spec.rollout.genBatchSize={prompts}"]
    if args.n:
        sets.append(f"spec.rollout.n={args.n}")
    return sets + list(args.set or [])


def resolved_spec(doc: dict, overrides: list[str]):
    """The validated spec after overrides (the same validation `dapo run` applies)."""
    from dapo.spec import apply_overrides, parse_run

    return parse_run(apply_overrides(doc, overrides)).spec


def trl_command(spec, args, seed: int, out: Path) -> list[str]:
    """benchmarks/trl_dapo.py with every shared setting taken from the resolved spec."""
    ls, ro, al = spec.learner, spec.rollout, spec.algorithm
    if ls.train_batch_size % ls.mini_batch_size or ls.ppo_epochs != 1:
        raise SystemExit("side_by_side: TRL gets trainBatchSize / miniBatchSize optimizer steps per generation "
                         "and one epoch; make spec.learner.miniBatchSize divide trainBatchSize and set ppoEpochs 1")
    cmd = [sys.executable, str(common.REPO / "benchmarks/trl_dapo.py"),
           "--model", spec.model.path, "--train", spec.data.train, "--eval", spec.data.eval or spec.data.train,
           "--prompt-template", spec.data.prompt_template, "--max-prompt-length", str(ro.max_prompt_length),
           "--prompts-per-step", str(ls.train_batch_size),
           "--optimizer-steps-per-step", str(ls.train_batch_size // ls.mini_batch_size),
           "--n", str(ro.n), "--max-response-length", str(ro.max_response_length),
           "--overlong-buffer", str(al.overlong.buffer_length if al.overlong.enabled else 0),
           "--micro-batch", str(ls.micro_batch_size), "--lr", str(ls.lr), "--warmup-steps", str(ls.warmup_steps),
           "--weight-decay", str(ls.weight_decay), "--grad-clip", str(ls.grad_clip), "--eps-low", str(al.eps_low),
           "--eps-high", str(al.eps_high), "--steps", str(args.steps), "--eval-every", str(spec.eval.every_steps),
           "--eval-prompts", str(spec.data.eval_max_prompts or 10**9), "--eval-n", str(spec.eval.n),
           "--seed", str(seed), "--threads", str(args.threads), "--out", str(out)]
    if spec.model.gguf_file:
        cmd += ["--gguf-file", spec.model.gguf_file]
    if spec.model.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    return cmd


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(step lines, eval lines) of a metrics.jsonl."""
    steps, evals = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "val/acc/mean" in row:
            evals.append(row)
        elif "timing_s/step" in row:
            steps.append(row)
    return steps, evals


def summarize_ours(metrics_path: Path, peak_rss_mib: float) -> dict:
    """Our run's numbers in the same shape as trl_dapo.summarize (training wall time = sum of
    timing_s/step, which excludes evaluation)."""
    steps, evals = read_metrics(metrics_path)
    wall, per_step = 0.0, []
    wall_at_step = {0: 0.0}
    for row in steps:
        wall += row["timing_s/step"]
        wall_at_step[row["step"]] = wall
        learner_s = row.get("timing_s/old_log_prob", 0.0) + row.get("timing_s/update_actor", 0.0)
        tokens = row.get("perf/throughput", 0.0) * row["timing_s/step"]
        per_step.append({"step_s": row["timing_s/step"], "gen_s": row.get("timing_s/gen"),
                         "gen_tokens_per_s": row.get("perf/gen_tokens_per_s"),
                         "learner_tokens_per_s": tokens / learner_s if learner_s else None,
                         "num_gen_batches": row.get("train/num_gen_batches"), "train_acc": row.get("train/acc/mean")})
    timed = per_step[1:] if len(per_step) > 2 else per_step
    curve = [(wall_at_step.get(e["step"], wall), e["val/acc/mean"]) for e in evals]
    return {
        "median_step_s": common.median(s["step_s"] for s in timed),
        "min_step_s": min((s["step_s"] for s in timed), default=None),
        "median_gen_s": common.median(s["gen_s"] for s in timed),
        "median_gen_tokens_per_s": common.median(s["gen_tokens_per_s"] for s in timed),
        "median_learner_tokens_per_s": common.median(s["learner_tokens_per_s"] for s in timed),
        "median_num_gen_batches": common.median(s["num_gen_batches"] for s in timed),
        "peak_rss_mib": peak_rss_mib, "train_wall_s": wall, "steps": len(steps),
        "val_acc_first": curve[0][1] if curve else None, "val_acc_last": curve[-1][1] if curve else None,
        "acc_curve": curve,
    }


def failed_run(system: str, repeat: int, child: dict) -> dict:
    """A failed run stays in the results (with the end of its log) instead of hiding."""
    tail = Path(child["log"]).read_text().strip().splitlines()[-3:] if child["log"] else []
    common.progress(f"{system} repeat {repeat} FAILED (rc {child['rc']}): {' | '.join(tail)[-600:]}")
    return {"failed": True, "rc": child["rc"], "log": child["log"], "log_tail": tail}


def run_system(system: str, spec_doc: dict, overrides: list[str], spec, args, repeat: int, out_dir: Path) -> dict:
    seed = args.seed + repeat
    run_dir = out_dir / "runs" / f"{system}-r{repeat}"
    # every invocation measures from scratch: a run folder left by an earlier one would make
    # `dapo run` refuse (committed checkpoints) or mix two runs' metrics
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    # ours-async runs two busy processes (rollout, learner): each gets half the threads
    env = common.bench_env(max(1, args.threads // 2) if system == "ours-async" else args.threads)
    load_before = common.load_average()
    if system == "trl":
        result_path = run_dir / "trl.json"
        child = common.run_child(trl_command(spec, args, seed, result_path), env=env, log_path=run_dir / "log.txt")
        if child["rc"] != 0:
            return failed_run(system, repeat, child)
        summary = json.loads(result_path.read_text())["summary"]
        summary["peak_rss_mib"] = child["peak_rss_mib"]
    else:
        run_file = run_dir / "run-file.yaml"
        run_file.write_text(yaml.safe_dump(spec_doc))
        extra = [f"spec.learner.seed={seed}"]
        if system == "ours-nods":
            extra.append("spec.algorithm.dynamicSampling.enabled=false")
        cmd = [sys.executable, "-m", "dapo.cli", "run", str(run_file), "--output-dir", str(run_dir / "run")]
        if system == "ours-async":
            extra.append("spec.rollout.maxStaleness=1")
            cmd += ["--launcher", "processes"] + args.cpu_options
        for item in overrides + extra:
            cmd += ["--set", item]
        child = common.run_child(cmd, env=env, log_path=run_dir / "log.txt")
        if child["rc"] != 0:
            return failed_run(system, repeat, child)
        summary = summarize_ours(run_dir / "run" / "metrics.jsonl", child["peak_rss_mib"])
    summary["process_wall_s"] = child["wall_s"]
    # `uptime` load before and after: the machine is shared, so every run says how busy it was
    summary["load_avg_before"], summary["load_avg_after"] = load_before, common.load_average()
    common.progress(f"{system} repeat {repeat}: step {summary['median_step_s']:.3f}s, "
                    f"acc {summary['val_acc_first']} -> {summary['val_acc_last']} ({child['wall_s']:.0f}s)")
    return summary


def compare(runs: dict[str, list[dict]], base: str = "trl") -> dict:
    """Per-repeat ratios against TRL, then medians and ranges over repeats."""
    out = {}
    for system, results in runs.items():
        if not all(not r.get("failed") for r in results) or not results:
            out[system] = {"failed_repeats": [i for i, r in enumerate(results) if r.get("failed")]}
        ok = [i for i, r in enumerate(results) if not r.get("failed") and not runs[base][i].get("failed")]
        results = [results[i] for i in ok]
        if not results:
            continue
        agg = {key: common.median(r[key] for r in results) for key in
               ("median_step_s", "min_step_s", "median_gen_tokens_per_s", "median_learner_tokens_per_s", "peak_rss_mib",
                "val_acc_last", "train_wall_s")}
        if system != base:
            ratios, acc_gaps = [], []
            for mine, theirs in zip(results, [runs[base][i] for i in ok]):
                ratios.append(common.ratio(mine["median_step_s"], theirs["median_step_s"]))
                horizon = min(mine["train_wall_s"], theirs["train_wall_s"])
                a, b = common.acc_at_time(mine["acc_curve"], horizon), common.acc_at_time(theirs["acc_curve"], horizon)
                acc_gaps.append({"horizon_s": horizon, "acc": a, "trl_acc": b})
            agg["step_time_ratio_vs_trl"] = common.median(ratios)
            agg["step_time_ratio_range"] = common.spread(ratios)
            # the fastest step of each run: on a shared machine the least disturbed estimate
            agg["min_step_time_ratio_vs_trl"] = common.median(
                common.ratio(m["min_step_s"], t["min_step_s"]) for m, t in zip(results, [runs[base][i] for i in ok]))
            agg["acc_at_equal_wall"] = common.median(g["acc"] for g in acc_gaps)
            agg["trl_acc_at_equal_wall"] = common.median(g["trl_acc"] for g in acc_gaps)
            agg["equal_wall_detail"] = acc_gaps
        out.setdefault(system, {}).update(agg)
    return out


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    colours = {"ours": "tab:blue", "ours-nods": "tab:cyan", "trl": "tab:orange"}
    for system, results in runs.items():
        for i, r in enumerate(results):
            if r.get("acc_curve"):
                t, acc = zip(*r["acc_curve"])
                ax.plot(t, acc, marker="o", ms=3, color=colours.get(system), alpha=0.8, label=system if i == 0 else None)
    ax.set_xlabel("training wall time, s (evaluation excluded)")
    ax.set_ylabel("held-out accuracy (avg@n, T=1)")
    ax.set_title("accuracy vs wall time: ours vs TRL GRPOTrainer (DAPO)")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-file", type=Path, default=None)
    p.add_argument("--set", action="append", help="extra PATH=VALUE override applied to both systems' settings")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-step", type=int, default=None)
    p.add_argument("--mini-batch", type=int, default=None,
                   help="prompts per optimizer step (default: the run file's miniBatchSize)")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-n", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="ours-async: learner and rollout (with reward) on disjoint CPUs, half of --threads each "
                        "(dapo run --cpus), as separate pods")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--quick", action="store_true", help="1 repeat, 6 steps (smoke run)")
    p.add_argument("--out-dir", type=Path, default=Path("bench-results/side_by_side"))
    p.add_argument("--plots", type=str, default=str(common.REPO / "docs/img"), help="folder for PNGs ('' = none)")
    args = p.parse_args(argv)
    # ours-async's CPU split, resolved before any run so a machine too small fails at once
    args.cpu_options = common.pod_cpus(max(1, args.threads // 2)) if args.pin else []
    if args.quick:
        args.repeats, args.steps, args.eval_every = 1, 6, 3
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; choose from {SYSTEMS}")

    machine = common.machine_info()
    doc = base_run_doc(args.run_file)
    overrides = matched_overrides(args, doc)
    spec = resolved_spec(doc, overrides)
    common.progress(f"settings: {spec.learner.train_batch_size} prompts x {spec.rollout.n} responses per step, "
                    f"{spec.learner.train_batch_size // spec.learner.mini_batch_size} optimizer steps per step, "
                    f"max response {spec.rollout.max_response_length}, lr {spec.learner.lr}, {args.steps} steps, "
                    f"{args.repeats} repeats, systems {systems}")
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for repeat in range(args.repeats):
        order = systems if repeat % 2 == 0 else list(reversed(systems))
        for system in order:
            runs[system].append(run_system(system, doc, overrides, spec, args, repeat, args.out_dir))
    comparison = compare(runs) if "trl" in runs else {}
    machine["load_avg_at_end"] = common.load_average()
    payload = {"machine": machine, "settings": spec.model_dump(mode="json", by_alias=True),
               "overrides": overrides, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
               "comparison": comparison}
    common.write_json(args.out_dir / "side_by_side.json", payload)
    rows = []
    for system, agg in comparison.items():
        if "median_step_s" not in agg:
            rows.append([system, "FAILED"] + ["-"] * 8)
            continue
        rows.append([system, agg["median_step_s"], agg.get("step_time_ratio_vs_trl", 1.0),
                     agg.get("min_step_time_ratio_vs_trl", 1.0),
                     agg["median_gen_tokens_per_s"], agg["median_learner_tokens_per_s"], agg["peak_rss_mib"],
                     agg.get("acc_at_equal_wall", "-"), agg.get("trl_acc_at_equal_wall", "-"), agg["val_acc_last"]])
    print(common.format_table(["system", "step s", "step / TRL", "fastest step / TRL's", "gen tok/s", "learner tok/s", "peak RSS MiB",
                               "acc @ equal wall", "TRL acc @ same wall", "final acc"], rows))
    if args.plots:  # '' = no plots (a Path('') would mean the current folder)
        plot(runs, Path(args.plots) / "bench-side-by-side-acc.png")
    print(f"wrote {args.out_dir / 'side_by_side.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
