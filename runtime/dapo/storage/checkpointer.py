"""What a training checkpoint holds, and how a run resumes from it.

Layout of one checkpoint (committed through `dapo.storage.CheckpointStore`: files first, under
``step-XXXXXXXX/attempt-.../``, manifest last, so a half-written checkpoint is never "latest"):

    model/                 HF format: config.json, *.safetensors, tokenizer files
                           (`AutoModelForCausalLM.from_pretrained(folder)` loads it); a LoRA run
                           (spec.model.lora): peft's adapter_config.json + adapter_model.safetensors
                           (`PeftModel.from_pretrained(base, folder)` loads them), the tokenizer
                           files and base_model.json, the base's spec.model.path and weights sha256
                           (`dapo.model.lora`), checked before the adapters are restored or exported
    learner.pt             optimizer + lr-scheduler state (torch.save)
    trainer_state.json     step, weight version, sampler position, surplus groups and in-flight
                           batches (their token arrays in trainer_tensors.safetensors), the
                           trainer's Python RNG (`Trainer.rng`)
    trainer_tensors.safetensors   the token ids and behaviour log-probs of those groups
                           (dapo.controller.state)
    run.yaml               the resolved run file of the run (what `dapo eval`, `dapo export` and
                           `dapo compare` read next to a checkpoint, in S3 too)
    metrics.jsonl          the run's metrics up to this step (`dapo compare` on checkpoint prefixes)
    rng.pt                 torch CPU (and CUDA) RNG states

Resuming restores every one of these, so step s+1 after a resume samples the same prompts with
the same seeds and applies the same update as the uninterrupted run. Every file is checked
against the manifest's sha256 before anything is loaded; a checkpoint that fails is refused
(the error names the file and the checkpoint) and resume falls back to the newest one that
verifies, un-committing the damaged newer ones so that training commits those steps again.

The checkpointer sees the trainer only through `Checkpointable` (below; the trainer's side is
`dapo.controller.trainer.Trainer`'s "checkpoints" section): what to save (`CheckpointContents`),
how to load each part back, and `after_restore`. The learner, not this module, knows how its
weights are laid out: the full weights come gathered on the controller (a ZeRO-3 learner gathers
them from every rank) and go back onto every rank, so one code path serves the single-process
learner and every distributed strategy.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file

from dapo.model.lora import read_base_reference, write_base_reference
from dapo.storage import CheckpointCorruptError

log = logging.getLogger("dapo.storage.checkpointer")

MODEL_DIR = "model"
LEARNER_FILE = "learner.pt"
TRAINER_FILE = "trainer_state.json"
TRAINER_TENSORS_FILE = "trainer_tensors.safetensors"
RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.jsonl"
RNG_FILE = "rng.pt"


def capture_torch_rng() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_torch_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint_folder(folder: Path, *, model, model_state: dict[str, torch.Tensor], tokenizer,
                            learner_state: dict, trainer_state: dict,
                            trainer_tensors: dict[str, torch.Tensor] | None = None,
                            base_model: dict | None = None) -> None:
    """Write every checkpoint file into ``folder`` (local, not yet committed). The weights come
    from ``model_state`` (full tensors by name; a LoRA model's: its adapters, saved in peft's
    format, with ``base_model`` the reference to its base); ``model`` supplies only the config and
    the class (its own parameters may be partitioned placeholders)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(folder / MODEL_DIR, state_dict=model_state, safe_serialization=True)
    except Exception as exc:  # e.g. a model still flagged as quantised (gguf) refuses to save
        raise RuntimeError(f"checkpoint: could not save the policy model in HF format ({exc}); "
                           "load the base model as a plain (non-quantised) model") from exc
    if base_model is not None:
        write_base_reference(folder / MODEL_DIR, base_model)
    tokenizer.save_pretrained(folder / MODEL_DIR)
    torch.save(learner_state, folder / LEARNER_FILE)
    (folder / TRAINER_FILE).write_text(json.dumps(trainer_state))
    save_file(dict(trainer_tensors or {}), str(folder / TRAINER_TENSORS_FILE))
    torch.save(capture_torch_rng(), folder / RNG_FILE)


def read_model_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in a checkpoint's model/ folder, by name (CPU).

    The learner loads them in place (`learner.load_model_weights`) instead of from_pretrained:
    that keeps the objects the optimizer holds and works however the base model was loaded
    (HF folder, gguf, builtin)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint model folder {model_dir} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


def restore_model_weights(target, model_dir: Path) -> None:
    """Read a checkpoint's model/ folder and hand the weights to ``target`` (a learner or a
    `Checkpointable`: every rank of a distributed learner receives them); a name mismatch says
    which spec field to check."""
    reference = read_base_reference(model_dir)
    if reference is not None:  # adapters: only onto the base they were trained on
        target.check_base_model(reference, str(model_dir))
    state = read_model_state(model_dir)
    try:
        target.load_model_weights(state)
    except ValueError as exc:
        raise RuntimeError(f"checkpoint {model_dir} does not match the model: {exc} "
                           "(was the run file's spec.model changed?)") from exc


@dataclass
class CheckpointContents:
    """Everything one checkpoint holds besides the RNG states (which are this process's)."""

    model: torch.nn.Module  # supplies the config and the class only (its parameters may be partitioned)
    model_state: dict[str, torch.Tensor]  # the full weights by name
    learner_state: dict  # optimizer + lr schedule (torch.save)
    trainer_state: dict  # JSON-able: position, surplus, versions, the trainer's RNG
    meta: dict  # recorded in the manifest: weight_version, total_steps
    trainer_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # trainer_state's token arrays
    base_model: dict | None = None  # LoRA: the base's path and weights sha256 (model_state holds the adapters)


