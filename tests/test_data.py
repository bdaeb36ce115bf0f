"""Tests of dapo.data.prompts: the prompt loader (real public sets + synthetic edge cases) and the sampler.

Run: .venv/bin/pytest -s tests/test_data.py   (-s shows the printed counts)
"""

from __future__ import annotations

import collections
import datetime
import itertools
import json
import logging
import random
import subprocess
import sys
import time
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dapo
from dapo.data.sampler import PromptSampler, epoch_permutation
from dapo.data.prompts import (
    DAPO_PROMPT_PREFIX,
    DAPO_PROMPT_SUFFIX,
    LoadReport,
    PromptRecord,
    apply_dapo_template,
    dataset_fingerprint,
    is_dapo_templated,
    load_prompts,
    normalize_answer_value,
    prompt_uid,
)

# ../shared/data relative to the repository root (see the data README).
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"public data sets folder {DATA} is absent (tests on real data need ../shared/data)"
)


def assert_report_adds_up(report: LoadReport) -> None:
    """Every row read is accounted for exactly once."""
    assert report.rows_read == (
        report.bad_rows_total + report.duplicates_dropped + report.conflicting_rows_dropped + report.truncated + report.kept
    ), report


def count_template_occurrences(text: str) -> int:
    return text.count(DAPO_PROMPT_PREFIX.strip()) + text.count(DAPO_PROMPT_SUFFIX.strip())


# =========================================================================== template


