"""`dapo role learner|rollout|reward`: what the pods run (and `dapo run --launcher processes`
runs as local processes).

Configuration comes ONLY from the run file (``--config`` or ``$DAPO_RUN_FILE``) and the
environment contract of dapo.contracts (EnvVar: replica index, peers' addresses, learner ranks,
checkpoint / cache overrides, optional local knobs); docs/architecture.md lists the variables.
The components come from dapo.wiring, as in every other launch mode.

Learner rank 0 is the controller: it serves /status at once ("starting"), builds the Trainer with
`RemoteRolloutEngine` + `RemoteScorer` + the learner, trains, serves "succeeded" (exit 0) or
"failed" with the message (exit 1; a run-file or configuration error: ``runFileError`` in /status
and exit 2, as every other role and `dapo run` exit on one) for the grace period, and releases the
other learner ranks. Ranks >= 1 build the same learner and follow rank 0's commands.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from dapo import wiring
from dapo.contracts import HTTP_PORT, ROLES, RUN_FILE_ERROR_EXIT_CODE, Env, EnvVar
from dapo.errors import ConfigError
from dapo.spec import DAPORun, SpecError, load_run_file

log = logging.getLogger("dapo.entry.roles")


# --------------------------------------------------------------------------- environment

env = Env()


def replica_first_rank(index: int, tensor_parallel_size: int = 1) -> int:
    """Weight-sync rank of rollout replica ``index``'s first worker: rank 0 is learner-0, replica i
    holds ranks 1 + i x TP .. (i + 1) x TP (one per tensor-parallel worker of its vLLM engine,
    each of which receives and loads its own shard; `dapo.rollout.vllm.receiver_rank`)."""
    return 1 + index * tensor_parallel_size


def weight_sync_config(rank: int, rollout_replicas: int, verify: bool = False, tensor_parallel_size: int = 1):
    """The weight-sync group of this run from DAPO_WEIGHT_SYNC_ADDR: 1 + replicas x
    tensor_parallel_size ranks, ``rank`` this process's (0 = learner-0, a replica's first rank:
    `replica_first_rank`); None when the variable is unset."""
    from dapo.weightsync import WeightSyncConfig

    address = env.host_port(EnvVar.WEIGHT_SYNC_ADDR)
    if address is None:
        return None
    host, port = address
    return WeightSyncConfig(host=host, port=port, world_size=1 + rollout_replicas * tensor_parallel_size, rank=rank,
                            timeout_s=env.float(EnvVar.WEIGHT_SYNC_TIMEOUT_S, 600.0),
                            verify_checksums=verify or env.flag(EnvVar.VERIFY_WEIGHT_SYNC))


def http_address() -> tuple[str, int]:
    return env.str(EnvVar.HTTP_HOST, "0.0.0.0"), env.int(EnvVar.HTTP_PORT, HTTP_PORT)


def resolved_run(run: DAPORun) -> DAPORun:
    """The run with the environment's overrides applied (DAPO_CHECKPOINT_URI)."""
    uri = env.str(EnvVar.CHECKPOINT_URI)
    if uri and uri != run.spec.checkpoint.uri:
        run = run.model_copy(deep=True)
        run.spec.checkpoint.uri = uri
    return run


def run_dir_for(run: DAPORun) -> Path:
    explicit = env.str(EnvVar.RUN_DIR)
    if explicit:
        return Path(explicit)
    return wiring.cache_dir(run.spec) / "runs" / run.metadata.name


