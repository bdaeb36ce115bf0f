"""Run-file scorers (spec.reward.scorers): routing, verl's calling convention, bad results,
the stop on a scorer that always fails, and import errors naming the field at start."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import _run_files
from dapo.reward import RewardScorer
from dapo.reward.custom import ScorerImportError, load_function, read_score
from dapo.reward.pool import ScorerFailedError
from dapo.spec import SpecError, parse_run

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]


# this module's run files: the minimal preset with these sections, and spec.reward = REWARD + the test's
CUSTOM = dict(name="custom", data={"train": "examples/data/arith-train.jsonl"},
              rollout={"maxResponseLength": 64, "genBatchSize": 8}, learner={"trainBatchSize": 4, "miniBatchSize": 4},
              algorithm={"overlong": {"enabled": False}})
REWARD = {"workers": 1, "timeoutSeconds": 2}


def scorer_for(**reward) -> RewardScorer:
    return RewardScorer.from_spec(parse_run(_run_files.run_doc(**CUSTOM, reward={**REWARD, **reward})).spec)


@pytest.fixture()
def scorer_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(textwrap.dedent('''
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            """verl's compute_score signature, positional order included."""
            return {"score": 2.0 if solution_str.strip() == ground_truth else -0.5, "pred": solution_str.strip()}
    '''))
    return path


@pytest.mark.integration
def test_rules_route_first_match_then_builtin_rules_then_default(scorer_file):
    """First matching glob wins (case-insensitive); unmatched rows fall back to the built-in
    data-source rules and then spec.reward.scorer; verl-style functions run unchanged."""
    with scorer_for(scorers=[
        {"dataSource": "reverse*", "function": "_custom_scorers:reverse_score"},
        {"dataSource": "reverse-special", "function": "_custom_scorers:echo_kwargs"},  # shadowed by the first
        {"dataSource": "exact", "function": f"{scorer_file}:compute_score"},
    ]) as scorer:
        results = scorer.score_batch(
            ["olleh", "hello", "olleh", "exact!", "wrong", "Answer: 3", "Answer: 4"],
            ["hello", "hello", "hello", "exact!", "exact!", "3", "4"],
            ["reverse", "REVERSE-x", "reverse-special", "exact", "exact", "aime2024", None])
    assert [r.scorer for r in results[:3]] == ["_custom_scorers:reverse_score"] * 3
    assert [r.score for r in results[:3]] == [1.0, 0.0, 1.0]
    assert [r.acc for r in results[:3]] == [True, False, True]  # acc defaults to score > 0
    assert results[3].scorer == f"{scorer_file}:compute_score"
    assert (results[3].score, results[3].acc, results[3].pred) == (2.0, True, "exact!")
    assert (results[4].score, results[4].acc) == (-0.5, False)
    assert [r.scorer for r in results[5:]] == ["math_dapo", "math_dapo"]
    assert all(r.acc for r in results[5:]) and all(r.error is None for r in results)


@pytest.mark.integration
def test_function_gets_verls_keyword_arguments():
    with scorer_for(scorers=[{"dataSource": "*", "function": "_custom_scorers:echo_kwargs"}]) as scorer:
        result = scorer.score_batch(["abcd"], ["x"], ["my-source"])[0]
    assert result.error is None
    assert (result.score, result.acc, result.pred) == (0.5, True, "my-source|None|4")


@pytest.mark.integration
def test_function_gets_each_rows_extra_info_through_the_worker_pool():
    infos = [{"split": "train", "index": 3}, None]
    with scorer_for(scorers=[{"dataSource": "*", "function": "_custom_scorers:echo_kwargs"}]) as scorer:
        results = scorer.score_batch(["abcd", "ab"], ["x", "y"], ["s1", "s2"], extra_infos=infos)
    assert [r.pred for r in results] == ["s1|{'split': 'train', 'index': 3}|4", "s2|None|2"]


@pytest.mark.integration
def test_relative_file_reference_resolves_against_the_start_directory(tmp_path, scorer_file, monkeypatch):
    monkeypatch.chdir(scorer_file.parent)
    with scorer_for(scorers=[{"dataSource": "*", "function": "my_reward.py:compute_score"}]) as scorer:
        result = scorer.score_batch(["ok"], ["ok"], ["any"])[0]
    assert result.scorer == f"{scorer_file}:compute_score" and result.score == 2.0


@pytest.mark.integration
@pytest.mark.parametrize("function, error", [
    ("nan_score", "non-finite"),
    ("string_score", "returned a str"),
    ("mapping_without_score", "without 'score'"),
    ("raising", "user scorer bug"),
])
def test_bad_results_score_as_failed_and_are_counted_with_the_data_source(function, error, caplog):
    ref = f"_custom_scorers:{function}"
    with scorer_for(scorers=[{"dataSource": "bad*", "function": ref}], failedScore=-3.0) as scorer:
        with caplog.at_level(logging.WARNING, logger="dapo.reward"):
            results = scorer.score_batch(["x", "y", "Answer: 1"], ["1", "1", "1"], ["bad-a", "bad-a", "math_dapo"])
        assert [r.score for r in results[:2]] == [-3.0, -3.0] and not any(r.acc for r in results[:2])
        assert all(error in r.error for r in results[:2])
        assert results[2].acc and results[2].error is None
        assert scorer.failures[(ref, "bad-a")] == 2
    assert any("2 of 2 responses of data_source 'bad-a' failed in scorer " + ref in m for m in caplog.messages)


@pytest.mark.integration
def test_custom_scorer_gets_the_pools_time_bound_crash_isolation_and_input_cap(run_doc):
    doc = run_doc(**CUSTOM, reward={**REWARD, "scorers": [
        {"dataSource": "slow", "function": "_custom_scorers:sleepy"},
        {"dataSource": "crash", "function": "_custom_scorers:exits"},
        {"dataSource": "echo", "function": "_custom_scorers:echo_kwargs"}]})
    doc["spec"]["reward"]["timeoutSeconds"] = 1
    with RewardScorer.from_spec(parse_run(doc).spec, max_input_chars=100) as scorer:
        scorer.score_batch(["warm"], ["x"], ["echo"])
        start = time.monotonic()
        results = scorer.score_batch(["a", "b", "z" * 5000], ["1", "1", "1"], ["slow", "crash", "echo"])
        elapsed = time.monotonic() - start
    assert results[0].timed_out and results[0].score == -1.0 and "time bound" in results[0].error
    assert "died" in results[1].error and results[1].score == -1.0
    assert results[2].pred.endswith("|100")  # the worker saw the 100-character tail only
    assert elapsed < 1.0 + 6.0, elapsed


@pytest.mark.integration
def test_a_scorer_that_fails_every_response_stops_with_its_name():
    """Eight data rows (runs of responses with one ground truth) failed in a row stop the run;
    the count spans batches."""
    ref = "_custom_scorers:raising"
    rows = lambda first, count: [str(k) for k in range(first, first + count) for _ in range(3)]  # noqa: E731
    with scorer_for(scorers=[{"dataSource": "*", "function": ref}]) as scorer:
        scorer.score_batch(["a"] * 15, rows(0, 5), ["s"] * 15)  # 15 failures in 5 rows: not yet
        with pytest.raises(ScorerFailedError, match=r"_custom_scorers:raising \(spec.reward.scorers\[0\].function\) "
                                                    r"failed every response of each of its last 8 data rows.*user scorer bug"):
            scorer.score_batch(["a"] * 9, rows(5, 3), ["s"] * 9)


@pytest.mark.integration
def test_one_poisoned_row_never_stops_the_run():
    """A row whose ground truth makes the scorer raise fails its n = 16 responses (more than the
    8-row stop) every time it is drawn, between rows that score: the run goes on."""
    ref = "_custom_scorers:poisoned_row"
    with scorer_for(scorers=[{"dataSource": "*", "function": ref}]) as scorer:
        for _ in range(3):
            truths = ["7"] * 16 + ["poison"] * 16 + ["9"] * 16
            results = scorer.score_batch(["Answer: 7"] * 48, truths, ["s"] * 48)
            assert [r.error is None for r in results] == [True] * 16 + [False] * 16 + [True] * 16
        assert scorer.failures[(ref, "s")] == 48
        # alone, back to back (e.g. drawn at the end of one batch and the start of the next): still one row each
        for _ in range(7):
            scorer.score_batch(["x"] * 16, ["poison"] * 16, ["s"] * 16)


@pytest.mark.integration
def test_a_scorer_with_some_failures_keeps_running():
    """Failures that a success interrupts do not stop the run (only an unbroken run of them does)."""
    ref = "_custom_scorers:picky"
    with scorer_for(scorers=[{"dataSource": "*", "function": ref}]) as scorer:
        for _ in range(3):  # 6 failures, then a success, per batch
            results = scorer.score_batch(["boom"] * 6 + ["fine"], ["x"] * 7, ["s"] * 7)
            assert [r.error is None for r in results] == [False] * 6 + [True]
        assert scorer.failures[(ref, "s")] == 18


@pytest.mark.parametrize("ref, message", [
    ("no_such_module_xyz:f", r"spec.reward.scorers\[1\].function: cannot import 'no_such_module_xyz'"),
    ("_custom_scorers:missing", r"spec.reward.scorers\[1\].function: '_custom_scorers' has no attribute 'missing'"),
    ("_custom_scorers:NOT_CALLABLE", r"spec.reward.scorers\[1\].function: .* is a int, not a function"),
    ("does/not/exist.py:f", r"spec.reward.scorers\[1\].function: .*no such file"),
])
def test_unresolvable_function_is_a_run_file_error_naming_the_field(ref, message):
    with pytest.raises(ScorerImportError, match=message):
        scorer_for(scorers=[{"dataSource": "ok", "function": "_custom_scorers:reverse_score"},
                            {"dataSource": "*", "function": ref}])


def test_import_time_exception_and_bad_shape_are_run_file_errors(tmp_path, run_doc):
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('needs torch_geometric')\n")
    with pytest.raises(ScorerImportError, match=r"scorers\[0\].function: cannot import .*needs torch_geometric"):
        scorer_for(scorers=[{"dataSource": "*", "function": f"{broken}:f"}])
    with pytest.raises(SpecError, match=r"spec.reward.scorers\[0\].function: string should match pattern"):
        parse_run(run_doc(**CUSTOM, reward={**REWARD, "scorers": [{"dataSource": "*", "function": "no colon here"}]}))
    with pytest.raises(ScorerImportError, match="not a function reference"):
        load_function("x", "spec.reward.scorers[0].function")


def test_read_score_accepts_numbers_and_mappings_only():
    assert read_score(0.25) == (0.25, True, "")
    assert read_score(-1) == (-1.0, False, "")
    assert read_score({"score": 1, "acc": False, "pred": 7}) == (1.0, False, "7")
    for bad in (None, "1", float("inf"), [1.0], {"acc": True}, {"score": float("nan")}):
        with pytest.raises((TypeError, ValueError)):
            read_score(bad)


def _write_run(tmp_path: Path, function: str) -> Path:
    doc = _run_files.run_doc(**CUSTOM, reward={**REWARD, "scorers": [{"dataSource": "*", "function": function}]})
    doc["spec"]["data"]["train"] = str(REPO / "examples/data/arith-train.jsonl")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DAPO_CACHE_DIR=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "dapo.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.processes
def test_dapo_run_refuses_an_unresolvable_scorer_before_loading_the_model(tmp_path):
    run = _write_run(tmp_path, "my_missing_pkg.rewards:compute_score")
    start = time.monotonic()
    done = _cli("run", str(run), "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: spec.reward.scorers[0].function: cannot import 'my_missing_pkg.rewards'" in done.stderr
    assert "loaded in" not in done.stderr  # failed before the policy was built
    assert time.monotonic() - start < 60


@pytest.mark.processes
def test_reward_role_fails_fast_with_the_message(tmp_path):
    """What the reward pod runs: exit code 2 and the message on stderr (the container's
    termination message; the operator turns it into the DAPORun's Failed condition)."""
    run = _write_run(tmp_path, "scorers/judge.py:score")
    done = _cli("role", "reward", "--config", str(run), cwd=tmp_path)
    assert done.returncode == 2
    assert "spec.reward.scorers[0].function" in done.stderr and "no such file" in done.stderr


@pytest.mark.integration
def test_example_format_scorer_through_the_pool(monkeypatch):
    """examples/custom-scorer.yaml's rule, as `dapo run` from the repository root resolves it."""
    from dapo.spec import load_run_file

    monkeypatch.chdir(REPO)
    spec = load_run_file(REPO / "examples/custom-scorer.yaml").spec
    with RewardScorer.from_spec(spec, overlong_enabled=False) as scorer:
        results = scorer.score_batch(["Answer: 84", "Answer: 85", "Answer: 8x", "84"], ["1"] * 4, ["arith"] * 4)
    assert [(r.score, r.acc, r.pred) for r in results] == [
        (1.0, True, "84"), (0.0, False, "85"), (-1.0, False, "[INVALID]"), (-1.0, False, "[INVALID]")]
    assert results[0].scorer == f"{REPO}/examples/scorers/even_answer.py:compute_score"


@pytest.mark.integration
def test_verl_code_row_reaches_the_scorer_as_data(tmp_path):
    """A verl-style code data set (parquet; reward_model.ground_truth = {"inputs", "outputs"},
    ~20 kB of JSON, past the old 4096-character cap): the row loads with its ground truth as a
    dict and a run-file scorer receives it unchanged; a built-in scorer refuses such a row naming
    the fix; spec.reward.maxGroundTruthChars below its size refuses it without calling the scorer."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dapo.data.prompts import load_prompts

    cases = {"inputs": [f"{k} {k + 1}\n" for k in range(400)], "outputs": [f"{2 * k + 1}\n" for k in range(400)]}
    size = len(json.dumps(cases, separators=(",", ":")))
    assert size > 4096
    rows = [{"data_source": "codecontests", "prompt": [{"role": "user", "content": "Add two numbers."}],
             "ability": "code", "reward_model": {"style": "rule", "ground_truth": cases},
             "extra_info": {"split": "train", "index": 0}}]
    path = tmp_path / "code.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (record,), report = load_prompts(path, template="none")
    assert report.kept == 1 and record.ground_truth == cases and record.data_source == "codecontests"

    everything = "".join(cases["outputs"])
    scorer_rule = [{"dataSource": "codecontests", "function": "_custom_scorers:code_tests"}]
    with scorer_for(scorers=scorer_rule) as scorer:
        right, half = scorer.score_batch([everything, everything[: len(everything) // 2]], [record.ground_truth] * 2,
                                         [record.data_source] * 2, extra_infos=[record.extra_info] * 2)
    assert (right.error, right.score, right.acc, right.pred) == (None, 1.0, True, "400/400")
    assert half.error is None and 0.3 < half.score < 0.7 and not half.acc
    with scorer_for() as builtin:
        (refused,) = builtin.score_batch([everything], [record.ground_truth], [record.data_source])
    assert "built-in scorer" in refused.error and "spec.reward.scorers" in refused.error
    with scorer_for(scorers=scorer_rule, maxGroundTruthChars=size - 1) as capped:
        (capped_result,) = capped.score_batch([everything], [record.ground_truth], [record.data_source])
    assert "maxGroundTruthChars" in capped_result.error and capped_result.score == -1.0


@pytest.mark.integration
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_scorer_workers_do_not_see_the_reward_process_credentials(monkeypatch, start_method, run_doc):
    """The reward process holds S3 keys, the remote reward headers and a tracker token; a run-file
    scorer's worker sees none of them (os.environ nor /proc/self/environ), only what
    spec.reward.passEnv lists."""
    secrets = {"AWS_SECRET_ACCESS_KEY": "s3-key", "DAPO_REWARD_REMOTE_HEADERS": '{"Authorization": "Bearer x"}',
               "TRACKER_TOKEN": "t0k", "SCORER_SETTING": "strict"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    rule = [{"dataSource": "*", "function": "_custom_scorers:environment_report"}]
    for pass_env, expected in (([], "-"), (["SCORER_*"], "SCORER_SETTING")):
        doc = run_doc(**CUSTOM, reward={**REWARD, "scorers": rule, "passEnv": pass_env})
        with RewardScorer.from_spec(parse_run(doc).spec, start_method=start_method) as scorer:
            (result,) = scorer.score_batch(["a"], ["1"], ["s"])
        assert result.error is None and result.pred == expected, (pass_env, result)
    assert all(os.environ[key] == value for key, value in secrets.items()), "this process keeps its environment"


def test_the_scrubbed_environment_keeps_compute_settings_and_drops_the_rest():
    """Thread counts and torch's CPU kernel choice reach the scorer workers (and every process the
    shared fork server starts later); credentials and other names do not, unless passed."""
    from dapo.reward.isolation import scorer_environment

    environ = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "PATH": "/bin",
               "AWS_SECRET_ACCESS_KEY": "s3-key", "SCORER_SETTING": "strict"}
    assert scorer_environment(environ) == {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "PATH": "/bin"}
    assert scorer_environment(environ, ["SCORER_*"])["SCORER_SETTING"] == "strict"
