"""Tests for dapo.reward: the DAPO reference scorer, the math-verify scorer, the registry, and
the time-bounded worker pool with overlong shaping.

Expected values in the tables come from the reference semantics (verl's math_dapo scorer:
last 300 characters, last ``Answer:`` line, Minerva normalisation, string equality), not from
running this implementation.
"""

from __future__ import annotations

import contextlib

import os
import re
import time
from pathlib import Path

import pytest

import dapo.reward.registry as registry
from dapo.reward import (
    INVALID_PRED,
    RewardResult,
    RewardScorer,
    ScoreResult,
    UnknownScorerError,
    get_scorer,
    known_scorers,
    normalize_final_answer,
    score_math_dapo,
    score_math_verify,
    scorer_for_data_source,
)

# the runtime's own tables, as imported (this module's fixture extends copies of them with test scorers)
BUILTIN_SCORERS, BUILTIN_RULES = registry.SCORERS, registry.DATA_SOURCE_RULES

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA_DIR.is_dir():  # the repo checked out elsewhere: the documented shared location
    DATA_DIR = Path("/work/shared/data")

# A hang in the pool must fail the run, not stall it (pytest-timeout is in the test extras).
pytestmark = pytest.mark.timeout(120)

FILLER = "Let me work through this carefully. " * 40  # ~1.4 KB of reasoning before the answer


# ------------------------------------------------------------------- math_dapo: tricky answers

