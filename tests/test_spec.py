"""The run-file spec: defaults, overrides and error messages a user can act on."""

import os
import subprocess
import sys

import pytest
import yaml

from dapo.spec import DAPORun, SpecError, apply_overrides, dump_run, load_run_file, parse_run


def test_defaults_are_the_paper_hyperparameters(run_doc):
    run = parse_run(run_doc())
    s = run.spec
    assert (s.algorithm.eps_low, s.algorithm.eps_high, s.algorithm.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert s.algorithm.loss_agg_mode == "token-mean"
    assert (s.algorithm.overlong.buffer_length, s.algorithm.overlong.penalty_factor) == (4096, 1.0)
    assert s.algorithm.dynamic_sampling.enabled and s.algorithm.dynamic_sampling.max_gen_batches == 10
    assert (s.rollout.n, s.rollout.max_response_length, s.rollout.gen_batch_size) == (16, 20480, 1536)
    assert (s.learner.train_batch_size, s.learner.mini_batch_size, s.learner.lr) == (512, 32, 1e-6)
    assert (s.learner.warmup_steps, s.learner.weight_decay, s.learner.grad_clip) == (20, 0.1, 1.0)
    assert (s.eval.n, s.eval.top_p) == (32, 0.7)


def test_resolved_file_round_trips(run_doc):
    run = parse_run(run_doc(learner={"lr": 3e-6}))
    again = parse_run(yaml.safe_load(dump_run(run)))
    assert again == run
    assert "status" not in yaml.safe_load(dump_run(run))


def test_override_by_path_is_validated_like_the_file(run_doc):
    doc = apply_overrides(run_doc(), ["spec.learner.lr=2e-6", "spec.rollout.n=4", "spec.algorithm.dynamic_sampling.enabled=false"])
    run = parse_run(doc)
    assert run.spec.learner.lr == 2e-6
    assert run.spec.rollout.n == 4
    assert run.spec.algorithm.dynamic_sampling.enabled is False
    with pytest.raises(SpecError, match=r"spec\.rollout\.n"):
        parse_run(apply_overrides(run_doc(), ["spec.rollout.n=zero"]))
    with pytest.raises(SpecError, match="PATH=VALUE"):
        apply_overrides(run_doc(), ["spec.rollout.n"])


BAD_FILES = [
    # (change to the minimal file, text the error must contain)
    (lambda d: d["spec"].pop("model"), "spec.model: required field is missing"),
    (lambda d: d["spec"]["data"].pop("train"), "spec.data.train: required field is missing"),
    (lambda d: d["spec"].update(rollout={"tempreature": 1.0}), "spec.rollout.tempreature: unknown field"),
    (lambda d: d["spec"].update(learner={"strategy": "fsdp"}), "'deepspeed-zero2', 'deepspeed-zero3' or 'torch'"),
    (lambda d: d["spec"].update(algorithm={"lossAggMode": "mean"}), "spec.algorithm.lossAggMode"),
    (lambda d: d["spec"].update(algorithm={"clipRatioC": 0.5}), "spec.algorithm.clipRatioC"),
    (lambda d: d["spec"].update(algorithm={"epsLow": 0.3, "epsHigh": 0.2}), "epsHigh must be >= spec.algorithm.epsLow"),
    (lambda d: d["spec"].update(learner={"trainBatchSize": 16, "miniBatchSize": 32}), "miniBatchSize must be <= spec.learner.trainBatchSize"),
    (lambda d: d["spec"].update(learner={"trainBatchSize": 48, "miniBatchSize": 32}), "multiple of spec.learner.miniBatchSize"),
    (lambda d: d["spec"].update(rollout={"maxResponseLength": 1024}), "bufferLength must be < spec.rollout.maxResponseLength"),
    (lambda d: d["spec"].update(rollout={"n": 0}), "spec.rollout.n: input should be greater than or equal to 1"),
    (lambda d: d["spec"].update(rollout={"topP": 1.5}), "spec.rollout.topP"),
    (lambda d: d["metadata"].update(name="Bad_Name"), "metadata.name"),
    (lambda d: d.update(kind="Job"), "kind: DAPORun"),
    (lambda d: d.update(apiVersion="dapo.dev/v1"), "apiVersion: dapo.dev/v1alpha1"),
    (lambda d: d["spec"].update(checkpoint={"keep": 0}), "spec.checkpoint.keep"),
]


@pytest.mark.parametrize("mutate,expected", BAD_FILES)
def test_bad_files_name_the_field(mutate, expected, run_doc):
    doc = run_doc()
    mutate(doc)
    with pytest.raises(SpecError) as info:
        parse_run(doc, source="bad.yaml")
    assert expected in str(info.value)
    assert "Traceback" not in str(info.value)


@pytest.mark.processes
def test_cli_reports_a_bad_file_without_traceback(tmp_path, run_doc):
    bad = tmp_path / "bad.yaml"
    doc = run_doc(learner={"miniBatchSize": 0})
    bad.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "dapo.cli", "run", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "spec.learner.miniBatchSize" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_load_run_file_errors(tmp_path):
    with pytest.raises(SpecError, match="no such run file"):
        load_run_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_run_file(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a YAML mapping"):
        load_run_file(listy)


def test_example_run_files_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    files = [p for p in root.rglob("*.yaml") if "kind: DAPORun" in p.read_text()]
    assert files, "no example run files found"
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "DAPORun":
                assert isinstance(parse_run(doc, source=str(path)), DAPORun)


def test_dynamic_sampling_metric_defaults_by_scorer_kind(run_doc):
    """Omitted: acc with the built-in (binary) scorers, score with a run-file or remote scorer
    (it may grade); a value in the file wins either way."""
    from dapo.spec import dynamic_sampling_metric

    scorer = {"scorers": [{"dataSource": "*", "function": "my_scorers:graded"}]}
    remote = {"remote": {"url": "http://judge:8080/score"}}
    assert dynamic_sampling_metric(parse_run(run_doc()).spec) == "acc"
    assert dynamic_sampling_metric(parse_run(run_doc(reward=scorer)).spec) == "score"
    assert dynamic_sampling_metric(parse_run(run_doc(reward=remote)).spec) == "score"
    chosen = {"dynamicSampling": {"metric": "acc"}}
    assert dynamic_sampling_metric(parse_run(run_doc(reward=scorer, algorithm=chosen)).spec) == "acc"
    chosen = {"dynamicSampling": {"metric": "score"}}
    assert dynamic_sampling_metric(parse_run(run_doc(algorithm=chosen)).spec) == "score"
    with pytest.raises(SpecError, match="dynamicSampling.metric"):
        parse_run(run_doc(algorithm={"dynamicSampling": {"metric": "reward"}}))


def test_unknown_loss_parameter_is_refused_before_anything_loads(capsys):
    """`dapo run` with a parameter the chosen loss lacks exits 2 at parse time with the line naming
    the field and what the loss accepts (no model is built: the error comes before)."""
    from dapo.cli import main

    code = main(["run", "examples/quickstart.yaml", "--set", "spec.algorithm.policyLoss=gspo",
                 "--set", 'spec.algorithm.policyLossParams={"foo": 1.0}', "--output-dir", "/nonexistent/never-made"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "spec.algorithm.policyLossParams: policy loss 'gspo' has no parameter(s) foo; it accepts: eps_low, eps_high" in err


@pytest.mark.processes
def test_a_loss_registered_by_another_package_is_a_run_file_value(tmp_path):
    """An installed package naming a module in the `dapo.algorithms` entry points adds its losses:
    the spec (read from source, torch not imported) accepts the name and its parameters, and the
    learner's registry resolves it once the module loads."""
    package = tmp_path / "my_losses"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "losses.py").write_text(
        "from dapo.algo import register_policy_loss\n\n"
        "@register_policy_loss('scaled-dapo', aggregation='token-mean')\n"
        "def scaled(log_prob, old_log_prob, advantages, mask, config, *, scale: float = 2.0):\n"
        "    return -scale * advantages * (log_prob - old_log_prob).exp(), {}\n")
    dist = tmp_path / "my_losses-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-losses\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dapo.algorithms]\nmine = my_losses.losses\n")
    script = (
        "import sys\n"
        "from dapo.spec import POLICY_LOSS_PARAMS, parse_run\n"
        "assert 'torch' not in sys.modules, 'the spec imported torch'\n"
        "assert POLICY_LOSS_PARAMS['scaled-dapo'] == ('scale',), POLICY_LOSS_PARAMS\n"
        "doc = {'metadata': {'name': 'a'}, 'spec': {'model': {'path': 'builtin:arith-tiny'}, 'data': {'train': 't.jsonl'},"
        " 'algorithm': {'policyLoss': 'scaled-dapo', 'policyLossParams': {'scale': 3.0}}}}\n"
        "parse_run(doc)\n"
        "from dapo.algo import POLICY_LOSSES\n"
        "print(POLICY_LOSSES.resolve('scaled-dapo').__module__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "my_losses.losses"
