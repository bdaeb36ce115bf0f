"""Batch reward scoring with a hard time bound per response, in killable worker processes.

Why processes: the scorers are regex and SymPy code. A catastrophic regex or a power tower
like ``9^{9^{9^9}}`` spins inside one C call that holds the GIL, so neither threads nor
``signal.alarm`` can stop it. Each response is scored in a worker process; when it overruns
``timeout_s`` the worker is SIGKILLed and replaced, and the response is failed (``acc``
False, correctness -1, ``timed_out`` True). A worker that dies (``os._exit``, segfault,
MemoryError escape) fails its response the same way and is replaced. Workers come from the
``forkserver`` context (a fork of a clean, torch-free server process, not of the caller,
which may hold torch / OpenMP threads that ``fork`` would corrupt) or ``spawn``.

Shaping (DAPO soft overlong punishment, ``dapo.algo.overlong_penalty``):

    score = correctness + overlong_penalty(length)      (correctness +1 / -1)
    acc   = correctness > 0                             (unshaped; dynamic sampling uses it)
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import pickle
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from dapo.reward.registry import get_scorer, scorer_for_data_source
from dapo.reward.result import INVALID_PRED, RewardResult
from dapo.reward.worker import worker_main

__all__ = ["RewardScorer"]

_WORKER_MODULE = "dapo.reward.worker"


@dataclass(eq=False)
class _Worker:
    """A worker process, its pipe, and the task it is running (``None`` when idle)."""

    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0
    started_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Verdict:
    """What a worker (or the pool on its behalf) said about one response."""

    correct: bool
    pred: str
    timed_out: bool = False
    error: str | None = None


class RewardScorer:
    """Score batches of responses within a time bound per response; see the module docstring.

    ``timeout_s``: wall-clock bound of one scorer call (DAPORun ``spec.reward.timeoutSeconds``).
    ``workers``: worker processes scoring in parallel.
    ``default_scorer``: scorer for data_source values no rule matches (``spec.reward.scorer``).
    ``max_response_length`` / ``overlong_buffer_length`` / ``overlong_penalty_factor`` /
    ``overlong_enabled``: DAPO soft overlong punishment, in tokens.
    ``max_input_chars``: a response longer than this keeps only its tail (the final answer
    is at the end; math_dapo reads only the last 300 characters). ``None``: no cap.
    ``max_ground_truth_chars``: a longer ground truth is failed without scoring (no real
    answer is that long; normalising one costs quadratic regex time).
    ``memory_limit_mb``: address-space cap of each worker (``None``: none).
    ``start_method``: ``"forkserver"`` or ``"spawn"`` (``fork`` is refused: see above).
    ``startup_timeout_s``: how long to wait for a worker to come up before raising.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        workers: int = 2,
        default_scorer: str = "math_dapo",
        max_response_length: int | None = None,
        overlong_buffer_length: int | None = None,
        overlong_penalty_factor: float = 1.0,
        overlong_enabled: bool = True,
        *,
        max_input_chars: int | None = 16384,
        max_ground_truth_chars: int = 4096,
        memory_limit_mb: int | None = 2048,
        start_method: str = "forkserver",
        startup_timeout_s: float = 60.0,
        warm_modules: Sequence[str] = ("math_verify",),
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0 seconds, got {timeout_s!r}")
        if int(workers) < 1:
            raise ValueError(f"reward workers must be >= 1, got {workers!r}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start_method must be 'forkserver' or 'spawn', got {start_method!r} "
                "('fork' would copy the caller's torch threads into the workers)"
            )
        get_scorer(default_scorer)  # unknown name -> error listing the known ones
        if overlong_enabled:
            if max_response_length is None or overlong_buffer_length is None:
                raise ValueError(
                    "overlong shaping is enabled: give max_response_length and overlong_buffer_length "
                    "(spec.rollout.maxResponseLength, spec.algorithm.overlong.bufferLength), "
                    "or pass overlong_enabled=False"
                )
            if not 0 < overlong_buffer_length <= max_response_length:
                raise ValueError(
                    f"overlong_buffer_length must be in (0, max_response_length={max_response_length}], "
                    f"got {overlong_buffer_length!r}"
                )
        self.timeout_s = float(timeout_s)
        self.num_workers = int(workers)
        self.default_scorer = default_scorer
        self.max_response_length = max_response_length
        self.overlong_buffer_length = overlong_buffer_length
        self.overlong_penalty_factor = float(overlong_penalty_factor)
        self.overlong_enabled = bool(overlong_enabled)
        self.max_input_chars = max_input_chars
        self.max_ground_truth_chars = int(max_ground_truth_chars)
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = float(startup_timeout_s)
        self._warm_modules = tuple(warm_modules)
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # The server imports these once; every worker is then a cheap fork of it.
            self._ctx.set_forkserver_preload([_WORKER_MODULE, *self._warm_modules])
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._startup_failures = 0
        self.stats = {"scored": 0, "timed_out": 0, "crashed": 0, "errors": 0, "workers_started": 0}

    # ---- lifecycle -----------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec) -> "RewardScorer":
        """The scorer a run file asks for (spec.reward, the overlong shaping of spec.algorithm):
        the one construction every launch mode uses (dapo.wiring)."""
        ol = spec.algorithm.overlong
        return cls(timeout_s=spec.reward.timeout_seconds, workers=spec.reward.workers,
                   default_scorer=spec.reward.scorer, max_response_length=spec.rollout.max_response_length,
                   overlong_buffer_length=ol.buffer_length, overlong_penalty_factor=ol.penalty_factor,
                   overlong_enabled=ol.enabled)

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        # a scorer nobody closed: stop its workers; at interpreter exit modules may already be
        # torn down, and an exception from __del__ would only be printed as noise
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

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
        process = self._ctx.Process(
            target=worker_main,
            args=(child_end, self._warm_modules, self.memory_limit_mb),
            name="dapo-reward-worker",
            daemon=True,
        )
        process.start()
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

    def _fill_pool(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._start_worker())

    # ---- scoring -------------------------------------------------------------------------

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        data_sources: Sequence[str | None] | None = None,
        response_lengths: Sequence[int] | None = None,
        truncated: Sequence[bool] | None = None,
    ) -> list[RewardResult]:
        """Score ``responses`` against ``ground_truths``; results in input order.

        ``data_sources`` picks each row's scorer (:func:`scorer_for_data_source`, default
        ``default_scorer``); ``response_lengths`` (tokens) drive overlong shaping and are
        required when it is enabled; ``truncated`` (hit the length limit) is passed through
        for overlong filtering downstream.
        """
        count = len(responses)
        data_sources = [None] * count if data_sources is None else list(data_sources)
        truncated = [False] * count if truncated is None else [bool(t) for t in truncated]
        for name, values in (("ground_truths", ground_truths), ("data_sources", data_sources), ("truncated", truncated)):
            if len(values) != count:
                raise ValueError(f"score_batch: {name} has {len(values)} items, responses has {count}")
        penalties = self._overlong_penalties(response_lengths, count)
        scorer_names = [scorer_for_data_source(ds, self.default_scorer)[0] for ds in data_sources]
        verdicts = self._run(responses, ground_truths, scorer_names)
        results = []
        for i, verdict in enumerate(verdicts):
            correctness = 1.0 if verdict.correct else -1.0
            results.append(
                RewardResult(
                    score=correctness + penalties[i],
                    acc=verdict.correct,
                    pred=verdict.pred,
                    truncated=truncated[i],
                    correctness=correctness,
                    overlong_penalty=penalties[i],
                    timed_out=verdict.timed_out,
                    scorer=scorer_names[i],
                    error=verdict.error,
                )
            )
        return results

    def _overlong_penalties(self, response_lengths: Sequence[int] | None, count: int) -> list[float]:
        """Per-response soft overlong punishment (zeros when shaping is off)."""
        if not self.overlong_enabled:
            return [0.0] * count
        if response_lengths is None or len(response_lengths) != count:
            raise ValueError(
                f"score_batch: overlong shaping needs response_lengths (tokens) for all {count} responses, "
                f"got {None if response_lengths is None else len(response_lengths)}"
            )
        import torch  # deferred: workers import this module's package and must stay torch-free

        from dapo.algo import overlong_penalty

        lengths = torch.as_tensor(list(response_lengths), dtype=torch.float64)
        penalty = overlong_penalty(
            lengths, self.max_response_length, self.overlong_buffer_length, self.overlong_penalty_factor
        )
        return [float(p) for p in penalty.tolist()]

    def _cap_input(self, response: str) -> str:
        """The tail of an oversize response (the final answer lives at the end)."""
        if self.max_input_chars is not None and len(response) > self.max_input_chars:
            return response[-self.max_input_chars :]
        return response

    def _run(self, responses: Sequence[str], ground_truths: Sequence[str], scorer_names: list[str]) -> list[_Verdict]:
        """Dispatch every response to the workers; collect verdicts in input order."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardScorer is closed; create a new one")
            verdicts: list[_Verdict | None] = [None] * len(responses)
            pickles = {name: self._scorer_pickle(name) for name in set(scorer_names)}
            pending: deque[int] = deque()
            for i, ground_truth in enumerate(ground_truths):
                if not isinstance(responses[i], str) or not isinstance(ground_truth, str):
                    verdicts[i] = _Verdict(False, INVALID_PRED, error="response and ground truth must be strings")
                elif len(ground_truth) > self.max_ground_truth_chars:
                    verdicts[i] = _Verdict(
                        False, INVALID_PRED,
                        error=f"ground truth has {len(ground_truth)} characters (> max_ground_truth_chars="
                        f"{self.max_ground_truth_chars}); not scored",
                    )
                else:
                    pending.append(i)
            self._fill_pool()
            for worker in list(self._workers):
                if worker.task is not None:  # left busy by an interrupted call: its answer is stale
                    self._discard(worker)
            while pending or any(w.task is not None for w in self._workers):
                self._dispatch(pending, responses, ground_truths, scorer_names, pickles)
                self._collect(verdicts)
            for verdict in verdicts:
                if verdict.timed_out:
                    self.stats["timed_out"] += 1
                elif verdict.error:
                    self.stats["errors"] += 1
            self.stats["scored"] += len(verdicts)
            return verdicts  # type: ignore[return-value]

    def _scorer_pickle(self, name: str) -> bytes:
        fn = get_scorer(name)
        try:
            return pickle.dumps(fn)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise TypeError(
                f"reward scorer {name!r} ({fn!r}) cannot be sent to worker processes: define it as a "
                f"module-level function of an importable module ({exc})"
            ) from exc

    def _dispatch(self, pending, responses, ground_truths, scorer_names, pickles) -> None:
        for worker in self._workers:
            if worker.task is None and worker.ready and not worker.process.is_alive():
                self._discard(worker)  # died while idle (e.g. killed from outside)
                continue
            if not pending:
                return
            if worker.ready and worker.task is None:
                i = pending.popleft()
                try:
                    worker.conn.send((i, pickles[scorer_names[i]], self._cap_input(responses[i]), ground_truths[i]))
                except (OSError, ValueError):
                    pending.appendleft(i)  # the worker died while idle: replace it, retry the task
                    self._discard(worker)
                    continue
                worker.task = i
                worker.deadline = time.monotonic() + self.timeout_s

    def _collect(self, verdicts: list[_Verdict | None]) -> None:
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
                verdicts[worker.task] = _Verdict(
                    False, INVALID_PRED, timed_out=True,
                    error=f"scorer exceeded the {self.timeout_s:g} s time bound; worker killed",
                )
                self._discard(worker)

    def _on_event(self, worker: _Worker, verdicts: list[_Verdict | None]) -> None:
        """A worker's pipe is readable or its process ended: read its message or bury it."""
        try:
            message = worker.conn.recv() if worker.conn.poll() else None
        except (EOFError, OSError):
            message = None
        if message is None:  # end of pipe or process gone: the worker is dead
            self._bury(worker, verdicts)
            return
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            self._startup_failures = 0
        elif message[1] == worker.task:  # one task in flight per worker; anything else is stale
            if kind == "ok":
                verdicts[worker.task] = _Verdict(bool(message[3]), message[4])
            else:
                verdicts[worker.task] = _Verdict(False, INVALID_PRED, error=f"scorer raised {message[2]}")
            worker.task = None
        if not worker.process.is_alive():  # answered, then exited: replace before reuse
            self._bury(worker, verdicts)

    def _bury(self, worker: _Worker, verdicts: list[_Verdict | None]) -> None:
        """A dead worker: fail its task (if any) and start a replacement."""
        worker.process.join(1.0)
        if worker.task is not None:
            verdicts[worker.task] = _Verdict(
                False, INVALID_PRED,
                error=f"reward worker died (exit code {worker.process.exitcode}) while scoring; replaced",
            )
            self.stats["crashed"] += 1
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
