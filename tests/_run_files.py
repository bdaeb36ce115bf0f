"""The one builder of the run files (DAPORun documents) the tests write or parse.

``run_doc(name, preset, **sections)`` returns a fresh document: the preset's spec with each keyword
section deep-merged into it (nested mappings merge key by key, anything else replaces the preset's
value; ``Replace({...})`` replaces a whole mapping instead of merging into it). Tests get it as the
``run_doc`` fixture of tests/conftest.py; helper modules, module-level constants and session
fixtures import it from here.

Presets (the few distinct bases the tests start from):

- ``minimal``: the smallest valid file (a built-in model and a training file): spec defaults tests;
- ``cluster``: a small cluster file (2 learners, 2 rollout replicas, S3 data) in namespace ns1;
- ``operator``: ``cluster`` plus 1 reward replica, S3 checkpoints and backoffLimit 2: the run the
  operator tests create;
- ``tiny``: the tiny in-process training of tests/test_trainer.py (builtin:test-tiny, 12 train and 3
  eval prompts written into ``folder``, dynamic sampling, 4 steps, a checkpoint every 2);
- ``processes``: several processes on 2 cores (4 prompts x 2 responses a step, no dynamic
  sampling); the caller gives model.path, data.train, learner.totalSteps and checkpoint;
- ``faults``: the fault-injection runs of tests/faults/ (the arithmetic model, dynamic sampling,
  a checkpoint every step, 4 steps); the caller gives model.path and data.train.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import yaml

API_VERSION = "dapo.dev/v1alpha1"
FAULT_STEPS = 4  # the faults preset's training steps (and checkpoints kept)


class Replace(dict):
    """A section (or nested mapping) that replaces the preset's value instead of merging into it."""


def write_tiny_prompts(folder: Path, count: int, name: str) -> Path:
    """``count`` sum problems whose answers are prefixes of "0123456789" (tests/_tiny_trainer.py's
    OverlapScorer gives their groups varying accuracy)."""
    path = Path(folder) / name
    with path.open("w") as fh:
        for i in range(count):
            fh.write(json.dumps({"problem": f"What is {i}+{i * 7 % 11}?", "answer": "0123456789"[: 1 + i % 4]}) + "\n")
    return path


def _tiny(folder: Path) -> dict[str, Any]:
    return {
        "model": {"path": "builtin:test-tiny"},
        "data": {"train": str(write_tiny_prompts(folder, 12, "train.jsonl")),
                 "eval": str(write_tiny_prompts(folder, 3, "eval.jsonl")), "promptTemplate": "none"},
        "algorithm": {"overlong": {"enabled": True, "bufferLength": 2},
                      "dynamicSampling": {"enabled": True, "maxGenBatches": 5}},
        "rollout": {"engine": "hf", "n": 4, "maxResponseLength": 6, "genBatchSize": 3},
        "learner": {"strategy": "torch", "trainBatchSize": 2, "miniBatchSize": 1, "microBatchSize": 3, "lr": 1e-3,
                    "warmupSteps": 1, "totalSteps": 4, "seed": 3, "weightDecay": 0.0},
        "reward": {"workers": 1, "timeoutSeconds": 5},
        "eval": {"everySteps": 2, "beforeTrain": True, "n": 2},
        "checkpoint": {"everySteps": 2, "keep": 2},
    }


_CLUSTER = {
    "model": {"path": "builtin:arith-tiny"},
    "data": {"train": "s3://data/train.parquet"},
    "rollout": {"replicas": 2, "maxResponseLength": 256, "genBatchSize": 8},
    "algorithm": {"overlong": {"bufferLength": 64}},
    "learner": {"replicas": 2, "trainBatchSize": 8, "miniBatchSize": 4},
}