def _setup(role: str) -> None:
    index = env.str(EnvVar.RANK if role == "learner" else EnvVar.REPLICA_INDEX, "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {role}-{index} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    threads = env.int(EnvVar.TORCH_THREADS, 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    # one line a pinned run (dapo run --cpus) or a pod's cpuset can be checked against (Linux only)
    if hasattr(os, "sched_getaffinity"):
        logging.getLogger("dapo.entry.roles").info("%s-%s runs on CPUs %s", role, index,
                                                    ",".join(map(str, sorted(os.sched_getaffinity(0)))))


# --------------------------------------------------------------------------- rollout


def run_rollout(run: DAPORun) -> int:
    from dapo.services.http import serve_forever
    from dapo.services.rollout import RolloutService

    spec = run.spec
    index = env.int(EnvVar.REPLICA_INDEX, 0)
    replicas = env.int(EnvVar.REPLICAS, spec.rollout.replicas)
    if not 0 <= index < replicas:
        raise ConfigError(f"DAPO_REPLICA_INDEX={index} is outside 0..{replicas - 1} (DAPO_REPLICAS={replicas})")
    wiring.refuse_lora_in_remote_vllm(spec)
    t0 = time.perf_counter()
    # the rollout pod's only model: the HF engine samples from it in place (no copy)
    engine = wiring.build_engine(spec, share_policy=True)
    log.info("rollout replica %d/%d: %s engine ready in %.1fs", index, replicas, type(engine).__name__,
             time.perf_counter() - t0)
    tp = spec.rollout.tensor_parallel_size
    service = RolloutService(engine, sync_config=weight_sync_config(replica_first_rank(index, tp), replicas,
                                                                    spec.rollout.verify_weight_sync, tp),
                             replica=index)
    host, port = http_address()
    return serve_forever(service.make_app, host, port, on_stop=service.close)


# --------------------------------------------------------------------------- reward


def run_reward(run: DAPORun) -> int:
    from dapo.services.http import serve_forever
    from dapo.services.reward import RewardService

    service = RewardService(wiring.build_scorer(run.spec), replica=env.int(EnvVar.REPLICA_INDEX, 0))
    host, port = http_address()
    return serve_forever(service.make_app, host, port, on_stop=service.close)


# --------------------------------------------------------------------------- learner


def replica_liveness_s() -> float | None:
    """DAPO_REPLICA_LIVENESS_S (default `REPLICA_LIVENESS_S`; 0: off) for the rollout and reward pools."""
    from dapo.services.http import REPLICA_LIVENESS_S

    seconds = env.float(EnvVar.REPLICA_LIVENESS_S, REPLICA_LIVENESS_S)
    return seconds if seconds > 0 else None


def remote_engine_factory(rollout_urls: list[str], run_dir: Path):
    """``engine_factory`` for build_embedded_run: the rollout replicas behind a RemoteRolloutEngine."""
    from dapo.services.rollout import RemoteRolloutEngine

    def factory(spec, model, tokenizer, device):
        verify = spec.rollout.verify_weight_sync or env.flag(EnvVar.VERIFY_WEIGHT_SYNC)
        group = weight_sync_config(0, len(rollout_urls), verify, spec.rollout.tensor_parallel_size)
        engine = RemoteRolloutEngine(rollout_urls, sync_config=group,
                                     verify=verify, sync_log=run_dir / "weight_sync.jsonl" if verify else None,
                                     request_timeout_s=env.float(EnvVar.ROLLOUT_REQUEST_TIMEOUT_S, 3600.0),
                                     liveness_s=replica_liveness_s())
        engine.wait_ready(env.float(EnvVar.SERVICE_WAIT_S, 1800.0))
        return engine

    return factory


def run_learner(run: DAPORun) -> int:
    rank = env.int(EnvVar.RANK, 0)
    world_size = env.int(EnvVar.WORLD_SIZE, 1)
    if rank == 0:
        return run_controller(run, world_size)
    return run_follower(run, world_size)


def run_follower(run: DAPORun, world_size: int) -> int:
    spec = run.spec
    device = wiring.pick_device()
    model, _ = wiring.load_policy(spec, device)
    wiring.build_learner(wiring.apply_lora(spec, model), spec, device, world_size).follow()
    return 0


def run_controller(run: DAPORun, world_size: int) -> int:
    """Learner rank 0 (see the module docstring)."""
    from dapo.entry.inprocess import build_embedded_run
    from dapo.services.http import parse_urls
    from dapo.services.reward import RemoteScorer
    from dapo.controller.guardrails import GuardrailStop
    from dapo.controller.status_server import StatusServer, placeholder_status

    spec = run.spec
    host, port = http_address()
    status = StatusServer(host, port, labels={"run": run.metadata.name}).start()
    grace = env.float(EnvVar.STATUS_GRACE_S, 60.0)
    embedded = None
    code = 1
    # the operator reads a stopped pod's log tail (terminationMessagePolicy FallbackToLogsOnError) for
    # a bare "error: ..." / "guardrail: ..." line: printed last, after the status grace period
    last_line = None
    try:
        run_dir = run_dir_for(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = env.int(EnvVar.GANG_GENERATION, 0) > 0
        rollout_urls = parse_urls(env.str(EnvVar.ROLLOUT_URLS), EnvVar.ROLLOUT_URLS)
        scorer = RemoteScorer(parse_urls(env.str(EnvVar.REWARD_URLS), EnvVar.REWARD_URLS),
                              timeout_s=spec.reward.timeout_seconds, liveness_s=replica_liveness_s())
        scorer.wait_ready(env.float(EnvVar.SERVICE_WAIT_S, 1800.0))
        log.info("controller: %d learner rank(s), %d rollout replica(s), %d reward replica(s), run dir %s%s",
                 world_size, len(rollout_urls), len(scorer.urls), run_dir,
                 " (resuming: gang generation > 0)" if resume else "")
        embedded = build_embedded_run(
            run, run_dir, resume=resume, scorer=scorer, engine_factory=remote_engine_factory(rollout_urls, run_dir),
            learner_factory=lambda model, spec_, device: wiring.build_learner(model, spec_, device, world_size),
            eval_in_pods=spec.eval.separate_pod)
        trainer = embedded.trainer
        status.set_source(trainer.status, latest=trainer.metrics.latest_values)
        trainer.train()
        code = 0
        log.info("training finished: %d steps", trainer.step)
    except GuardrailStop as exc:  # suspend / fail: its own exit code, so the operator never restarts the gang
        log.error("guardrail: %s", exc)
        code, last_line = exc.exit_code, f"guardrail: {exc}"
        status.set_override(embedded.trainer.status())  # state suspended / failed, with the trip
    except Exception as exc:  # noqa: BLE001 - reported through /status and the exit code
        run_file_error = isinstance(exc, (SpecError, ConfigError))
        if run_file_error:  # the file or a setting: one line naming it (as `dapo run` prints), no traceback
            log.error("error: %s", exc)
            code, last_line = RUN_FILE_ERROR_EXIT_CODE, f"error: {exc}"
        else:
            log.exception("the controller failed")
        doc = embedded.trainer.status() if embedded is not None else placeholder_status("starting")
        doc.update(state="failed", message=f"{type(exc).__name__}: {exc}", runFileError=run_file_error)
        status.set_override(doc)
    finally:
        if embedded is not None:
            _release(embedded)
    log.info("serving the final state (%s) for %gs", status.document()["state"], grace)
    time.sleep(grace)
    status.stop()
    if last_line is not None:
        print(last_line, file=sys.stderr, flush=True)
    return code


def _release(embedded) -> None:
    """Free the other learner ranks and the weight-sync group (best effort: the run is over)."""
    learner = embedded.trainer.learner
    for action in (getattr(learner, "shutdown", None), embedded.close):  # embedded.close closes the engine too
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
    path = getattr(args, "config", None) or env.str(EnvVar.RUN_FILE)
    if not path:
        raise SpecError("no run file: pass --config FILE or set DAPO_RUN_FILE (the operator mounts it at "
                        "/etc/dapo/run.yaml)")
    run = resolved_run(load_run_file(path))
    return {"learner": run_learner, "rollout": run_rollout, "reward": run_reward}[role](run)
