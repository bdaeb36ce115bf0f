"""Killable scorer processes with a hard time bound per response: the worker pool of the reward side.

Why processes: the scorers are regex and SymPy code. A catastrophic regex or a power tower like
``9^{9^{9^9}}`` spins inside one C call that holds the GIL, so neither threads nor
``signal.alarm`` can stop it. Each response is scored in a worker process; when it overruns
``timeout_s`` the worker is SIGKILLed and replaced, and the response's verdict says so
(``timed_out``). A worker that dies (``os._exit``, segfault, MemoryError escape) fails its
response the same way and is replaced. Workers come from the ``forkserver`` context (a fork of a
clean, torch-free server process, not of the caller, which may hold torch / OpenMP threads that
``fork`` would corrupt) or ``spawn``, with a scrubbed environment (dapo.reward.isolation).

Dispatch: a worker gets up to ``_TASKS_PER_MESSAGE`` responses in one message and answers each as
it finishes, so a batch costs a few pipe round trips instead of one per response (measured:
docs/benchmarks.md, "Micro benchmarks", reward pool dispatch). The time bound stays per
response: each response's clock starts when the previous answer of its worker arrives; when one
overruns or kills its worker, only it fails and the worker's unanswered rest goes back to the
queue for the replacement.

(One state machine over one worker table: start, dispatch, collect, time out, bury, replace.)
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from dapo.reward.isolation import start_scrubbed
from dapo.reward.result import INVALID_PRED
from dapo.reward.worker import worker_main

__all__ = ["Task", "Verdict", "WorkerPool"]

_WORKER_MODULE = "dapo.reward.worker"
_TASKS_PER_MESSAGE = 32


@dataclass(frozen=True)
class Verdict:
    """What a scorer (or the pool on its behalf) said about one response. ``score`` is the
    scorer's score (``None`` when it failed: ``error`` says why)."""

    correct: bool
    pred: str
    timed_out: bool = False
    error: str | None = None
    score: float | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.score is None


@dataclass(frozen=True)
class Task:
    """One response for a worker: how to find its scorer (``("ref", "mod:fn")`` or
    ``("pickle", bytes)``), the response, its ground truth, data source and extra_info."""

    scorer: tuple[str, Any]
    response: str
    ground_truth: Any
    data_source: str | None
    extra_info: Any = None


@dataclass(eq=False)
class _Worker:
    """A worker process, its pipe, and the tasks sent to it and not yet answered, in order (the
    first is running; ``deadline`` is its time bound)."""

    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    ready: bool = False
    tasks: deque = field(default_factory=deque)
    deadline: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def task(self) -> int | None:
        """The task the worker is running (``None`` when idle)."""
        return self.tasks[0] if self.tasks else None


