"""dapo.rollout.vllm: the pure parts (vLLM is GPU-only and not installed here).

vLLM-shaped outputs are built with SimpleNamespace and dicts exactly as vLLM returns them
(RequestOutput.outputs -> CompletionOutput with token_ids, logprobs = [{token_id: Logprob}],
finish_reason, index). The worker extension is exercised against a fake model_runner whose
model has a vLLM-style load_weights, fed through a real weight-sync group over gloo.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
from types import SimpleNamespace

import pytest
import torch

from dapo.rollout.base import FINISH_LENGTH, FINISH_STOP
from dapo.rollout.vllm import (
    VLLMEngine,
    VLLMEngineError,
    WeightSyncWorkerExtension,
    finish_reason,
    request_seed,
    sampled_log_probs,
    samples_from_outputs,
    sampling_kwargs,
)
from dapo.weightsync import WeightSender, WeightSyncConfig


def logprob(value):
    return SimpleNamespace(logprob=value, rank=1, decoded_token=None)


def completion(index, ids, lps, reason, extra_top=False):
    positions = []
    for tok, lp in zip(ids, lps):
        entry = {tok: logprob(lp)}
        if extra_top:  # logprobs=1: the top-1 token may differ from the sampled one
            entry[tok + 1000] = logprob(-0.01)
        positions.append(entry)
    return SimpleNamespace(index=index, token_ids=ids, logprobs=positions, finish_reason=reason,
                           stop_reason=None, text="")


def test_module_imports_without_vllm():
    assert importlib.util.find_spec("dapo.rollout.vllm") is not None
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(VLLMEngineError, match="pip install vllm"):
            VLLMEngine("/nowhere", eos_ids=[2])


def test_finish_reason_mapping():
    assert finish_reason("stop") == FINISH_STOP
    assert finish_reason("length") == FINISH_LENGTH
    for bad in ("abort", None, ""):
        with pytest.raises(VLLMEngineError, match="aborted or is incomplete"):
            finish_reason(bad, request_id="r7")


def test_sampled_log_probs_pick_the_sampled_token():
    ids = [5, 9, 2]
    positions = [{5: logprob(-0.5)}, {9: logprob(-1.25), 77: logprob(-0.1)}, {2: -2.0}]  # bare floats too
    assert sampled_log_probs(ids, positions) == [-0.5, -1.25, -2.0]
    with pytest.raises(VLLMEngineError, match="no log-prob for sampled token 9"):
        sampled_log_probs(ids, [{5: logprob(-0.5)}, {8: logprob(-1.0)}, {2: logprob(-2.0)}])
    with pytest.raises(VLLMEngineError, match="2 log-prob entries for 3 tokens"):
        sampled_log_probs(ids, positions[:2])
    with pytest.raises(VLLMEngineError, match="logprobs=0"):
        sampled_log_probs(ids, None)
    with pytest.raises(VLLMEngineError, match="not a log-probability"):
        sampled_log_probs([5], [{5: logprob(0.3)}])


def test_samples_from_outputs_keep_prompt_order_and_sample_index():
    outputs = [
        SimpleNamespace(request_id="0", outputs=[completion(1, [4, 2], [-0.1, -0.2], "stop"),
                                                 completion(0, [7, 8, 9], [-1.0, -2.0, -3.0], "length")]),
        SimpleNamespace(request_id="1", outputs=[completion(0, [2], [-0.3], "stop", extra_top=True),
                                                 completion(1, [6], [-0.4], "length")]),
    ]
    samples = samples_from_outputs(outputs, n=2, weight_version=4)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    assert {s.weight_version for s in samples} == {4}
    assert [s.response_ids for s in samples] == [[7, 8, 9], [4, 2], [2], [6]]
    assert samples[0].log_probs == [-1.0, -2.0, -3.0] and samples[0].truncated
    assert samples[1].finish_reason == FINISH_STOP and samples[2].log_probs == [-0.3]
    with pytest.raises(VLLMEngineError, match="returned 2 samples, asked for 3"):
        samples_from_outputs(outputs, n=3)


def test_sampling_kwargs_and_seeds():
    kw = sampling_kwargs(n=4, temperature=0.7, top_p=1.0, max_new_tokens=16, seed=11, stop_token_ids=[3, 2, 3])
    assert kw["logprobs"] == 0 and kw["n"] == 4 and kw["max_tokens"] == 16 and kw["stop_token_ids"] == [2, 3]
    assert kw["ignore_eos"] is False and kw["seed"] == 11
    with pytest.raises(ValueError):
        sampling_kwargs(n=0, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0, stop_token_ids=[2])
    with pytest.raises(ValueError, match="temperature"):
        sampling_kwargs(n=1, temperature=0.0, top_p=1.0, max_new_tokens=4, seed=0, stop_token_ids=[2])
    seeds = {request_seed(5, i) for i in range(100)}
    assert len(seeds) == 100 and request_seed(5, 3) == request_seed(5, 3) != request_seed(6, 3)


class FakeVLLMModel(torch.nn.Module):
    """vLLM models fuse q/k/v into qkv_proj; load_weights maps HF names onto that layout."""

    def __init__(self):
        super().__init__()
        self.qkv_proj = torch.nn.Parameter(torch.zeros(6, 2))
        self.loaded: list[str] = []

    def load_weights(self, weights):
        for name, tensor in weights:
            row = {"q_proj.weight": 0, "k_proj.weight": 2, "v_proj.weight": 4}[name]
            self.qkv_proj.data[row:row + 2].copy_(tensor)
            self.loaded.append(name)
        return set(n for n, _ in weights)


class FakeWorker(WeightSyncWorkerExtension):
    def __init__(self):
        self.model_runner = SimpleNamespace(model=FakeVLLMModel())
        self.device = torch.device("cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_worker_extension_receives_a_sync_through_load_weights():
    """A real WeightSender -> the extension's receiver (a thread standing in for the vLLM worker)."""
    port = free_port()
    worker = FakeWorker()
    tensors = {"q_proj.weight": torch.full((2, 2), 1.0), "k_proj.weight": torch.full((2, 2), 2.0),
               "v_proj.weight": torch.full((2, 2), 3.0)}
    result = {}

    def rollout_side():
        try:
            worker.dapo_join_weight_sync("127.0.0.1", port, 2, 1, backend="gloo", timeout_s=20.0, bucket_bytes=1 << 10)
            result["version"] = worker.dapo_receive_weights()
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc
        finally:
            worker.dapo_leave_weight_sync()

    thread = threading.Thread(target=rollout_side)
    thread.start()
    sender = WeightSender(WeightSyncConfig(host="127.0.0.1", port=port, world_size=2, rank=0, backend="gloo",
                                           timeout_s=20.0, bucket_bytes=1 << 10, verify_checksums=True))
    try:
        stats = sender.send(tensors.items(), version=3)
    finally:
        thread.join(30)
        sender.close()
    assert "error" not in result, result.get("error")
    assert result["version"] == 3 and stats.tensors == 3
    assert worker.model_runner.model.qkv_proj[:, 0].tolist() == [1, 1, 2, 2, 3, 3]
    assert sorted(worker.model_runner.model.loaded) == sorted(tensors)
    assert worker.dapo_load_weights([("k_proj.weight", torch.full((2, 2), 9.0))]) == 1
    assert worker.model_runner.model.qkv_proj[2, 0] == 9.0