# (response, ground truth, expected acc, expected normalised pred or None to skip that check)
MATH_DAPO_CASES = [
    ("Answer: 5", "5", True, "5"),
    ("Answer: $5$", "5", True, "5"),
    ("Answer: $5.$", "5", True, "5"),  # ".$" -> "$"
    ("Answer: 5.", "5", False, "5."),  # a bare trailing period survives normalisation
    ("Answer: \\boxed{5}", "5", True, "5"),
    ("Answer: $\\boxed{42}$", "42", True, "42"),
    ("Answer: \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),  # shorthand expanded
    ("Answer: $\\frac{1}{2}$", "\\frac12", True, "\\frac{1}{2}"),
    ("Answer: 1/2", "\\frac{1}{2}", False, "1/2"),  # string compare: no symbolic equivalence
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", False, "\\dfrac{1}{2}"),
    ("Answer: 0.5", "\\frac{1}{2}", False, "0.5"),
    ("Answer: x = 5", "5", True, "5"),  # text after the last "="
    ("Answer: $x=y=7$", "7", True, "7"),
    ("Answer: 5 \\text{ cm}", "5", True, "5"),
    ("Answer: 12 inches", "12", True, "12"),
    ("Answer: \\$5", "5", True, "5"),
    ("Answer: 5 dollars", "5", True, "5"),
    ("Answer: 1,000", "1000", True, "1000"),
    ("Answer: 1000", "1,000", True, "1000"),
    ("Answer: 1,000,000", "1000000", True, "1000000"),
    ("Answer: 3\nsome more text\nAnswer: 5", "5", True, "5"),  # the last Answer line wins
    ("Answer: 3\nsome more text\nAnswer: 5", "3", False, "5"),
    ("answer: 5", "5", True, "5"),  # case-insensitive
    ("ANSWER : 5", "5", True, "5"),
    ("Answer:\n5", "5", True, "5"),  # \s* crosses the newline
    ("The answer is 5.", "5", False, INVALID_PRED),  # no "Answer:" -> invalid
    ("so the result is \\boxed{5}", "5", False, INVALID_PRED),  # math_dapo needs the Answer line
    ("", "5", False, INVALID_PRED),
    ("Answer: -7", "-7", True, "-7"),
    ("Answer: 7", "-7", False, "7"),
    ("Answer: $-\\frac{3}{4}$", "-\\frac{3}{4}", True, "-\\frac{3}{4}"),
    ("Answer: 30^\\circ", "30", True, "30"),
    ("Answer: $30^{\\circ}$", "30", True, "30"),
    ("Answer: 30 degrees", "30", True, "30"),
    ("Answer: \\sqrt2", "\\sqrt{2}", True, "\\sqrt{2}"),
    ("Answer: $2\\sqrt{2}$", "\\sqrt{8}", False, "2\\sqrt{2}"),
    ("Answer: \\text{(B)}", "(B)", True, "(B)"),
    ("Answer: 204", "204", True, "204"),
    ("Answer: 0204", "204", False, "0204"),  # zero padding is not normalised
    ("Answer: 23 is my final result", "23", False, None),
]


@pytest.mark.parametrize("response, ground_truth, acc, pred", MATH_DAPO_CASES)
def test_math_dapo_tricky_answers(response, ground_truth, acc, pred):
    result = score_math_dapo(FILLER + "\n" + response, ground_truth)
    assert result.acc is acc
    assert result.score == (1.0 if acc else -1.0)
    if pred is not None:
        assert result.pred == pred


def test_math_dapo_reads_only_the_last_300_characters():
    tail = "\n" + "x" * 299
    assert score_math_dapo("Answer: 5" + tail, "5").pred == INVALID_PRED  # answer starts before the tail
    assert score_math_dapo("Answer: 5" + "\n" + "x" * 280, "5").acc is True
    # An earlier Answer outside the window cannot override the one inside it.
    assert score_math_dapo("Answer: 5\n" + "y" * 400 + "\nAnswer: 6", "6").acc is True


def test_math_dapo_result_is_frozen_dataclass_and_mapping():
    result = score_math_dapo("Answer: 5", "5")
    assert isinstance(result, ScoreResult)
    assert result["score"] == 1.0 and result["acc"] is True and result["pred"] == "5"
    assert dict(result) == {"score": 1.0, "acc": True, "pred": "5"}
    assert "acc" in result and "nope" not in result
    with pytest.raises(KeyError):
        result["nope"]
    with pytest.raises(AttributeError):
        result.score = 0.0  # type: ignore[misc]


def test_normalize_final_answer_examples():
    assert normalize_final_answer("\\boxed{\\frac12}") == "\\frac{1}{2}"
    assert normalize_final_answer("$\\sqrt3$") == "\\sqrt{3}"
    assert normalize_final_answer("  10 \\text{ points} ") == "10"
    assert normalize_final_answer("\\text{Monday}") == "Monday"
    assert normalize_final_answer("12,345") == "12345"
    assert normalize_final_answer("1,2,3") == "123"  # the reference quirk: any comma-digits string
    assert normalize_final_answer("(1,2)") == "(1,2)"


# ------------------------------------------------------------------- math_dapo: real ground truths


def _read_ground_truths(name: str) -> list[str]:
    pq = pytest.importorskip("pyarrow.parquet")
    path = DATA_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} absent: the shared public data folder (../shared/data) is not checked out here")
    rows = pq.read_table(path, columns=["reward_model"]).column("reward_model").to_pylist()
    return [row["ground_truth"] for row in rows]


def _wrong_answer(ground_truth: str) -> str:
    """A different answer: the next integer, or the ground truth with a digit appended."""
    try:
        return str(int(ground_truth) + 1)
    except ValueError:
        return ground_truth + "7"


@pytest.mark.parametrize("name", ["dapo-math-17k.parquet", "aime-2024.parquet"])
def test_math_dapo_on_every_real_ground_truth(name):
    ground_truths = _read_ground_truths(name)
    assert len(ground_truths) > 900
    failures = []
    for gt in ground_truths:
        right = score_math_dapo(f"{FILLER}\nSo we are done.\nAnswer: {gt}", gt)
        wrong = score_math_dapo(f"{FILLER}\nSo we are done.\nAnswer: {_wrong_answer(gt)}", gt)
        if not (right.score == 1.0 and right.acc and wrong.score == -1.0 and not wrong.acc):
            failures.append((gt, right, wrong))
    assert not failures, f"{len(failures)} of {len(ground_truths)} rows disagree, e.g. {failures[:3]}"


# ------------------------------------------------------------------- math_verify


