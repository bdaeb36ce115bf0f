"""Evaluation, export and comparison of trained policies: the estimators against their closed
forms, `dapo eval` reproducing a run's own evaluation, `dapo export` giving a folder transformers
loads with the checkpoint's logits, `dapo compare` labelling runs by what differs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from _run_files import run_doc
from dapo.evaluation.metrics import PromptSamples, maj_at_k, pass_at_k, summarize, validation_metrics

torch.set_num_threads(2)


# --------------------------------------------------------------------------- the estimators


def closed_form_pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k) with exact integers (Chen et al. 2021, eq. 1)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_equals_the_closed_form():
    """Every (n, c, k) with n <= 12, k <= n: the product form equals the binomial ratio; the edge
    cases are exact (c = 0: 0; c = n or k > n - c: 1; k = n: 1 as soon as one sample is right)."""
    for n in range(1, 13):
        for c, k in itertools.product(range(n + 1), range(1, n + 1)):
            # float64 product of <= 12 factors in (0, 1]: ~12 x 1.1e-16 rounding; 1e-12 holds it
            assert pass_at_k(n, c, k) == pytest.approx(closed_form_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(32, 0, 8) == 0.0 and pass_at_k(32, 32, 1) == 1.0 and pass_at_k(32, 1, 32) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)  # pass@1 is avg@n: c / n
    assert pass_at_k(200, 13, 100) == pytest.approx(closed_form_pass_at_k(200, 13, 100), rel=1e-9)  # no overflow
    for bad in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_maj_at_k_votes_on_answers_ties_go_to_the_first_and_invalid_answers_do_not_vote():
    preds, accs = ["7", "8", "8", "7", "9"], [True, False, False, True, False]
    assert maj_at_k(preds, accs, 3) is False  # "8" twice against "7" once
    assert maj_at_k(preds, accs, 4) is True  # 2-2 tie: "7" came first
    assert maj_at_k(["8", "7", "7", "8"], [False, True, True, False], 4) is False  # tie: "8" came first
    assert maj_at_k(["[INVALID]", "[INVALID]", "5"], [False, False, True], 3) is True  # only "5" votes
    assert maj_at_k(["[INVALID]", ""], [False, False], 2) is False  # no vote: wrong
    with pytest.raises(ValueError):
        maj_at_k(preds, accs, 6)


def _prompt(source: str, accs: list[bool], preds: list[str] | None = None) -> PromptSamples:
    n = len(accs)
    return PromptSamples(source, "q", ["r"] * n, preds or [str(a) for a in accs], accs, [1.0 if a else -1.0 for a in accs],
                         [3] * n, [False] * (n - 1) + [True])


def test_summaries_per_data_source_and_the_training_metric_names():
    prompts = [_prompt("aime", [True, False, False, False], ["12", "13", "13", "12"]), _prompt("aime", [False] * 4),
               _prompt("math", [True, True, False, True], ["5", "5", "6", "5"])]
    summary = summarize(prompts, [1, 2])
    assert set(summary) == {"aime", "math", "all"}
    assert summary["aime"]["avg@4"] == 1 / 8 and summary["aime"]["pass@1"] == pytest.approx(1 / 8, abs=1e-15)
    assert summary["aime"]["pass@2"] == pytest.approx((0.5 + 0.0) / 2, abs=1e-15)
    assert summary["math"]["maj@2"] == 1.0 and summary["aime"]["maj@2"] == 0.5  # aime: "12"-"13" tie -> "12", right
    metrics = validation_metrics(prompts, 4, [2])
    assert metrics["val/acc/mean"] == 4 / 12 and metrics["val-core/math/acc/mean@4"] == 3 / 4
    assert metrics["val/acc/aime"] == 1 / 8 and metrics["val-core/aime/acc/pass@2"] == pytest.approx(0.25, abs=1e-15)
    assert set(k for k in metrics if k.startswith("val-core/math/")) == {
        "val-core/math/acc/mean@4", "val-core/math/acc/pass@2", "val-core/math/acc/maj@2"}
    assert metrics["val/pass@2"] == pytest.approx((0.5 + 0.0 + 1.0) / 3, abs=1e-15)
    assert summary["all"]["truncated"] == 3 / 12 and summary["all"]["response_length"] == 3.0


# --------------------------------------------------------------------------- a trained run


def _run_file(tmp_path: Path, name: str, model_dir: Path, *, lr: float = 1e-3, steps: int = 2,
              checkpoint: dict | None = None) -> Path:
    """A 2-step training of a tiny model with a run-file scorer on which a random model's replies
    vary (``_custom_scorers:length_parity``), evaluated at the end with n = 4 (passK 1, 2)."""
    from _dapo_runs import write_data

    train = write_data(tmp_path / "train.jsonl", 8)
    held_out = write_data(tmp_path / "eval.jsonl", 5)
    doc = run_doc(name, "minimal",
                  model={"path": str(model_dir)},
                  data={"train": str(train), "eval": str(held_out), "promptTemplate": "none"},
                  algorithm={"overlong": {"enabled": False}, "dynamicSampling": {"enabled": False}},
                  rollout={"engine": "hf", "n": 2, "maxResponseLength": 6, "genBatchSize": 2},
                  learner={"strategy": "torch", "trainBatchSize": 2, "miniBatchSize": 2, "microBatchSize": 4, "lr": lr,
                           "warmupSteps": 0, "totalSteps": steps, "seed": 4, "weightDecay": 0.0},
                  reward={"workers": 1, "timeoutSeconds": 5,
                          "scorers": [{"dataSource": "*", "function": "_custom_scorers:length_parity"}]},
                  eval={"everySteps": steps, "beforeTrain": False, "n": 4, "passK": [1, 2], "temperature": 1.0,
                        "topP": 1.0},
                  checkpoint=checkpoint or {"everySteps": steps, "keep": 2})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model folder, and a run of it: (run file, run folder, the run's last evaluation line)."""
    from _dapo_runs import make_model
    from dapo.cli import main

    tmp = tmp_path_factory.mktemp("trained")
    model_dir = make_model(tmp / "model")
    run_file, run_dir = _run_file(tmp, "trained", model_dir), tmp / "run"
    assert main(["run", str(run_file), "--output-dir", str(run_dir)]) == 0
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [line for line in lines if "val/acc/mean" in line][-1]
    assert last_eval["step"] == 2 and 0.0 < last_eval["val/acc/mean"] < 1.0  # a figure that can differ
    return tmp, run_file, run_dir, last_eval