def test_apply_dapo_template_exact_text():
    wrapped = apply_dapo_template("What is 1+1?")
    assert wrapped == (
        "Solve the following math problem step by step. The last line of your response should be of the "
        "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        "What is 1+1?\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    assert is_dapo_templated(wrapped)
    # A raw problem that merely starts like the instruction (one exists in DAPO-Math-17k) is raw.
    assert not is_dapo_templated("Solve the following equation in positive numbers: x + 1 = 2")


def test_normalize_answer_value():
    assert normalize_answer_value("blah\n#### 1,234") == "1234"
    assert normalize_answer_value(5.0) == "5"
    assert normalize_answer_value(-1.0) == "-1"
    assert normalize_answer_value(2.5) == "2.5"
    assert normalize_answer_value(7) == "7"
    assert normalize_answer_value("  \\frac{1}{2} ") == "\\frac{1}{2}"
    for unusable in (None, True, float("nan"), float("inf")):
        assert normalize_answer_value(unusable) is None
    # JSON ground truths (code test cases) stay data; an empty one is an empty answer
    assert normalize_answer_value(["1"]) == ["1"] and normalize_answer_value({"a": (1, 2)}) == {"a": [1, 2]}
    assert normalize_answer_value([]) == "" and normalize_answer_value({}) == ""


# =========================================================================== real data


@pytest.fixture(scope="module")
def dapo17k():
    """One timed default load of DAPO-Math-17k shared by the tests below: (records, report, seconds)."""
    started = time.perf_counter()
    records, report = load_prompts(DATA / "dapo-math-17k.parquet")
    return records, report, time.perf_counter() - started


@needs_data
def test_dapo_math_17k_counts_conflicts_template_and_speed(dapo17k):
    path = DATA / "dapo-math-17k.parquet"
    # Independent count straight from pyarrow: rows, distinct prompts, prompts with >1 answer.
    table = pq.read_table(path, columns=["prompt", "reward_model"]).to_pylist()
    answers_by_prompt: dict[str, set[str]] = collections.defaultdict(set)
    for row in table:
        answers_by_prompt[row["prompt"][-1]["content"]].add(row["reward_model"]["ground_truth"].strip())
    expected_conflicts = {p for p, a in answers_by_prompt.items() if len(a) > 1}
    conflict_rows = sum(1 for row in table if row["prompt"][-1]["content"] in expected_conflicts)
    expected_kept = len(answers_by_prompt) - len(expected_conflicts)
    expected_duplicates = len(table) - conflict_rows - expected_kept

    records, report, seconds = dapo17k
    print(f"\n[dapo-math-17k] {report.summary()}")
    print(f"[dapo-math-17k] independent: rows={len(table)} distinct={len(answers_by_prompt)} "
          f"conflicting prompts={len(expected_conflicts)} ({conflict_rows} rows) duplicates={expected_duplicates}; "
          f"load took {seconds:.2f}s")

    assert report.rows_read == len(table) == 17917
    assert len(answers_by_prompt) == 17290  # the data README's figure
    assert report.conflicting_prompts_dropped == len(expected_conflicts) > 0
    assert report.conflicting_rows_dropped == conflict_rows
    assert report.duplicates_dropped == expected_duplicates
    assert report.kept == len(records) == expected_kept
    assert report.bad_rows == {}
    assert_report_adds_up(report)
    assert seconds < 10, f"loading 17k rows took {seconds:.1f}s"

    # Templated exactly once, around the raw problem; conflicting prompts are gone entirely.
    raw_problems = set(answers_by_prompt) - expected_conflicts
    assert report.templated == len(table) and report.already_templated == 0
    inner = set()
    for record in records:
        assert len(record.prompt) == 1 and record.prompt[0]["role"] == "user"
        text = record.text
        assert text.startswith(DAPO_PROMPT_PREFIX) and text.endswith(DAPO_PROMPT_SUFFIX)
        assert count_template_occurrences(text) == 2, text[:200]
        inner.add(text[len(DAPO_PROMPT_PREFIX) : -len(DAPO_PROMPT_SUFFIX)])
        assert record.data_source == "DAPO-17k"
        assert record.ground_truth == next(iter(answers_by_prompt[text[len(DAPO_PROMPT_PREFIX) : -len(DAPO_PROMPT_SUFFIX)]]))
    assert inner == raw_problems
    assert len({r.uid for r in records}) == len(records)

    # Keep-first: kept order follows first occurrence in the file.
    first_seen = list(dict.fromkeys(row["prompt"][-1]["content"] for row in table))
    assert [p for p in first_seen if p not in expected_conflicts] == [
        r.text[len(DAPO_PROMPT_PREFIX) : -len(DAPO_PROMPT_SUFFIX)] for r in records
    ]


@needs_data
def test_dapo_math_17k_template_none_and_max_prompts(dapo17k):
    path = DATA / "dapo-math-17k.parquet"
    full = dapo17k[0]
    raw, report = load_prompts(path, template="none")
    assert report.templated == 0
    assert [apply_dapo_template(r.text) for r in raw] == [r.text for r in full]
    first, cut = load_prompts(path, max_prompts=100)
    print(f"\n[dapo-math-17k max_prompts=100] {cut.summary()}")
    assert [r.uid for r in first] == [r.uid for r in full[:100]]
    assert cut.kept == 100 and cut.truncated == len(full) - 100
    assert_report_adds_up(cut)


@needs_data
def test_aime_2024_is_not_double_wrapped_and_dedupes_32_copies():
    path = DATA / "aime-2024.parquet"
    table = pq.read_table(path).to_pylist()
    contents = [row["prompt"][-1]["content"] for row in table]
    distinct = list(dict.fromkeys(contents))
    records, report = load_prompts(path)
    print(f"\n[aime-2024] {report.summary()}; independent: rows={len(table)} distinct={len(distinct)}")
    assert report.rows_read == len(table) == 960
    assert report.kept == len(distinct) == 30
    assert report.duplicates_dropped == 930
    assert report.conflicting_prompts_dropped == 0
    assert report.templated == 0 and report.already_templated == 960
    assert [r.text for r in records] == distinct  # untouched: already templated in the file
    for record in records:
        assert count_template_occurrences(record.text) == 2
        assert record.text == apply_dapo_template(record.extra["extra_info"]["raw_problem"])
    # avg@32 evaluation keeps the copies on request.
    all_rows, report_all = load_prompts(path, dedupe=False)
    assert len(all_rows) == 960 and report_all.duplicates_dropped == 0
    assert_report_adds_up(report_all)


@needs_data
def test_math500_jsonl():
    path = DATA / "math500.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records, report = load_prompts(path)
    print(f"\n[math500] {report.summary()}")
    distinct = {r["problem"] for r in rows}
    assert report.rows_read == len(rows) == 500
    assert report.kept == len(distinct)
    assert [r.ground_truth for r in records] == [row["answer"].strip() for row in rows]
    assert [r.text for r in records] == [apply_dapo_template(row["problem"]) for row in rows]
    assert {r.data_source for r in records} == {"math500"}
    assert records[0].extra["unique_id"] == rows[0]["unique_id"]


@needs_data
def test_gsm8k_answer_extraction():
    path = DATA / "gsm8k-test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    expected = [row["answer"].rsplit("####", 1)[1].strip().replace(",", "") for row in rows]
    with_commas = sum(1 for row in rows if "," in row["answer"].rsplit("####", 1)[1])
    records, report = load_prompts(path)
    print(f"\n[gsm8k] {report.summary()}; answers with thousands commas: {with_commas}")
    assert report.rows_read == len(rows) == 1319
    assert report.kept == len({row["question"] for row in rows})
    assert with_commas > 0  # the comma rule is exercised on real data
    assert [r.ground_truth for r in records] == expected
    assert all("####" not in r.ground_truth and "," not in r.ground_truth for r in records)
    assert records[0].extra["answer_text"] == rows[0]["answer"]
    assert all(count_template_occurrences(r.text) == 2 for r in records)


@needs_data
def test_amc23_float_answers_and_problem_column():
    path = DATA / "amc23.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records, report = load_prompts(path)
    print(f"\n[amc23] {report.summary()}")
    assert report.rows_read == len(rows) == 40 == report.kept
    assert [r.ground_truth for r in records] == [str(int(row["answer"])) for row in rows]
    assert records[0].ground_truth == "27"
    assert [r.text for r in records] == [apply_dapo_template(row["problem"]) for row in rows]
    # Override: use the `question` column instead, and a fixed data source column.
    again, _ = load_prompts(path, columns={"problem": "question", "dataSource": "url"})
    assert [r.text for r in again] == [apply_dapo_template(row["question"]) for row in rows]
    assert again[0].data_source == rows[0]["url"]


@needs_data
def test_uids_are_stable_across_loads():
    first, _ = load_prompts(DATA / "math500.jsonl")
    second, _ = load_prompts(DATA / "math500.jsonl")
    assert [r.uid for r in first] == [r.uid for r in second]
    assert all(r.uid == prompt_uid(r.prompt) for r in first)
    assert dataset_fingerprint(first) == dataset_fingerprint(second) != dataset_fingerprint(first[1:])


# =========================================================================== synthetic files


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_counted_by_reason(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"problem": "p1", "answer": "1"},
        {"problem": "p2"},                      # missing column 'answer'
        {"answer": "3"},                        # missing column 'problem'
        {"problem": "p4", "answer": "   "},      # empty answer
        {"problem": "p5", "answer": None},      # empty answer
        {"problem": "  ", "answer": "6"},       # empty prompt
        {"problem": "p7", "answer": True},      # unusable answer
        {"problem": {"x": 1}, "answer": "8"},   # malformed prompt
        "{not json",                            # invalid JSON line
        "",                                     # blank line: not a row
        {"problem": "p10", "answer": 10.0},
        {"problem": "x" * 500, "answer": "11"},  # too long (with the limit below)
    ])
    records, report = load_prompts(path, max_prompt_length=400)
    print(f"\n[synthetic bad rows] {report.summary()}")
    assert [r.ground_truth for r in records] == ["1", "10"]
    assert report.rows_read == 11
    assert report.bad_rows == {
        "missing column 'answer'": 1,
        "missing column 'problem'": 1,
        "empty answer": 2,
        "empty prompt": 1,
        "unusable answer": 1,
        "malformed prompt": 1,
        "invalid JSON line": 1,
        "too long": 1,
    }
    assert_report_adds_up(report)
    # The length measure is pluggable (e.g. tokens); here: words of the templated prompt (~40 + problem).
    _, report_words = load_prompts(path, max_prompt_length=60, prompt_length=lambda m: len(m[-1]["content"].split()))
    assert "too long" not in report_words.bad_rows and report_words.kept == 3


