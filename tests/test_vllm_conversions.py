"""dapo.rollout.vllm's pure parts, without vLLM: finish reasons, the sampled tokens' log-probs
picked from vLLM's outputs, samples in prompt-major order, sampling settings and per-sample seeds,
and the engine settings the run file gives per device. The pieces the in-process weight update
travels in are tested in tests/test_vllm_gpu_path.py; the real engine in tests/test_engine_vllm.py
(marker vllm)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dapo.rollout.base import FINISH_LENGTH, FINISH_STOP
from dapo.rollout.vllm import (
    VLLMEngineError,
    finish_reason,
    sample_seed,
    sampled_log_probs,
    samples_from_outputs,
    sampling_kwargs,
)


def logprob(value):
    return SimpleNamespace(logprob=value, rank=1, decoded_token=None)


def completion(ids, lps, reason, extra_top=False):
    positions = []
    for tok, lp in zip(ids, lps):
        entry = {tok: logprob(lp)}
        if extra_top:  # logprobs=1: the top-1 token may differ from the sampled one
            entry[tok + 1000] = logprob(-0.01)
        positions.append(entry)
    return SimpleNamespace(index=0, token_ids=ids, logprobs=positions, finish_reason=reason, stop_reason=None, text="")


def test_finish_reason_mapping():
    assert finish_reason("stop") == FINISH_STOP
    assert finish_reason("length") == FINISH_LENGTH
    for bad in ("abort", None, ""):
        with pytest.raises(VLLMEngineError, match="aborted or is incomplete"):
            finish_reason(bad, request_id="r7")


def test_sampled_log_probs_pick_the_sampled_token():
    ids = [5, 9, 2]
    positions = [{5: logprob(-0.5)}, {9: logprob(-1.25), 77: logprob(-0.1)}, {2: -2.0}]  # bare floats too
    assert sampled_log_probs(ids, positions) == [-0.5, -1.25, -2.0]  # picked, not computed: exact
    with pytest.raises(VLLMEngineError, match="no log-prob for sampled token 9"):
        sampled_log_probs(ids, [{5: logprob(-0.5)}, {8: logprob(-1.0)}, {2: logprob(-2.0)}])
    with pytest.raises(VLLMEngineError, match="2 log-prob entries for 3 tokens"):
        sampled_log_probs(ids, positions[:2])
    with pytest.raises(VLLMEngineError, match="logprobs=0"):
        sampled_log_probs(ids, None)
    with pytest.raises(VLLMEngineError, match="not a log-probability"):
        sampled_log_probs([5], [{5: logprob(0.3)}])


def test_samples_from_outputs_one_request_per_sample_prompt_major():
    outputs = [
        SimpleNamespace(request_id="0", outputs=[completion([7, 8, 9], [-1.0, -2.0, -3.0], "length")]),
        SimpleNamespace(request_id="1", outputs=[completion([4, 2], [-0.1, -0.2], "stop")]),
        SimpleNamespace(request_id="2", outputs=[completion([2], [-0.3], "stop", extra_top=True)]),
        SimpleNamespace(request_id="3", outputs=[completion([6], [-0.4], "length")]),
    ]
    samples = samples_from_outputs(outputs, n=2, weight_version=4)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    assert {s.weight_version for s in samples} == {4}
    assert [s.response_ids for s in samples] == [[7, 8, 9], [4, 2], [2], [6]]
    assert samples[0].log_probs == [-1.0, -2.0, -3.0] and samples[0].truncated  # copied, not computed: exact
    assert samples[1].finish_reason == FINISH_STOP and samples[2].log_probs == [-0.3]
    with pytest.raises(VLLMEngineError, match="not a multiple of n=3"):
        samples_from_outputs(outputs, n=3)
    outputs[1].outputs.append(completion([1], [-0.5], "stop"))
    with pytest.raises(VLLMEngineError, match="returned 2 samples, asked for 1"):
        samples_from_outputs(outputs, n=2)


def test_sampling_kwargs():
    kw = sampling_kwargs(n=1, temperature=0.7, top_p=1.0, max_new_tokens=16, seed=11, stop_token_ids=[3, 2, 3])
    assert kw["logprobs"] == 0 and kw["n"] == 1 and kw["max_tokens"] == 16 and kw["stop_token_ids"] == [2, 3]
    assert kw["ignore_eos"] is False and kw["seed"] == 11
    with pytest.raises(ValueError):
        sampling_kwargs(n=0, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0, stop_token_ids=[2])
    with pytest.raises(ValueError, match="temperature"):
        sampling_kwargs(n=1, temperature=0.0, top_p=1.0, max_new_tokens=4, seed=0, stop_token_ids=[2])


def test_sample_seeds_are_distinct_per_prompt_and_sample_and_reproducible():
    """The old per-prompt seed (base * 1000003 + i, vLLM adding j per sample) gave prompt i+1's
    sample j the seed of prompt i's sample j+1; per-(prompt, sample) hashes share nothing."""
    seeds = [sample_seed(5, i, j) for i in range(1536) for j in range(16)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(5, 3, 2) == sample_seed(5, 3, 2) != sample_seed(6, 3, 2)
    assert all(sample_seed(5, i + 1, j) != sample_seed(5, i, j + 1) for i in range(50) for j in range(15))


def test_vllm_settings_from_the_run_file_per_device():
    from dapo.spec import SpecError, parse_run
    from dapo.wiring import vllm_engine_kwargs

    def spec(**rollout):
        return parse_run({"metadata": {"name": "r"}, "spec": {
            "model": {"path": "builtin:arith-tiny"}, "data": {"train": "t.jsonl"},
            "rollout": {"engine": "vllm", "maxPromptLength": 100, "maxResponseLength": 28, **rollout},
            "algorithm": {"overlong": {"bufferLength": 4}}}}).spec

    cpu = vllm_engine_kwargs(spec(), "cpu")
    assert cpu["enforce_eager"] is True and cpu["enable_chunked_prefill"] is False
    assert cpu["kv_cache_memory_bytes"] == 1 << 30 and cpu["max_model_len"] == 128
    gpu = vllm_engine_kwargs(spec(), "cuda")
    assert gpu["enforce_eager"] is False and "enable_chunked_prefill" not in gpu
    assert "kv_cache_memory_bytes" not in gpu and gpu["gpu_memory_utilization"] == 0.85
    tuned = vllm_engine_kwargs(spec(kvCacheGiB=0.5, enforceEager=False, enableChunkedPrefill=True), "cuda")
    assert tuned["kv_cache_memory_bytes"] == 1 << 29 and tuned["enforce_eager"] is False
    assert tuned["enable_chunked_prefill"] is True
    with pytest.raises(SpecError, match=r"spec\.rollout\.enableChunkedPrefill: true crashes"):
        vllm_engine_kwargs(spec(enableChunkedPrefill=True), "cpu")
    with pytest.raises(SpecError, match="kvCacheGiB"):
        spec(kvCacheGiB=0)