@pytest.mark.integration  # trains a tiny model in process (reward worker pool, HF engine)
def test_eval_of_the_final_checkpoint_reproduces_the_runs_last_evaluation(trained):
    """`dapo eval RUN_DIR` (its latest checkpoint, its run.yaml, n = 4) gives exactly the run's own
    val/acc/mean, val/score/mean, response length and pass@k at that step; --samples has n x
    prompts lines, and -k beyond n is refused."""
    from dapo.cli import main

    tmp, _, run_dir, last_eval = trained
    out, samples = tmp / "eval.json", tmp / "samples.jsonl"
    assert main(["eval", str(run_dir), "--data", str(tmp / "eval.jsonl"), "--k", "1,2", "--json", str(out),
                 "--samples", str(samples)]) == 0
    result = json.loads(out.read_text())
    (source, row), = result["by_source"].items()
    assert result["n"] == 4 and result["step_seeds"] == 2
    assert row["avg@4"] == last_eval["val/acc/mean"] and row["score"] == last_eval["val/score/mean"]
    assert row["response_length"] == last_eval["val/response_length/mean"]
    assert row["pass@2"] == last_eval["val/pass@2"] == last_eval[f"val-core/{source}/acc/pass@2"]
    assert row["maj@2"] == last_eval[f"val-core/{source}/acc/maj@2"]
    assert len(samples.read_text().splitlines()) == 4 * row["prompts"] == 4 * 5
    assert {"prompt", "response", "score", "acc", "pred", "data_source"} <= set(json.loads(samples.read_text().split("\n")[0]))
    assert main(["eval", str(run_dir), "--data", str(tmp / "eval.jsonl"), "--k", "8"]) == 2


