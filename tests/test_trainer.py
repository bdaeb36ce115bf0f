"""The controller end to end on a tiny random Qwen2: `dapo run`, metrics contract, checkpoints,
exact resume, dynamic sampling (surplus carry-over, the cap's explanation) and `dapo plot`.

The policy is a tiny random model and the generation engine is the real HFEngine. A random
model cannot answer math, so most tests score with `OverlapScorer`, a deterministic in-process
rule with RewardScorer's interface (acc = the response contains a character of the answer): it
gives groups with varying accuracy, which is what exercises dynamic sampling. One test runs the
real RewardScorer (math_dapo) to show the all-wrong cap message.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import dapo.model.loading
import dapo.wiring
from _dapo_tiny import inject_tiny_policy
from _run_files import Replace, write_run_file
from _tiny_trainer import OverlapScorer, checkpoint_folder, final_weights, read_lines, tiny_trainer
from dapo.cli import main as cli_main
from dapo.entry.inprocess import build_embedded_run
from dapo.spec import SpecError, parse_run
from dapo.storage.checkpointer import Checkpointable, Checkpointer
from dapo.controller.trainer import DynamicSamplingError, Trainer

torch.set_num_threads(2)

CONTRACT_KEYS = [
    "step", "actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/entropy",
    "actor/grad_norm", "actor/lr", "critic/score/mean", "train/acc/mean", "response_length/mean",
    "response_length/clip_ratio", "train/num_gen_batches", "train/num_groups_kept", "train/surplus_groups",
    "timing_s/gen", "timing_s/reward", "timing_s/update_actor", "timing_s/step", "perf/throughput",
]


@pytest.fixture
def patched(monkeypatch):
    """`dapo run` with the tiny policy and the OverlapScorer; records each step's prompt uids."""
    inject_tiny_policy(monkeypatch)
    monkeypatch.setattr(dapo.wiring, "build_scorer", lambda spec: OverlapScorer())
    batches: list[list[str]] = []
    original = Trainer.collect_groups

    def recording(self, *args):
        out = original(self, *args)
        batches.append([g.uid for g in out.groups])
        return out

    monkeypatch.setattr(Trainer, "collect_groups", recording)
    return batches


@pytest.mark.integration
def test_run_metrics_checkpoint_resume_and_plot(tmp_path, patched, capsys, run_doc):
    run_file = write_run_file(tmp_path / "run.yaml", run_doc(preset="tiny"))
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"

    assert cli_main(["run", str(run_file), "--output-dir", str(full_dir)]) == 0
    full_batches = list(patched)
    steps, evals = read_lines(full_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:
        missing = [k for k in CONTRACT_KEYS if k not in record]
        assert not missing, missing
    assert [e["step"] for e in evals] == [0, 2, 4] and all(0.0 <= e["val/acc/mean"] <= 1.0 for e in evals)
    assert (full_dir / "run.yaml").exists() and "trainBatchSize: 2" in (full_dir / "run.yaml").read_text()
    log_text = (full_dir / "run.log").read_text()
    assert "step 4/4" in log_text and "ETA" in log_text and "s/step" in log_text
    assert "step 4/4" in capsys.readouterr().err

    # committed checkpoints (keep 2: steps 2 and 4) load with from_pretrained
    from transformers import AutoModelForCausalLM, AutoTokenizer

    committed = sorted(p.name for p in (full_dir / "checkpoints").iterdir() if (p / "manifest.json").exists())
    assert committed == ["step-00000002", "step-00000004"]
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint_folder(full_dir, 4) / "model")
    AutoTokenizer.from_pretrained(checkpoint_folder(full_dir, 4) / "model")
    assert sum(p.numel() for p in reloaded.parameters()) > 0

    # the same run interrupted after step 2, then resumed: same prompts, same final weights
    patched.clear()
    assert cli_main(["run", str(run_file), "--output-dir", str(split_dir), "--set", "spec.learner.totalSteps=2"]) == 0
    assert patched == full_batches[:2]
    with pytest.raises(SpecError, match="--resume"):
        build_embedded_run(parse_run(run_doc(preset="tiny")), split_dir, resume=False)
    patched.clear()
    assert cli_main(["run", str(run_file), "--output-dir", str(split_dir), "--resume"]) == 0
    assert patched == full_batches[2:], "resume must continue at the same data position"
    assert [r["step"] for r in read_lines(split_dir)[0]] == [1, 2, 3, 4]
    a, b = final_weights(full_dir, 4), final_weights(split_dir, 4)
    assert a.keys() == b.keys()
    for name in a:  # resumed vs uninterrupted: the same arithmetic on the same machine, bit-exact by design
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    assert not torch.equal(a["model.norm.weight"], torch.ones_like(a["model.norm.weight"])), "training moved no weight"

    # a damaged newest checkpoint (one byte of the weights flipped, same size) is refused, naming
    # the file; resume falls back to step 2, the newest that verifies, and ends in the same state
    damaged = tmp_path / "damaged"
    shutil.copytree(full_dir, damaged)
    weights = checkpoint_folder(damaged, 4) / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    patched.clear()
    assert cli_main(["run", str(run_file), "--output-dir", str(damaged), "--resume"]) == 0
    assert patched == full_batches[2:], "the fallback must redo steps 3 and 4 from checkpoint 2"
    log_text = (damaged / "run.log").read_text()
    assert re.search(r"refusing checkpoint step 4: checkpoint step 4 \(.*step-00000004\): file "
                     r"model/model.safetensors has sha256", log_text), log_text[-3000:]
    assert "resuming from checkpoint step 2, the newest that verifies (skipped damaged steps [4])" in log_text
    b = final_weights(damaged, 4)
    for name in a:  # as above: two runs of the same steps on one machine, bit-exact by design
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)

    # dapo plot RUN_DIR writes a PNG
    assert cli_main(["plot", str(full_dir)]) == 0
    png = full_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