def test_conflicts_drop_every_copy_and_duplicates_keep_first(tmp_path):
    path = write_jsonl(tmp_path / "conflicts.jsonl", [
        {"problem": "A", "answer": "5", "tag": "first"},
        {"problem": "B", "answer": "1"},
        {"problem": "A", "answer": " 5 ", "tag": "second"},  # same answer after normalising: duplicate
        {"problem": "C", "answer": "6"},
        {"problem": "B", "answer": "2"},                     # conflict: every B goes
        {"problem": "B", "answer": "1"},
        {"problem": "D", "answer": "$7$"},
        {"problem": "D", "answer": "7"},                     # $7$ and 7 agree
    ])
    records, report = load_prompts(path)
    print(f"\n[synthetic conflicts] {report.summary()}")
    assert [r.ground_truth for r in records] == ["5", "6", "$7$"]
    assert records[0].extra["tag"] == "first"
    assert report.conflicting_prompts_dropped == 1 and report.conflicting_rows_dropped == 3
    assert report.duplicates_dropped == 2
    assert_report_adds_up(report)
    kept_all, report_all = load_prompts(path, dedupe=False)
    assert len(kept_all) == 5 and report_all.conflicting_rows_dropped == 3


def test_raw_and_prewrapped_copies_are_one_prompt_in_dapo_parquet(tmp_path):
    raw = "Compute $2+2$."
    def row(content, truth):
        return {
            "data_source": "toy", "prompt": [{"role": "user", "content": content}], "ability": "math",
            "reward_model": {"ground_truth": truth, "style": "rule"}, "extra_info": {"index": 0},
        }
    path = tmp_path / "toy.parquet"
    pq.write_table(pa.Table.from_pylist([
        row(raw, "4"),
        row(apply_dapo_template(raw), "4"),
        row("Compute $3+3$.", "6"),
    ]), path)
    records, report = load_prompts(path)
    assert [r.text for r in records] == [apply_dapo_template(raw), apply_dapo_template("Compute $3+3$.")]
    assert report.templated == 2 and report.already_templated == 1 and report.duplicates_dropped == 1
    assert records[0].data_source == "toy" and records[0].extra["ability"] == "math"
    # what scorers get: the verl extra_info keys at the top level, the other columns, the row index
    assert records[0].extra_info == {"ability": "math", "index": 0, "row_index": 0}
    stamped = PromptRecord("u", [{"role": "user", "content": "q"}], "1", "s",
                           {"blob": b"\x00", "when": datetime.date(2026, 1, 2), "extra_info": {"n": 1.5}})
    assert stamped.extra_info == {"blob": "b'\\x00'", "when": "2026-01-02", "n": 1.5}  # JSON values only


