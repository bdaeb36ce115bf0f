"""The device check of the GPU path: one command, no network, under 8 minutes on one H100.

    python benchmarks/gpu_check.py                      # on a CUDA machine (Qwen2.5-0.5B's shape, bf16)
    python benchmarks/gpu_check.py --device cpu         # the same sections on CPU, small sizes (CI)

Sections (each PASS, FAIL with the reason, or SKIP with the reason; exit 1 when any FAILs):

1. ``train``: DAPO steps (default 20) of the HF engine + torch learner through the project's own
   wiring (``dapo.entry.inprocess.build_embedded_run`` -> ``dapo.wiring`` -> ``Trainer.train_step``;
   the run file's reward scorer math_dapo in its worker pool) on a randomly initialised model of
   Qwen2.5-0.5B's shape (transformers' Qwen2Config; 24 layers, hidden 896, vocab 151936, tied
   embedding) with the built-in character tokenizer (``dapo.model.builtin.build_tokenizer``),
   written to a local folder and loaded from it as ``spec.model.path``; bf16 on a GPU. Prints
   generation tokens/s (response tokens / generation seconds), learner tokens/s (prompt + response
   tokens / update seconds) and the learner's model-FLOPs utilisation against the card's dense
   bf16 peak (`BF16_PEAK_TFLOPS`; an unknown card is named and gets no MFU). Model FLOPs per
   trained token: PaLM's 6 N + 12 L d T (Chowdhery et al. 2022, appendix B; N the matmul
   parameters, lm_head included, T the mean sequence length), over the update phase only
   (``timing_s/update_actor``; the proximal log-prob pass is timed apart). The first steps are
   warm-up and left out of the figures (``--warmup``).
2. ``published``: the async pipeline's published weight copies (``RolloutPipeline.publish``, with
   the trained learner's parameters) are in pinned host memory and allocate nothing on the GPU.
3. ``weight-sync``: a round trip of the model's tensors between this process (``WeightSender``,
   rank 0) and a spawned one (``WeightReceiver``, rank 1) over gloo with CUDA tensors on both
   sides (NCCL needs two GPUs: gloo stages each bucket through host memory), against a
   device-to-device copy of the same bytes (on CPU: a memcpy); then one verified sync
   (``verify_checksums``): the receiver's streamed checksum equals the sender's state checksum
   and it holds at most two buckets (plus the tensors larger than a bucket) of buffers.
4. ``deepspeed``: two DAPO steps with the DeepSpeed ZeRO-2 learner (``DistributedLearner``,
   strategy deepspeed-zero2) on one rank in a spawned process, if deepspeed imports (SKIP with
   the reason otherwise, e.g. no wheel on the device).

What the device needs: torch, transformers, safetensors (there) and dapo's own pure-Python imports
(pydantic, pyyaml, tqdm, dill, ...): the ``imports`` line at the start names any that are missing,
so they can travel as wheels. Raw figures: ``--out FILE`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

#: dense bf16 peak (no sparsity) in TFLOPS from NVIDIA's datasheets, by a part of the name
#: torch.cuda.get_device_name gives; the first match wins, so the specific names come first
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.4),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),  # H200 SXM, GH200
    ("A100", 312.0),
]

#: model shapes: Qwen2.5-0.5B's (GPU) and a small one (CPU in CI); and the run sizes for each
PRESETS = {
    "qwen2.5-0.5b": dict(vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                         rope_theta=1e6, gen_batch=32, n=8, response=256, micro=16, bucket_mib=256),
    "small": dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                  rope_theta=1e4, gen_batch=4, n=4, response=16, micro=16, bucket_mib=1 / 16),
}

#: the project's modules the sections run (imported first, so a missing dependency is named at once)
CHECKED_MODULES = ("dapo.entry.inprocess", "dapo.controller.trainer", "dapo.controller.pipeline", "dapo.rollout.hf",
                   "dapo.learner.torch_learner", "dapo.learner.distributed", "dapo.weightsync", "dapo.reward.pool",
                   "dapo.reward.math_dapo", "dapo.model.builtin", "dapo.spec", "common")


def peak_tflops(device_name: str) -> float | None:
    for part, tflops in BF16_PEAK_TFLOPS:
        if part in device_name:
            return tflops
    return None


def _reap(child) -> None:
    """Wait a minute for a section's child process to end, then kill it."""
    child.join(60)
    if child.is_alive():
        child.kill()


