"""`dapo export RUN_DIR|CHECKPOINT|S3_URI [--step N] OUT_DIR`: a checkpoint's policy as a plain
Hugging Face folder (config, safetensors, tokenizer, generation config) that `transformers`
(`AutoModelForCausalLM.from_pretrained(OUT_DIR)`) and vLLM load as they are.

The checkpoint is fetched through `dapo.storage.CheckpointStore` (every file's sha256 checked
against the manifest), and every file written to OUT_DIR is checked again against the same
manifest after the copy ("verified on the way out"), so what leaves the platform is byte for byte
what the run committed. A checkpoint without a generation_config.json gets one from the model's
config (its eos / pad / bos tokens).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from dapo.errors import DapoError
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


def main(args) -> int:
    """Entry point of `dapo export` (see dapo.cli)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    done = export_checkpoint(args.source, args.out_dir, step=args.step)
    print(f"exported step {done['step']} of {done['uri']} to {args.out_dir} ({len(done['files'])} files, "
          "each sha256-checked against the checkpoint's manifest)")
    return 0
