"""What a training checkpoint holds, and how a run resumes from it.

Layout of one checkpoint (committed through `dapo.storage.CheckpointStore`: files first,
manifest last, so a half-written checkpoint is never "latest"):

    model/                 HF format: config.json, *.safetensors, tokenizer files
                           (`AutoModelForCausalLM.from_pretrained(folder)` loads it)
    learner.pt             optimizer + lr-scheduler state (torch.save)
    trainer_state.json     step, weight version, sampler position, surplus groups, python RNG
    rng.pt                 torch CPU (and CUDA) RNG states

Resuming restores every one of these, so step s+1 after a resume samples the same prompts with
the same seeds and applies the same update as the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

log = logging.getLogger("dapo.checkpoint")

MODEL_DIR = "model"
LEARNER_FILE = "learner.pt"
TRAINER_FILE = "trainer_state.json"
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


def write_checkpoint_folder(folder: Path, *, model, tokenizer, learner_state: dict, trainer_state: dict) -> None:
    """Write every checkpoint file into ``folder`` (local, not yet committed)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(folder / MODEL_DIR, safe_serialization=True)
    except Exception as exc:  # e.g. a model still flagged as quantised (gguf) refuses to save
        raise RuntimeError(f"checkpoint: could not save the policy model in HF format ({exc}); "
                           "load the base model as a plain (non-quantised) model") from exc
    tokenizer.save_pretrained(folder / MODEL_DIR)
    torch.save(learner_state, folder / LEARNER_FILE)
    (folder / TRAINER_FILE).write_text(json.dumps(trainer_state))
    torch.save(capture_torch_rng(), folder / RNG_FILE)


def load_model_weights(model, model_dir: Path) -> None:
    """Load the safetensors of a checkpoint's model/ folder into ``model`` in place.

    Loading in place (instead of from_pretrained) keeps the object the learner's optimizer holds
    and works for every way the base model was loaded (HF folder, gguf, builtin)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint model folder {model_dir} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    result = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint {model_dir} does not match the model: missing {missing[:5]}, "
                           f"unexpected {list(result.unexpected_keys)[:5]} (was the run file's spec.model changed?)")


def _tied_names(model) -> set[str]:
    """Parameter names that alias another parameter (tied embeddings): save_pretrained omits them."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    return tied


class Checkpointer:
    """Saves and restores a `Trainer` through a `CheckpointStore`."""

    def __init__(self, store, tokenizer, staging_root: str | Path):
        self.store = store
        self.tokenizer = tokenizer
        self.staging_root = Path(staging_root)

    def save(self, trainer):
        """Write the trainer's full state and commit it as checkpoint ``trainer.step``."""
        self.staging_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"step-{trainer.step:08d}-", dir=self.staging_root))
        try:
            write_checkpoint_folder(folder, model=trainer.learner.model, tokenizer=self.tokenizer,
                                    learner_state=trainer.learner.state_dict(), trainer_state=trainer.state_dict())
            meta = {"weight_version": trainer.weight_version, "total_steps": trainer.total_steps}
            info = self.store.commit(trainer.step, folder, meta=meta, overwrite=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        log.info("checkpoint step %d committed at %s", info.step, info.uri)
        return info

    def restore(self, trainer, info=None) -> bool:
        """Restore the latest committed checkpoint (or ``info``) into ``trainer``; False when none."""
        info = info or self.store.latest()
        if info is None:
            return False
        folder = Path(self.store.fetch(info))
        load_model_weights(trainer.learner.model, folder / MODEL_DIR)
        trainer.learner.load_state_dict(torch.load(folder / LEARNER_FILE, weights_only=False))
        trainer.load_state_dict(json.loads((folder / TRAINER_FILE).read_text()))
        restore_torch_rng(torch.load(folder / RNG_FILE, weights_only=False))
        # the engine must serve the restored weights under the restored version
        trainer.engine.update_weights(trainer.learner.named_parameters_for_sync(), trainer.weight_version)
        trainer.last_checkpoint = {"step": info.step, "uri": info.uri}
        log.info("resumed from checkpoint step %d (%s): weight version %d, sampler epoch %d position %d, "
                 "%d surplus groups", info.step, info.uri, trainer.weight_version, trainer.sampler.epoch,
                 trainer.sampler.position, len(trainer.surplus))
        return True
