"""Batch reward scoring with a hard time bound per response, in killable worker processes.

(~540 lines: the pool's life cycle, dispatch, timeouts and failure accounting are one state
machine over the same worker table.)

Why processes: the scorers are regex and SymPy code. A catastrophic regex or a power tower
like ``9^{9^{9^9}}`` spins inside one C call that holds the GIL, so neither threads nor
``signal.alarm`` can stop it. Each response is scored in a worker process; when it overruns
``timeout_s`` the worker is SIGKILLed and replaced, and the response is failed (``acc``
False, correctness -1, ``timed_out`` True). A worker that dies (``os._exit``, segfault,
MemoryError escape) fails its response the same way and is replaced. Workers come from the
``forkserver`` context (a fork of a clean, torch-free server process, not of the caller,
which may hold torch / OpenMP threads that ``fork`` would corrupt) or ``spawn``.

Dispatch: a worker gets up to ``_TASKS_PER_MESSAGE`` responses in one message and answers each as
it finishes, so a batch costs a few pipe round trips instead of one per response (measured:
docs/benchmarks.md, "Micro benchmarks", reward pool dispatch).
The time bound stays per response: each response's clock starts when the previous answer of its
worker arrives; when one overruns or kills its worker, only it fails and the worker's unanswered
rest goes back to the queue for the replacement.

Shaping (DAPO soft overlong punishment, ``dapo.algo.overlong_penalty``):

    score = correctness + overlong_penalty(length)      (correctness: the scorer's score,
    acc   = the scorer's acc                             +1 / -1 for the built-in ones)

Routing, per response, on its row's ``data_source`` (case-insensitive globs):

1. the run file's ``spec.reward.scorers`` rules (``dataSource`` glob -> ``function``), first match;
2. the remote reward service (``spec.reward.remote``) when one is set: it takes every other row;
3. the built-in rules (:data:`dapo.reward.registry.DATA_SOURCE_RULES`), then ``spec.reward.scorer``.

A response whose scorer fails (exception, non-finite or wrongly typed result, time bound, worker
crash) scores ``failed_score`` with ``acc`` False and ``error`` set; failures are counted per
(scorer, data_source) in ``stats`` and logged. A run-file or remote scorer that fails every
response of ``stop_after_failed_rows`` data rows in a row raises :class:`ScorerFailedError`
naming it: it is broken, and training on nothing but failure scores would be silent garbage.
Rows, not responses: the n responses of one prompt arrive together (consecutive, with one ground
truth and data source), so one poisoned row (a ground truth that makes the scorer raise) counts
once and can never stop a run, whatever n is.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dapo.errors import DapoError
from dapo.reward.custom import load_function, normalize_ref
from dapo.reward.isolation import scorer_environment, start_scrubbed
from dapo.reward.registry import get_scorer, scorer_for_data_source
from dapo.reward.result import INVALID_PRED, RewardResult
from dapo.reward.worker import worker_main

__all__ = ["RewardScorer", "ScorerFailedError"]

log = logging.getLogger("dapo.reward")

_WORKER_MODULE = "dapo.reward.worker"
_TASKS_PER_MESSAGE = 32


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


class ScorerFailedError(DapoError, RuntimeError):
    """A run-file or remote scorer failed every one of its last responses; names the scorer."""


def _row_outcomes(verdicts, scorer_names, sources, ground_truths) -> list[tuple[str, bool]]:
    """(scorer, every response failed) per data row, in order: a row is a run of consecutive
    responses with the same scorer, data source and ground truth (a prompt's n responses)."""
    rows: list[tuple[str, bool]] = []
    previous = None
    for verdict, name, source, truth in zip(verdicts, scorer_names, sources, ground_truths):
        failed = verdict.error is not None or verdict.score is None
        if previous is not None and previous == (name, source, truth):
            rows[-1] = (name, rows[-1][1] and failed)
        else:
            rows.append((name, failed))
        previous = (name, source, truth)
    return rows


@dataclass(frozen=True)
class _Verdict:
    """What a worker (or the pool on its behalf) said about one response. ``score`` is the
    scorer's score (``None`` when it failed: ``error`` says why)."""

    correct: bool
    pred: str
    timed_out: bool = False
    error: str | None = None
    score: float | None = None


class RewardScorer:
    """Score batches of responses within a time bound per response; see the module docstring.

    ``timeout_s``: wall-clock bound of one scorer call (DAPORun ``spec.reward.timeoutSeconds``).
    ``workers``: worker processes scoring in parallel.
    ``default_scorer``: scorer for data_source values no rule matches (``spec.reward.scorer``).
    ``max_response_length`` / ``overlong_buffer_length`` / ``overlong_penalty_factor`` /
    ``overlong_enabled``: DAPO soft overlong punishment, in tokens.
    ``max_input_chars``: a response longer than this keeps only its tail (the final answer
    is at the end; math_dapo reads only the last 300 characters). ``None``: no cap.
    ``max_ground_truth_chars``: a longer ground truth (a list / dict one: its JSON) is failed
    without scoring (spec.reward.maxGroundTruthChars; the default 1 MiB holds code test cases).
    Ground truths that are JSON lists / objects go to run-file and remote scorers unchanged; a
    built-in scorer (which takes strings) fails such a row, naming the fix.
    ``memory_limit_mb``: address-space cap of each worker (``None``: none).
    ``start_method``: ``"forkserver"`` or ``"spawn"`` (``fork`` is refused: see above).
    ``startup_timeout_s``: how long to wait for a worker to come up before raising.
    ``scorers``: ``(data_source glob, "module:function" or "file.py:function")`` rules tried
    first (spec.reward.scorers); every function is imported here, so a bad reference fails now
    (:class:`~dapo.reward.custom.ScorerImportError` naming ``spec.reward.scorers[i].function``).
    ``pass_env``: environment names (globs) the worker processes get besides Python's own
    (spec.reward.passEnv); nothing else of this process's environment reaches a scorer.
    ``remote``: a :class:`~dapo.reward.remote.RemoteReward` for rows no rule matches.
    ``failed_score``: the score of a response whose scorer failed (spec.reward.failedScore).
    ``stop_after_failed_rows``: consecutive data rows (runs of responses with one ground truth and
    data source) whose every response a run-file / remote scorer failed, that stop the run.

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
        max_ground_truth_chars: int = 1 << 20,
        memory_limit_mb: int | None = 2048,
        start_method: str = "forkserver",
        startup_timeout_s: float = 60.0,
        warm_modules: Sequence[str] = ("math_verify",),
        scorers: Sequence[tuple[str, str]] = (),
        pass_env: Sequence[str] = (),
        remote=None,
        failed_score: float = -1.0,
        stop_after_failed_rows: int = 8,
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
        # (lower-cased glob, normalised reference, run-file field) of each rule, imports checked now
        self._rules: list[tuple[str, str, str]] = []
        for i, (pattern, ref) in enumerate(scorers):
            where = f"spec.reward.scorers[{i}].function"
            load_function(ref, where)
            self._rules.append((str(pattern).strip().lower(), normalize_ref(ref), where))
        self._user_refs = {ref: where for _, ref, where in self._rules}
        self.remote = remote
        self.failed_score = float(failed_score)
        self.stop_after_failed_rows = int(stop_after_failed_rows)
        self._streaks: Counter[str] = Counter()
        self.failures: Counter[tuple[str, str]] = Counter()  # (scorer, data_source) -> failed responses
        self._remote_thread = ThreadPoolExecutor(1, thread_name_prefix="remote-reward") if remote is not None else None
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
        # what the worker processes start with: no credentials of this process (dapo.reward.isolation)
        self.worker_env = scorer_environment(os.environ, pass_env)
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # The server imports these once; every worker is then a cheap fork of it.
            self._ctx.set_forkserver_preload([_WORKER_MODULE, *self._warm_modules])
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._startup_failures = 0
        self.stats = {"scored": 0, "timed_out": 0, "crashed": 0, "errors": 0, "workers_started": 0}

    @classmethod
    def from_spec(cls, spec, **overrides) -> "RewardScorer":
        """The scorer a run file asks for (``spec``: a DAPORunSpec): spec.reward (timeout, workers,
        default scorer, run-file scorers, remote service, failed score) and the overlong shaping
        of spec.algorithm.overlong / spec.rollout.maxResponseLength. ``overrides`` go to the
        constructor as keyword arguments (tests: ``start_method``, ``memory_limit_mb``). The one
        construction every launch mode uses (dapo.wiring.build_scorer)."""
        reward, overlong = spec.reward, spec.algorithm.overlong
        remote = None
        if reward.remote is not None:
            from dapo.reward.remote import RemoteReward

            remote = RemoteReward.from_spec(reward.remote)
        kwargs = dict(
            timeout_s=reward.timeout_seconds, workers=reward.workers, default_scorer=reward.scorer,
            max_response_length=spec.rollout.max_response_length, overlong_buffer_length=overlong.buffer_length,
            overlong_penalty_factor=overlong.penalty_factor, overlong_enabled=overlong.enabled,
            scorers=[(rule.data_source, rule.function) for rule in reward.scorers], remote=remote,
            failed_score=reward.failed_score, max_ground_truth_chars=reward.max_ground_truth_chars,
            pass_env=list(reward.pass_env),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    # ---- lifecycle -----------------------------------------------------------------------

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
        if getattr(self, "_remote_thread", None) is not None:
            self._remote_thread.shutdown(wait=False, cancel_futures=True)
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

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        data_sources: Sequence[str | None] | None = None,
        response_lengths: Sequence[int] | None = None,
        truncated: Sequence[bool] | None = None,
        extra_infos: Sequence[dict | None] | None = None,
    ) -> list[RewardResult]:
        """Score ``responses`` against ``ground_truths``; results in input order.

        ``data_sources`` picks each row's scorer (:func:`scorer_for_data_source`, default
        ``default_scorer``); ``response_lengths`` (tokens) drive overlong shaping and are
        required when it is enabled; ``truncated`` (hit the length limit) is passed through
        for overlong filtering downstream; ``extra_infos`` go to run-file and remote scorers as
        their ``extra_info`` (built-in scorers do not take it).
        """
        count = len(responses)
        data_sources = [None] * count if data_sources is None else list(data_sources)
        truncated = [False] * count if truncated is None else [bool(t) for t in truncated]
        extra_infos = [None] * count if extra_infos is None else list(extra_infos)
        for name, values in (("ground_truths", ground_truths), ("data_sources", data_sources), ("truncated", truncated),
                             ("extra_infos", extra_infos)):
            if len(values) != count:
                raise ValueError(f"score_batch: {name} has {len(values)} items, responses has {count}")
        penalties = self._overlong_penalties(response_lengths, count)
        scorer_names = [self.route(ds) for ds in data_sources]
        sources = [None if ds is None else str(ds) for ds in data_sources]
        remote_rows = [i for i, name in enumerate(scorer_names) if self.remote is not None and name == self.remote.name]
        remote_answer = None
        if remote_rows:  # the HTTP round trips overlap with the local workers
            remote_answer = self._remote_thread.submit(
                self.remote.score, [responses[i] for i in remote_rows], [ground_truths[i] for i in remote_rows],
                [sources[i] for i in remote_rows], [extra_infos[i] for i in remote_rows])
        verdicts = self._run(responses, ground_truths, scorer_names, sources, extra_infos, skip=set(remote_rows))
        if remote_answer is not None:
            for i, (score, acc, pred, error) in zip(remote_rows, remote_answer.result()):
                verdicts[i] = _Verdict(bool(acc) and error is None, pred, error=error, score=score)
        self._account(verdicts, scorer_names, sources, ground_truths)
        results = []
        for i, verdict in enumerate(verdicts):
            failed = verdict.error is not None or verdict.score is None
            correctness = self.failed_score if failed else float(verdict.score)
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

    def route(self, data_source: str | None) -> str:
        """The scorer of a row: a run-file rule's function reference, the remote service's name,
        or a built-in scorer name (see the module docstring)."""
        key = "" if data_source is None else str(data_source).strip().lower()
        for pattern, ref, _ in self._rules:
            if fnmatch.fnmatchcase(key, pattern):
                return ref
        if self.remote is not None:
            return self.remote.name
        return scorer_for_data_source(data_source, self.default_scorer)[0]

    def _account(self, verdicts: list[_Verdict], scorer_names: list[str], sources: list[str | None],
                 ground_truths: Sequence) -> None:
        """Count and log failed responses per (scorer, data_source); stop on a scorer that failed
        every response of its last ``stop_after_failed_rows`` rows (run-file and remote scorers)."""
        failed: Counter[tuple[str, str]] = Counter()
        seen: Counter[tuple[str, str]] = Counter()
        first_error: dict[tuple[str, str], str] = {}
        for verdict, name, source in zip(verdicts, scorer_names, sources):
            key = (name, source if source is not None else "")
            seen[key] += 1
            if verdict.error is not None or verdict.score is None:
                failed[key] += 1
                first_error.setdefault(key, str(verdict.error))
        for name, row_failed in _row_outcomes(verdicts, scorer_names, sources, ground_truths):
            self._streaks[name] = self._streaks[name] + 1 if row_failed else 0
        for key, count in failed.items():
            self.failures[key] += count
            log.warning("reward: %d of %d responses of data_source %r failed in scorer %s (scored %g); first: %s",
                        count, seen[key], key[1], key[0], self.failed_score, first_error[key])
        for name, streak in self._streaks.items():
            if streak < self.stop_after_failed_rows:
                continue
            if name in self._user_refs:
                where = self._user_refs[name]
            elif self.remote is not None and name == self.remote.name:
                where = "spec.reward.remote"
            else:
                continue  # built-in scorers fail on hostile rows by design (time bound): no stop
            errors = "; ".join(sorted({first_error[k] for k in first_error if k[0] == name}))[:1000]
            raise ScorerFailedError(
                f"reward scorer {name} ({where}) failed every response of each of its last {streak} data rows: "
                f"{errors}. Call it by hand on a row of your data to find the bug (it gets keyword arguments "
                "solution_str, ground_truth, data_source, extra_info and must return a float or "
                "{'score': float, ...})")

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

    def _run(self, responses: Sequence[str], ground_truths: Sequence[str], scorer_names: list[str],
             sources: list[str | None], extra_infos: list[dict | None],
             skip: set[int] = frozenset()) -> list[_Verdict | None]:
        """Dispatch every response but ``skip`` to the workers; verdicts in input order (``None``
        at the skipped places)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardScorer is closed; create a new one")
            verdicts: list[_Verdict | None] = [None] * len(responses)
            payloads = {scorer_names[i]: self._scorer_payload(scorer_names[i])
                        for i in range(len(responses)) if i not in skip}
            pending: deque[int] = deque()
            self._pending = pending  # a failed worker's unanswered tasks go back here
            for i, ground_truth in enumerate(ground_truths):
                if i in skip:
                    continue
                refusal = self._refusal(responses[i], ground_truth, scorer_names[i])
                if refusal is not None:
                    verdicts[i] = _Verdict(False, INVALID_PRED, error=refusal)
                else:
                    pending.append(i)
            if pending:  # a batch for the remote service only needs no worker processes
                self._fill_pool()
            for worker in list(self._workers):
                if worker.tasks:  # left busy by an interrupted call: its answers are stale
                    worker.tasks.clear()
                    self._discard(worker)
            while pending or any(w.task is not None for w in self._workers):
                self._dispatch(pending, responses, ground_truths, scorer_names, sources, extra_infos, payloads)
                self._collect(verdicts)
            for verdict in verdicts:
                if verdict is None:
                    continue
                if verdict.timed_out:
                    self.stats["timed_out"] += 1
                elif verdict.error:
                    self.stats["errors"] += 1
            self.stats["scored"] += len(verdicts) - len(skip)
            return verdicts

    def _refusal(self, response, ground_truth, scorer: str) -> str | None:
        """Why a response is failed without calling its scorer, or None."""
        if not isinstance(response, str):
            return "the response must be a string"
        user_scorer = scorer in self._user_refs
        if isinstance(ground_truth, str):
            size = len(ground_truth)
        elif user_scorer and isinstance(ground_truth, (list, dict)):
            size = len(json.dumps(ground_truth, separators=(",", ":")))
        elif isinstance(ground_truth, (list, dict)):
            return (f"the ground truth is a JSON {type(ground_truth).__name__} and the built-in scorer {scorer} takes "
                    "strings; score such rows with a run-file scorer (spec.reward.scorers) or spec.reward.remote")
        else:
            return f"the ground truth must be a string, list or object, not {type(ground_truth).__name__}"
        if size > self.max_ground_truth_chars:
            return (f"ground truth has {size} characters (> spec.reward.maxGroundTruthChars="
                    f"{self.max_ground_truth_chars}); not scored")
        return None

    def _scorer_payload(self, name: str) -> tuple[str, object]:
        """How a worker finds the scorer: a run-file reference it imports itself, or a pickled
        (by reference) registered function."""
        if name in self._user_refs:
            return ("ref", name)
        fn = get_scorer(name)
        try:
            return ("pickle", pickle.dumps(fn))
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise TypeError(
                f"reward scorer {name!r} ({fn!r}) cannot be sent to worker processes: define it as a "
                f"module-level function of an importable module ({exc})"
            ) from exc

    def _dispatch(self, pending, responses, ground_truths, scorer_names, sources, extra_infos, payloads) -> None:
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
                    # only run-file scorers take extra_info: built-in ones get none to unpickle
                    worker.conn.send([(i, payloads[scorer_names[i]], self._cap_input(responses[i]), ground_truths[i],
                                       sources[i], extra_infos[i] if payloads[scorer_names[i]][0] == "ref" else None)
                                      for i in ids])
                except (OSError, ValueError):
                    pending.extendleft(reversed(ids))  # the worker died while idle: replace it, retry the tasks
                    self._discard(worker)
                    continue
                worker.tasks.extend(ids)
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
                verdicts[worker.tasks.popleft()] = _Verdict(
                    False, INVALID_PRED, timed_out=True,
                    error=f"scorer exceeded the {self.timeout_s:g} s time bound; worker killed",
                )
                self._requeue(worker)
                self._discard(worker)

    def _on_event(self, worker: _Worker, verdicts: list[_Verdict | None]) -> None:
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
                    verdicts[task] = _Verdict(bool(message[3]), message[4], score=float(message[2]))
                else:
                    verdicts[task] = _Verdict(False, INVALID_PRED, error=f"scorer raised {message[2]}")
                worker.deadline = time.monotonic() + self.timeout_s  # the next task's clock starts now
        if not received or not worker.process.is_alive():  # end of pipe or process gone: the worker is dead
            self._bury(worker, verdicts)

    def _bury(self, worker: _Worker, verdicts: list[_Verdict | None]) -> None:
        """A dead worker: fail its task (if any) and start a replacement."""
        worker.process.join(1.0)
        if worker.task is not None:
            verdicts[worker.tasks.popleft()] = _Verdict(
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
