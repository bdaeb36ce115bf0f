"""`dapo role learner|rollout|reward`: what the pods run (and `dapo run --launcher processes`
runs as local processes).

Configuration comes ONLY from the run file (``--config`` or ``$DAPO_RUN_FILE``) and the
environment of CONTRACTS.md:

    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT     learner ranks (torch.distributed env://)
    DAPO_REPLICA_INDEX, DAPO_REPLICAS              rollout / reward replica i of M
    DAPO_WEIGHT_SYNC_ADDR=host:port                learner-0's weight-sync store
    DAPO_ROLLOUT_URLS, DAPO_REWARD_URLS            comma lists of http://host:port
    DAPO_GANG_GENERATION                           > 0: resume from the latest committed checkpoint
    DAPO_CHECKPOINT_URI, DAPO_CACHE_DIR            override spec.checkpoint.uri / the staging cache

plus knobs for local runs, all optional: DAPO_HTTP_HOST / DAPO_HTTP_PORT (default 0.0.0.0:8000),
DAPO_RUN_DIR (learner-0's metrics / logs; default $DAPO_CACHE_DIR/runs/NAME), DAPO_STATUS_GRACE_S
(how long learner-0 keeps serving the final state, default 60), DAPO_SERVICE_WAIT_S (how long
learner-0 waits for the services to come up, default 1800), DAPO_WEIGHT_SYNC_TIMEOUT_S (default
600), DAPO_VERIFY_WEIGHT_SYNC=1 (as spec.rollout.verifyWeightSync: CRC per tensor and learner == replica state checksums after
every sync, logged to RUN_DIR/weight_sync.jsonl), DAPO_TORCH_THREADS.

Learner rank 0 is the controller: it serves /status at once ("starting"), builds the Trainer with
`RemoteRolloutEngine` + `RemoteScorer` + the learner, trains, serves "succeeded" (exit 0) or
"failed" with the message (exit 1) for the grace period, and releases the other learner ranks.
Ranks >= 1 build the same learner and follow rank 0's commands.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from dapo.spec import DAPORun, SpecError, load_run_file

log = logging.getLogger("dapo.roles")

ROLES = ("learner", "rollout", "reward")


# --------------------------------------------------------------------------- environment


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SpecError(f"environment variable {name}={raw!r} must be an integer") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SpecError(f"environment variable {name}={raw!r} must be a number") from None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_host_port(text: str, variable: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SpecError(f"{variable}={text!r}: expected HOST:PORT, e.g. run-learner-0.run-learner.ns.svc:29600")
    return host.strip("[]"), int(port)


def weight_sync_config(rank: int, rollout_replicas: int, verify: bool = False):
    """The weight-sync group of this run from DAPO_WEIGHT_SYNC_ADDR: rank 0 = learner-0,
    rollout replica i = rank i + 1; None when the variable is unset."""
    from dapo.weight_sync import WeightSyncConfig

    addr = os.environ.get("DAPO_WEIGHT_SYNC_ADDR", "").strip()
    if not addr:
        return None
    host, port = parse_host_port(addr, "DAPO_WEIGHT_SYNC_ADDR")
    return WeightSyncConfig(host=host, port=port, world_size=1 + rollout_replicas, rank=rank,
                            timeout_s=env_float("DAPO_WEIGHT_SYNC_TIMEOUT_S", 600.0),
                            verify_checksums=verify or env_flag("DAPO_VERIFY_WEIGHT_SYNC"))


def http_address() -> tuple[str, int]:
    return os.environ.get("DAPO_HTTP_HOST", "0.0.0.0"), env_int("DAPO_HTTP_PORT", 8000)


def resolved_run(run: DAPORun) -> DAPORun:
    """The run with the environment's overrides applied (DAPO_CHECKPOINT_URI)."""
    uri = os.environ.get("DAPO_CHECKPOINT_URI", "").strip()
    if uri and uri != run.spec.checkpoint.uri:
        run = run.model_copy(deep=True)
        run.spec.checkpoint.uri = uri
    return run


def run_dir_for(run: DAPORun) -> Path:
    explicit = os.environ.get("DAPO_RUN_DIR", "").strip()
    if explicit:
        return Path(explicit)
    cache = os.environ.get("DAPO_CACHE_DIR", "").strip() or run.spec.storage.cache_dir
    return Path(cache) / "runs" / run.metadata.name