@pytest.mark.integration  # trains a tiny model in process (reward worker pool, HF engine)
def test_export_is_a_plain_folder_with_the_checkpoints_logits_and_refuses_a_changed_file(trained, tmp_path):
    """`dapo export RUN_DIR OUT`: transformers loads OUT as it is (generation config included) and
    its logits equal the checkpoint model's, bit for bit; a checkpoint file changed after the
    commit is refused (sha256 against the manifest)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo.cli import main
    from dapo.storage import CheckpointStore

    tmp, _, run_dir, _ = trained
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    store = CheckpointStore(str(run_dir / "checkpoints"))
    original = AutoModelForCausalLM.from_pretrained(store.fetch(store.latest()) / "model").eval()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = AutoTokenizer.from_pretrained(out)("What is 3+4?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(original(ids).logits, exported(ids).logits)
    assert main(["export", str(run_dir), str(out)]) == 2  # the folder exists and is not empty
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    weights = CheckpointStore(str(damaged / "checkpoints")).files_uri(store.latest())
    weights = Path(str(weights).replace(str(run_dir), str(damaged))) / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    assert main(["export", str(damaged), str(tmp_path / "from-damaged")]) == 1


@pytest.mark.integration  # trains tiny models in process and serves S3 (moto) in the test process
def test_compare_labels_runs_by_what_differs_and_reads_checkpoint_prefixes(trained, tmp_path):
    """Three runs differing in spec.learner.lr, one read from its run folder, one from its local
    checkpoint prefix, one from an S3 prefix (moto) where only its checkpoints live: the table
    names each by `learner.lr=...` with its final and best val/acc/mean, and the PNG is written."""
    from moto.server import ThreadedMotoServer

    from dapo.cli import main

    tmp, _, _, _ = trained
    model_dir = tmp / "model"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            patch.setenv("DAPO_CACHE_DIR", str(tmp_path / "cache"))
            from dapo.storage.s3 import s3_client

            s3_client().create_bucket(Bucket="runs")
            refs = []
            for lr, where in ((1e-3, "folder"), (3e-3, "local prefix"), (1e-2, "s3 prefix")):
                uri = "s3://runs/lr-1e-2" if where == "s3 prefix" else None
                run_file = _run_file(tmp_path, f"lr{lr:g}".replace(".", "-"), model_dir, lr=lr,
                                     checkpoint={"everySteps": 2, "keep": 1, **({"uri": uri} if uri else {})})
                assert main(["run", str(run_file), "--output-dir", str(tmp_path / f"run-{lr:g}")]) == 0
                refs.append({"folder": str(tmp_path / f"run-{lr:g}"), "local prefix": str(tmp_path / f"run-{lr:g}" / "checkpoints"),
                             "s3 prefix": uri}[where])
            png = tmp_path / "compare.png"
            import contextlib
            import io

            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert main(["compare", *refs, "--metric", "val/acc/mean", "--metric", "critic/score/mean",
                             "--out", str(png)]) == 0
    finally:
        server.stop()
    text = printed.getvalue()
    rows = [line for line in text.splitlines() if line.startswith("| learner.lr=")]
    assert [row.split("|")[1].strip() for row in rows] == ["learner.lr=0.001", "learner.lr=0.003", "learner.lr=0.01"]
    assert all(len(row.split("|")) == 2 + 1 + 4 for row in rows)  # run, then final and best of two metrics
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration  # trains a tiny model in process (reward worker pool, HF engine)
def test_an_evaluation_pods_result_joins_the_runs_metrics(trained, tmp_path):
    """spec.eval.separatePod: `dapo eval --store-result` of a checkpoint stores its result beside it
    (evals/step-N.json, the training run's metric names), and a trainer in evaluation-pod mode
    writes it to metrics.jsonl as the evaluation of step N and reports it as its last val/acc/mean;
    waiting for a result that never comes ends at its bound. A plain model folder has nowhere to
    store a result."""
    import shutil
    import time

    from dapo.cli import main
    from dapo.controller.metrics import MetricsWriter
    from dapo.controller.pod_evaluations import PodEvaluations
    from dapo.storage import CheckpointStore

    tmp, _, run_dir, last_eval = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    store = CheckpointStore(str(copy / "checkpoints"))
    assert store.evaluated_steps() == []
    assert main(["eval", str(copy / "checkpoints"), "--data", str(tmp / "eval.jsonl"), "--k", "1,2",
                 "--store-result"]) == 0
    assert store.evaluated_steps() == [2]
    evaluations = PodEvaluations(store, MetricsWriter(tmp_path / "pod-mode"))
    (record,) = evaluations.collect()
    assert evaluations.collect() == []  # each result once
    (line,) = [json.loads(x) for x in (tmp_path / "pod-mode" / "metrics.jsonl").read_text().splitlines()]
    assert line == record and line["step"] == 2 and line["eval/separate_pod"] == 1
    for key in ("val/acc/mean", "val/score/mean", "val/pass@2"):
        assert line[key] == last_eval[key], key  # the same figures the run computed in process
    assert evaluations.wait_for(2, timeout_s=0.0) == []  # already there
    t0 = time.monotonic()
    assert evaluations.wait_for(4, timeout_s=0.2, poll_s=0.05) == [] and time.monotonic() - t0 < 0.2 + 2.0
    assert main(["eval", str(tmp / "model"), "--data", str(tmp / "eval.jsonl"), "--store-result"]) == 2  # not a checkpoint
