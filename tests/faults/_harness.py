"""Real processes for the fault-injection suite: a tiny model, run files, the processes launcher
started in the background with its role pids, and the data accounting against an
uninterrupted run.

"Nothing lost" is checked per training step: the digest of the prompt uids trained in that step
(``train/prompt_uids_digest`` in metrics.jsonl) and the sampler state after it (each
checkpoint's trainer_state.json, one checkpoint per step) must equal an uninterrupted run's,
every step exactly once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from _dapo_runs import REPO, make_model, write_data  # noqa: F401 - re-exported for the scenarios
from _dapo_runs import role_env as shared_role_env
from _dapo_runs import run_doc as shared_run_doc

STEPS = 4
PROMPTS = 16  # gen batch 4 x 4 steps: one epoch, every step a new set of prompts


def run_doc(model_dir: Path, train: str, *, learners: int = 1, rollouts: int = 1, rewards: int = 1,
            checkpoint_uri: str | None = None, steps: int = STEPS) -> dict:
    """The shared tiny run file with a checkpoint every step (the data accounting needs each one)."""
    checkpoint = {"everySteps": 1, "keep": steps}
    if checkpoint_uri:
        checkpoint["uri"] = checkpoint_uri
    return shared_run_doc(model_dir, train, name="faults", steps=steps, checkpoint=checkpoint, learners=learners,
                          rollouts=rollouts, rewards=rewards)


def write_run_file(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


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

    def kill(self, role: str) -> float:
        """SIGKILL one role's main process (not its group: as the OOM killer would); its time."""
        os.kill(self.pid(role), signal.SIGKILL)
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


# --------------------------------------------------------------------------- data accounting


def step_record(digest: str, trainer_state: dict) -> dict:
    return {"uids": digest, "sampler": trainer_state["sampler"], "weight_version": trainer_state["weight_version"]}


def run_records(run_dir: Path, read_state) -> list[dict]:
    """Per step of a finished run: uid digest (metrics.jsonl) + sampler state (checkpoints).
    ``read_state(step)`` returns that step's trainer_state.json as a dict."""
    return [{"step": int(line["step"]), **step_record(line["train/prompt_uids_digest"], read_state(int(line["step"])))}
            for line in step_lines(run_dir)]


def local_state_reader(checkpoint_root: Path):
    return lambda step: json.loads((checkpoint_root / f"step-{step:08d}" / "trainer_state.json").read_text())


def s3_state_reader(client, bucket: str, prefix: str):
    def read(step: int) -> dict:
        key = f"{prefix}/step-{step:08d}/trainer_state.json"
        return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    return read


def data_lost(reference: list[dict], got: list[dict]) -> int:
    """Steps of the uninterrupted ``reference`` that ``got`` lacks, repeats or trained on other
    prompts / from another data position, plus steps ``got`` has beyond the reference."""
    by_step: dict[int, list[dict]] = {}
    for record in got:
        by_step.setdefault(record["step"], []).append(record)
    lost = 0
    for want in reference:
        have = by_step.pop(want["step"], [])
        if len(have) != 1 or {k: v for k, v in have[0].items()} != want:
            lost += 1
    return lost + sum(len(v) for v in by_step.values())


def reference_records(run_file: Path, out: Path) -> list[dict]:
    """An uninterrupted in-process run of ``run_file`` (its own checkpoint folder): per step the
    uid digest and sampler state. With dynamic sampling off they depend on the data and seeds
    only, not on how many processes computed the step."""
    from types import SimpleNamespace

    from dapo.entry.inprocess import build_embedded_run
    from dapo.spec import load_run_file

    class WrongScorer:  # the tiny model cannot do arithmetic: every answer is wrong anyway
        def score_batch(self, responses, ground_truths, data_sources=None, response_lengths=None, truncated=None):
            return [SimpleNamespace(score=-1.0, acc=False) for _ in responses]

    run = load_run_file(run_file, ["spec.checkpoint.uri=" + str(out / "checkpoints"), "spec.learner.replicas=1",
                                   "spec.rollout.replicas=1"])
    embedded = build_embedded_run(run, out, resume=False, scorer=WrongScorer())
    try:
        embedded.trainer.train()
    finally:
        embedded.close()
    return run_records(out, local_state_reader(out / "checkpoints"))
