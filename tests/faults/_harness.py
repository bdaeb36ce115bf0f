"""Real processes for the fault-injection suite: a small arithmetic model that really learns, run
files with dynamic sampling on, the processes launcher started in the background with its role
pids, and the comparison of a run's whole training state against an uninterrupted run.

What "recovered exactly" means here: the final checkpoint of the interrupted-and-resumed run holds
the same model weights, optimizer and lr-scheduler state, sampler position, surplus groups, Python
and torch RNG states, step and weight version as the final checkpoint of an uninterrupted run of the
same run file with the same process topology (tensors compared with ``torch.equal``, everything else
with ``==``), and metrics.jsonl holds every step exactly once, each trained on the same prompts
(uid digest) as the uninterrupted run's.

Why the model and scorer: the arithmetic task (``dapo.model.builtin``) with a briefly warmed-up tiny model
samples the right answer ~20 % of the time, so the real ``math_dapo`` scorer gives rewards that
vary inside groups, advantages are non-zero, the weights move every step, and dynamic sampling drops
groups and leaves surplus ones: every part of the state depends on what happened before.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from _dapo_runs import role_env as shared_role_env
from _run_files import FAULT_STEPS

STEPS = FAULT_STEPS  # the faults run file's steps (tests/_run_files.py)

# A ~10k-parameter arithmetic model (sums of one-digit numbers) warmed up for a few seconds: it
# answers in the "Answer: N" format and is right about a fifth of the time at temperature 1.
ARITH_RECIPE_FIELDS = dict(operand_max=9, eval_problems=20, hidden_size=32, layers=2, heads=2, kv_heads=1,
                           intermediate_size=64, max_positions=32, warmup_steps=300, warmup_batch=32,
                           lr_warmup_steps=10)


def arith_recipe():
    from dapo.model.builtin import ArithRecipe

    return replace(ArithRecipe(), **ARITH_RECIPE_FIELDS)


def make_model(folder: Path) -> Path:
    from dapo.model.builtin import build_arith_tiny

    return build_arith_tiny(folder / "arith", arith_recipe())


def write_data(path: Path) -> Path:
    """The recipe's training sums (80) as a jsonl with data_source "arith" (scored by math_dapo)."""
    from dapo.model.builtin import split_problems, write_arith_jsonl

    train, _ = split_problems(arith_recipe())
    write_arith_jsonl(path, train)
    return path


def arith_sections(model_dir: Path, train_file: Path) -> dict:
    """The run-file sections naming the arithmetic model and its training sums: with tests/_run_files.py's
    ``faults`` preset (4 groups of 4 responses per step, generation batches of 8 prompts, dynamic
    sampling on: about a third of the groups are all-wrong and dropped, the rest fill the batch and
    the surplus is saved and dropped at the next step; two optimizer steps per training step; a
    checkpoint every step), ``run_doc(preset="faults", **arith_sections(model_dir, train_file))``."""
    return {"model": {"path": str(model_dir)}, "data": {"train": str(train_file)}}


def role_env(extra: dict | None = None) -> dict:
    return shared_role_env(extra, weight_sync_timeout_s=30, learner_timeout_s=60)


class Launch:
    """`dapo run FILE --launcher processes` in the background, its output in ``log_path``."""

    def __init__(self, run_file: Path, out: Path, env: dict, *args: str, name: str = "attempt"):
        self.out = out
        self.log_path = out.parent / f"{out.name}-{name}.log"
        self.log_file = self.log_path.open("w")
        command = [sys.executable, "-m", "dapo.cli", "run", str(run_file), "--output-dir", str(out),
                   "--launcher", "processes", *args]
        self.proc = subprocess.Popen(command, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """Role name -> pid, from the launcher's "started ROLE (pid N)" lines."""
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"started (\w+-\d+) \(pid (\d+)\)", self.text())}

    def pid(self, role: str, timeout: float = 60) -> int:
        return wait_for(lambda: self.pids().get(role), timeout, f"the launcher to start {role}")

    def kill(self, role: str, sig: int = signal.SIGKILL) -> float:
        """Signal one role's main process (not its group: as the OOM killer would); its time."""
        os.kill(self.pid(role), sig)
        return time.monotonic()

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.log_file.close()

    def wait_for_step(self, step: int, timeout: float = 180) -> float:
        """Until metrics.jsonl holds a training line for ``step``; the time it appeared."""
        wait_for(lambda: step in steps_done(self.out) or self.proc.poll() is not None, timeout,
                 f"step {step} in {self.out / 'metrics.jsonl'}")
        if step not in steps_done(self.out):
            raise AssertionError(f"the run exited with {self.proc.returncode} before step {step}:\n"
                                 + self.text()[-3000:])
        return time.monotonic()


def wait_for(check, timeout: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll_s)


def step_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # being written
            continue
        if "actor/pg_loss" in record:
            out.append(record)
    return out


def steps_done(run_dir: Path) -> set[int]:
    return {int(r["step"]) for r in step_lines(run_dir)}