@runtime_checkable
class Checkpointable(Protocol):
    """What `Checkpointer` saves and restores (`dapo.controller.trainer.Trainer`)."""

    step: int  # the training step a checkpoint taken now is committed as

    def checkpoint_contents(self) -> CheckpointContents:
        """What to save, the full weights gathered first (a ZeRO-3 learner gathers them with
        collectives, and no other learner call may come between its gathers)."""

    def load_model_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """A checkpoint's full weights into the model, in place; ValueError names mismatched tensors."""

    def check_base_model(self, reference: dict, where: str) -> None:
        """Raise unless the model is a LoRA policy on the base ``reference`` names (a LoRA
        checkpoint's base_model.json: path and weights sha256)."""

    def load_checkpoint_state(self, learner_state: dict, trainer_state: dict,
                              trainer_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """The learner's and the trainer's saved state (after the weights); ``trainer_tensors``
        holds the trainer state's token arrays (None: a checkpoint that kept them inline)."""

    def after_restore(self, step: int, uri: str) -> str:
        """Continue from the restored state: the rollout engine serves the restored weights under
        the restored weight version, the checkpoint is recorded as the last one. Returns a
        one-line description of the restored position for the log."""


class Checkpointer:
    """Saves and restores a `Checkpointable` (the trainer) through a `CheckpointStore`."""

    def __init__(self, store, tokenizer, staging_root: str | Path, *, run_file: str | None = None,
                 metrics_file: str | Path | None = None):
        """``run_file``: the resolved run file (YAML text) and ``metrics_file``: the run's
        metrics.jsonl, both copied into every checkpoint."""
        self.store = store
        self.tokenizer = tokenizer
        self.staging_root = Path(staging_root)
        self.run_file = run_file
        self.metrics_file = Path(metrics_file) if metrics_file is not None else None

    def save(self, trainer: Checkpointable):
        """Write the trainer's full state and commit it as checkpoint ``trainer.step``."""
        self.staging_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"step-{trainer.step:08d}-", dir=self.staging_root))
        try:
            contents = trainer.checkpoint_contents()
            write_checkpoint_folder(folder, model=contents.model, model_state=contents.model_state,
                                    tokenizer=self.tokenizer, learner_state=contents.learner_state,
                                    trainer_state=contents.trainer_state, trainer_tensors=contents.trainer_tensors,
                                    base_model=contents.base_model)
            if self.run_file is not None:
                (folder / RUN_FILE).write_text(self.run_file)
            if self.metrics_file is not None and self.metrics_file.exists():
                shutil.copyfile(self.metrics_file, folder / METRICS_FILE)
            meta = contents.meta
            del contents  # the full weights: gone before the upload
            # never overwrite: a committed step belongs to whoever committed it first (a second
            # trainer on the same checkpoint.uri fails here with CheckpointExistsError)
            info = self.store.commit(trainer.step, folder, meta=meta)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        log.info("checkpoint step %d committed at %s", info.step, info.uri)
        return info

    def restore(self, trainer: Checkpointable, info=None) -> bool:
        """Restore ``info``, or else the newest committed checkpoint that verifies, into
        ``trainer``; False when there is none. A checkpoint whose files do not match its manifest
        is never loaded: an explicit ``info`` raises `CheckpointCorruptError`; otherwise resume
        falls back to the previous committed one, logs which it skipped and why, and
        un-commits the skipped ones (their steps are trained and committed again)."""
        candidates = [info] if info is not None else list(reversed(self.store.list_committed()))
        skipped = []
        for candidate in candidates:
            try:
                folder = Path(self.store.fetch(candidate))
            except CheckpointCorruptError as exc:
                if info is not None:
                    raise
                log.error("refusing checkpoint step %d: %s; falling back to the previous committed checkpoint",
                          candidate.step, exc)
                skipped.append(candidate)
                continue
            if skipped:
                log.warning("resuming from checkpoint step %d, the newest that verifies (skipped damaged steps %s)",
                            candidate.step, [c.step for c in skipped])
                for bad in skipped:
                    self.store.uncommit(bad.step)
            self._load(trainer, candidate, folder)
            return True
        if skipped:
            raise CheckpointCorruptError(
                f"no committed checkpoint under {self.store.root_uri} verifies (steps {[c.step for c in skipped]} "
                "all differ from their manifests, see the errors above); restore the files from a backup, or start "
                "a fresh run with another spec.checkpoint.uri")
        return False

    def _load(self, trainer: Checkpointable, info, folder: Path) -> None:
        restore_model_weights(trainer, folder / MODEL_DIR)
        tensors_file = folder / TRAINER_TENSORS_FILE  # absent in checkpoints that kept the arrays inline
        tensors = load_file(str(tensors_file)) if tensors_file.exists() else None
        trainer.load_checkpoint_state(torch.load(folder / LEARNER_FILE, weights_only=False),
                                      json.loads((folder / TRAINER_FILE).read_text()), tensors)
        restore_torch_rng(torch.load(folder / RNG_FILE, weights_only=False))
        position = trainer.after_restore(info.step, info.uri)
        log.info("resumed from checkpoint step %d (%s): %s", info.step, info.uri, position)
