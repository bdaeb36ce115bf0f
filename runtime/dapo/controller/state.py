"""The trainer's resumable state on disk: groups and collected batches as a small JSON document
plus their token arrays as tensors.

The surplus groups and the in-flight batches of the async pipeline hold every sample's token ids
and behaviour log-probs: at paper scale (512 prompts x 16 responses x 20k tokens, k batches in
flight) that is gigabytes, far too much to build as one JSON string. So a checkpoint keeps, for
each list of groups under a key ("surplus", "in_flight.0", ...), three flat tensors:

    KEY.prompt_ids     int64    every group's prompt ids, concatenated
    KEY.response_ids   int64    every sample's response ids, concatenated
    KEY.log_probs      float64  every sample's log-probs, concatenated (float64: the engine's
                                values come back bit for bit, so a resume continues exactly)

and the JSON keeps the rest with the lengths that cut them back apart (``prompt_len`` per group,
``len`` per sample). The checkpointer writes the tensors to a safetensors file, checksummed in the
manifest like every other file. Without a tensor dict (``tensors=None``) the arrays stay inline
in the JSON, which is how checkpoints written before this module hold them; both read back.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

TOKEN_FIELDS = ("prompt_ids", "response_ids", "log_probs")


def groups_to_state(groups: list, key: str, tensors: dict[str, torch.Tensor] | None) -> list[dict]:
    """The groups as JSON-able dicts; their token arrays into ``tensors`` under ``key`` (or inline)."""
    if tensors is None:
        return [g.to_state() for g in groups]
    states, prompt_ids, response_ids, log_probs = [], [], [], []
    for group in groups:
        state = group.to_state()
        prompt_ids.extend(state.pop("prompt_ids"))
        state["prompt_len"] = len(group.prompt_ids)
        for sample in state["samples"]:
            ids, probs = sample.pop("response_ids"), sample.pop("log_probs")
            if len(ids) != len(probs):
                raise ValueError(f"group {group.uid}: a sample has {len(ids)} tokens and {len(probs)} log-probs")
            sample["len"] = len(ids)
            response_ids.extend(ids)
            log_probs.extend(probs)
        states.append(state)
    if states:
        tensors[f"{key}.prompt_ids"] = torch.tensor(prompt_ids, dtype=torch.int64)
        tensors[f"{key}.response_ids"] = torch.tensor(response_ids, dtype=torch.int64)
        tensors[f"{key}.log_probs"] = torch.tensor(log_probs, dtype=torch.float64)
    return states


def groups_from_state(states: list[dict], key: str, tensors: dict[str, torch.Tensor] | None, group_cls) -> list:
    """Inverse of `groups_to_state` (inline arrays are read as they are)."""
    if not states or "prompt_len" not in states[0]:
        return [group_cls.from_state(s) for s in states]
    try:
        prompt_ids = tensors[f"{key}.prompt_ids"].tolist()
        response_ids = tensors[f"{key}.response_ids"].tolist()
        log_probs = tensors[f"{key}.log_probs"].tolist()
    except (KeyError, TypeError):
        raise ValueError(f"checkpoint trainer state: the token arrays of {key!r} are missing from its tensors") from None
    groups, p, r = [], 0, 0
    for state in states:
        state = dict(state)
        length = state.pop("prompt_len")
        state["prompt_ids"] = prompt_ids[p:p + length]
        p += length
        samples = []
        for sample in state["samples"]:
            sample = dict(sample)
            n = sample.pop("len")
            sample["response_ids"], sample["log_probs"] = response_ids[r:r + n], log_probs[r:r + n]
            r += n
            samples.append(sample)
        state["samples"] = samples
        groups.append(group_cls.from_state(state))
    if p != len(prompt_ids) or r != len(response_ids):
        raise ValueError(f"checkpoint trainer state: the lengths of {key!r} do not add up to its tensors")
    return groups


def collection_to_state(collection, key: str, tensors: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """A BatchCollection as a JSON-able dict (its groups through `groups_to_state`)."""
    state = {f.name: getattr(collection, f.name) for f in fields(collection) if f.name != "groups"}
    state["groups"] = groups_to_state(collection.groups, key, tensors)
    return state


def collection_from_state(state: dict, key: str, tensors: dict[str, torch.Tensor] | None, collection_cls,
                          group_cls):
    return collection_cls(**{**state, "groups": groups_from_state(state["groups"], key, tensors, group_cls)})