class WorkerPool:
    """``workers`` scorer processes; :meth:`run` scores a batch of tasks, each within ``timeout_s``.

    ``memory_limit_mb``: address-space cap of each worker (``None``: none). ``start_method``:
    ``"forkserver"`` or ``"spawn"`` (``fork`` is refused: see the module docstring).
    ``startup_timeout_s``: how long to wait for a worker to come up before raising.
    ``warm_modules``: imported by the fork server once (every worker is a cheap fork of it).
    ``worker_env``: the workers' whole environment (dapo.reward.isolation.scorer_environment)."""

    def __init__(self, timeout_s: float, workers: int, *, memory_limit_mb: int | None, start_method: str,
                 startup_timeout_s: float, warm_modules: Sequence[str], worker_env: Mapping[str, str]):
        if not timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0 seconds, got {timeout_s!r}")
        if int(workers) < 1:
            raise ValueError(f"reward workers must be >= 1, got {workers!r}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start_method must be 'forkserver' or 'spawn', got {start_method!r} "
                "('fork' would copy the caller's torch threads into the workers)"
            )
        self.timeout_s = float(timeout_s)
        self.num_workers = int(workers)
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = float(startup_timeout_s)
        self.worker_env = dict(worker_env)
        self._warm_modules = tuple(warm_modules)
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # The server imports these once; every worker is then a cheap fork of it.
            self._ctx.set_forkserver_preload([_WORKER_MODULE, *self._warm_modules])
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._startup_failures = 0
        self._pending: deque[int] = deque()
        self.stats = {"scored": 0, "timed_out": 0, "crashed": 0, "errors": 0, "workers_started": 0}

    # ---- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker (politely, then by SIGKILL after a second). Idempotent."""
        self._closed = True
        workers, self._workers = self._workers, []
        for worker in workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 1.0
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(1.0)
            worker.conn.close()

    def _start_worker(self) -> _Worker:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = start_scrubbed(self._ctx, lambda ctx: ctx.Process(
            target=worker_main,
            args=(child_end, self._warm_modules, self.memory_limit_mb),
            name="dapo-reward-worker",
            daemon=True,
        ), self.worker_env)
        child_end.close()
        self.stats["workers_started"] += 1
        return _Worker(process=process, conn=parent_end)

    def _discard(self, worker: _Worker) -> None:
        """Kill ``worker`` (if still running) and replace it with a fresh one."""
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(1.0)
        worker.conn.close()
        index = self._workers.index(worker)
        self._workers[index] = self._start_worker()

    def _requeue(self, worker: _Worker) -> None:
        """Put the tasks a failed worker never started back at the front of the queue."""
        self._pending.extendleft(reversed(worker.tasks))
        worker.tasks.clear()

    def _fill_pool(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._start_worker())

    # ---- scoring -------------------------------------------------------------------------

    def run(self, tasks: Mapping[int, Task]) -> dict[int, Verdict]:
        """A verdict for every task (keys are the caller's indices), each within the time bound."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardScorer is closed; create a new one")
            verdicts: dict[int, Verdict] = {}
            self._pending = deque(tasks)
            if self._pending:  # a batch for the remote service only needs no worker processes
                self._fill_pool()
            for worker in list(self._workers):
                if worker.tasks:  # left busy by an interrupted call: its answers are stale
                    worker.tasks.clear()
                    self._discard(worker)
            while self._pending or any(w.task is not None for w in self._workers):
                self._dispatch(tasks)
                self._collect(verdicts)
            for verdict in verdicts.values():
                if verdict.timed_out:
                    self.stats["timed_out"] += 1
                elif verdict.error:
                    self.stats["errors"] += 1
            return verdicts

    def _dispatch(self, tasks: Mapping[int, Task]) -> None:
        pending = self._pending
        for worker in self._workers:
            if worker.task is None and worker.ready and not worker.process.is_alive():
                self._discard(worker)  # died while idle (e.g. killed from outside)
                continue
            if not pending:
                return
            if worker.ready and worker.task is None:
                # an equal share of the queue per worker, at most _TASKS_PER_MESSAGE at a time
                share = -(-len(pending) // len(self._workers))
                ids = [pending.popleft() for _ in range(max(1, min(_TASKS_PER_MESSAGE, share)))]
                try:
                    worker.conn.send([(i, tasks[i].scorer, tasks[i].response, tasks[i].ground_truth,
                                       tasks[i].data_source, tasks[i].extra_info) for i in ids])
                except (OSError, ValueError):
                    pending.extendleft(reversed(ids))  # the worker died while idle: replace it, retry the tasks
                    self._discard(worker)
                    continue
                worker.tasks.extend(ids)
                worker.deadline = time.monotonic() + self.timeout_s

    def _collect(self, verdicts: dict[int, Verdict]) -> None:
        """Wait for the next event (a result, a worker ready or dead, a deadline) and handle it."""
        now = time.monotonic()
        busy = [w for w in self._workers if w.task is not None]
        starting = [w for w in self._workers if not w.ready]
        if not busy and starting and all(now - w.started_at > self.startup_timeout_s for w in starting):
            self.close()
            raise RuntimeError(
                f"no reward worker came up within {self.startup_timeout_s:.0f} s; check that the "
                f"'dapo' package imports in a fresh Python process (python -c 'import {_WORKER_MODULE}')"
            )
        wake = [w.deadline for w in busy] + [w.started_at + self.startup_timeout_s for w in starting]
        wait_s = max(0.0, min(wake) - now) if wake else 0.0
        watched = {}
        for worker in busy + starting:
            watched[worker.conn] = worker
            watched[worker.process.sentinel] = worker
        fired = multiprocessing.connection.wait(list(watched), timeout=wait_s)
        for worker in {id(watched[obj]): watched[obj] for obj in fired}.values():
            self._on_event(worker, verdicts)
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task is not None and now >= worker.deadline:
                verdicts[worker.tasks.popleft()] = Verdict(
                    False, INVALID_PRED, timed_out=True,
                    error=f"scorer exceeded the {self.timeout_s:g} s time bound; worker killed",
                )
                self._requeue(worker)
                self._discard(worker)

    def _on_event(self, worker: _Worker, verdicts: dict[int, Verdict]) -> None:
        """A worker's pipe is readable or its process ended: read every message it has sent,
        or bury it."""
        received = False
        while True:
            try:
                message = worker.conn.recv() if worker.conn.poll() else None
            except (EOFError, OSError):
                message = None
            if message is None:
                break
            received = True
            kind = message[0]
            if kind == "ready":
                worker.ready = True
                self._startup_failures = 0
            elif message[1] == worker.task:  # answers come in the order sent; anything else is stale
                task = worker.tasks.popleft()
                if kind == "ok":
                    verdicts[task] = Verdict(bool(message[3]), message[4], score=float(message[2]))
                else:
                    verdicts[task] = Verdict(False, INVALID_PRED, error=f"scorer raised {message[2]}")
                worker.deadline = time.monotonic() + self.timeout_s  # the next task's clock starts now
        if not received or not worker.process.is_alive():  # end of pipe or process gone: the worker is dead
            self._bury(worker, verdicts)

    def _bury(self, worker: _Worker, verdicts: dict[int, Verdict]) -> None:
        """A dead worker: fail its task (if any) and start a replacement."""
        worker.process.join(1.0)
        if worker.task is not None:
            verdicts[worker.tasks.popleft()] = Verdict(
                False, INVALID_PRED,
                error=f"reward worker died (exit code {worker.process.exitcode}) while scoring; replaced",
            )
            self.stats["crashed"] += 1
            self._requeue(worker)
        if not worker.ready:
            self._startup_failures += 1
            if self._startup_failures >= 3:
                self.close()
                raise RuntimeError(
                    f"reward workers die while starting (exit code {worker.process.exitcode}, "
                    f"{self._startup_failures} in a row); check that "
                    f"python -c 'import {_WORKER_MODULE}' works in a fresh process"
                )
        self._discard(worker)