def test_no_usable_rows_error_names_file_and_column(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": f"q{i}", "solution": str(i)} for i in range(12)])
    with pytest.raises(ValueError) as caught:
        load_prompts(path)
    message = str(caught.value)
    print(f"\n[error] {message}")
    assert message == f"{path}: no usable rows: column 'answer' missing in all 12 rows; pass data.columns.answer"
    records, _ = load_prompts(path, columns={"answer": "solution"})
    assert len(records) == 12 and records[3].ground_truth == "3"


def test_empty_file_and_all_conflicting_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no usable rows: the file holds no rows"):
        load_prompts(empty)
    torn = write_jsonl(tmp_path / "torn.jsonl", [{"problem": "A", "answer": "1"}, {"problem": "A", "answer": "2"}])
    with pytest.raises(ValueError, match=r"torn\.jsonl: no usable rows: .*different ground truths"):
        load_prompts(torn)
    blank_answers = write_jsonl(tmp_path / "blank.jsonl", [{"problem": "A", "answer": ""}] * 3)
    with pytest.raises(ValueError, match=r"blank\.jsonl: no usable rows: empty answer in all 3 rows.*data\.columns\.answer"):
        load_prompts(blank_answers)


def test_unsupported_inputs_are_clear_errors(tmp_path):
    csv = tmp_path / "set.csv"
    csv.write_text("problem,answer\n1+1,2\n")
    with pytest.raises(ValueError, match=r"set\.csv: unsupported file type '\.csv'; use \.parquet .* or \.jsonl"):
        load_prompts(csv)
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        load_prompts(folder)
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        load_prompts("gs://bucket/set.jsonl")
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"problem": "p", "answer": "1"}])
    with pytest.raises(ValueError, match="data.columns: unknown key 'question'"):
        load_prompts(ok, columns={"question": "problem"})
    with pytest.raises(ValueError, match="promptTemplate"):
        load_prompts(ok, template="chatml")  # type: ignore[arg-type]