# name: (default metadata.name, default metadata.namespace, spec or a function of the folder to write data into)
PRESETS: dict[str, tuple[str, str | None, dict[str, Any] | Callable[[Path], dict[str, Any]]]] = {
    "minimal": ("run-a", None, {"model": {"path": "builtin:arith-tiny"}, "data": {"train": "train.jsonl"}}),
    "cluster": ("demo", "ns1", _CLUSTER),
    "operator": ("demo", "ns1", {**_CLUSTER, "reward": {"replicas": 1}, "checkpoint": {"uri": "s3://ckpt/demo"},
                                 "backoffLimit": 2}),
    "tiny": ("t", None, _tiny),
    "processes": ("e2e", None, {
        "data": {"promptTemplate": "none"},
        "algorithm": {"overlong": {"enabled": True, "bufferLength": 4}, "dynamicSampling": {"enabled": False}},
        "rollout": {"replicas": 1, "engine": "hf", "n": 2, "maxResponseLength": 6, "genBatchSize": 4},
        "learner": {"replicas": 1, "strategy": "torch", "trainBatchSize": 4, "miniBatchSize": 2, "microBatchSize": 4,
                    "lr": 1e-3, "warmupSteps": 0, "seed": 5, "weightDecay": 0.0},
        "reward": {"replicas": 1, "workers": 1, "timeoutSeconds": 5},
        "eval": {"everySteps": 0, "beforeTrain": False},
    }),
    "faults": ("faults", None, {
        "data": {"promptTemplate": "none"},
        "algorithm": {"overlong": {"enabled": True, "bufferLength": 2},
                      "dynamicSampling": {"enabled": True, "maxGenBatches": 8}},
        "rollout": {"replicas": 1, "engine": "hf", "n": 4, "maxPromptLength": 16, "maxResponseLength": 8,
                    "genBatchSize": 8},
        "learner": {"replicas": 1, "strategy": "torch", "trainBatchSize": 4, "miniBatchSize": 2, "microBatchSize": 4,
                    "lr": 2e-3, "warmupSteps": 0, "totalSteps": FAULT_STEPS, "seed": 5, "weightDecay": 0.0},
        "reward": {"replicas": 1, "workers": 1, "timeoutSeconds": 5, "scorer": "math_dapo"},
        "eval": {"everySteps": 0, "beforeTrain": False},
        "checkpoint": {"everySteps": 1, "keep": FAULT_STEPS},
    }),
}


def needs_folder(preset: str) -> bool:
    """Whether the preset writes data files (into run_doc's ``folder``)."""
    return callable(PRESETS[preset][2])


def _plain(value: Any) -> Any:
    """A deep copy with Replace mappings turned into plain dicts (yaml.safe_dump writes dicts only)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return copy.deepcopy(value)


def deep_merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``updates`` merged in (in place; returned): mappings merge key by key unless the
    update is a ``Replace``; every other value replaces the base's."""
    for key, value in updates.items():
        if isinstance(value, dict) and not isinstance(value, Replace) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = _plain(value)
    return base


def run_doc(name: str | None = None, preset: str = "minimal", *, folder: Path | None = None,
            namespace: str | None = None, metadata: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A DAPORun document: ``preset``'s spec with ``sections`` (spec keys) deep-merged into it.

    ``name`` and ``namespace`` default to the preset's; ``metadata`` adds other metadata fields
    (labels); ``folder`` is where a preset that needs data files (``tiny``) writes them."""
    default_name, default_namespace, spec = PRESETS[preset]
    if callable(spec):
        if folder is None:
            raise ValueError(f"the {preset!r} preset writes its data files: give run_doc a folder")
        spec = spec(Path(folder))
    meta: dict[str, Any] = {"name": default_name if name is None else name}
    if namespace or default_namespace:
        meta["namespace"] = namespace or default_namespace
    meta.update(_plain(metadata or {}))
    return {"apiVersion": API_VERSION, "kind": "DAPORun", "metadata": meta,
            "spec": deep_merge(_plain(spec), sections)}


def write_run_file(path: Path, doc: dict[str, Any]) -> Path:
    """``doc`` as YAML at ``path``; returns the path."""
    path = Path(path)
    path.write_text(yaml.safe_dump(doc))
    return path
