"""What a model reference on the command line points at: a run's checkpoint, a Hugging Face
folder, a built-in model, a GGUF file. `dapo eval` and `dapo export` take the same references.

    runs/quickstart                  a run folder: its latest committed checkpoint (or --step)
    runs/quickstart/checkpoints      a checkpoint root, local or s3://bucket/prefix: the same
    .../step-00000100                one committed checkpoint (its manifest is checked)
    s3://ckpt/qwen-math[/step-...]   the same in S3 (downloaded and sha256-verified)
    a folder with config.json        a Hugging Face model folder (a checkpoint's model/ folder too)
    builtin:arith-tiny               a model the project builds itself
    model.gguf / --gguf-file F       a GGUF file (dequantised on load)

A checkpoint is always fetched through `dapo.storage.CheckpointStore`, which checks every file
against the manifest's sha256 before anything uses it. The run file that trained it (run.yaml,
saved with every checkpoint and in the run folder) comes along when there is one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dapo.spec import SpecError
from dapo.storage.checkpoints import CheckpointInfo, CheckpointStore
from dapo.storage.s3 import is_s3

__all__ = ["ModelSource", "resolve_model_source"]

_STEP = re.compile(r"^(?P<root>.*)/step-(?P<step>\d{8,})/?$")


@dataclass
class ModelSource:
    """A resolved reference: the model folder (or builtin: path), a GGUF file in it, the run
    file text that came with it, and the checkpoint it came from (None for plain folders)."""

    path: str  # a local folder, or builtin:NAME
    gguf_file: str | None = None
    run_file: str | None = None
    checkpoint: CheckpointInfo | None = None
    checkpoint_folder: Path | None = None
    store: CheckpointStore | None = None  # the checkpoint's store (where its evaluation result goes)

    def describe(self) -> str:
        if self.checkpoint is not None:
            return f"checkpoint step {self.checkpoint.step} ({self.checkpoint.uri})"
        return self.path + (f" ({self.gguf_file})" if self.gguf_file else "")


def _from_store(root: str, step: int | None, *, endpoint_url=None, region=None, run_file: str | None = None,
                what: str) -> ModelSource:
    store = CheckpointStore(root, endpoint_url=endpoint_url, region=region)
    if step is None:
        info = store.latest()
        if info is None:
            raise SpecError(f"{what}: no committed checkpoint under {store.root_uri}")
    else:
        info = next((i for i in store.list_committed() if i.step == step), None)
        if info is None:
            steps = [i.step for i in store.list_committed()]
            raise SpecError(f"{what}: no committed checkpoint of step {step} under {store.root_uri} (committed: "
                            f"{steps or 'none'}); pick one with --step")
    folder = Path(store.fetch(info))  # sha256 of every file checked against the manifest
    saved = folder / "run.yaml"
    return ModelSource(path=str(folder / "model"), run_file=saved.read_text() if saved.exists() else run_file,
                       checkpoint=info, checkpoint_folder=folder, store=store)


def resolve_model_source(ref: str, *, step: int | None = None, gguf_file: str | None = None,
                         endpoint_url: str | None = None, region: str | None = None) -> ModelSource:
    """The model ``ref`` names (module docstring); SpecError says what was looked for."""
    what = f"model {ref!r}"
    if ref.startswith("builtin:"):
        return ModelSource(path=ref)
    if is_s3(ref):
        match = _STEP.match(ref.rstrip("/"))
        if match and step is None:
            return _from_store(match["root"], int(match["step"]), endpoint_url=endpoint_url, region=region, what=what)
        return _from_store(ref, step, endpoint_url=endpoint_url, region=region, what=what)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path=str(path.parent), gguf_file=path.name)
    if not path.is_dir():
        raise SpecError(f"{what}: no such folder or file (a run folder, a checkpoint, a Hugging Face folder, "
                        "builtin:NAME, an s3:// prefix or a .gguf file)")
    if (path / "manifest.json").exists():  # a committed step folder
        match = _STEP.match(str(path.resolve()))
        if match is None:
            raise SpecError(f"{what}: a manifest.json outside a step-NNNNNNNN folder")
        return _from_store(match["root"], int(match["step"]), what=what)
    if (path / "checkpoints").is_dir():  # a run folder
        run_file = (path / "run.yaml").read_text() if (path / "run.yaml").exists() else None
        return _from_store(str(path / "checkpoints"), step, run_file=run_file, what=what)
    if any(child.name.startswith("step-") for child in path.iterdir()):  # a checkpoint root
        return _from_store(str(path), step, what=what)
    if (path / "model" / "config.json").exists():  # a checkpoint's files folder
        step_folder = _STEP.match(str(path.resolve().parent))
        if step_folder and (path.parent / "manifest.json").exists():  # committed: check it through its manifest
            return _from_store(step_folder["root"], int(step_folder["step"]), what=what)
        saved = path / "run.yaml"
        return ModelSource(path=str(path / "model"), run_file=saved.read_text() if saved.exists() else None)
    if (path / "config.json").exists() or gguf_file:
        return ModelSource(path=str(path), gguf_file=gguf_file)
    raise SpecError(f"{what}: found no checkpoint, config.json or GGUF file in {path}")
