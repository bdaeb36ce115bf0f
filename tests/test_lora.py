"""LoRA (spec.model.lora, dapo.model.lora): the spec and its refusals, the learner training adapters
only, adapter-only weight sync into the HF engine, checkpoints with a base reference, resume equal
to an uninterrupted run, and `dapo export` merging adapters into a plain Hugging Face folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from _dapo_tiny import tiny_policy
from _run_files import run_doc, write_run_file
from _tiny_trainer import OverlapScorer, checkpoint_folder, read_lines
from dapo.learner.batch import make_batch
from dapo.learner.torch_learner import TorchLearner, has_dropout
from dapo.model.lora import adapter_parameters, apply_lora, base_weights_sha256
from dapo.rollout.base import encode_prompt
from dapo.rollout.hf import HFEngine
from dapo.spec import LoraSpec, SpecError, parse_run

torch.set_num_threads(2)

# the fault suite's bit-exact state comparison (tests/faults/_harness.py), loaded by path: tests/faults is
# not a package, and its conftest (fault-report plumbing) must not be imported here
_spec = importlib.util.spec_from_file_location("_fault_harness", Path(__file__).parent / "faults" / "_harness.py")
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)


def _lora_policy(seed: int = 0, **lora):
    model, tok = tiny_policy(hidden=32, layers=2, seed=seed)
    torch.manual_seed(seed)
    return apply_lora(model, LoraSpec(**lora)), tok


def _learner(model, **kw) -> TorchLearner:
    return TorchLearner(model, lr=kw.pop("lr", 1e-2), mini_batch_rows=4, micro_batch_rows=4, weight_decay=0.0, **kw)


def _batch(tok, rows: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [encode_prompt(tok, [{"role": "user", "content": text}]) for text in ("1+1", "12+34", "7", "x=?")][:rows]
    responses = [torch.randint(3, len(tok), (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (rows,), generator=g)]
    batch = make_batch(prompts, responses, tok.pad_token_id)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5][:rows])[:, None] * batch.response_mask
    return batch


# --------------------------------------------------------------------------- the spec


def test_lora_spec_parses_and_unsupported_combinations_name_the_field_and_fix(tmp_path):
    def run_doc_tiny(**sections):
        return run_doc(preset="tiny", folder=tmp_path, **sections)

    spec = parse_run(run_doc_tiny(model={"lora": {"rank": 4, "alpha": 8, "dropout": 0.1,
                                                            "targetModules": ["q_proj"]}})).spec
    assert spec.model.lora == LoraSpec(rank=4, alpha=8.0, dropout=0.1, target_modules=["q_proj"])
    assert parse_run(run_doc_tiny()).spec.model.lora is None  # absent: full fine-tuning
    with pytest.raises(SpecError, match=r"spec.model.lora with several learner ranks needs spec.learner.strategy torch"
                                        r".*set spec.learner.strategy: torch"):
        parse_run(run_doc_tiny(model={"lora": {}}, learner={"replicas": 2, "strategy": "deepspeed-zero2"}))
    assert parse_run(run_doc_tiny(model={"lora": {}}, learner={"replicas": 2})).spec.learner.strategy == "torch"
    remote_vllm = parse_run(run_doc_tiny(model={"lora": {}}, rollout={"engine": "vllm"}))  # fine in one process
    from dapo.entry.processes import run_processes

    with pytest.raises(SpecError, match=r"spec.model.lora with rollout processes running vLLM.*engine: hf"):
        run_processes(remote_vllm, tmp_path / "never", resume=False)
    with pytest.raises(SpecError, match=r"spec.model.lora.rank"):
        parse_run(run_doc_tiny(model={"lora": {"rank": 0}}))


def test_the_operator_refuses_a_lora_run_file(tmp_path):
    from dapo_operator.render import render_objects

    path = write_run_file(tmp_path / "run.yaml", run_doc(preset="operator", model={"lora": {"rank": 8}},
                                                         rollout={"engine": "hf"}, learner={"replicas": 1}))
    with pytest.raises(SpecError, match=r"spec.model.lora: the operator does not start LoRA runs .* remove spec.model.lora"):
        render_objects(str(path))


# --------------------------------------------------------------------------- the learner


def test_target_modules_alpha_and_dropout_reach_the_adapters():
    model, _ = _lora_policy(rank=2, alpha=8.0, target_modules=["q_proj", "v_proj"])
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, _ in adapter_parameters(model)}
    assert adapted == {"q_proj", "v_proj"}  # targetModules: no adapter on k_proj, o_proj or the MLP
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in adapter_parameters(model)}
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        x = torch.randn(3, 32)
        delta = layer(x) - layer.base_layer(x)
        want = (8.0 / 2) * x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    torch.testing.assert_close(delta, want, atol=1e-5, rtol=1e-5)  # alpha / rank scales B A x
    assert not has_dropout(model)  # dropout 0: the training forward is the engine's forward
    dropped, _ = _lora_policy(rank=2, dropout=0.5)
    assert has_dropout(dropped)  # so the learner takes proximal log-probs from an eval-mode pass


def test_only_adapters_train_and_hold_optimizer_state():
    model, tok = _lora_policy(rank=4)
    learner = _learner(model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters_before = {n: p.detach().clone() for n, p in adapter_parameters(model)}
    held = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for _, p in adapter_parameters(model)}
    metrics = learner.update(_batch(tok))
    assert metrics["actor/grad_norm"] > 0
    for name, before in base_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name  # the base never moves
    moved = [n for n, p in adapter_parameters(model) if not torch.equal(p, adapters_before[n])]
    assert moved, "no adapter moved"
    assert len(learner.state_dict()["optimizer"]["state"]) == len(adapters_before)
    saved = learner.full_state_dict_for_save()
    assert set(saved) == {n for n, _ in adapter_parameters(model)}  # the adapters alone, under the module's names
    other, _ = _lora_policy(rank=4, seed=1)
    from dapo.model.lora import adapter_state, load_adapter_state
    from peft import get_peft_model_state_dict

    load_adapter_state(other, get_peft_model_state_dict(model))  # the saved format round-trips exactly
    assert all(torch.equal(a, b) for a, b in zip(adapter_state(other).values(), adapter_state(model).values()))
    with pytest.raises(ValueError, match=r"adapters: missing \['base_model.model.model.layers.0.mlp.down_proj"):
        learner.load_model_weights({})  # nothing loaded: the names are checked first


@pytest.mark.integration
def test_adapter_only_sync_makes_engine_log_probs_equal_the_learners():
    model, tok = _lora_policy(rank=4)
    learner = _learner(model, lr=5e-2)
    engine = HFEngine(learner.model, tok)  # its own copy: base loaded once, adapters synced
    base_sha = base_weights_sha256(engine.model)
    learner.update(_batch(tok))
    sent = list(learner.named_parameters_for_sync())
    assert sent and all("lora_" in name for name, _ in sent)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sent_bytes = sum(t.numel() * t.element_size() for _, t in sent)
    assert sent_bytes * 5 < full_bytes  # rank 4 on a 32-wide model: ~10x fewer bytes
    engine.update_weights(sent, 1)
    assert base_weights_sha256(engine.model) == base_sha  # nothing but adapters reached the engine
    prompts = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in ("1+1", "12+345", "x")]
    samples = engine.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3)
    batch = make_batch([prompts[s.prompt_index] for s in samples], [s.response_ids for s in samples], tok.pad_token_id)
    learner_lp = learner.compute_log_probs(batch)
    for i, s in enumerate(samples):
        # the test_engine tolerance: KV-cache decode vs one padded forward of the same float32 weights, <= a few ulp
        torch.testing.assert_close(torch.tensor(s.log_probs), learner_lp[i, :len(s.log_probs)], atol=2e-5, rtol=1e-4)
    # the same engine before the sync would sample from the base: the adapters changed its log-probs
    stale = HFEngine(_lora_policy(rank=4)[0], tok)
    stale_lp = [stale_s.log_probs for stale_s in stale.generate(prompts, n=2, temperature=1.0, top_p=1.0,
                                                                 max_new_tokens=6, seed=3)]
    assert stale_lp != [s.log_probs for s in samples]
    with pytest.raises(KeyError, match="takes adapter tensors only"):
        engine.update_weights([("base_model.model.model.norm.weight", torch.ones(32))], 2)
    with pytest.raises(ValueError, match="refusing to serve a partial update"):
        engine.update_weights(sent[:-1], 2)


def test_vllm_lora_rank_slots():
    """vLLM serves adapters in rank slots of fixed sizes: the smallest that holds spec.model.lora.rank."""
    from dapo.rollout.vllm import VLLMEngineError, vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 16, 512)] == [1, 8, 8, 16, 16, 512]
    with pytest.raises(VLLMEngineError, match="spec.model.lora.rank 600"):
        vllm_lora_rank(LoraSpec(rank=600).rank)


# --------------------------------------------------------------------------- checkpoints, resume, export


def _final_state(run_dir: Path) -> dict:
    """The fault suite's final state, less the last evaluation's wall-clock seconds (a measurement, not state)."""
    state = _harness.final_state(str(run_dir / "checkpoints"), run_dir)
    state["trainer"]["last_val"].pop("timing_s/eval")
    return state


@pytest.mark.integration
def test_lora_resume_equals_uninterrupted_and_export_merges(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import dapo.wiring
    from _dapo_tiny import inject_tiny_policy

    inject_tiny_policy(monkeypatch)  # builtin:test-tiny is the tiny policy, also for `dapo export`'s base
    monkeypatch.setattr(dapo.wiring, "build_scorer", lambda spec: OverlapScorer())

    from dapo import wiring
    from dapo.cli import main as cli_main
    from dapo.model.lora import BASE_MODEL_FILE, load_adapter_state
    from dapo.storage.checkpointer import read_model_state

    doc = run_doc(preset="tiny", folder=tmp_path, model={"lora": {"rank": 4, "alpha": 16}},
                  learner={"lr": 0.05, "totalSteps": 2}, checkpoint={"everySteps": 1},
                  eval={"beforeTrain": False, "everySteps": 2})
    run_file = write_run_file(tmp_path / "run.yaml", doc)
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    assert cli_main(["run", str(run_file), "--output-dir", str(full_dir)]) == 0
    assert cli_main(["run", str(run_file), "--output-dir", str(split_dir), "--set", "spec.learner.totalSteps=1"]) == 0
    assert cli_main(["run", str(run_file), "--output-dir", str(split_dir), "--resume"]) == 0
    want, got = _final_state(full_dir), _final_state(split_dir)
    assert want["checkpoint step"] == 2 and set(want["model"]) == set(got["model"])
    assert all("lora_" in name for name in want["model"])  # the checkpoint holds the adapters only
    assert len(want["optimizer and scheduler"]["optimizer"]["state"]) == len(want["model"])  # and their AdamW state
    assert _harness.differences(want, got) == []  # adapters, optimizer, sampler, RNGs: bit for bit
    lines = [line for line in _harness.step_lines(full_dir)]
    assert all(0 < line["perf/weight_sync_bytes"] == lines[0]["perf/weight_sync_bytes"] for line in lines)

    # `dapo eval` of the LoRA checkpoint (base + adapters) reproduces the run's own evaluation at that step
    import json

    last_eval = read_lines(full_dir)[1][-1]
    assert last_eval["step"] == 2
    assert cli_main(["eval", str(full_dir), "--data", str(tmp_path / "eval.jsonl"), "--json", str(tmp_path / "e.json")]) == 0
    (row,) = json.loads((tmp_path / "e.json").read_text())["by_source"].values()
    assert (row["avg@2"], row["score"]) == (last_eval["val/acc/mean"], last_eval["val/score/mean"])

    # the merged export loads without peft and gives the learner's log-probs (adapters applied)
    out = tmp_path / "export"
    assert cli_main(["export", str(full_dir), str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    spec = parse_run(doc).spec
    model, tok = wiring.load_policy(spec, "cpu")
    learner = _learner(wiring.apply_lora(spec, model))
    ckpt_model = checkpoint_folder(full_dir, 2) / "model"
    assert (ckpt_model / BASE_MODEL_FILE).exists()
    load_adapter_state(learner.model, read_model_state(ckpt_model))
    batch = _batch(tok)
    merged_learner = _learner(merged)
    torch.testing.assert_close(merged_learner.compute_log_probs(batch), learner.compute_log_probs(batch),
                               atol=2e-5, rtol=1e-4)  # W + s B A vs W x + s B (A x): float32 rounding only
    base_learner = _learner(wiring.load_policy(spec, "cpu")[0])
    assert not torch.allclose(base_learner.compute_log_probs(batch), learner.compute_log_probs(batch), atol=1e-3)

    # adapters never land on another base: one base weight changed is refused on resume, naming the fix
    from dapo.entry.inprocess import build_embedded_run

    other, tok = wiring.load_policy(spec, "cpu")
    with torch.no_grad():
        other.model.norm.weight[0] += 1.0
    with pytest.raises(RuntimeError, match=r"trained on base model builtin:test-tiny .* point spec.model.path"):
        build_embedded_run(parse_run(doc), full_dir, resume=True, scorer=OverlapScorer(), policy=(other, tok))


@pytest.mark.processes
def test_processes_launcher_sends_adapters_only_to_rollout_processes(tmp_path):
    """`dapo run --launcher processes` of a LoRA run file with two data-parallel learner ranks (each
    wraps its own base with the same adapters; rank 0's reach the other): the rollout processes
    load the base once and apply the adapters each sync brings; every sync's checksum (DAPO_VERIFY_WEIGHT_SYNC) is the
    same on the learner and on both replicas, it changes every step (the adapters train), and each
    sync sends the adapters' bytes only."""
    import json
    import subprocess
    import sys

    import yaml

    from _dapo_runs import make_model, role_env, write_data
    from dapo.model.lora import adapter_parameters, apply_lora

    model_dir = make_model(tmp_path / "model")
    doc = run_doc(preset="processes", model={"path": str(model_dir), "lora": {"rank": 4}},
                  data={"train": str(write_data(tmp_path / "train.jsonl", 12))},
                  learner={"totalSteps": 2, "lr": 0.05, "replicas": 2}, rollout={"replicas": 2},
                  checkpoint={"everySteps": 0, "keep": 1})
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "dapo.cli", "run", str(run_file), "--output-dir", str(out),
                             "--launcher", "processes"], env=role_env({"DAPO_VERIFY_WEIGHT_SYNC": "1"}),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    syncs = [json.loads(line) for line in (out / "weight_sync.jsonl").read_text().splitlines()]
    assert [s["version"] for s in syncs] == [1, 2]
    for sync in syncs:
        assert len(sync["replicas"]) == 2 and set(sync["replicas"].values()) == {sync["learner"]}, sync
    assert syncs[0]["learner"] != syncs[1]["learner"]
    from transformers import AutoModelForCausalLM

    adapters = dict(adapter_parameters(apply_lora(AutoModelForCausalLM.from_pretrained(model_dir), LoraSpec(rank=4))))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "actor/pg_loss" in line]
    assert {line["perf/weight_sync_bytes"] for line in lines} == {sum(t.numel() * t.element_size()
                                                                      for t in adapters.values())}
    # the final checkpoint: the adapters and their AdamW state only (the data-parallel learner's rank 0)
    store_state = _harness.final_state(str(out / "checkpoints"), tmp_path)
    assert store_state["checkpoint step"] == 2 and set(store_state["model"]) == {
        name.replace(".default", "") for name in adapters}
    assert len(store_state["optimizer and scheduler"]["optimizer"]["state"]) == len(adapters)
    assert "learner rank 1/2 following the controller" in (out / "logs" / "learner-1.log").read_text()
