"""Parameter and buffer names of a model as checkpoints and weight syncs see them.

A checkpoint (save_pretrained) keeps one name of each tied pair and no non-persistent buffers;
these helpers map between those names and a model's own, for every learner backend.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch


def persistent_buffers(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, buffer) of the buffers ``model.state_dict()`` holds (non-persistent ones such as
    rotary inv_freq are rebuilt from the config and never saved)."""
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


def parameter_aliases(model) -> dict[str, str]:
    """alias name -> canonical name for parameters registered under several names (tied
    embeddings: lm_head.weight -> model.embed_tokens.weight); canonical = first registration,
    the name ``named_parameters()`` yields."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in canonical:
            aliases[name] = canonical[id(param)]
        else:
            canonical[id(param)] = name
    return aliases


def check_weight_names(model, names: Iterable[str]) -> None:
    """Raise ValueError unless ``names`` (a checkpoint's tensor names) cover every parameter and
    persistent buffer of ``model`` (a tied alias may stand in for its canonical name or be
    omitted, as save_pretrained omits it) and name nothing else."""
    names = set(names)
    aliases = parameter_aliases(model)
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in persistent_buffers(model)}
    present = names | {aliases[n] for n in names if n in aliases}  # an alias provides its canonical tensor
    missing = sorted(n for n in expected - present if n not in aliases)
    unexpected = sorted(names - expected)
    if missing or unexpected:
        raise ValueError(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")


def weight_for(name: str, state: Mapping[str, torch.Tensor], aliases: dict[str, str]) -> torch.Tensor:
    """``state``'s tensor for parameter ``name``, found under the name itself or any name tied
    to it (a checkpoint keeps only one name of a tied pair)."""
    if name in state:
        return state[name]
    canonical = aliases.get(name, name)
    for candidate in [canonical] + [a for a, c in aliases.items() if c == canonical]:
        if candidate in state:
            return state[candidate]
    raise KeyError(f"no tensor for parameter {name} (nor for the names tied to it)")