@pytest.mark.parametrize("max_staleness", [0, 1])
def test_surplus_groups_carry_to_the_next_step_only_within_max_staleness(tmp_path, max_staleness):
    """Surplus of a collection is one weight version behind at the next step: spec.rollout.maxStaleness
    0 (on-policy) drops it, counted, and generates afresh; 1 trains it (and checkpoints what is left).
    train_step() runs the collection in line, so both take the same synchronous path."""
    trainer = tiny_trainer(tmp_path, OverlapScorer("alternate"),
                           rollout={"genBatchSize": 6, "maxStaleness": max_staleness},
                           eval={"beforeTrain": False, "everySteps": 0})
    first = trainer.train_step()
    assert first["train/num_gen_batches"] == 1 and first["train/num_groups_kept"] == 6
    surplus_uids = [g.uid for g in trainer.surplus]
    assert first["train/surplus_groups"] == len(surplus_uids) == 4
    recorded = []
    original = trainer.collect_groups
    trainer.collect_groups = lambda: (recorded.append(out := original()), out)[1]
    second = trainer.train_step()
    assert second["async/version_lag_max"] <= max_staleness
    if max_staleness == 0:
        assert second["train/surplus_used"] == 0 and second["train/surplus_dropped"] == 4
        assert second["async/stale_samples_dropped"] == 4 * 4  # 4 groups of n = 4
        assert second["train/num_gen_batches"] == 1
        assert not set(g.uid for g in recorded[0].groups) & set(surplus_uids)
        return
    assert second["train/num_gen_batches"] == 0, "a full batch of surplus needs no generation"
    assert second["train/surplus_used"] == 2 and second["async/version_lag_max"] == 1
    assert [g.uid for g in recorded[0].groups] == surplus_uids[:2]
    assert second["train/surplus_groups"] == len(surplus_uids) - 2
    # the surplus is part of the checkpointed state
    state = json.loads(json.dumps(trainer.state_dict()))
    assert [g["uid"] for g in state["surplus"]] == surplus_uids[2:]


@pytest.mark.integration
def test_scorer_gets_each_responses_row_extra_info(tmp_path):
    scorer = OverlapScorer()
    trainer = tiny_trainer(tmp_path, scorer, eval={"beforeTrain": False, "everySteps": 0})
    groups = trainer.generate_groups(trainer.train_records, [2, 0], n=2, temperature=1.0, top_p=1.0, seed=1)
    assert len(groups) == 2
    expected = [trainer.train_records[i].extra_info for i in (2, 2, 0, 0)]
    assert scorer.extra_infos == expected and expected[0]["row_index"] == 2


class _OnlyCheckpointable:
    """A trainer seen through `Checkpointable` alone: any other attribute raises."""

    MEMBERS = {name for name in vars(Checkpointable) if not name.startswith("_")} | set(Checkpointable.__annotations__)

    def __init__(self, trainer):
        self._trainer = trainer

    def __getattr__(self, name):
        if name not in self.MEMBERS:
            raise AttributeError(f"the checkpointer reached trainer.{name}, outside Checkpointable")
        return getattr(self._trainer, name)


