"""Reward replica service and the controller's client.

Service (aiohttp), one per reward pod / process, wrapping one `dapo.reward.RewardScorer` (its
worker-process pool bounds every response's scoring time: a response that overruns
spec.reward.timeoutSeconds scores as wrong with ``timed_out`` true):

    POST /score   ScoreRequest {"responses": [str], "ground_truths": [str | list | object],
                   "data_sources": [str|null] | null, "response_lengths": [int] | null,
                   "truncated": [bool] | null, "extra_infos": [object | null] | null}
                  -> ScoreAnswer {"results": [ScoreResult (RewardResult's fields), ...]}  (input order)
                  (models of `dapo.contracts`, validated on both sides)
    GET  /healthz {"ok": true, ...}

`RemoteScorer` has RewardScorer's ``score_batch`` signature: it cuts the batch into one
contiguous slice per replica and retries a failed slice on another replica.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from pydantic import ValidationError

from dapo.contracts import ScoreAnswer, ScoreRequest, ScoreResult, contract_violation
from dapo.reward.failures import ScorerFailedError
from dapo.reward.remote import RemoteRewardError
from dapo.reward.result import RewardResult
from dapo.services.http import REPLICA_LIVENESS_S, ReplicaPool, RequestThreads, RetryableError, ServiceError, post_json, split_evenly

log = logging.getLogger("dapo.services.reward")

_RESULT_FIELDS = tuple(f for f in RewardResult.__dataclass_fields__)


def parse_score_request(doc) -> ScoreRequest:
    """Validate a /score body (`dapo.contracts.ScoreRequest`); ValueError names the bad field."""
    try:
        return ScoreRequest.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(contract_violation(exc)) from None


class RewardService:
    """One reward replica around a scorer with RewardScorer's ``score_batch``."""

    def __init__(self, scorer, *, replica: int = 0):
        self.scorer = scorer
        self.replica = replica
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="score")  # RewardScorer serialises anyway

    def score(self, request: ScoreRequest) -> dict:
        results = self.scorer.score_batch(request.responses, request.ground_truths, request.data_sources,
                                          request.response_lengths, request.truncated, extra_infos=request.extra_infos)
        return ScoreAnswer(results=[ScoreResult.model_validate(_result_dict(r)) for r in results]).wire()

    def make_app(self):
        import asyncio

        from aiohttp import web

        async def score(request):
            try:
                parsed = parse_score_request(await request.json())
            except (ValueError, json.JSONDecodeError) as exc:
                return web.json_response({"error": f"bad /score request: {exc}"}, status=400)
            try:
                answer = await asyncio.get_running_loop().run_in_executor(self._pool, self.score, parsed)
            except ValueError as exc:  # the scorer refused the batch (e.g. lengths missing for shaping)
                return web.json_response({"error": str(exc)}, status=400)
            except (ScorerFailedError, RemoteRewardError) as exc:
                # the user's scorer / service is broken: another replica would fail the same way, so
                # a 4xx (not retried) carries the message naming it to the controller, which stops
                log.error("%s", exc)
                return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=422)
            except Exception as exc:  # noqa: BLE001 - the client retries on another replica
                log.exception("scoring failed")
                return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=500)
            return web.json_response(answer)

        async def healthz(_request):
            return web.json_response({"ok": True, "role": "reward", "replica": self.replica})

        app = web.Application(client_max_size=256 << 20)
        app.add_routes([web.post("/score", score), web.get("/healthz", healthz)])
        return app

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.scorer, "close", None)
        if close is not None:
            close()


def _result_dict(result) -> dict:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    return {k: getattr(result, k) for k in _RESULT_FIELDS if hasattr(result, k)}


def results_from_wire(doc, expected: int, url: str) -> list[RewardResult]:
    """The results of a /score answer (`dapo.contracts.ScoreAnswer`), ``expected`` of them."""
    try:
        answer = ScoreAnswer.model_validate(doc)
    except ValidationError as exc:
        raise RetryableError(f"{url}: the /score answer does not follow the contract: {contract_violation(exc)}") from None
    if len(answer.results) != expected:
        raise RetryableError(f"{url} returned {len(answer.results)} results for {expected} responses")
    return [RewardResult(**result.model_dump()) for result in answer.results]


class RemoteScorer:
    """RewardScorer's ``score_batch`` over reward replicas (see the module docstring).

    ``timeout_s`` is the per-response bound of the replicas (spec.reward.timeoutSeconds): a slice
    of k responses may take up to k * timeout_s on a one-worker replica, so the request timeout
    is ``base_timeout_s + k * timeout_s``."""

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 5.0, max_retries: int = 2,
                 base_timeout_s: float = 60.0, liveness_s: float | None = REPLICA_LIVENESS_S):
        if not urls:
            raise ServiceError("RemoteScorer needs at least one reward replica URL (DAPO_REWARD_URLS)")
        self.pool = ReplicaPool(urls, "reward", liveness_s=liveness_s)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.base_timeout_s = base_timeout_s
        self._threads = RequestThreads("reward-client")

    @property
    def urls(self) -> list[str]:
        return self.pool.urls

    def wait_ready(self, timeout_s: float) -> None:
        self.pool.wait_ready(timeout_s)

    def score_batch(self, responses, ground_truths, data_sources=None, response_lengths=None,
                    truncated=None, extra_infos=None) -> list[RewardResult]:
        count = len(responses)
        if len(ground_truths) != count:
            raise ValueError(f"score_batch: ground_truths has {len(ground_truths)} items, responses has {count}")
        if count == 0:
            return []
        columns = {"responses": list(responses), "ground_truths": list(ground_truths),
                   "data_sources": None if data_sources is None else list(data_sources),
                   "response_lengths": None if response_lengths is None else [int(x) for x in response_lengths],
                   "truncated": None if truncated is None else [bool(x) for x in truncated],
                   "extra_infos": None if extra_infos is None else list(extra_infos)}
        futures = [self._threads.submit(self._score_slice, k, start, stop, columns)
                   for k, (start, stop) in enumerate(split_evenly(count, len(self.urls)))]
        results: list[RewardResult] = []
        for future in futures:
            results.extend(future.result())
        return results

    def _score_slice(self, k: int, start: int, stop: int, columns: dict) -> list[RewardResult]:
        payload = ScoreRequest(**{key: None if value is None else value[start:stop]
                                  for key, value in columns.items()}).wire()
        timeout = self.base_timeout_s + (stop - start) * self.timeout_s

        def attempt(url: str) -> list[RewardResult]:
            return results_from_wire(post_json(url + "/score", payload, timeout), stop - start, url)

        return self.pool.call(f"score (responses {start}..{stop - 1})", k, attempt, self.max_retries)

    def close(self) -> None:
        """Nothing to release: each request runs in its own daemon thread (`RequestThreads`)."""