@pytest.mark.parametrize(
    "response, ground_truth, acc",
    [
        ("Answer: $\\frac{1}{2}$", "1/2", True),
        ("Answer: 1/2", "\\frac{1}{2}", True),
        ("Answer: 0.5", "\\frac{1}{2}", True),
        ("the result is $\\boxed{\\dfrac{1}{2}}$", "\\frac12", True),
        ("Answer: $2\\sqrt{2}$", "\\sqrt{8}", True),
        ("Answer: $x = 5$", "5", True),
        ("Answer: 1,000", "1000", True),
        ("Answer: 27", "27.0", True),  # AMC-style float ground truth
        ("Answer: 3\nActually, Answer: 5", "5", True),
        ("Answer: 6", "5", False),
        ("I do not know.", "5", False),
    ],
)
def test_math_verify_equivalent_forms(response, ground_truth, acc):
    result = score_math_verify(FILLER + "\n" + response, ground_truth)
    assert isinstance(result, ScoreResult)
    assert result.acc is acc and result.score == (1.0 if acc else -1.0)


def test_math_verify_no_answer_is_invalid():
    assert score_math_verify("nothing here", "5").pred == INVALID_PRED


def test_math_verify_from_a_worker_thread_does_not_raise():
    """math-verify's signal.alarm timeouts raise ValueError off the main thread; ours turn them off."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(score_math_verify, "Answer: $\\frac{2}{4}$", "\\frac{1}{2}").result(timeout=30)
    assert result.acc is True


# ------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "data_source, expected",
    [
        ("math_dapo", "math_dapo"),
        ("DAPO-17k", "math_dapo"),
        ("math_dapo_reasoning", "math_dapo"),
        ("aime-2024", "math_dapo"),
        ("AIME2024", "math_dapo"),
        ("aime25", "math_dapo"),
        ("math", "math_verify"),
        ("MATH-500", "math_verify"),
        ("gsm8k", "math_verify"),
        ("amc23", "math_verify"),
        ("AMC", "math_verify"),
        ("some-unknown-set", "math_dapo"),
        (None, "math_dapo"),
    ],
)
def test_scorer_for_data_source(data_source, expected):
    name, fn = scorer_for_data_source(data_source)
    assert name == expected and fn is get_scorer(expected)


def test_scorer_for_data_source_uses_the_configured_default():
    assert scorer_for_data_source("my-set", default="math_verify")[0] == "math_verify"
    assert scorer_for_data_source("aime-2024", default="math_verify")[0] == "math_dapo"


def test_unknown_scorer_lists_the_known_ones():
    with pytest.raises(UnknownScorerError) as info:
        get_scorer("math_dapoo")
    assert "math_dapo" in str(info.value) and "math_verify" in str(info.value)
    with pytest.raises(UnknownScorerError):
        scorer_for_data_source("my-set", default="nope")
    with pytest.raises(UnknownScorerError):
        RewardScorer(default_scorer="nope", overlong_enabled=False)


def test_builtin_scorer_tables_are_read_only_and_route_by_glob():
    """The built-in scorers and routing rules cannot be changed at run time (users' scorers come
    from the run file); a test-only scorer joins them through `with_test_scorers` alone."""
    with pytest.raises(TypeError):
        BUILTIN_SCORERS["mine"] = always_right_scorer  # type: ignore[index]
    assert isinstance(BUILTIN_RULES, tuple)
    assert "test_always_right" not in known_scorers()
    with with_test_scorers({"test_always_right": always_right_scorer}, [("test-always-*", "test_always_right")]):
        assert "test_always_right" in known_scorers()
        assert scorer_for_data_source("TEST-ALWAYS-yes") == ("test_always_right", always_right_scorer)
    assert "test_always_right" not in known_scorers()
    with pytest.raises(UnknownScorerError, match="spec.reward.scorers"):
        get_scorer("not-a-scorer")


@contextlib.contextmanager
def with_test_scorers(scorers: dict, rules: list[tuple[str, str]]):
    """The built-in tables plus ``scorers`` (by name) and ``rules`` (tried first), for the block."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "SCORERS", {**registry.SCORERS, **scorers})
        patch.setattr(registry, "DATA_SOURCE_RULES", tuple(rules) + registry.DATA_SOURCE_RULES)
        yield


