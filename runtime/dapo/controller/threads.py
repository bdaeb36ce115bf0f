"""How many CPU threads torch uses: the CPUs this run may have, so a busy neighbour costs its share.

torch runs its CPU kernels on an OpenMP team of one thread per CPU, in lock-step: every parallel
region ends at a barrier that waits for the slowest thread. When another process takes one of
the cores, one thread of the team loses whole time slices while the others wait at the barrier,
and a step slows by far more than the core it lost. Waiting passively (OMP_WAIT_POLICY=PASSIVE)
removes the spinning but makes every small parallel region pay a wake-up, which slows the quiet
case. Sizing the team to the CPUs left free removes the stall and keeps the quiet speed: the step
then costs what one fewer core costs (measured with `benchmarks/contention.py`: docs/benchmarks.md,
"A busy neighbour").

`ThreadBudget.apply()`, called by each thread that runs torch work at the start of a unit of it
(a training step, a rollout collection, a /generate request), sets that thread's torch threads:

- ``DAPO_THREAD_BUDGET=off``: nothing is changed, torch keeps its own count;
- ``DAPO_TORCH_THREADS`` when set: that number, always (a person decided);
- a CPU quota (a pod's CPU limit, cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``): at most the
  quota, rounded up; neighbours on the node are the quota's business, so no more than that;
- otherwise (a laptop, a VM): the CPUs of this process's affinity mask minus those other
  processes kept busy (per-CPU busy time from /proc/stat, this process's own CPU time
  subtracted), looked at every half second or so; a neighbour counts from half a core on, and the
  budget moves only when two looks in a row agree (a burst of a helper process moves nothing);
  at least 1.

Reproducibility: a run's float arithmetic depends on its thread count (torch's reductions split
by threads), so a run whose budget changed is not bit-identical to one whose budget did not. On a
quiet machine the budget never moves; the log says when it does, and each step's metrics carry
``perf/torch_threads``. Set ``DAPO_THREAD_BUDGET=off`` (or a count in ``DAPO_TORCH_THREADS``)
where bit-identical reruns on a shared machine matter more than speed (the test suite does).

torch reads a thread's team size when that thread first runs a parallel op and keeps it, so the
budget is applied per thread, by the thread itself. On a CUDA machine the budget does nothing
(the kernels run on the GPU).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path

from dapo.contracts import Env, EnvVar

log = logging.getLogger("dapo.controller.threads")

# a neighbour's use of the CPUs below this many cores is background noise (daemons, our own
# short-lived helpers), not a competitor
NEIGHBOUR_THRESHOLD_CORES = 0.5
# at most this often the CPUs are looked at again (each look reads /proc/stat)
LOOK_INTERVAL_S = 0.5


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs this process's cgroup may use (quota / period), None without a quota."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _busy_seconds(cpus: set[int]) -> float | None:
    """Seconds the CPUs in ``cpus`` were busy since boot (/proc/stat), None where unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]
        busy += sum(values) - values[3] - values[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


class ThreadBudget:
    """The torch thread count for this process's compute threads (module docstring). One per
    process; thread-safe."""

    def __init__(self, cpus: set[int] | None = None, enabled: bool | None = None, environ=None):
        if cpus is None:
            cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self.cpus = cpus
        self.fixed = Env(environ).int(EnvVar.TORCH_THREADS, 0) or None
        quota = cgroup_cpu_quota()
        self.ceiling = max(1, min(len(cpus), math.ceil(quota))) if quota else len(cpus)
        self.adaptive = self.fixed is None and quota is None
        if enabled is None:
            import torch

            enabled = not torch.cuda.is_available() and Env(environ).str(EnvVar.THREAD_BUDGET).lower() != "off"
        self.enabled = enabled
        self._lock = threading.Lock()
        self._last: tuple[float, float, float] | None = None  # (wall, busy, own cpu) at the last look
        self.budget = self.fixed or self.ceiling
        self._wanted = self.budget  # what the last look asked for

    def look(self) -> int:
        """Update the budget from what the CPUs did since the last look (at most every
        LOOK_INTERVAL_S); returns it."""
        if not self.adaptive:
            return self.budget
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < LOOK_INTERVAL_S:
                return self.budget
            busy, own = _busy_seconds(self.cpus), time.process_time()
            if busy is None:
                self.adaptive = False
                return self.budget
            if self._last is not None:
                wall, busy0, own0 = self._last
                others = max(0.0, (busy - busy0) - (own - own0)) / max(now - wall, 1e-6)
                neighbours = math.floor(others + 1 - NEIGHBOUR_THRESHOLD_CORES)
                wanted = max(1, self.ceiling - neighbours)
                if wanted != self.budget and wanted == self._wanted:  # two looks in a row agree
                    log.info("torch threads %d -> %d: other processes keep %.1f of this run's %d CPUs busy",
                             self.budget, wanted, others, len(self.cpus))
                    self.budget = wanted
                self._wanted = wanted
            self._last = (now, busy, own)
            return self.budget

    def apply(self) -> int:
        """Set the calling thread's torch threads to the budget (looking first); returns it."""
        if not self.enabled:
            return 0
        import torch

        budget = self.look()
        if torch.get_num_threads() != budget:
            torch.set_num_threads(budget)
        return budget


_process_budget: ThreadBudget | None = None
_process_lock = threading.Lock()


def thread_budget() -> ThreadBudget:
    """This process's budget (made on first use)."""
    global _process_budget
    with _process_lock:
        if _process_budget is None:
            _process_budget = ThreadBudget()
        return _process_budget