def _raise_child_error(answer: dict, who: str) -> None:
    """A child's answer carrying its traceback ends the section with it."""
    if "error" in answer:
        raise RuntimeError(f"{who} failed:\n{answer['error']}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the model folder


def write_model(folder: Path, shape: dict, device: str) -> dict:
    """A randomly initialised Qwen2ForCausalLM of ``shape`` and the built-in tokenizer, saved as a
    Hugging Face folder (bf16 on CUDA, float32 on CPU); returns its FLOP-relevant sizes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dapo.model.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"], max_position_embeddings=32768, rope_theta=shape["rope_theta"],
        rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds instead of a minute on CPU
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    # matmul weights: every 2-D parameter but the embedding lookup, plus the tied lm_head's matmul
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    matmul += shape["vocab"] * shape["hidden"]
    del model
    return {"parameters": params, "matmul_parameters": matmul}


def run_document(folder: Path, train: Path, preset: dict, steps: int, device: str, strategy: str) -> dict:
    return {
        "apiVersion": "dapo.dev/v1alpha1", "kind": "DAPORun", "metadata": {"name": "gpu-check"},
        "spec": {
            "model": {"path": str(folder), "dtype": "bfloat16" if device == "cuda" else "float32"},
            "data": {"train": str(train), "promptTemplate": "none"},
            # a random model answers nothing right: every group has one score, which dynamic
            # sampling would drop; off, the steps train full batches (advantages 0, same FLOPs)
            "algorithm": {"dynamicSampling": {"enabled": False},
                          "overlong": {"enabled": True, "bufferLength": max(1, preset["response"] // 4)}},
            "rollout": {"engine": "hf", "n": preset["n"], "temperature": 1.0, "maxPromptLength": 16,
                        "maxResponseLength": preset["response"], "genBatchSize": preset["gen_batch"]},
            "learner": {"strategy": strategy, "trainBatchSize": preset["gen_batch"],
                        "miniBatchSize": preset["gen_batch"], "microBatchSize": preset["micro"], "lr": 1e-6,
                        "warmupSteps": 0, "weightDecay": 0.0, "totalSteps": steps, "seed": 0},
            "reward": {"scorer": "math_dapo", "workers": 1, "timeoutSeconds": 5},
            "eval": {"everySteps": 0, "beforeTrain": False},
            "checkpoint": {"everySteps": 0},
        },
    }


def build_run(folder: Path, train: Path, preset: dict, steps: int, device: str, run_dir: Path, *,
              strategy: str = "torch", learner_factory=None):
    from dapo.entry.inprocess import build_embedded_run
    from dapo.spec import parse_run

    run = parse_run(run_document(folder, train, preset, steps, device, strategy))
    return build_embedded_run(run, run_dir, resume=False, learner_factory=learner_factory)


def step_figures(records: list[dict], sizes: dict, layers: int, hidden: int) -> dict:
    """Throughput and model FLOPs of the timed steps' metrics (dapo.controller.trainer)."""
    gen_tokens = sum(r["perf/gen_tokens_per_s"] * r["timing_s/gen"] for r in records)
    gen_s = sum(r["timing_s/gen"] for r in records)
    trained = [r["perf/throughput"] * r["timing_s/step"] for r in records]  # prompt + response tokens
    update_s = sum(r["timing_s/update_actor"] for r in records)
    seq = statistics.mean(r["prompt_length/mean"] + r["response_length/mean"] for r in records)
    flops_per_token = 6 * sizes["matmul_parameters"] + 12 * layers * hidden * seq
    return {
        "steps_timed": len(records),
        "generation_tokens_per_s": gen_tokens / gen_s,
        "learner_tokens_per_s": sum(trained) / update_s,
        "learner_flops_per_s": flops_per_token * sum(trained) / update_s,
        "mean_sequence_tokens": seq,
        "step_s_median": statistics.median(r["timing_s/step"] for r in records),
        "gen_s_median": statistics.median(r["timing_s/gen"] for r in records),
        "update_s_median": statistics.median(r["timing_s/update_actor"] for r in records),
        "old_log_prob_s_median": statistics.median(r["timing_s/old_log_prob"] for r in records),
        "pg_loss_finite": all(r["actor/pg_loss"] == r["actor/pg_loss"] for r in records),
    }


# --------------------------------------------------------------------------- sections


def section_train(ctx) -> dict:
    import torch

    embedded = build_run(ctx.folder, ctx.train, ctx.preset, ctx.steps, ctx.device, ctx.work / "run")
    trainer = embedded.trainer
    try:
        if ctx.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        records = []
        for _ in range(ctx.steps):
            records.append(trainer.train_step())
        figures = step_figures(records[ctx.warmup:], ctx.sizes, ctx.preset["layers"], ctx.preset["hidden"])
        figures.update(ctx.sizes, steps=len(records), warmup_steps=ctx.warmup,
                       weight_version=trainer.weight_version, learner=type(trainer.learner).__name__,
                       engine=type(trainer.engine).__name__)
        if ctx.device == "cuda":
            figures["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / (1 << 30)
        if ctx.peak_tflops:
            figures["mfu"] = figures["learner_flops_per_s"] / (ctx.peak_tflops * 1e12)
        problems = []
        if trainer.weight_version != ctx.steps:
            problems.append(f"weight version {trainer.weight_version} after {ctx.steps} steps")
        if not figures["pg_loss_finite"]:
            problems.append("a step's actor/pg_loss is NaN")
        ctx.learner_params = [(n, t) for n, t in trainer.learner.named_parameters_for_sync()]
        figures["problems"] = problems
        return figures
    finally:
        embedded.close()


def section_published(ctx) -> dict:
    """RolloutPipeline.publish of the trained learner's parameters: host copies, nothing on the GPU."""
    import torch

    from dapo.controller.pipeline import RolloutPipeline

    params = getattr(ctx, "learner_params", None)
    if not params:
        raise RuntimeError("no trained parameters (the train section failed)")
    release = threading.Event()

    def collect(step, version):  # holds the generator in step 0's collection while the learner publishes
        release.wait(60)
        return SimpleNamespace(rollout_idle_seconds=0.0)

    pipeline = RolloutPipeline(engine=SimpleNamespace(weight_version=0), collect=collect, max_staleness=1,
                               start_step=0, start_version=0, total_steps=3)
    try:
        synchronize(ctx.device)
        before = torch.cuda.memory_allocated() if ctx.device == "cuda" else 0
        t0 = time.perf_counter()
        pipeline.publish(1, lambda: iter(params))
        seconds = time.perf_counter() - t0
        after = torch.cuda.memory_allocated() if ctx.device == "cuda" else 0
        copies = pipeline.pending[1]
    finally:
        release.set()
        pipeline.close()
    nbytes = sum(t.numel() * t.element_size() for _, t in copies)
    devices = sorted({t.device.type for _, t in copies})
    pinned = all(t.is_pinned() for _, t in copies) if ctx.device == "cuda" else None
    problems = []
    if devices != ["cpu"]:
        problems.append(f"published copies on {devices}, not host memory")
    if ctx.device == "cuda" and not pinned:
        problems.append("published copies are not pinned")
    if after - before > 0:
        problems.append(f"publishing allocated {after - before} bytes on the GPU")
    return {"bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9, "devices": devices,
            "pinned": pinned, "gpu_bytes_allocated_by_publish": after - before, "problems": problems}


def _receiver_main(port: int, bucket_bytes: int, verify: bool, shapes: list, dtype_name: str, device: str,
                   syncs: int, answers) -> None:
    """Rank 1 of the weight-sync round trip (a spawned process): receive ``syncs`` versions into
    tensors on ``device``, then report their checksum, the streamed checksum and the buffers held."""
    try:
        import torch

        sys.path.insert(0, str(REPO / "runtime"))
        from dapo.weightsync import WeightReceiver, WeightSyncConfig, state_checksum

        dtype = getattr(torch, dtype_name)
        targets = {name: torch.empty(shape, dtype=dtype, device=device) for name, shape in shapes}

        def load(batch):
            for name, tensor in batch:
                targets[name].copy_(tensor)

        receiver = WeightReceiver(WeightSyncConfig("127.0.0.1", port, world_size=2, rank=1, backend="gloo",
                                                   bucket_bytes=bucket_bytes, timeout_s=120.0,
                                                   verify_checksums=verify))
        for _ in range(syncs):
            receiver.receive(load)
        synchronize(device)
        answers.put({"loaded": state_checksum(targets), "streamed": receiver.checksum,
                     "retained_bytes": receiver.retained_bytes})
        receiver.close()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the section
        answers.put({"error": traceback.format_exc()})


def _sync_round(tensors: list, bucket_bytes: int, verify: bool, device: str, syncs: int) -> tuple[list, dict]:
    """Send ``tensors`` ``syncs`` times to a spawned receiver; returns (SyncStats per sync, its answer)."""
    import multiprocessing

    from dapo.weightsync import WeightSender, WeightSyncConfig

    spawn = multiprocessing.get_context("spawn")
    answers = spawn.Queue()
    port = free_port()
    shapes = [(name, tuple(t.shape)) for name, t in tensors]
    dtype_name = str(tensors[0][1].dtype).removeprefix("torch.")
    child = spawn.Process(target=_receiver_main, args=(port, bucket_bytes, verify, shapes, dtype_name, device,
                                                       syncs, answers), daemon=True)
    child.start()
    stats = []
    try:
        sender = WeightSender(WeightSyncConfig("127.0.0.1", port, world_size=2, rank=0, backend="gloo",
                                               bucket_bytes=bucket_bytes, timeout_s=120.0, verify_checksums=verify))
        try:
            for version in range(1, syncs + 1):
                stats.append(sender.send(iter(tensors), version))
            answer = answers.get(timeout=300)
        finally:
            sender.close()
    finally:
        _reap(child)
    _raise_child_error(answer, "the receiver process")
    return stats, answer


def section_weight_sync(ctx) -> dict:
    import torch

    from dapo.weightsync import state_checksum

    tensors = [(n, t.detach().contiguous()) for n, t in (getattr(ctx, "learner_params", None) or [])]
    if not tensors:
        raise RuntimeError("no trained parameters (the train section failed)")
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    bucket = max(64, int(ctx.preset["bucket_mib"] * (1 << 20)))
    want = state_checksum(tensors)

    stats, answer = _sync_round(tensors, bucket, False, ctx.device, 1 + ctx.sync_trials)
    sync_s = statistics.median(s.seconds for s in stats[1:])  # the first sync allocates the buffers
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    copies = []
    for _ in range(1 + ctx.sync_trials):
        synchronize(ctx.device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(ctx.device)
        copies.append(time.perf_counter() - t0)
    copy_s = statistics.median(copies[1:])
    del src, dst
    problems = []
    if answer["loaded"] != want:
        problems.append("the receiver's tensors differ from the sender's")

    _, verified = _sync_round(tensors, bucket, True, ctx.device, 1)
    oversized = sum(t.numel() * t.element_size() for _, t in tensors if t.numel() * t.element_size() > bucket)
    bound = 2 * bucket + oversized
    if verified["streamed"] != want or verified["loaded"] != want:
        problems.append("the verified sync's streamed checksum differs from the sender's state checksum")
    if verified["retained_bytes"] > bound:
        problems.append(f"the verifying receiver holds {verified['retained_bytes']} bytes of buffers "
                        f"(bound: 2 buckets + tensors larger than a bucket = {bound})")
    return {"transport": "gloo, CUDA tensors on both sides (buckets staged through host memory)"
            if ctx.device == "cuda" else "gloo, CPU tensors",
            "bytes": nbytes, "bucket_bytes": bucket, "tensors": len(tensors), "syncs_timed": len(stats) - 1,
            "sync_s_median": sync_s, "sync_gb_per_s": nbytes / sync_s / 1e9,
            "copy_kind": "device-to-device copy" if ctx.device == "cuda" else "memcpy (CPU tensor copy)",
            "copy_s_median": copy_s, "copy_gb_per_s": nbytes / copy_s / 1e9,
            "sync_vs_copy": copy_s / sync_s, "verified_retained_bytes": verified["retained_bytes"],
            "verified_retained_bound": bound, "problems": problems}


def _deepspeed_main(folder: str, train: str, preset: dict, steps: int, device: str, work: str, answers) -> None:
    """Two DAPO steps with the ZeRO-2 learner on one rank (a spawned process: its own default
    process group and DeepSpeed state)."""
    try:
        sys.path.insert(0, str(REPO / "runtime"))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        from dapo.learner.distributed import DistributedLearner

        embedded = build_run(Path(folder), Path(train), preset, steps, device, Path(work) / "ds-run",
                             strategy="deepspeed-zero2",
                             learner_factory=lambda model, spec, dev: DistributedLearner.from_spec(model, spec,
                                                                                                   device=dev))
        trainer = embedded.trainer
        try:
            records = [trainer.train_step() for _ in range(steps)]
            backend = type(trainer.learner.backend).__name__
            strategy = trainer.learner.strategy
        finally:
            trainer.learner.shutdown()
            embedded.close()
        last = records[-1]
        tokens = last["perf/throughput"] * last["timing_s/step"]
        answers.put({"steps": len(records), "backend": backend, "strategy": strategy,
                     "weight_version": trainer.weight_version,
                     "learner_tokens_per_s_last_step": tokens / last["timing_s/update_actor"],
                     "pg_loss_finite": all(r["actor/pg_loss"] == r["actor/pg_loss"] for r in records)})
    except BaseException:  # noqa: BLE001 - reported to the parent
        answers.put({"error": traceback.format_exc()})


def section_deepspeed(ctx) -> dict:
    import multiprocessing

    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - not installed, or a broken install: say which
        return {"skip": f"deepspeed does not import here ({type(exc).__name__}: {exc}); "
                        "bring its wheel to run this section"}
    if ctx.device == "cpu":
        from dapo.learner.deepspeed_backend import deepspeed_cpu_usable

        if not deepspeed_cpu_usable():
            return {"skip": "DeepSpeed imports but does not pick its CPU accelerator on this machine"}
    spawn = multiprocessing.get_context("spawn")
    answers = spawn.Queue()
    child = spawn.Process(target=_deepspeed_main, args=(str(ctx.folder), str(ctx.train), ctx.preset, 2, ctx.device,
                                                        str(ctx.work), answers))  # not daemonic: the reward pool starts processes
    child.start()
    try:
        answer = answers.get(timeout=ctx.deepspeed_timeout_s)
    finally:
        _reap(child)
    _raise_child_error(answer, "the DeepSpeed learner process")
    problems = []
    if answer["backend"] != "DeepSpeedBackend" or answer["strategy"] != "deepspeed-zero2":
        problems.append(f"trained with {answer['backend']} ({answer['strategy']}), not DeepSpeed ZeRO-2")
    if answer["weight_version"] != answer["steps"] or not answer["pg_loss_finite"]:
        problems.append(f"after {answer['steps']} steps: weight version {answer['weight_version']}, "
                        f"finite losses {answer['pg_loss_finite']}")
    answer["problems"] = problems
    return answer


SECTIONS = [("train", section_train), ("published", section_published), ("weight-sync", section_weight_sync),
            ("deepspeed", section_deepspeed)]


# --------------------------------------------------------------------------- report


def outcome(result: dict) -> str:
    if "error" in result:
        return "FAIL"
    if "skip" in result:
        return "SKIP"
    return "FAIL" if result.get("problems") else "PASS"


def summary_lines(results: dict) -> list[str]:
    lines = []
    for name, result in results.items():
        state = outcome(result)
        why = result.get("error", "").strip().splitlines()[-1:] or result.get("problems") or [result.get("skip", "")]
        lines.append(f"  {name:<12} {state}" + (f": {'; '.join(why)}" if state != "PASS" else ""))
    return lines


def exit_code(results: dict) -> int:
    """1 when any section failed (a skipped one is no failure), else 0."""
    return 1 if any(outcome(r) == "FAIL" for r in results.values()) else 0


def print_figures(name: str, result: dict, ctx) -> None:
    if outcome(result) == "FAIL" and "error" in result:
        print(f"[{name}] FAIL\n{result['error']}", flush=True)
        return
    if "skip" in result:
        print(f"[{name}] SKIP: {result['skip']}", flush=True)
        return
    if name == "train":
        mfu = (f"{100 * result['mfu']:.1f} % of {ctx.peak_tflops:g} TFLOPS dense bf16 ({ctx.device_name})"
               if "mfu" in result else f"n/a: no bf16 peak known for {ctx.device_name}")
        print(f"[train] {result['steps']} steps ({result['warmup_steps']} warm-up), {result['engine']} + "
              f"{result['learner']}, {result['parameters'] / 1e6:.1f}M parameters\n"
              f"  generation tokens/s  {result['generation_tokens_per_s']:.1f}\n"
              f"  learner tokens/s     {result['learner_tokens_per_s']:.1f}\n"
              f"  learner TFLOPS       {result['learner_flops_per_s'] / 1e12:.3f}\n"
              f"  MFU                  {mfu}\n"
              f"  step s (median)      {result['step_s_median']:.3f} (gen {result['gen_s_median']:.3f}, update "
              f"{result['update_s_median']:.3f}, old log-prob {result['old_log_prob_s_median']:.3f})"
              + (f"\n  peak GPU memory GiB  {result['peak_gpu_memory_gib']:.2f}" if "peak_gpu_memory_gib" in result
                 else ""), flush=True)
    elif name == "published":
        print(f"[published] {result['bytes'] / 1e6:.1f} MB on {result['devices']} (pinned: {result['pinned']}), "
              f"{result['gb_per_s']:.2f} GB/s, GPU bytes allocated by publish: "
              f"{result['gpu_bytes_allocated_by_publish']}", flush=True)
    elif name == "weight-sync":
        print(f"[weight-sync] {result['transport']}: {result['bytes'] / 1e6:.1f} MB in {result['tensors']} tensors, "
              f"bucket {result['bucket_bytes'] / (1 << 20):g} MiB\n"
              f"  sync GB/s            {result['sync_gb_per_s']:.3f} (median of {result['syncs_timed']})\n"
              f"  {result['copy_kind']} GB/s {result['copy_gb_per_s']:.3f}\n"
              f"  sync / copy          {result['sync_vs_copy']:.4f}\n"
              f"  verified sync: receiver holds {result['verified_retained_bytes']} bytes of buffers "
              f"(bound {result['verified_retained_bound']})", flush=True)
    elif name == "deepspeed":
        print(f"[deepspeed] {result['steps']} steps with {result['backend']} ({result['strategy']}) on one rank, "
              f"learner tokens/s (last step) {result['learner_tokens_per_s_last_step']:.1f}", flush=True)
    for problem in result.get("problems", []):
        print(f"  PROBLEM: {problem}", flush=True)


def missing_modules() -> list[str]:
    """Top-level packages that `CHECKED_MODULES` need and this Python lacks (the first one each
    module stops at: bring it and run again)."""
    import importlib

    missing = set()
    for name in CHECKED_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing.add((exc.name or str(exc)).split(".")[0])
    return sorted(missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model shape and run sizes (default: qwen2.5-0.5b on cuda, small on cpu)")
    parser.add_argument("--steps", type=int, default=20, help="DAPO steps of the train section (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures (default 2)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    parser.add_argument("--response", type=int, default=None, help="override the preset's maxResponseLength")
    parser.add_argument("--sync-trials", type=int, default=3, help="timed weight syncs (default 3)")
    parser.add_argument("--deepspeed-timeout", type=float, default=300.0, help="seconds for the DeepSpeed section")
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    args = parser.parse_args(argv)

    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is built here: never reach for the Hub (children inherit it)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the wiring picks cuda whenever one is visible
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here", file=sys.stderr)
        return 2
    if args.steps <= args.warmup:
        print(f"--steps {args.steps} must exceed --warmup {args.warmup}", file=sys.stderr)
        return 2
    preset = dict(PRESETS[args.preset or ("qwen2.5-0.5b" if device == "cuda" else "small")])
    if args.layers is not None:
        preset["layers"] = args.layers
    if args.response is not None:
        preset["response"] = args.response
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"gpu_check: device {device_name}, torch {torch.__version__}, preset {args.preset or 'default'} "
          f"{preset}", flush=True)
    missing = missing_modules()
    print(f"[imports] {'missing: ' + ', '.join(missing) + ' (bring their wheels)' if missing else 'all present'}",
          flush=True)
    if missing:
        return 1
    started = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="dapo-gpu-check-") as work:
        work = Path(work)
        from common import arith_data_paths  # benchmarks/common.py: the quickstart's sums

        ctx = SimpleNamespace(device=device, device_name=device_name, peak_tflops=peak_tflops(device_name),
                              preset=preset, steps=args.steps, warmup=args.warmup, sync_trials=args.sync_trials,
                              deepspeed_timeout_s=args.deepspeed_timeout, work=work, folder=work / "model",
                              train=arith_data_paths()[0])
        t0 = time.perf_counter()
        ctx.sizes = write_model(ctx.folder, preset, device)
        print(f"[model] {ctx.sizes['parameters'] / 1e6:.1f}M parameters written in {time.perf_counter() - t0:.1f}s",
              flush=True)
        for name, section in SECTIONS:
            t0 = time.perf_counter()
            try:
                result = section(ctx)
            except Exception:  # noqa: BLE001 - one failed section fails the check, the others still run
                result = {"error": traceback.format_exc()}
            result["seconds"] = time.perf_counter() - t0
            results[name] = result
            print_figures(name, result, ctx)
    code = exit_code(results)
    print(f"SUMMARY ({device_name}, {time.perf_counter() - started:.0f}s): {'PASS' if code == 0 else 'FAIL'}")
    for line in summary_lines(results):
        print(line)
    if args.out is not None:
        args.out.write_text(json.dumps({"device": device_name, "preset": preset, "exit_code": code,
                                        "results": results}, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
