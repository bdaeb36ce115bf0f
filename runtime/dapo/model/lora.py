"""LoRA (``spec.model.lora``): low-rank adapters on a frozen base model, through peft.

The policy becomes a ``peft.PeftModel``: the base weights stay frozen (requires_grad False), so the
learner's optimizer holds only the adapters (it takes the parameters that require grad). What
leaves the learner is the adapters alone: the weight sync sends the adapter parameters under the
model's own names (the HF engine holds a copy of the same PeftModel, base included, and loads
them in place), and a checkpoint keeps them in peft's saved format (adapter_config.json +
adapter_model.safetensors, which ``PeftModel.from_pretrained`` loads) with a reference to the base
model: its spec.model.path and the sha256 of its weights (`base_weights_sha256`), checked on
resume and export so that adapters never land on a different base.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, Mapping

import torch

BASE_MODEL_FILE = "base_model.json"  # in a LoRA checkpoint's model/ folder, beside the adapter files
ADAPTER_MARK = "lora_"  # peft names every adapter tensor lora_A / lora_B (lora_embedding_* for embeddings)


def is_lora(model) -> bool:
    """Whether ``model`` is a peft-wrapped policy (adapters on a frozen base). Without peft imported
    no model can be one: full fine-tuning never pays for importing it."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def lora_config(lora):
    """peft's LoraConfig from `dapo.spec.LoraSpec`. An empty targetModules is peft's "all-linear"
    (every linear layer but the output head: the head of a tied-embedding model is the embedding)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules) or "all-linear", bias="none", task_type="CAUSAL_LM")


def apply_lora(model, lora):
    """The policy with fresh adapters (`lora_config`); peft initialises B to 0, so the wrapped model
    computes exactly what the base computes until the first update. Initialisation of A draws from
    torch's global RNG: callers seed it first (the run's seed), so every process builds the same adapters."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(lora))
    except ValueError as exc:  # e.g. targetModules naming no module of this architecture
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        from dapo.spec import SpecError

        raise SpecError(f"spec.model.lora.targetModules: {exc}; this model's linear layers are {names}") from None


def adapter_parameters(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, parameter) of every adapter tensor, under the model's own names (what the weight sync
    sends; an engine holding the same PeftModel finds them by these names)."""
    for name, param in model.named_parameters():
        if ADAPTER_MARK in name:
            yield name, param


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model.state_dict()`` (no copy), the state dict ``PeftModel.save_pretrained``
    takes and writes in peft's format (the adapter name dropped from each key)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ADAPTER_MARK in name}


def check_adapter_names(model, names) -> None:
    """ValueError unless ``names`` (a checkpoint's tensor names, peft's saved format) are exactly
    ``model``'s adapters: checked before anything is loaded (a data-parallel learner checks on
    rank 0 before it calls the other ranks in)."""
    from peft import get_peft_model_state_dict

    expected, names = set(get_peft_model_state_dict(model)), set(names)
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise ValueError(f"adapters: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         "(spec.model.lora rank / targetModules differ from the checkpoint's)")


def load_adapter_state(model, state: Mapping[str, torch.Tensor]) -> None:
    """Copy saved adapters (peft's format, a checkpoint's adapter_model.safetensors) into ``model``
    in place, so the optimizer keeps holding the same parameters. ValueError (`check_adapter_names`)
    names adapters the state lacks or tensors this model has no adapter for."""
    from peft import set_peft_model_state_dict

    check_adapter_names(model, state.keys())
    set_peft_model_state_dict(model, dict(state))


def base_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the frozen base under the base model's own names (peft's wrapper prefix
    and ``.base_layer`` removed), in the order of its state dict."""
    base = model.get_base_model()
    for name, tensor in base.state_dict().items():
        if ADAPTER_MARK not in name:
            yield name.replace(".base_layer.", "."), tensor


def base_weights_sha256(model) -> str:
    """`dapo.weightsync.state_checksum` (sha256 over each tensor's name, dtype, shape and bytes) of
    the base's weights: the identity of the base the adapters were trained on, whatever folder or
    format it was loaded from. The base never changes during a LoRA run, so the digest is
    computed once per model object."""
    cached = getattr(model, "_dapo_base_sha256", None)
    if cached is None:
        from dapo.weightsync import state_checksum

        cached = model._dapo_base_sha256 = state_checksum(base_weights(model))
    return cached


def base_reference(model, path: str) -> dict:
    """What a LoRA checkpoint records of its base (`BASE_MODEL_FILE`)."""
    return {"path": path, "sha256": base_weights_sha256(model)}


def write_base_reference(model_dir: Path, reference: dict) -> None:
    (Path(model_dir) / BASE_MODEL_FILE).write_text(json.dumps(reference, indent=1) + "\n")


def read_base_reference(model_dir: Path) -> dict | None:
    """A checkpoint model/ folder's base reference; None for a full-weights checkpoint."""
    path = Path(model_dir) / BASE_MODEL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def check_base(model, reference: dict, where: str) -> None:
    """RuntimeError unless ``model``'s base weights are the ones the adapters of ``where`` were trained on."""
    got = base_weights_sha256(model)
    if got != reference.get("sha256"):
        raise RuntimeError(f"{where}: its adapters were trained on base model {reference.get('path')} with weights "
                           f"sha256 {str(reference.get('sha256'))[:16]}..., this spec.model loads weights sha256 "
                           f"{got[:16]}...; point spec.model.path at that base model")


def policy_with_checkpoint_adapters(base, lora, model_dir: Path, where: str):
    """``base`` (the run file's spec.model, loaded) with the adapters of a LoRA checkpoint's model/
    folder: checked against the base the checkpoint recorded first. What `dapo eval` samples from
    and `dapo export` merges."""
    from dapo.storage.checkpointer import read_model_state

    reference = read_base_reference(model_dir)
    model = apply_lora(base, lora)
    check_base(model, reference, where)
    load_adapter_state(model, read_model_state(model_dir))
    return model
