"""dapo.controller.threads: torch's thread budget follows the CPUs this process may use."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dapo.controller import threads
from dapo.controller.threads import ThreadBudget, cgroup_cpu_quota


def test_a_fixed_count_and_a_cgroup_quota_win_over_the_cpus(tmp_path, monkeypatch):
    """DAPO_TORCH_THREADS is kept as given; a CPU quota (cgroup v2 cpu.max, rounded up) caps the
    budget and turns off watching the neighbours; without either the budget is the CPU count."""
    assert ThreadBudget(cpus={0, 1, 2, 3}, enabled=True, environ={"DAPO_TORCH_THREADS": "3"}).look() == 3
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 1.5)
    capped = ThreadBudget(cpus={0, 1, 2, 3}, enabled=True, environ={})
    assert (capped.look(), capped.adaptive) == (2, False)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    assert ThreadBudget(cpus={0, 1, 2, 3}, enabled=True, environ={}).look() == 4


@pytest.mark.processes
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 CPUs: with one, a neighbour cannot leave this process a CPU to move to")
def test_a_busy_neighbour_takes_one_thread_and_gives_it_back(monkeypatch):
    """A process that keeps one CPU busy lowers the budget by one after two looks that agree;
    after it ends, two quiet looks restore it; apply() sets the calling thread's torch threads."""
    import torch

    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(threads, "LOOK_INTERVAL_S", 0.0)
    cpus = set(os.sched_getaffinity(0))
    budget = ThreadBudget(cpus=cpus, enabled=True, environ={})
    budget.look()
    neighbour = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        time.sleep(1.0)
        assert budget.look() == len(cpus), "one look is not enough to move the budget"
        time.sleep(1.0)
        assert budget.look() == len(cpus) - 1
        before = torch.get_num_threads()
        assert budget.apply() == len(cpus) - 1 and torch.get_num_threads() == len(cpus) - 1
    finally:
        neighbour.kill()
        neighbour.wait()
    try:
        time.sleep(1.0)
        budget.look()
        time.sleep(1.0)
        assert budget.look() == len(cpus)
    finally:
        torch.set_num_threads(before)