# ------------------------------------------------------------------- pool (worker processes)
# Scorers below run in worker processes, which import this module by reference.


def always_right_scorer(solution: str, ground_truth: str) -> dict:
    return {"score": 1.0, "acc": True, "pred": ground_truth}


def regex_bomb_scorer(solution: str, ground_truth: str) -> ScoreResult:
    """Catastrophic backtracking: (a+)+b on a run of a's without b is exponential, inside re's C loop."""
    matched = re.fullmatch(r"(a+)+b", solution) is not None
    return ScoreResult.graded(matched, solution[:10])


def exit_scorer(solution: str, ground_truth: str) -> ScoreResult:
    os._exit(3)


def raising_scorer(solution: str, ground_truth: str) -> ScoreResult:
    raise ValueError("scorer bug")


def sleepy_scorer(solution: str, ground_truth: str) -> ScoreResult:
    """Sleeps the number of seconds before '|' in the response, then scores the rest with math_dapo."""
    delay, _, rest = solution.partition("|")
    time.sleep(float(delay))
    return score_math_dapo(rest, ground_truth)


# hostile scorers the pool tests route to by data_source (the name), next to the built-in ones
HOSTILE_SCORERS = {"test_regex_bomb": regex_bomb_scorer, "test_exit": exit_scorer, "test_raising": raising_scorer,
                   "test_sleepy": sleepy_scorer}

TIMEOUT_S = 1.0
SLACK_S = 2.0  # process kill + replacement on a loaded 2-core machine


@pytest.fixture(scope="module", autouse=True)
def hostile_scorers():
    """HOSTILE_SCORERS, each routed from the data_source of its name, for this module's tests."""
    with with_test_scorers(HOSTILE_SCORERS, [(name, name) for name in HOSTILE_SCORERS]):
        yield


@pytest.fixture(scope="module")
def pool(hostile_scorers):
    with RewardScorer(timeout_s=TIMEOUT_S, workers=2, overlong_enabled=False) as scorer:
        scorer.score_batch(["Answer: 1"], ["1"])  # start the workers outside the timed sections
        yield scorer


def _timed_batch(scorer, responses, ground_truths, data_sources=None):
    start = time.monotonic()
    results = scorer.score_batch(responses, ground_truths, data_sources)
    return results, time.monotonic() - start


@pytest.mark.integration
def test_pool_scores_in_input_order(pool):
    # Unequal delays on two workers: results complete out of order but must come back in order.
    responses = [f"{0.3 if i % 3 == 0 else 0.0}|Answer: {i}" for i in range(9)]
    gts = [str(i if i != 4 else 99) for i in range(9)]
    results = pool.score_batch(responses, gts, ["test_sleepy"] * 9)
    assert [r.pred for r in results] == [str(i) for i in range(9)]
    assert [r.acc for r in results] == [i != 4 for i in range(9)]
    assert all(isinstance(r, RewardResult) and not r.timed_out and r.error is None for r in results)
    assert [r.score for r in results] == [1.0 if i != 4 else -1.0 for i in range(9)]


@pytest.mark.integration
def test_pool_pathological_inputs_time_out_within_the_bound(pool):
    power_tower = FILLER + "\nAnswer: $9^{9^{9^{9}}}$"
    nested_braces = "Answer: $" + "{" * 5000 + "1" + "}" * 5000 + "$"
    regex_bomb = "a" * 60
    responses = ["Answer: 7", power_tower, regex_bomb, nested_braces, "Answer: 8"]
    gts = ["7", "5", "5", "1", "8"]
    sources = ["DAPO-17k", "MATH-500", "test_regex_bomb", "MATH-500", "aime-2024"]
    results, elapsed = _timed_batch(pool, responses, gts, sources)
    # 3 hung items on 2 workers: at most two rounds of the bound, plus the fast ones.
    assert elapsed < 2 * TIMEOUT_S + SLACK_S, elapsed
    assert [r.timed_out for r in results] == [False, True, True, True, False]
    for r in results[1:4]:
        assert (r.acc, r.score, r.correctness, r.pred) == (False, -1.0, -1.0, INVALID_PRED)
        assert "time bound" in r.error
    assert results[0].acc and results[4].acc
    assert [r.scorer for r in results] == ["math_dapo", "math_verify", "test_regex_bomb", "math_verify", "math_dapo"]
    # The pool (and this process) carry on.
    assert pool.score_batch(["Answer: 3"], ["3"])[0].acc is True


