"""The side-by-side benchmark's fairness rests on two pure pieces: every shared setting goes from
one validated spec to TRL's command line, and both systems read the same prompts. These tests
pin both (TRL itself is not needed: trl_dapo.parse_args imports nothing of it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402
import side_by_side  # noqa: E402
import trl_dapo  # noqa: E402


def harness_args(**overrides) -> argparse.Namespace:
    values = {"steps": 7, "seed": 3, "prompts_per_step": None, "mini_batch": None, "n": None, "eval_every": 5,
              "eval_prompts": 48, "eval_n": 4, "threads": 1, "set": []}
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("run_file", ["examples/quickstart.yaml", "examples/smollm2-135m-arith.yaml"])
def test_trl_gets_every_shared_setting_from_the_spec(run_file, tmp_path):
    doc = yaml.safe_load((REPO / run_file).read_text())
    args = harness_args()
    spec = side_by_side.resolved_spec(doc, side_by_side.matched_overrides(args, doc))
    command = side_by_side.trl_command(spec, args, seed=4, out=tmp_path / "trl.json")
    trl = trl_dapo.parse_args(command[2:])  # argparse exits on any flag trl_dapo does not know

    ls, ro, al = spec.learner, spec.rollout, spec.algorithm
    assert (trl.model, trl.gguf_file) == (spec.model.path, spec.model.gguf_file)
    assert (trl.train, trl.eval, trl.prompt_template) == (spec.data.train, spec.data.eval, spec.data.prompt_template)
    assert trl.max_prompt_length == ro.max_prompt_length
    assert (trl.prompts_per_step, trl.n, trl.max_response_length) == (ls.train_batch_size, ro.n, ro.max_response_length)
    assert trl.optimizer_steps_per_step == ls.train_batch_size // ls.mini_batch_size
    assert (trl.micro_batch, trl.lr, trl.warmup_steps, trl.weight_decay, trl.grad_clip) == (
        ls.micro_batch_size, ls.lr, ls.warmup_steps, ls.weight_decay, ls.grad_clip)
    assert (trl.eps_low, trl.eps_high) == (al.eps_low, al.eps_high)
    assert trl.overlong_buffer == (al.overlong.buffer_length if al.overlong.enabled else 0)
    assert (trl.steps, trl.seed, trl.eval_n, trl.eval_every) == (7, 4, spec.eval.n, spec.eval.every_steps)
    assert trl.eval_prompts == spec.data.eval_max_prompts == 48
    # TRL's GRPOConfig turns gradient checkpointing on by default: extra recomputation our learner
    # does not do unless the run file asks for it
    assert trl.gradient_checkpointing is spec.model.gradient_checkpointing is False
    # our generation batch is pinned to the training batch: TRL generates exactly one per step
    assert ro.gen_batch_size == ls.train_batch_size


def test_both_systems_read_the_same_chat_prompts():
    fewshot = common.read_prompt_set(REPO / "examples/data/sums-fewshot-eval.parquet", limit=5)
    assert len(fewshot) == 5
    messages, answer = fewshot[0]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                             "assistant", "user"]
    a, b = messages[-1]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
    assert int(answer) == int(a) + int(b)

    plain = common.read_prompt_set(REPO / "examples/data/arith-eval.jsonl", limit=3)
    assert all(len(m) == 1 and m[0]["role"] == "user" for m, _ in plain)
    templated = common.read_prompt_set(REPO / "examples/data/arith-eval.jsonl", template="dapo", limit=3)
    assert [t for _, t in templated] == [t for _, t in plain]
    assert all("Answer:" in m[0]["content"] for m, _ in templated)


def test_a_missing_prompt_set_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit, match="nope.jsonl"):
        common.read_prompt_set(tmp_path / "nope.jsonl")


def run_summary(step_s: float, wall: float, curve: list[tuple[float, float]]) -> dict:
    return {"median_step_s": step_s, "min_step_s": step_s * 0.8, "median_gen_tokens_per_s": 1.0,
            "median_learner_tokens_per_s": 1.0, "peak_rss_mib": 1.0, "val_acc_last": curve[-1][1],
            "train_wall_s": wall, "acc_curve": curve}


def test_accuracy_at_equal_wall_is_the_last_evaluation_each_had_reached():
    ours = run_summary(1.0, 50.0, [(0.0, 0.3), (25.0, 0.5), (50.0, 0.6)])
    trl = run_summary(2.0, 100.0, [(0.0, 0.3), (40.0, 0.45), (60.0, 0.55), (100.0, 0.65)])
    result = side_by_side.compare({"ours": [ours], "trl": [trl]})
    assert result["ours"]["step_time_ratio_vs_trl"] == pytest.approx(0.5)  # one float64 division: within an ulp
    # horizon = the faster run's training wall time (50 s): TRL had reached its 40 s evaluation
    # accuracies picked from the curves (the median of one repeat), not computed: exact
    assert (result["ours"]["acc_at_equal_wall"], result["ours"]["trl_acc_at_equal_wall"]) == (0.6, 0.45)


def test_a_failed_repeat_is_left_out_of_the_ratios():
    good = run_summary(1.0, 10.0, [(0.0, 0.3), (10.0, 0.4)])
    result = side_by_side.compare({"ours": [good, {"failed": True}],
                                   "trl": [run_summary(4.0, 40.0, [(0.0, 0.3), (40.0, 0.5)]), good]})
    assert result["ours"]["failed_repeats"] == [1]
    assert result["ours"]["step_time_ratio_vs_trl"] == pytest.approx(0.25)  # one float64 division: within an ulp


def test_gradient_checkpointing_reaches_trl_only_when_the_run_file_asks(tmp_path):
    doc = yaml.safe_load((REPO / "examples/quickstart.yaml").read_text())
    args = harness_args(set=["spec.model.gradientCheckpointing=true"])
    spec = side_by_side.resolved_spec(doc, side_by_side.matched_overrides(args, doc))
    command = side_by_side.trl_command(spec, args, seed=1, out=tmp_path / "trl.json")
    assert trl_dapo.parse_args(command[2:]).gradient_checkpointing is True
