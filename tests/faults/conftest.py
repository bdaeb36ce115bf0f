"""Fixtures of the fault-injection suite; the measured table is written at the end of the session."""

from __future__ import annotations

import sys
import time
from pathlib import Path

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

from operator_testkit import fake_learner  # noqa: E402,F401  (pytest fixture of the operator scenarios)