@pytest.mark.integration
def test_pool_megabyte_inputs(pool):
    megabyte = "x" * (1 << 20) + "\nAnswer: 12"
    # math_dapo: the tail cap keeps the answer, so a megabyte response scores quickly and right.
    results, elapsed = _timed_batch(pool, [megabyte, megabyte], ["12", "13"])
    assert [r.acc for r in results] == [True, False] and not any(r.timed_out for r in results)
    assert elapsed < TIMEOUT_S + SLACK_S
    # A ground truth over the limit (1 MiB by default) is refused without reaching a worker.
    big_gt = "1" * ((1 << 20) + 1)
    results, elapsed = _timed_batch(pool, ["Answer: 1"], [big_gt])
    assert results[0].acc is False and results[0].score == -1.0 and "maxGroundTruthChars" in results[0].error
    assert elapsed < 1.0


@pytest.mark.integration
def test_pool_uncapped_megabyte_latex_times_out():
    mega_latex = "$" + "\\frac{1}{2}+" * 90_000 + "1$"  # ~1 MB of LaTeX for math-verify to parse
    assert len(mega_latex) > 1_000_000
    with RewardScorer(timeout_s=TIMEOUT_S, workers=1, overlong_enabled=False, max_input_chars=None) as scorer:
        results, elapsed = _timed_batch(scorer, [mega_latex, "Answer: 2"], ["5", "2"], ["MATH-500", "math_dapo"])
    assert results[0].timed_out and results[0].score == -1.0 and not results[0].acc
    assert results[1].acc and not results[1].timed_out
    assert elapsed < TIMEOUT_S + SLACK_S + 3.0  # includes the first worker's start


@pytest.mark.integration
def test_pool_recovers_from_worker_crash_and_scorer_errors(pool):
    started = pool.stats["workers_started"]
    results = pool.score_batch(
        ["Answer: 1", "Answer: 2", "Answer: 3", "Answer: 4"],
        ["1", "2", "3", "4"],
        ["math_dapo", "test_exit", "test_raising", "math_dapo"],
    )
    assert [r.acc for r in results] == [True, False, False, True]
    assert "died" in results[1].error and not results[1].timed_out and results[1].score == -1.0
    assert "scorer bug" in results[2].error and not results[2].timed_out
    assert pool.stats["workers_started"] == started + 1  # only the crashed worker was replaced
    # Crash every worker at once, then score normally.
    pool.score_batch(["x", "y"], ["1", "1"], ["test_exit", "test_exit"])
    assert all(r.acc for r in pool.score_batch(["Answer: 5"] * 4, ["5"] * 4))


@pytest.mark.integration
def test_pool_one_worker_sends_many_responses_per_message_and_fails_only_the_bad_ones():
    """One worker, a batch larger than one message holds: a crash and a timeout in the middle
    fail only their own response; every other response is scored, in input order; the time
    bound is per response (three 0.6 s responses in one message under a 1 s bound all pass)."""
    with RewardScorer(timeout_s=TIMEOUT_S, workers=1, overlong_enabled=False) as scorer:
        scorer.score_batch(["Answer: 1"], ["1"])
        count = 70
        responses = [f"0|Answer: {i}" for i in range(count)]
        sources = ["test_sleepy"] * count
        responses[5], sources[5] = "x", "test_exit"
        responses[40] = f"{TIMEOUT_S + 5}|Answer: 40"
        started = scorer.stats["workers_started"]
        results, elapsed = _timed_batch(scorer, responses, [str(i) for i in range(count)], sources)
        assert "died" in results[5].error and results[40].timed_out
        assert [r.pred for i, r in enumerate(results) if i not in (5, 40)] == [str(i) for i in range(count) if i not in (5, 40)]
        assert all(r.acc and r.error is None for i, r in enumerate(results) if i not in (5, 40))
        assert scorer.stats["workers_started"] == started + 2
        assert elapsed < TIMEOUT_S + 2 * SLACK_S, elapsed

        slow = [f"{0.6 * TIMEOUT_S}|Answer: {i}" for i in range(3)]
        results = scorer.score_batch(slow, ["0", "1", "2"], ["test_sleepy"] * 3)
        assert not any(r.timed_out for r in results) and all(r.acc for r in results)


