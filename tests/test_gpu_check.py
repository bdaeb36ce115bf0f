"""benchmarks/gpu_check.py, the device check of the GPU path: run on CPU with small sizes (what CI
keeps working until a GPU runs it), its exit code, the bf16 peak table and the throughput / MFU
arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.processes  # the weight-sync receiver, the DeepSpeed learner and the reward workers are processes
def test_gpu_check_on_cpu_passes_and_prints_every_figure(tmp_path):
    from dapo.learner.deepspeed_backend import deepspeed_cpu_usable

    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--device", "cpu", "--steps", "4",
                           "--warmup", "1", "--sync-trials", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    for field in ("generation tokens/s", "learner tokens/s", "MFU                  n/a: no bf16 peak known for CPU",
                  "sync GB/s", "memcpy (CPU tensor copy) GB/s", "verified sync: receiver holds", "SUMMARY (CPU"):
        assert field in text, field
    report = json.loads(out.read_text())
    results = report["results"]
    assert report["exit_code"] == 0
    train = results["train"]
    assert train["steps"] == 4 and train["weight_version"] == 4 and train["steps_timed"] == 3
    assert train["generation_tokens_per_s"] > 0 and train["learner_tokens_per_s"] > 0
    assert train["engine"] == "HFEngine" and train["learner"] == "TorchLearner"
    assert results["published"]["devices"] == ["cpu"] and results["published"]["bytes"] > 0
    sync = results["weight-sync"]
    assert sync["bytes"] > 4 * sync["bucket_bytes"]  # several buckets per sync
    assert 0 < sync["verified_retained_bytes"] <= sync["verified_retained_bound"] < sync["bytes"]
    assert sync["sync_gb_per_s"] > 0 and sync["copy_gb_per_s"] > 0
    deepspeed = results["deepspeed"]
    if deepspeed_cpu_usable():
        assert gpu_check.outcome(deepspeed) == "PASS", deepspeed
        assert deepspeed["backend"] == "DeepSpeedBackend" and deepspeed["weight_version"] == 2
    else:
        assert "skip" in deepspeed and "[deepspeed] SKIP" in text


def test_a_failing_section_fails_the_check(tmp_path, monkeypatch, capsys):
    """One section raising: the others still run, the summary names it, the exit code is 1."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # main() sets both: restored after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ran = []

    def broken(ctx):
        raise RuntimeError("the receiver never answered")

    def fine(ctx):
        ran.append(ctx.device)
        return {"problems": []}

    monkeypatch.setattr(gpu_check, "write_model", lambda folder, shape, device: {"parameters": 1,
                                                                                   "matmul_parameters": 1})
    monkeypatch.setattr(gpu_check, "SECTIONS", [("broken", broken), ("fine", fine)])
    assert gpu_check.main(["--device", "cpu", "--steps", "3", "--warmup", "1"]) == 1
    printed = capsys.readouterr().out
    assert ran == ["cpu"]
    assert "SUMMARY (CPU" in printed and "FAIL" in printed
    assert "broken       FAIL: RuntimeError: the receiver never answered" in printed


def test_exit_code_counts_failures_and_problems_not_skips():
    assert gpu_check.exit_code({"a": {"problems": []}, "b": {"skip": "no deepspeed"}}) == 0
    assert gpu_check.exit_code({"a": {"problems": ["copies on cuda"]}}) == 1
    assert gpu_check.exit_code({"a": {"problems": []}, "b": {"error": "Traceback ..."}}) == 1


def test_bf16_peaks_by_device_name():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4  # SXM
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H100 NVL") == 835.0
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_step_figures_tokens_per_second_and_palm_flops():
    """Two steps: 100 and 300 response tokens generated in 1 s and 2 s; 400 and 800 tokens trained
    in 0.5 s and 1.5 s of update; mean sequence 10 + 20 tokens."""
    records = [
        {"perf/gen_tokens_per_s": 100.0, "timing_s/gen": 1.0, "perf/throughput": 100.0, "timing_s/step": 4.0,
         "timing_s/update_actor": 0.5, "timing_s/old_log_prob": 0.0, "prompt_length/mean": 10.0,
         "response_length/mean": 20.0, "actor/pg_loss": 0.1},
        {"perf/gen_tokens_per_s": 150.0, "timing_s/gen": 2.0, "perf/throughput": 200.0, "timing_s/step": 4.0,
         "timing_s/update_actor": 1.5, "timing_s/old_log_prob": 0.25, "prompt_length/mean": 10.0,
         "response_length/mean": 20.0, "actor/pg_loss": float("nan")},
    ]
    figures = gpu_check.step_figures(records, {"matmul_parameters": 1000}, layers=2, hidden=8)
    assert figures["generation_tokens_per_s"] == pytest.approx(400 / 3)
    assert figures["learner_tokens_per_s"] == pytest.approx(1200 / 2)
    assert figures["learner_flops_per_s"] == pytest.approx((6 * 1000 + 12 * 2 * 8 * 30) * 1200 / 2)
    assert figures["pg_loss_finite"] is False