def test_s3_uris_go_through_the_storage_seam(tmp_path, monkeypatch):
    local = write_jsonl(tmp_path / "staged.jsonl", [{"problem": "p", "answer": "1"}])
    calls = []

    def fake_stage(uri, cache_dir=None):
        calls.append((uri, cache_dir))
        return local

    fake = types.ModuleType("dapo.storage")
    fake.stage = fake_stage
    monkeypatch.setitem(sys.modules, "dapo.storage", fake)
    monkeypatch.setattr(dapo, "storage", fake, raising=False)
    records, report = load_prompts("s3://bucket/sets/train.jsonl", cache_dir=tmp_path / "cache")
    assert calls == [("s3://bucket/sets/train.jsonl", tmp_path / "cache")]
    assert report.path == "s3://bucket/sets/train.jsonl" and records[0].data_source == "train"
    # The extension is checked before anything is staged.
    with pytest.raises(ValueError, match="unsupported file type"):
        load_prompts("s3://bucket/sets/train.csv")
    assert len(calls) == 1


@pytest.mark.processes
def test_local_loading_never_imports_storage(tmp_path):
    path = write_jsonl(tmp_path / "local.jsonl", [{"problem": "p", "answer": "1"}])
    code = (
        "import sys; from dapo.data.prompts import load_prompts; load_prompts(sys.argv[1]); "
        "assert 'dapo.storage' not in sys.modules and 'boto3' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)


def test_summary_is_logged(tmp_path, caplog):
    path = write_jsonl(tmp_path / "log.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "p", "answer": "2"}, {"problem": "q", "answer": "3"}])
    with caplog.at_level(logging.INFO, logger="dapo.data.prompts"):
        _, report = load_prompts(path)
    messages = [r.getMessage() for r in caplog.records if r.name == "dapo.data.prompts"]
    assert report.summary() in messages
    assert any("different ground truths" in m for m in messages)
    assert "\n" not in report.summary()


def test_prompt_record_fields():
    record = PromptRecord(uid="u", prompt=[{"role": "user", "content": "hi"}], ground_truth="1", data_source="s")
    assert record.extra == {} and record.text == "hi"


# =========================================================================== sampler


def drain(sampler: PromptSampler, sizes) -> list[list[int]]:
    return [sampler.next_indices(k) for k in sizes]


def test_sampler_deterministic_across_instances():
    sizes = [3, 7, 1, 12, 5, 30]
    assert drain(PromptSampler(17, seed=3), sizes) == drain(PromptSampler(17, seed=3), sizes)


def test_sampler_each_epoch_is_a_permutation_and_epochs_differ():
    n = 50
    sampler = PromptSampler(n, seed=11)
    epochs = [sampler.next_indices(n) for _ in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert len({tuple(order) for order in epochs}) == 4
    assert epochs[2] == epoch_permutation(n, 11, 2)
    assert sampler.epoch == 4 and sampler.position == 0


def test_sampler_crosses_epoch_boundaries():
    n = 10
    sampler = PromptSampler(n, seed=5)
    e0, e1, e2 = (epoch_permutation(n, 5, e) for e in range(3))
    assert sampler.next_indices(7) == e0[:7]
    crossing = sampler.next_indices(7)
    assert crossing == e0[7:] + e1[:4]
    assert (sampler.epoch, sampler.position) == (1, 4)
    # A request longer than an epoch spans several.
    assert sampler.next_indices(15) == e1[4:] + e2[:9]
    assert (sampler.epoch, sampler.position, sampler.consumed) == (2, 9, 29)
    # A request longer than an epoch spans several whole epochs.
    e3, e4 = epoch_permutation(n, 5, 3), epoch_permutation(n, 5, 4)
    assert sampler.next_indices(12) == e2[9:] + e3 + e4[:1]
    assert (sampler.epoch, sampler.position) == (4, 1)
    assert sampler.next_indices(0) == []


def test_sampler_state_round_trip_at_arbitrary_points():
    n = 13
    for cut in (0, 1, 6, 12, 13, 14, 26, 40):
        original = PromptSampler(n, seed=21)
        taken = 0
        rng = random.Random(cut)
        while taken < cut:  # reach the cut with irregular batch sizes
            k = min(rng.randint(1, 5), cut - taken)
            original.next_indices(k)
            taken += k
        state = json.loads(json.dumps(original.state_dict()))
        if cut == n:
            assert (state["epoch"], state["position"]) == (1, 0)  # exactly at the boundary
        restored = PromptSampler(n, seed=21)
        restored.load_state_dict(state)
        future_sizes = [4, 9, 13, 2, 20]
        assert drain(restored, future_sizes) == drain(original, future_sizes), f"cut={cut}"


def test_sampler_peek_does_not_advance():
    sampler = PromptSampler(8, seed=1)
    sampler.next_indices(5)
    peeked = sampler.peek(6)
    assert (sampler.epoch, sampler.position) == (0, 5)
    assert sampler.next_indices(6) == peeked


def test_sampler_seeds_differ_and_unshuffled_is_in_order():
    assert PromptSampler(100, seed=0).next_indices(100) != PromptSampler(100, seed=1).next_indices(100)
    plain = PromptSampler(4, seed=0, shuffle=False)
    assert plain.next_indices(10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_sampler_order_is_pinned():
    # Resume must survive upgrades: this order is part of the checkpoint contract. If it changes,
    # checkpoints written by earlier versions would continue with different prompts.
    assert epoch_permutation(10, 0, 0) == [5, 4, 7, 0, 2, 8, 1, 9, 6, 3]
    assert epoch_permutation(10, 0, 1) == [7, 1, 8, 0, 3, 9, 5, 6, 4, 2]


def test_sampler_shuffle_is_roughly_uniform():
    counts = collections.Counter(tuple(epoch_permutation(3, seed, 0)) for seed in range(1200))
    assert set(counts) == set(itertools.permutations(range(3)))
    assert all(150 <= c <= 250 for c in counts.values()), counts  # expected 200 each


def test_sampler_independent_of_global_rng_state():
    import numpy as np
    import torch

    def run():
        return PromptSampler(30, seed=9).next_indices(45)

    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    first = run()
    random.seed(2); np.random.seed(2); torch.manual_seed(2)
    before = (random.getstate(), torch.random.get_rng_state().clone())
    second = run()
    assert first == second
    assert random.getstate() == before[0] and torch.equal(torch.random.get_rng_state(), before[1])


def test_sampler_rejects_mismatched_or_bad_state():
    state = PromptSampler(10, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"num_items 10 in the checkpoint vs 11 now"):
        PromptSampler(11, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed 1 in the checkpoint vs 2 now"):
        PromptSampler(10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"shuffle"):
        PromptSampler(10, seed=1, shuffle=False).load_state_dict(state)
    fingerprinted = PromptSampler(10, seed=1, fingerprint="aaa").state_dict()
    with pytest.raises(ValueError, match=r"data fingerprint 'aaa' in the checkpoint vs 'bbb' now"):
        PromptSampler(10, seed=1, fingerprint="bbb").load_state_dict(fingerprinted)
    with pytest.raises(ValueError, match="not a sampler state"):
        PromptSampler(10, seed=1).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="invalid position"):
        PromptSampler(10, seed=1).load_state_dict({**state, "position": 10})
    with pytest.raises(ValueError, match="num_items must be a positive integer"):
        PromptSampler(0, seed=1)
    with pytest.raises(ValueError, match="k must be a non-negative integer"):
        PromptSampler(3, seed=1).next_indices(-1)