def _setup(role: str) -> None:
    index = os.environ.get("RANK") if role == "learner" else os.environ.get("DAPO_REPLICA_INDEX")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {role}-{index or 0} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    threads = env_int("DAPO_TORCH_THREADS", 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- rollout


def pick_engine(choice: str, cuda: bool, vllm_importable: bool) -> str:
    """'auto' -> 'vllm' when a GPU and vLLM are there, else 'hf'; explicit choices pass, but
    'vllm' without them is an error naming the fix."""
    if choice == "auto":
        return "vllm" if cuda and vllm_importable else "hf"
    if choice == "vllm" and not (cuda and vllm_importable):
        raise SpecError("spec.rollout.engine: vllm needs a CUDA GPU and the vllm package in the rollout image "
                        f"(GPU: {cuda}, vllm importable: {vllm_importable}); use engine: hf or auto")
    return choice


def build_rollout_engine(spec, cache_dir: str | None):
    import importlib.util

    import torch

    from dapo.launch import pick_device

    kind = pick_engine(spec.rollout.engine, torch.cuda.is_available(), importlib.util.find_spec("vllm") is not None)
    if kind == "vllm":
        return build_vllm_engine(spec, cache_dir)
    from dapo.engine import HFEngine
    from dapo.models import load_policy

    device = pick_device()
    torch.manual_seed(spec.learner.seed)
    model, tokenizer = load_policy(spec.model, device=device, cache_dir=cache_dir)
    rows = env_int("DAPO_ENGINE_MAX_ROWS", 64 if device == "cpu" else 256)
    return HFEngine(model, tokenizer, device=device, max_batch_rows=rows, copy_model=False)


def build_vllm_engine(spec, cache_dir: str | None):
    """`VLLMEngine` on the staged base model, sized from spec.rollout."""
    from transformers import AutoTokenizer, GenerationConfig

    from dapo.engine_vllm import VLLMEngine
    from dapo.models import resolve_model_dir

    if spec.model.gguf_file:
        raise SpecError("spec.rollout.engine: vllm does not load spec.model.ggufFile here; use engine: hf")
    folder = resolve_model_dir(spec.model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(spec.model.tokenizer or folder)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        extra = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:  # no generation_config.json
        extra = None
    eos.update([extra] if isinstance(extra, int) else (extra or []))
    dtype = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[spec.model.dtype]
    ro = spec.rollout
    return VLLMEngine(str(folder), eos_ids=eos, seed=spec.learner.seed, dtype=dtype,
                      gpu_memory_utilization=ro.gpu_memory_utilization, tensor_parallel_size=ro.tensor_parallel_size,
                      max_model_len=ro.max_prompt_length + ro.max_response_length)


def run_rollout(run: DAPORun) -> int:
    from dapo.services.http import serve_forever
    from dapo.services.rollout import RolloutService

    spec = run.spec
    index = env_int("DAPO_REPLICA_INDEX", 0)
    replicas = env_int("DAPO_REPLICAS", spec.rollout.replicas)
    if not 0 <= index < replicas:
        raise SpecError(f"DAPO_REPLICA_INDEX={index} is outside 0..{replicas - 1} (DAPO_REPLICAS={replicas})")
    t0 = time.perf_counter()
    engine = build_rollout_engine(spec, os.environ.get("DAPO_CACHE_DIR") or None)
    log.info("rollout replica %d/%d: %s engine ready in %.1fs", index, replicas, type(engine).__name__,
             time.perf_counter() - t0)
    service = RolloutService(engine, sync_config=weight_sync_config(index + 1, replicas, spec.rollout.verify_weight_sync),
                             replica=index)
    host, port = http_address()
    return serve_forever(service.make_app, host, port, on_stop=service.close)


# --------------------------------------------------------------------------- reward


def run_reward(run: DAPORun) -> int:
    from dapo.reward import RewardScorer
    from dapo.services.http import serve_forever
    from dapo.services.reward import RewardService

    scorer = RewardScorer.from_spec(run.spec)  # a scorer that does not import: SpecError, exit 2, pod Failed
    service = RewardService(scorer, replica=env_int("DAPO_REPLICA_INDEX", 0))
    host, port = http_address()
    return serve_forever(service.make_app, host, port, on_stop=service.close)


# --------------------------------------------------------------------------- learner


def make_learner(model, spec, device, world_size: int):
    """TorchLearner for one learner rank; the DistributedLearner (torch DDP-style or DeepSpeed
    ZeRO, spec.learner.strategy) when there are several."""
    if world_size <= 1:
        from dapo.learner import TorchLearner

        if spec.learner.strategy != "torch":
            log.info("spec.learner.strategy=%s with one learner rank: training with plain torch", spec.learner.strategy)
        return TorchLearner.from_spec(model, spec, device=device)
    from dapo.dist_learner import DistributedLearner

    return DistributedLearner.from_spec(model, spec, device=device,
                                        timeout_s=env_float("DAPO_LEARNER_TIMEOUT_S", 1800.0))


def remote_engine_factory(rollout_urls: list[str], run_dir: Path):
    """``engine_factory`` for build_embedded_run: the rollout replicas behind a RemoteRolloutEngine."""
    from dapo.services.rollout import RemoteRolloutEngine

    def factory(spec, model, tokenizer, device):
        verify = spec.rollout.verify_weight_sync or env_flag("DAPO_VERIFY_WEIGHT_SYNC")
        engine = RemoteRolloutEngine(rollout_urls, sync_config=weight_sync_config(0, len(rollout_urls), verify),
                                     verify=verify, sync_log=run_dir / "weight_sync.jsonl" if verify else None)
        engine.wait_ready(env_float("DAPO_SERVICE_WAIT_S", 1800.0))
        return engine

    return factory


def run_learner(run: DAPORun) -> int:
    rank = env_int("RANK", 0)
    world_size = env_int("WORLD_SIZE", 1)
    if rank == 0:
        return run_controller(run, world_size)
    return run_follower(run, world_size)


def run_follower(run: DAPORun, world_size: int) -> int:
    import torch

    from dapo.launch import pick_device
    from dapo.models import load_policy

    spec = run.spec
    device = pick_device()
    torch.manual_seed(spec.learner.seed)
    model, _ = load_policy(spec.model, device=device, cache_dir=os.environ.get("DAPO_CACHE_DIR") or None)
    learner = make_learner(model, spec, device, world_size)
    learner.follow()
    return 0


def run_controller(run: DAPORun, world_size: int) -> int:
    """Learner rank 0 (see the module docstring)."""
    from dapo.launch import build_embedded_run
    from dapo.services.http import parse_urls
    from dapo.services.reward import RemoteScorer
    from dapo.services.status import StatusServer, placeholder_status

    spec = run.spec
    host, port = http_address()
    status = StatusServer(host, port, labels={"run": run.metadata.name}).start()
    grace = env_float("DAPO_STATUS_GRACE_S", 60.0)
    embedded = None
    code = 1
    try:
        run_dir = run_dir_for(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = env_int("DAPO_GANG_GENERATION", 0) > 0
        rollout_urls = parse_urls(os.environ.get("DAPO_ROLLOUT_URLS"), "DAPO_ROLLOUT_URLS")
        scorer = RemoteScorer(parse_urls(os.environ.get("DAPO_REWARD_URLS"), "DAPO_REWARD_URLS"),
                              timeout_s=spec.reward.timeout_seconds)
        scorer.wait_ready(env_float("DAPO_SERVICE_WAIT_S", 1800.0))
        log.info("controller: %d learner rank(s), %d rollout replica(s), %d reward replica(s), run dir %s%s",
                 world_size, len(rollout_urls), len(scorer.urls), run_dir,
                 " (resuming: gang generation > 0)" if resume else "")
        embedded = build_embedded_run(
            run, run_dir, resume=resume, scorer=scorer, engine_factory=remote_engine_factory(rollout_urls, run_dir),
            learner_factory=lambda model, spec_, device: make_learner(model, spec_, device, world_size))
        trainer = embedded.trainer
        status.set_source(trainer.status, latest=trainer.metrics.latest_values)
        trainer.train()
        code = 0
        log.info("training finished: %d steps", trainer.step)
    except Exception as exc:  # noqa: BLE001 - reported through /status and the exit code
        log.exception("the controller failed")
        doc = embedded.trainer.status() if embedded is not None else placeholder_status("starting")
        doc.update(state="failed", message=f"{type(exc).__name__}: {exc}")
        status.set_override(doc)
    finally:
        if embedded is not None:
            _release(embedded)
    log.info("serving the final state (%s) for %gs", status.document()["state"], grace)
    time.sleep(grace)
    status.stop()
    return code


def _release(embedded) -> None:
    """Free the other learner ranks and the weight-sync group (best effort: the run is over)."""
    learner = embedded.trainer.learner
    for action in (getattr(learner, "shutdown", None), getattr(embedded.trainer.engine, "close", None), embedded.close):
        if action is None:
            continue
        try:
            action()
        except Exception as exc:  # noqa: BLE001
            log.warning("cleanup step %s failed: %s", getattr(action, "__qualname__", action), exc)


# --------------------------------------------------------------------------- entry point


def main(args) -> int:
    """`dapo role ROLE [--config FILE]`."""
    role = args.role
    if role not in ROLES:
        raise SpecError(f"role {role!r}: use one of {ROLES}")
    _setup(role)
    path = getattr(args, "config", None) or os.environ.get("DAPO_RUN_FILE")
    if not path:
        raise SpecError("no run file: pass --config FILE or set DAPO_RUN_FILE (the operator mounts it at "
                        "/etc/dapo/run.yaml)")
    run = resolved_run(load_run_file(path))
    return {"learner": run_learner, "rollout": run_rollout, "reward": run_reward}[role](run)
