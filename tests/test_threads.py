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
def test_the_budget_follows_the_neighbours_after_two_looks_that_agree(monkeypatch):
    """/proc/stat and the clocks scripted: a neighbour keeping 1.0 of 2 CPUs busy lowers the budget
    to 1 on the second look that sees it (not the first); 0.4 of a core is noise; when the
    neighbour leaves, two quiet looks give the CPU back."""
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(threads, "LOOK_INTERVAL_S", 0.0)
    clock = {"wall": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(threads, "_busy_seconds", lambda cpus: clock["busy"])
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(threads.time, "process_time", lambda: clock["own"])
    budget = ThreadBudget(cpus={0, 1}, enabled=True, environ={})

    def look(others: float, own: float = 1.8) -> int:  # one second: this run and the others' CPU-seconds
        clock["wall"] += 1.0
        clock["own"] += own
        clock["busy"] += own + others
        return budget.look()

    assert look(0.0) == 2  # the first look has nothing to compare with
    assert [look(0.0), look(0.4), look(1.0), look(1.0), look(1.0), look(0.0), look(0.0)] == [2, 2, 2, 1, 1, 1, 2]


@pytest.mark.processes  # a busy neighbour process
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 CPUs: with one, a neighbour cannot leave this process a CPU to move to")
def test_a_real_busy_neighbour_takes_a_thread(monkeypatch):
    """A process that keeps one CPU busy (read from the real /proc/stat) lowers the budget by one
    within two looks, and apply() gives the calling thread that many torch threads. (Giving it back
    is the scripted test's: on a shared machine something else may keep a CPU busy.)"""
    import torch

    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(threads, "LOOK_INTERVAL_S", 0.0)
    cpus = set(os.sched_getaffinity(0))
    budget = ThreadBudget(cpus=cpus, enabled=True, environ={})
    budget.look()
    before = torch.get_num_threads()
    neighbour = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        for _ in range(2):
            time.sleep(1.0)
            budget.look()
        assert budget.budget <= len(cpus) - 1
        assert budget.apply() == budget.budget and torch.get_num_threads() == budget.budget
    finally:
        neighbour.kill()
        neighbour.wait()
        torch.set_num_threads(before)