@pytest.mark.integration
def test_checkpointer_saves_and_restores_through_checkpointable_alone(tmp_path):
    """Save a trained step and restore it into a fresh trainer, each seen only through the
    `Checkpointable` members: the restored trainer has the step, the version, the weights, and
    its engine serves those weights under that version."""
    assert _OnlyCheckpointable.MEMBERS == {"step", "checkpoint_contents", "load_model_weights", "check_base_model",
                                           "load_checkpoint_state", "after_restore"}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    quiet = dict(eval={"beforeTrain": False, "everySteps": 0})
    source = tiny_trainer(tmp_path / "a", OverlapScorer("alternate"), **quiet)
    source.train_step()
    info = source.checkpointer.save(_OnlyCheckpointable(source))
    target = tiny_trainer(tmp_path / "b", OverlapScorer("alternate"), **quiet)
    restorer = Checkpointer(source.checkpointer.store, target.tokenizer, staging_root=tmp_path / "staging")
    assert restorer.restore(_OnlyCheckpointable(target))
    assert (target.step, target.weight_version, target.engine.weight_version) == (1, 1, 1)
    assert target.last_checkpoint == {"step": info.step, "uri": info.uri}
    assert [g.uid for g in target.surplus] == [g.uid for g in source.surplus]
    engine_weights = dict(target.engine.model.named_parameters())
    for name, param in source.learner.model.named_parameters():  # copies of the saved tensors: exact
        torch.testing.assert_close(dict(target.learner.model.named_parameters())[name], param, atol=0, rtol=0)
        torch.testing.assert_close(engine_weights[name], param, atol=0, rtol=0, msg=name)


@pytest.mark.integration
@pytest.mark.parametrize("mode,expected", [("right", "ALL-CORRECT"), ("wrong", "ALL-WRONG")])
def test_dynamic_sampling_cap_explains_what_to_change(tmp_path, mode, expected):
    trainer = tiny_trainer(tmp_path, OverlapScorer(mode), eval={"beforeTrain": False},
                           algorithm={"dynamicSampling": {"enabled": True, "maxGenBatches": 2}})
    with pytest.raises(DynamicSamplingError) as err:
        trainer.train()
    message = str(err.value)
    assert expected in message
    counts = "6 were all-correct and 0 were all-wrong" if mode == "right" else "0 were all-correct and 6 were all-wrong"
    assert counts in message and "after 2 generation batches" in message
    for field in ("maxGenBatches", "genBatchSize", "spec.rollout.n", "dynamicSampling.enabled=false"):
        assert field in message
    assert trainer.status()["state"] == "failed" and expected in trainer.status()["message"]


@pytest.mark.integration
@pytest.mark.parametrize("metric", ["acc", "score"])
def test_dynamic_sampling_metric_decides_whether_graded_groups_train(tmp_path, metric):
    """A graded scorer calls every response right but scores them 0.2-0.6: filtering on acc drops
    every group as all-correct and the cap stops the run; spec.algorithm.dynamicSampling.metric
    score keeps the groups whose scores vary, and they train with non-zero advantages."""
    trainer = tiny_trainer(tmp_path, OverlapScorer("graded"), eval={"beforeTrain": False, "everySteps": 0},
                           algorithm={"dynamicSampling": {"enabled": True, "maxGenBatches": 2, "metric": metric}},
                           learner={"totalSteps": 1})
    if metric == "acc":
        with pytest.raises(DynamicSamplingError, match="had varying accuracy .*metric: acc.*ALL-CORRECT"):
            trainer.train()
        return
    metrics = trainer.train()
    assert metrics["train/num_groups_kept"] >= 2 and metrics["train/groups_all_correct"] < 3 * metrics["train/num_gen_batches"]
    assert metrics["actor/pg_loss"] != 0.0 and metrics["train/acc/mean"] == 1.0


@pytest.mark.integration
def test_dynamic_sampling_with_one_response_per_prompt_fills_the_batch(tmp_path):
    """n = 1: every group is a group of one, kept as verl keeps it (dropping them, the batch
    could never fill and the cap would stop the run)."""
    trainer = tiny_trainer(tmp_path, OverlapScorer("wrong"), eval={"beforeTrain": False, "everySteps": 0},
                           rollout={"n": 1}, algorithm={"dynamicSampling": {"enabled": True, "maxGenBatches": 1}},
                           learner={"totalSteps": 1})
    metrics = trainer.train()
    assert metrics["train/num_gen_batches"] == 1 and metrics["train/groups_all_wrong"] == 0


