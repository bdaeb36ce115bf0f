"""Shared pieces of the multi-process tests (tests/test_distributed_e2e.py, test_vllm_e2e.py,
test_dashboard.py; tests/faults/ uses role_env): a tiny model folder, sum problems and the env every
role process gets. Their run file is tests/_run_files.py's ``processes`` preset."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_model(folder: Path) -> Path:
    """A tiny random Qwen2 as an HF folder. Its EOS embedding is scaled up so that some contexts
    end the response at once and others never do: response lengths vary inside a group, so the
    overlong-shaped scores vary and the updates are not zero (the model cannot answer math)."""
    import torch

    from _dapo_tiny import tiny_policy

    model, tokenizer = tiny_policy(32, 2, 0)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.eos_token_id] *= 30
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(path: Path, count: int) -> Path:
    with path.open("w") as fh:
        for i in range(count):
            fh.write(json.dumps({"problem": f"What is {i}+{i * 7 % 11}?", "answer": str(i + i * 7 % 11)}) + "\n")
    return path


def role_env(extra: dict | None = None, *, weight_sync_timeout_s: int = 60, learner_timeout_s: int = 120) -> dict:
    """One torch thread per process and short timeouts: a dead peer is noticed in seconds."""
    env = dict(os.environ)
    env.update({"DAPO_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "DAPO_STATUS_GRACE_S": "0", "DAPO_SERVICE_WAIT_S": "120",
                "DAPO_WEIGHT_SYNC_TIMEOUT_S": str(weight_sync_timeout_s), "DAPO_LEARNER_TIMEOUT_S": str(learner_timeout_s),
                "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), env.get("PYTHONPATH", "")])})
    env.update(extra or {})
    return env


def final_checkpoint_weights(run_dir: Path, step: int) -> dict:
    """The model weights of the newest committed checkpoint under RUN_DIR/checkpoints (read
    through the manifest: data files sit in per-attempt folders), which must be ``step``."""
    from safetensors.torch import load_file

    from dapo.storage import CheckpointStore

    store = CheckpointStore(str(run_dir / "checkpoints"))
    final = store.latest()
    assert final is not None and final.step == step, final
    return load_file(str(store.fetch(final) / "model" / "model.safetensors"))