class FakeLLM:
    """What VLLMEngine needs from vllm.LLM after construction: collective_rpc, reset_prefix_cache."""

    def __init__(self, worker, reset_ok=True):
        self.worker, self.reset_ok, self.resets = worker, reset_ok, 0

    def collective_rpc(self, method, args=()):
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self):
        self.resets += 1
        return self.reset_ok


def _engine_with(llm):
    engine = VLLMEngine.__new__(VLLMEngine)  # skip the vllm import: wire a fake LLM in
    engine.llm, engine._version, engine._joined, engine.eos_ids = llm, 0, False, [2]
    return engine


def test_update_weights_resets_the_prefix_cache_and_reports_the_version():
    llm = FakeLLM(FakeWorker())
    engine = _engine_with(llm)
    engine.update_weights([("v_proj.weight", torch.ones(2, 2))], version=4)
    assert engine.weight_version == 4 and llm.resets == 1
    assert llm.worker.model_runner.model.qkv_proj[4, 0] == 1.0
    refusing = _engine_with(FakeLLM(FakeWorker(), reset_ok=False))
    with pytest.raises(VLLMEngineError, match="prefix cache"):
        refusing.update_weights([("v_proj.weight", torch.ones(2, 2))], version=5)
    assert refusing.weight_version == 0  # never reports a version it cannot serve cleanly
    with pytest.raises(VLLMEngineError, match="join_weight_sync"):
        engine.receive_weights()
