"""`RewardScorer`: a batch of responses in, one shaped reward per response out.

The reward side of a training step, put together from its parts:

- routing (`dapo.reward.routing`): which scorer each row's ``data_source`` goes to: the run
  file's functions, the remote service, the built-in rules, the default scorer;
- the worker pool (`dapo.reward.workers`): killable scorer processes, a hard time bound per
  response, a scrubbed environment (`dapo.reward.isolation`);
- the remote reward service (`dapo.reward.remote`), called on its own thread so its HTTP round
  trips overlap the local workers;
- failures (`dapo.reward.failures`): what a failed response scores, and the stop on a broken
  run-file / remote scorer;
- shaping (`dapo.reward.shaping`): DAPO's soft overlong punishment added to the score.

Before any scorer runs, a response is refused (failed without a call) when it is not a string or
its ground truth is too long or of a type its scorer cannot take (``max_ground_truth_chars``;
JSON ground truths go to run-file and remote scorers only).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from dapo.reward.failures import FailurePolicy, ScorerFailedError
from dapo.reward.isolation import scorer_environment
from dapo.reward.result import INVALID_PRED, RewardResult
from dapo.reward.routing import ScorerRoutes
from dapo.reward.shaping import OverlongShaping
from dapo.reward.workers import Task, Verdict, WorkerPool

__all__ = ["RewardScorer", "ScorerFailedError"]

log = logging.getLogger("dapo.reward")


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
    ``start_method``: ``"forkserver"`` or ``"spawn"`` (``fork`` is refused: dapo.reward.workers).
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
        self._closed = True  # until every part is built: __del__ of a half-built scorer has nothing to close
        self.shaping = OverlongShaping(bool(overlong_enabled), max_response_length, overlong_buffer_length,
                                       float(overlong_penalty_factor))
        self.routes = ScorerRoutes(scorers, remote, default_scorer)
        self.failure_policy = FailurePolicy(self.routes, failed_score, stop_after_failed_rows)
        # what the worker processes start with: no credentials of this process (dapo.reward.isolation)
        self.workers = WorkerPool(timeout_s, workers, memory_limit_mb=memory_limit_mb, start_method=start_method,
                                  startup_timeout_s=startup_timeout_s, warm_modules=warm_modules,
                                  worker_env=scorer_environment(os.environ, pass_env))
        self.remote = remote
        self._remote_thread = ThreadPoolExecutor(1, thread_name_prefix="remote-reward") if remote is not None else None
        self.max_input_chars = max_input_chars
        self.max_ground_truth_chars = int(max_ground_truth_chars)
        self._closed = False

    # the parts' state, as callers read it
    @property
    def stats(self) -> dict[str, int]:
        """scored / timed_out / crashed / errors responses, workers_started."""
        return self.workers.stats

    @property
    def failures(self):
        """(scorer, data_source) -> failed responses."""
        return self.failure_policy.failures

    @property
    def worker_env(self) -> dict[str, str]:
        return self.workers.worker_env

    @property
    def failed_score(self) -> float:
        return self.failure_policy.failed_score

    def route(self, data_source: str | None) -> str:
        """The scorer of a row (dapo.reward.routing)."""
        return self.routes.route(data_source)

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
        if getattr(self, "_remote_thread", None) is not None:
            self._remote_thread.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "workers", None) is not None:
            self.workers.close()
        self._closed = True

    # ---- scoring -------------------------------------------------------------------------

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence,
        data_sources: Sequence[str | None] | None = None,
        response_lengths: Sequence[int] | None = None,
        truncated: Sequence[bool] | None = None,
        extra_infos: Sequence[dict | None] | None = None,
    ) -> list[RewardResult]:
        """Score ``responses`` against ``ground_truths``; results in input order.

        ``data_sources`` picks each row's scorer (dapo.reward.routing, default ``default_scorer``);
        ``response_lengths`` (tokens) drive overlong shaping and are required when it is enabled;
        ``truncated`` (hit the length limit) is passed through for overlong filtering downstream;
        ``extra_infos`` go to run-file and remote scorers as their ``extra_info`` (built-in
        scorers do not take it).
        """
        count = len(responses)
        data_sources = [None] * count if data_sources is None else list(data_sources)
        truncated = [False] * count if truncated is None else [bool(t) for t in truncated]
        extra_infos = [None] * count if extra_infos is None else list(extra_infos)
        for name, values in (("ground_truths", ground_truths), ("data_sources", data_sources), ("truncated", truncated),
                             ("extra_infos", extra_infos)):
            if len(values) != count:
                raise ValueError(f"score_batch: {name} has {len(values)} items, responses has {count}")
        if self._closed:
            raise RuntimeError("RewardScorer is closed; create a new one")
        penalties = self.shaping.penalties(response_lengths, count)
        scorer_names = [self.routes.route(ds) for ds in data_sources]
        sources = [None if ds is None else str(ds) for ds in data_sources]
        remote_rows = [i for i, name in enumerate(scorer_names) if self.routes.is_remote(name)]
        remote_answer = None
        if remote_rows:  # the HTTP round trips overlap with the local workers
            remote_answer = self._remote_thread.submit(
                self.remote.score, [responses[i] for i in remote_rows], [ground_truths[i] for i in remote_rows],
                [sources[i] for i in remote_rows], [extra_infos[i] for i in remote_rows])
        verdicts: list[Verdict | None] = [None] * count
        tasks: dict[int, Task] = {}
        remote_set = set(remote_rows)
        local = [i for i in range(count) if i not in remote_set]
        for i in local:
            refusal = self._refusal(responses[i], ground_truths[i], scorer_names[i])
            if refusal is not None:
                verdicts[i] = Verdict(False, INVALID_PRED, error=refusal)
                continue
            user = self.routes.is_user(scorer_names[i])
            # only run-file scorers take extra_info: built-in ones get none to unpickle
            tasks[i] = Task(self.routes.payload(scorer_names[i]), self._cap_input(responses[i]), ground_truths[i],
                            sources[i], extra_infos[i] if user else None)
        for i, verdict in self.workers.run(tasks).items():
            verdicts[i] = verdict
        refused = len(local) - len(tasks)
        self.stats["errors"] += refused
        self.stats["scored"] += len(local)
        if remote_answer is not None:
            for i, (score, acc, pred, error) in zip(remote_rows, remote_answer.result()):
                verdicts[i] = Verdict(bool(acc) and error is None, pred, error=error, score=score)
        self.failure_policy.account(verdicts, scorer_names, sources, ground_truths)
        results = []
        for i, verdict in enumerate(verdicts):
            correctness = self.failed_score if verdict.failed else float(verdict.score)
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

    def _cap_input(self, response: str) -> str:
        """The tail of an oversize response (the final answer lives at the end)."""
        if self.max_input_chars is not None and len(response) > self.max_input_chars:
            return response[-self.max_input_chars :]
        return response

    def _refusal(self, response, ground_truth, scorer: str) -> str | None:
        """Why a response is failed without calling its scorer, or None."""
        if not isinstance(response, str):
            return "the response must be a string"
        user_scorer = self.routes.is_user(scorer)
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