@pytest.mark.integration
def test_pool_overlong_shaping():
    # L_max = 100, L_cache = 20: no penalty up to 80 tokens, a linear ramp to -1 at 100, -1 beyond.
    lengths = [50, 80, 90, 100, 150, 90]
    responses = ["Answer: 4", "Answer: 4", "Answer: 4", "Answer: 4", "Answer: 4", "no answer"]
    truncated = [False, False, False, False, True, False]
    with RewardScorer(timeout_s=5.0, workers=1, max_response_length=100, overlong_buffer_length=20) as scorer:
        results = scorer.score_batch(responses, ["4"] * 6, None, lengths, truncated)
    # (80 - len) / 20 and +-1 in Python float64: within an ulp of these values; approx's rel 1e-6 is far above
    assert [r.overlong_penalty for r in results] == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0, -0.5])
    assert [r.score for r in results] == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0, -1.5])
    assert [r.acc for r in results] == [True] * 5 + [False]  # acc stays unshaped
    assert [r.correctness for r in results] == [1.0] * 5 + [-1.0]
    assert [r.truncated for r in results] == truncated
    assert results[2]["score"] == pytest.approx(0.5)  # mapping access


@pytest.mark.integration
def test_pool_overlong_factor_and_disabled():
    with RewardScorer(
        timeout_s=5.0, workers=1, max_response_length=100, overlong_buffer_length=20, overlong_penalty_factor=0.5
    ) as scorer:
        (result,) = scorer.score_batch(["Answer: 4"], ["4"], None, [90])
    # float64 of a ramp times 0.5, plus 1: within an ulp (approx: rel 1e-6)
    assert result.overlong_penalty == pytest.approx(-0.25) and result.score == pytest.approx(0.75)
    with RewardScorer(timeout_s=5.0, workers=1, overlong_enabled=False) as scorer:
        (result,) = scorer.score_batch(["Answer: 4"], ["4"], None, [10_000])
    assert result.overlong_penalty == 0.0 and result.score == 1.0


def test_pool_argument_errors():
    with pytest.raises(ValueError, match="max_response_length"):
        RewardScorer(overlong_enabled=True)
    with pytest.raises(ValueError, match="spec.algorithm.overlong.bufferLength"):
        RewardScorer(max_response_length=10, overlong_buffer_length=20)
    with pytest.raises(ValueError, match="fork"):
        RewardScorer(overlong_enabled=False, start_method="fork")
    with RewardScorer(workers=1, max_response_length=100, overlong_buffer_length=20) as scorer:
        with pytest.raises(ValueError, match="response_lengths"):
            scorer.score_batch(["Answer: 1"], ["1"])
        with pytest.raises(ValueError, match="ground_truths"):
            scorer.score_batch(["Answer: 1"], ["1", "2"], None, [1])
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score_batch(["Answer: 1"], ["1"], None, [1])


def test_pool_rejects_scorers_workers_cannot_import():
    with with_test_scorers({"test_lambda": lambda s, g: {"score": 1.0, "acc": True, "pred": ""}}, []):
        with RewardScorer(workers=1, overlong_enabled=False, default_scorer="test_lambda") as scorer:
            with pytest.raises(TypeError, match="module-level function"):
                scorer.score_batch(["Answer: 1"], ["1"])
