"""`dapo run FILE`: the embedded single-machine training.

Builds the pieces the controller needs (policy, rollout engine, learner, reward scorer, data,
checkpoint store) from the run file and hands them to `dapo.controller.trainer.Trainer`. The run directory
(default runs/NAME) receives run.yaml (the resolved run file), metrics.jsonl, run.log and, unless
spec.checkpoint.uri says otherwise, checkpoints/.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path


from dapo import wiring
from dapo.errors import ConfigError
from dapo.spec import DAPORun, SpecError, dump_run, load_run_file

log = logging.getLogger("dapo.entry.inprocess")


@dataclass
class EmbeddedRun:
    """Everything `build_embedded_run` made; ``close()`` stops the rollout engine (vLLM's engine
    process) and the reward workers, and finishes the trackers."""

    trainer: object
    checkpointer: object
    scorer: object
    run_dir: Path

    def close(self) -> None:
        # vLLM's engine core is a separate process that outlives this one unless it is shut down
        self.trainer.engine.close()
        close = getattr(self.scorer, "close", None)
        if close is not None:
            close()
        metrics = getattr(self.trainer, "metrics", None)
        if metrics is not None:  # finish the experiment trackers with the last checkpoint
            metrics.close(final_checkpoint=getattr(self.trainer, "last_checkpoint", None),
                          succeeded=getattr(self.trainer, "state", "") == "succeeded")


def default_run_dir(run: DAPORun) -> Path:
    return Path("runs") / run.metadata.name


def build_embedded_run(run: DAPORun, run_dir: Path, *, resume: bool, scorer=None, policy=None,
                       engine_factory=None, learner_factory=None, eval_in_pods: bool = False) -> EmbeddedRun:
    """Wire a Trainer for one process. ``scorer`` / ``policy`` (model, tokenizer) replace the
    ones the run file names (tests use this to avoid worker processes or model loading).
    ``engine_factory(spec, model, tokenizer, device)`` / ``learner_factory(model, spec, device)``
    replace the in-process engine and learner of dapo.wiring (learner-0 of a distributed run passes
    the remote rollout client and the distributed learner: `dapo.entry.roles`). ``eval_in_pods``:
    evaluation pods evaluate the checkpoints (spec.eval.separatePod on a cluster)."""
    from dapo.storage.checkpointer import Checkpointer
    from dapo.data.sampler import PromptSampler
    from dapo.data.prompts import dataset_fingerprint, load_run_prompts
    from dapo.controller.metrics import MetricsWriter, ProgressLog
    from dapo.controller.tracking import build_trackers
    from dapo.controller.trainer import Trainer
    from dapo.seeding import seed_all

    spec = run.spec
    device = wiring.pick_device()
    cache_dir = wiring.cache_dir(spec)
    seed_all(spec.learner.seed)

    if scorer is None:  # first: a run-file scorer that does not import fails before the model loads
        scorer = wiring.build_scorer(spec)

    t0 = time.perf_counter()
    if policy is None:
        policy = wiring.load_policy(spec, device)
    model, tokenizer = policy
    model = wiring.apply_lora(spec, model)
    log.info("policy %s loaded in %.1fs: %.1fM parameters on %s", spec.model.path, time.perf_counter() - t0,
             sum(p.numel() for p in model.parameters()) / 1e6, device)

    data = spec.data
    train_records = load_run_prompts(spec, "train", data.train, data.max_prompts, tokenizer, cache_dir)
    eval_records = load_run_prompts(spec, "eval", data.eval, data.eval_max_prompts, tokenizer, cache_dir) if data.eval else []
    if len(train_records) < spec.rollout.gen_batch_size:
        log.warning("spec.rollout.genBatchSize (%d) is larger than the training set (%d prompts): "
                    "one generation batch repeats prompts", spec.rollout.gen_batch_size, len(train_records))

    if engine_factory is not None:
        engine = engine_factory(spec, model, tokenizer, device)
    else:
        engine = wiring.build_engine(spec, policy=(model, tokenizer), device=device)
    learner = (learner_factory or wiring.build_learner)(model, spec, device)
    sampler = PromptSampler(len(train_records), seed=spec.learner.seed,
                            fingerprint=dataset_fingerprint(train_records))
    store = wiring.build_checkpoint_store(spec, run_dir)
    checkpointer = Checkpointer(store, tokenizer, staging_root=run_dir / ".staging", run_file=dump_run(run),
                                metrics_file=run_dir / "metrics.jsonl")
    metrics = MetricsWriter(run_dir, trackers=build_trackers(run, run_dir))
    trainer = Trainer(spec, engine=engine, learner=learner, scorer=scorer, tokenizer=tokenizer,
                      train_records=train_records, eval_records=eval_records, sampler=sampler,
                      metrics=metrics, progress=ProgressLog(), checkpointer=checkpointer, eval_in_pods=eval_in_pods)
    if spec.eval.separate_pod and not eval_in_pods:
        log.info("spec.eval.separatePod applies on Kubernetes (evaluation pods); this run evaluates in process")

    latest = store.latest()
    if latest is not None and not resume:
        raise SpecError(f"{store.root_uri}: holds committed checkpoints "
                        f"(latest step {latest.step}) of an earlier run; pass --resume to continue it, or choose "
                        f"another --output-dir / spec.checkpoint.uri for a fresh run")
    if resume:
        if checkpointer.restore(trainer):  # the newest checkpoint that verifies
            dropped = metrics.truncate_after(trainer.step)
            if dropped:
                log.info("metrics.jsonl: dropped %d lines after step %d (they are re-done now)", dropped, trainer.step)
        else:
            log.info("--resume: no committed checkpoint in %s, starting at step 0", store)
    elif (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # no checkpoint: nothing of an earlier attempt is kept
    return EmbeddedRun(trainer=trainer, checkpointer=checkpointer, scorer=scorer, run_dir=run_dir)


def main_run(args) -> int:
    """Entry point of `dapo run` (see dapo.cli)."""
    from dapo.controller.metrics import remove_handlers, setup_run_logging
    from dapo.controller.trainer import DynamicSamplingError
    from dapo.preflight import preflight_run

    run = load_run_file(args.file, list(getattr(args, "overrides", None) or []))
    run_dir = Path(args.output_dir) if getattr(args, "output_dir", None) else default_run_dir(run)
    cpu_options = list(getattr(args, "cpus", None) or [])
    if getattr(args, "launcher", "inprocess") == "processes":
        from dapo.entry.processes import parse_cpus, run_processes

        cpus = parse_cpus(cpu_options)
        preflight_run(run, str(args.file))  # a run file `dapo check` refuses never starts
        return run_processes(run, run_dir, resume=bool(getattr(args, "resume", False)), cpus=cpus)
    if cpu_options:
        raise ConfigError("--cpus pins role processes: use it with --launcher processes (in process, every role "
                          "shares this process's CPUs; use taskset to pin the whole run)")
    preflight_run(run, str(args.file))
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers = setup_run_logging(run_dir)
    # SIGTERM (kill, a closing terminal, a job scheduler) ends the run like Ctrl-C: through the
    # finally blocks, so the engine's and the reward pool's processes are stopped, not orphaned
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        (run_dir / "run.yaml").write_text(dump_run(run))
        log.info("run %s -> %s", run.metadata.name, run_dir.resolve())
        embedded = build_embedded_run(run, run_dir, resume=bool(getattr(args, "resume", False)))
        try:
            embedded.trainer.train()
        except DynamicSamplingError as exc:
            log.error("training stopped at step %d: %s", embedded.trainer.step, exc)
            return 1
        finally:
            embedded.close()
        log.info("done: %d steps; metrics in %s; curves: dapo plot %s", embedded.trainer.step,
                 run_dir / "metrics.jsonl", run_dir)
    except KeyboardInterrupt:
        log.error("interrupted: the run stopped; resume from its last checkpoint with --resume")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        remove_handlers(handlers)
    return 0


def interrupt(signum, frame):
    """A signal handler that stops the main thread as Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")