@pytest.mark.integration
def test_total_epochs_counts_passes_over_the_prompts_under_dynamic_sampling(tmp_path):
    """totalEpochs 1 (no totalSteps) on 12 prompts: training stops after the step that draws the
    12th prompt, however many generation batches dynamic sampling needed per step."""
    trainer = tiny_trainer(tmp_path, OverlapScorer("overlap"), eval={"beforeTrain": False, "everySteps": 0},
                           learner={"totalSteps": None, "totalEpochs": 1})
    bound = trainer.total_steps
    assert bound == 6  # ceil(12 prompts / trainBatchSize 2): every group kept
    drawn = []
    step = trainer.train_step

    def counting():
        metrics = step()
        drawn.append(trainer.sampler.consumed)
        return metrics

    trainer.train_step = counting
    trainer.train()
    assert drawn[-1] >= 12 and all(d < 12 for d in drawn[:-1]), drawn
    assert trainer.step < bound, "dynamic sampling dropped groups: fewer steps than the all-kept bound"
    assert trainer.step == len(drawn) <= bound
    assert trainer.status()["totalSteps"] == trainer.step and trainer.status()["state"] == "succeeded"
    assert trainer.last_checkpoint["step"] == trainer.step  # the end of the passes is checkpointed


@pytest.mark.integration
def test_without_dynamic_sampling_groups_are_taken_as_they_come(tmp_path):
    trainer = tiny_trainer(tmp_path, OverlapScorer("right"), eval={"beforeTrain": False, "everySteps": 0},
                           algorithm={"dynamicSampling": Replace({"enabled": False})}, learner={"totalSteps": 1})
    trainer.train()
    metrics = trainer.last_metrics
    assert metrics["train/num_gen_batches"] == 1 and metrics["train/num_groups_kept"] == 3
    # every score is +1: their mean is exactly 1; every advantage is exactly 0, so is every loss term
    assert metrics["train/surplus_groups"] == 1 and metrics["critic/score/mean"] == 1.0
    assert metrics["actor/pg_loss"] == 0.0  # all advantages are zero
    assert trainer.status()["state"] == "succeeded" and trainer.status()["weightVersion"] == 1


@pytest.mark.integration
def test_real_reward_scorer_all_wrong_cap_through_dapo_run(tmp_path, monkeypatch, run_doc):
    """The real RewardScorer (math_dapo in worker processes): a random model never writes
    'Answer: <n>', every group is all-wrong, and `dapo run` exits 1 with the explanation."""
    inject_tiny_policy(monkeypatch)
    doc = run_doc(preset="tiny", algorithm={"dynamicSampling": {"enabled": True, "maxGenBatches": 1}},
                  eval={"beforeTrain": False})
    run_dir = tmp_path / "real"
    assert cli_main(["run", str(write_run_file(tmp_path / "run.yaml", doc)), "--output-dir", str(run_dir)]) == 1
    log_text = (run_dir / "run.log").read_text()
    assert "0 were all-correct and 3 were all-wrong" in log_text and "ALL-WRONG" in log_text


def test_processes_launcher_checks_the_model_before_starting_processes(tmp_path, capsys, run_doc):
    # builtin:test-tiny exists only in this process (monkeypatched elsewhere): the launcher must say so
    # before it starts any role process (the launcher itself is tested in test_distributed_e2e.py)
    run_file = write_run_file(tmp_path / "run.yaml", run_doc(preset="tiny"))
    assert cli_main(["run", str(run_file), "--launcher", "processes", "--output-dir", str(tmp_path / "x")]) == 2
    assert "unknown built-in model 'builtin:test-tiny'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "logs").exists()


def test_processes_preflight_stages_the_model_where_the_roles_will_look(tmp_path, monkeypatch, run_doc):
    """spec.storage.cacheDir (no DAPO_CACHE_DIR): the launcher's preflight builds / stages the
    model in that folder, the one role_environment hands every role process."""
    import dapo.entry.processes as processes
    import dapo.model.loading

    seen = []
    monkeypatch.setattr(dapo.model.loading, "resolve_model_dir", lambda spec, cache: seen.append(cache))
    monkeypatch.delenv("DAPO_CACHE_DIR", raising=False)
    run = parse_run(run_doc(preset="tiny", storage={"cacheDir": str(tmp_path / "cache")}))
    processes.preflight(run)
    envs = processes.process_env(run, tmp_path / "run", resume=False, base_env={})
    assert seen == [tmp_path / "cache"]
    assert {env["DAPO_CACHE_DIR"] for env in envs.values()} == {str(tmp_path / "cache")}
