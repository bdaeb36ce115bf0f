"""Fixtures of the fault-injection suite; the measured table is written at the end of the session."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parents[1]
for folder in (_TESTS, _TESTS / "faults", _TESTS / "operator"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import report  # noqa: E402

_STARTED = time.monotonic()


def pytest_sessionfinish(session, exitstatus):
    if report.RESULTS:
        json_path, md_path = report.write_report(report.RESULTS, time.monotonic() - _STARTED)
        sys.stderr.write(f"\nfault-injection report: {md_path} ({json_path})\n")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The small arithmetic model (built once per session, a few seconds)."""
    from _harness import make_model

    return make_model(tmp_path_factory.mktemp("arith-model"))


@pytest.fixture(scope="session")
def train_file(tmp_path_factory):
    from _harness import write_data

    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="session")
def reference_for(tmp_path_factory, model_dir, train_file):
    """``reference_for(learners=, rollouts=, steps=)``: the uninterrupted processes-launcher run of
    that run file (local checkpoints), run once per topology and session."""
    from _harness import STEPS, arith_sections, role_env, run_reference
    from _run_files import run_doc, write_run_file

    cache = {}

    def get(*, learners: int = 1, rollouts: int = 1, steps: int = STEPS, lora: dict | None = None):
        key = (learners, rollouts, steps, tuple(sorted((lora or {}).items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"reference-{learners}l{rollouts}r{steps}s{'-lora' if lora else ''}")
            sections = arith_sections(model_dir, train_file)
            if lora is not None:
                sections["model"]["lora"] = lora
            doc = run_doc(preset="faults", **sections,
                          learner={"replicas": learners, "totalSteps": steps}, rollout={"replicas": rollouts},
                          checkpoint={"keep": steps})
            cache[key] = run_reference(write_run_file(folder / "run.yaml", doc), folder / "out", role_env(), model_dir)
        return cache[key]

    return get


from operator_testkit import fake_learner  # noqa: E402,F401  (pytest fixture of the operator scenarios)