def local_manifest(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists()


# --------------------------------------------------------------------------- training state


def final_state(checkpoint_uri: str, scratch: Path, *, endpoint_url: str | None = None) -> dict:
    """The latest committed checkpoint under ``checkpoint_uri``, loaded: model tensors, optimizer
    + scheduler state (learner.pt), trainer state (step, weight version, sampler, surplus groups,
    Python RNG; the groups' token arrays from trainer_tensors.safetensors) and torch RNG (rng.pt).
    Fetched with sha256 verification."""
    import torch

    from safetensors.torch import load_file

    from dapo.storage.checkpointer import (LEARNER_FILE, MODEL_DIR, RNG_FILE, TRAINER_FILE, TRAINER_TENSORS_FILE,
                                           read_model_state)
    from dapo.storage import CheckpointStore

    store = CheckpointStore(checkpoint_uri, endpoint_url=endpoint_url)
    info = store.latest()
    assert info is not None, f"no committed checkpoint under {checkpoint_uri}"
    folder = store.fetch(info, scratch / f"final-{info.step}")
    return {"checkpoint step": info.step,
            "model": read_model_state(folder / MODEL_DIR),
            "optimizer and scheduler": torch.load(folder / LEARNER_FILE, weights_only=False),
            "trainer": json.loads((folder / TRAINER_FILE).read_text()),
            "trainer tensors (surplus / in-flight tokens)": load_file(str(folder / TRAINER_TENSORS_FILE)),
            "torch rng": torch.load(folder / RNG_FILE, weights_only=False)}


def differences(want, got, where: str = "") -> list[str]:
    """Paths at which ``got`` differs from ``want`` (tensors bit for bit; floats exactly): the reference
    is an uninterrupted run of the same run file and topology on this machine, so bit-exact by design."""
    import torch

    if isinstance(want, torch.Tensor) or isinstance(got, torch.Tensor):
        same = (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.dtype == got.dtype
                and want.shape == got.shape and torch.equal(want, got))
        return [] if same else [where or "tensor"]
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}/{k}: only in one" for k in sorted(set(map(str, want)) ^ set(map(str, got)))]
        for key in want:
            if key in got:
                out += differences(want[key], got[key], f"{where}/{key}")
        return out
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        if len(want) != len(got):
            return [f"{where}: length {len(got)} != {len(want)}"]
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if want == got else [where or "value"]


def step_digests(run_dir: Path) -> list[tuple[int, str]]:
    """(step, prompt uid digest) per training line of metrics.jsonl, in file order."""
    return [(int(r["step"]), r["train/prompt_uids_digest"]) for r in step_lines(run_dir)]


class Reference:
    """An uninterrupted processes-launcher run of a run file: its final state and step digests."""

    def __init__(self, state: dict, digests: list[tuple[int, str]], lines: list[dict], initial_model: dict):
        self.state = state
        self.digests = digests
        self.lines = lines
        self.initial_model = initial_model

    def check_really_trains(self) -> None:
        """The comparison is only meaningful when the state depends on the history: the weights
        moved, groups were dropped by dynamic sampling and surplus groups were left over (saved in
        the checkpoints, dropped at the next step: maxStaleness 0 trains on-policy only)."""
        model = self.state["model"]
        if all("lora_" in name for name in model):  # a LoRA run's checkpoint: adapters, B starting at 0
            moved = [name for name, tensor in model.items() if "lora_B" in name and bool(tensor.any())]
        else:
            moved = differences(self.initial_model, model)
        assert moved, "the reference run's weights equal the initial weights: the model did not train"
        assert sum(r["train/groups_all_wrong"] + r["train/groups_all_correct"] for r in self.lines) > 0, \
            "dynamic sampling dropped no group in the reference run"
        assert sum(r["train/surplus_groups"] for r in self.lines) > 0, "no surplus group was ever left over"
        assert len({d for _, d in self.digests}) == len(self.digests), "every step must train other prompts"


def compare_with_reference(reference: Reference, out: Path, checkpoint_uri: str, *,
                           endpoint_url: str | None = None) -> list[str]:
    """Everything in which the run in ``out`` differs from ``reference`` (empty: equal)."""
    problems = []
    got = step_digests(out)
    if got != reference.digests:
        problems.append(f"metrics.jsonl steps/prompts {got} != uninterrupted {reference.digests}")
    problems += differences(reference.state, final_state(checkpoint_uri, out.parent, endpoint_url=endpoint_url))
    return problems


def run_reference(run_file: Path, out: Path, env: dict, model_dir: Path, *, checkpoint_uri: str | None = None,
                  endpoint_url: str | None = None) -> Reference:
    from dapo.storage.checkpointer import read_model_state

    run = Launch(run_file, out, env, name="reference")
    code = run.wait(300)
    assert code == 0, run.text()[-4000:]
    assert "resumed" not in run.text()
    reference = Reference(final_state(checkpoint_uri or str(out / "checkpoints"), out.parent, endpoint_url=endpoint_url),
                          step_digests(out), step_lines(out), read_model_state(model_dir))
    reference.check_really_trains()
    return reference
