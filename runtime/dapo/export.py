"""`dapo export RUN_DIR|CHECKPOINT|S3_URI [--step N] OUT_DIR`: a checkpoint's policy as a plain
Hugging Face folder (config, safetensors, tokenizer, generation config) that `transformers`
(`AutoModelForCausalLM.from_pretrained(OUT_DIR)`) and vLLM load as they are.

The checkpoint is fetched through `dapo.storage.CheckpointStore` (every file's sha256 checked
against the manifest), and every file written to OUT_DIR is checked again against the same
manifest after the copy ("verified on the way out"), so what leaves the platform is byte for byte
what the run committed. A checkpoint without a generation_config.json gets one from the model's
config (its eos / pad / bos tokens).

A LoRA checkpoint (spec.model.lora: adapters + base_model.json, `dapo.model.lora`) exports the
MERGED model: the base its run file names is loaded, its weights' sha256 checked against the one the
checkpoint recorded, the (manifest-checked) adapters applied and folded into the base weights
(W + alpha / r x B A), and the result saved as a plain folder that loads without peft.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from dapo.errors import DapoError
from dapo.model.lora import read_base_reference
from dapo.spec import SpecError

log = logging.getLogger("dapo.export")

MODEL_DIR = "model"


class ExportError(DapoError, RuntimeError):
    """The exported folder does not match the checkpoint; names the file."""


def export_checkpoint(source_ref: str, out_dir: str | Path, *, step: int | None = None) -> dict:
    """Write the policy of ``source_ref``'s checkpoint (dapo.storage.sources) into ``out_dir``;
    returns what was written (files with their sha256, the checkpoint's step and URI)."""
    from dapo.storage.checkpoints import sha256_file
    from dapo.storage.sources import resolve_model_source

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise SpecError(f"{out}: the export folder exists and is not empty; name a new folder")
    source = resolve_model_source(source_ref, step=step)
    if source.checkpoint is None:
        raise SpecError(f"{source_ref}: not a checkpoint (a run folder, a checkpoint folder or an s3:// prefix); "
                        "a Hugging Face folder is already exported")
    manifest_files = source.checkpoint.manifest["files"]
    model_dir = Path(source.path)
    reference = read_base_reference(model_dir)
    if reference is not None:
        return export_merged_lora(source, reference, out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for path in sorted(model_dir.iterdir()):
        rel = f"{MODEL_DIR}/{path.name}"
        if not path.is_file() or rel not in manifest_files:
            continue
        shutil.copyfile(path, out / path.name)
        got = sha256_file(out / path.name)
        if got != manifest_files[rel]["sha256"]:
            raise ExportError(f"{out / path.name}: sha256 {got[:16]}... after the copy, the checkpoint's manifest says "
                              f"{manifest_files[rel]['sha256'][:16]}...; the export is incomplete, remove {out}")
        written[path.name] = got
    if "config.json" not in written or not any(name.endswith(".safetensors") for name in written):
        raise ExportError(f"checkpoint {source.checkpoint.uri} has no model config or safetensors weights")
    if "generation_config.json" not in written:
        config = json.loads((out / "config.json").read_text())
        generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
    log.info("exported checkpoint step %d (%s) to %s: %d files, sha256-checked against its manifest",
             source.checkpoint.step, source.checkpoint.uri, out, len(written))
    return {"step": source.checkpoint.step, "uri": source.checkpoint.uri, "files": written}


def export_merged_lora(source, reference: dict, out: Path) -> dict:
    """Base + adapters of a LoRA checkpoint merged into one plain Hugging Face folder at ``out``."""
    from transformers import AutoTokenizer

    from dapo import wiring
    from dapo.model.loading import load_policy
    from dapo.model.lora import policy_with_checkpoint_adapters
    from dapo.spec import parse_run

    if source.run_file is None:
        raise SpecError(f"checkpoint {source.checkpoint.uri} holds LoRA adapters but no run.yaml naming their base "
                        f"model ({reference.get('path')}) and spec.model.lora; it cannot be merged")
    import yaml

    spec = parse_run(yaml.safe_load(source.run_file), source=f"{source.checkpoint.uri}/run.yaml").spec
    if spec.model.lora is None:
        raise SpecError(f"checkpoint {source.checkpoint.uri}: adapters without spec.model.lora in its run.yaml")
    # the base as training loaded it (same path, dtype, GGUF dequantisation, cache); then its
    # adapters, checked against the recorded base before they are merged into it
    base, _ = load_policy(spec.model, device="cpu", cache_dir=wiring.cache_dir(spec))
    model = policy_with_checkpoint_adapters(base, spec.model.lora, Path(source.path), f"checkpoint {source.checkpoint.uri}")
    merged = model.merge_and_unload()  # W <- W + (alpha / r) B A in every adapted layer; plain modules again
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source.path).save_pretrained(out)
    from dapo.storage.checkpoints import sha256_file

    written = {path.name: sha256_file(path) for path in sorted(out.iterdir()) if path.is_file()}
    log.info("exported LoRA checkpoint step %d (%s) merged into base %s (sha256 %s...) to %s", source.checkpoint.step,
             source.checkpoint.uri, reference.get("path"), str(reference.get("sha256"))[:16], out)
    return {"step": source.checkpoint.step, "uri": source.checkpoint.uri, "files": written, "merged_lora": True}


def main(args) -> int:
    """Entry point of `dapo export` (see dapo.cli)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    done = export_checkpoint(args.source, args.out_dir, step=args.step)
    checked = ("LoRA adapters merged into their sha256-checked base" if done.get("merged_lora")
               else "each sha256-checked against the checkpoint's manifest")
    print(f"exported step {done['step']} of {done['uri']} to {args.out_dir} ({len(done['files'])} files, {checked})")
    return 0
