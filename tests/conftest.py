"""Shared test set-up.

The thread budget (dapo.controller.threads) is off for the whole suite (DAPO_THREAD_BUDGET=off):
a run's float arithmetic depends on its thread count, and the tests compare runs bit for bit
(resume equal to an uninterrupted run), so torch's thread count must not follow whatever else the
machine is doing while they run; each test module sets its own. tests/test_threads.py tests the
budget itself with its own settings.
"""

from __future__ import annotations

import os

os.environ.setdefault("DAPO_THREAD_BUDGET", "off")
