"""The built-in quickstart model and its data: tokenizer, deterministic cached build, data files."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from dapo.model import builtin
from dapo.model.builtin import ArithRecipe, build_arith_tiny, build_tokenizer, builtin_path, split_problems

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
# Small enough to build in well under a second, big enough to exercise every code path.
TINY = ArithRecipe(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32,
                   warmup_steps=3, warmup_batch=4, lr_warmup_steps=1)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tokenizer_round_trip_and_chat_template():
    tok = build_tokenizer()
    text = "37+48=Answer: 85"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("Answer:")) == 1  # "Answer:" is one token
    assert len(ids) == len("37+48=") + 1 + len(" 85")
    prompt = tok.apply_chat_template([{"role": "user", "content": "37+48"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "37+48="
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_sloppy_teacher_slips_one_digit_and_is_right_at_its_rate():
    rng = random.Random(0)
    for answer in ["0", "7", "10", "98"]:
        for _ in range(50):
            wrong = builtin.sloppy_answer(answer, rng)
            diff = abs(int(wrong) - int(answer))
            assert int(wrong) >= 0 and diff in {10**k for k in range(len(answer))}
    answers = [builtin.teacher_answer("42", 0.3, rng) for _ in range(4000)]
    # a binomial rate of 4000 seeded draws (Python's integer Mersenne Twister: the same on every CPU):
    # std sqrt(0.3 x 0.7 / 4000) = 7.2e-3, +-0.03 is 4.1 sigma
    assert 0.27 < answers.count("42") / len(answers) < 0.33


def test_build_is_deterministic(tmp_path):
    import torch
    from safetensors.torch import load_file

    first = build_arith_tiny(tmp_path / "a", TINY)
    second = build_arith_tiny(tmp_path / "b", TINY)
    w1, w2 = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # two builds on one machine: bit-exact by design
    other = build_arith_tiny(tmp_path / "c", replace(TINY, seed=TINY.seed + 1))
    w3 = load_file(other / "model.safetensors")
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_built_folder_loads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_arith_tiny(tmp_path / "m", TINY)
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    enc = tok(["3+4=", "12+30="], return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, enc["input_ids"].shape[1] + 3)
    meta = json.loads((folder / "dapo_builtin.json").read_text())
    assert meta["recipe"]["warmup_steps"] == 3 and meta["steps"] == 3


def test_builtin_path_builds_once_then_reuses_cache(tmp_path, monkeypatch):
    monkeypatch.setitem(builtin.BUILTINS, "arith-tiny", TINY)
    calls = []
    real_build = builtin.build_arith_tiny
    monkeypatch.setattr(builtin, "build_arith_tiny", lambda dest, recipe: calls.append(dest) or real_build(dest, recipe))
    first = builtin_path("arith-tiny", tmp_path)
    second = builtin_path("arith-tiny", tmp_path)
    assert first == second == tmp_path / "builtin" / f"arith-tiny-{TINY.digest()}"
    assert len(calls) == 1 and (first / "config.json").is_file()
    # a changed recipe is a different cache entry
    monkeypatch.setitem(builtin.BUILTINS, "arith-tiny", replace(TINY, seed=5))
    assert builtin_path("arith-tiny", tmp_path) != first and len(calls) == 2


def test_builtin_path_honours_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(builtin.BUILTINS, "arith-tiny", TINY)
    monkeypatch.setenv("DAPO_CACHE_DIR", str(tmp_path))
    assert builtin_path("arith-tiny").parent == tmp_path / "builtin"


def test_unknown_builtin_name_names_the_field_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"spec\.model\.path.*builtin:nope.*builtin:arith-tiny"):
        builtin_path("nope", tmp_path)
    assert not (tmp_path / "builtin").exists()


def test_committed_data_files_equal_the_generator(tmp_path):
    import pyarrow.parquet as pq

    def content(path):  # parquet bytes carry the writer's version: compare rows
        return pq.read_table(path).to_pylist() if path.suffix == ".parquet" else path.read_text()

    written = builtin.write_arith_data(tmp_path)
    assert len(written) == 4
    for path in written:
        assert content(DATA / path.name) == content(path), (
            f"examples/data/{path.name} is stale: run `python -m dapo.model.builtin write-data examples/data`")


def test_data_files_are_disjoint_and_cover_the_task():
    train, evaluation = _read_jsonl(DATA / builtin.TRAIN_FILE), _read_jsonl(DATA / builtin.EVAL_FILE)
    train_problems = {r["problem"] for r in train}
    eval_problems = {r["problem"] for r in evaluation}
    assert len(eval_problems) == len(evaluation) == builtin.ARITH_TINY.eval_problems
    assert len(train_problems) == len(train) >= 2000
    assert not train_problems & eval_problems
    for row in train + evaluation:
        a, b = row["problem"].split("+")
        assert row["answer"] == str(int(a) + int(b)) and row["data_source"] == "arith"
    # the warm-up samples only from the train split, so it never sees an evaluation problem
    warmup_pool, held_out = split_problems()
    assert {p for p, _ in warmup_pool} == train_problems and {p for p, _ in held_out} == eval_problems


def test_committed_data_loads_with_the_project_loader():
    from dapo.data.prompts import load_prompts

    records, _report = load_prompts(DATA / builtin.EVAL_FILE, template="none")
    assert len(records) == 200 and records[0].ground_truth.isdigit()
    assert records[0].prompt[-1]["content"] == _read_jsonl(DATA / builtin.EVAL_FILE)[0]["problem"]


def test_fewshot_prompts_load_as_chat_messages_ending_in_the_question():
    from dapo.data.prompts import load_prompts

    records, _report = load_prompts(DATA / builtin.FEWSHOT_EVAL_FILE, template="none")
    plain = _read_jsonl(DATA / builtin.EVAL_FILE)
    assert len(records) == len(plain)
    first = records[0]
    a, b = plain[0]["problem"].split("+")
    assert [m["role"] for m in first.prompt] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert first.prompt[-1]["content"] == f"What is {a} + {b}?"
    assert first.ground_truth == plain[0]["answer"]
