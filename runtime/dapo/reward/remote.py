"""A user's reward service over HTTP (``spec.reward.remote``): a judge model, a code sandbox, a
company's verifier.

Contract (one POST per batch of at most ``batchSize`` responses, JSON both ways)::

    POST <url>   {"requests": [{"solution_str": str, "ground_truth": str | list | object,
                                "data_source": str | null, "extra_info": object | null}, ...]}
    200          {"results": [float | {"score": float, "acc": bool?, "pred": str?}, ...]}

``extra_info`` is the row's `PromptRecord.extra_info` (its other columns, verl's ``extra_info``
keys at the top level). ``results`` is as long as ``requests`` and in the same order; each entry is read like a run-file
scorer's return value (:func:`dapo.reward.custom.read_score`): a bad entry (NaN, a string, no
``score``) fails that one response. Headers (``Authorization``, ...) come from the environment
variable ``DAPO_REWARD_REMOTE_HEADERS``, a JSON object; on Kubernetes the operator sets it from
the Secret ``spec.reward.remote.headersSecret`` (key ``headers``), never from the run file.

A batch is bounded by ``timeoutSeconds`` per attempt, as a whole (a server that trickles its
answer byte by byte times out too); a failed attempt (connection refused, timeout, HTTP 5xx, 408
or 429, an answer that is not the contract's JSON) is retried ``maxRetries`` times, after the
server's Retry-After when it sends one (at most 120 s) and otherwise after exponential backoff
with jitter (0.5 s, 1 s, 2 s, ... each between half and all of it), then
:class:`RemoteRewardError` names the URL and every failure. Another HTTP 4xx is not retried (the
request itself is refused).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from dapo.contracts import EnvVar
from dapo.reward.custom import read_score
from dapo.services.http import RetryableError, ServiceError, backoff_delay, post_json

__all__ = ["HEADERS_ENV", "RemoteReward", "RemoteRewardError", "headers_from_env"]

log = logging.getLogger("dapo.reward.remote")

HEADERS_ENV = EnvVar.REWARD_REMOTE_HEADERS


class RemoteRewardError(ServiceError):
    """The remote reward service failed a batch for good; the message names the URL."""


def headers_from_env(environ=os.environ) -> dict[str, str]:
    """The HTTP headers of ``DAPO_REWARD_REMOTE_HEADERS`` (a JSON object of strings), or {}."""
    raw = environ.get(HEADERS_ENV, "").strip()
    if not raw:
        return {}
    try:
        headers = json.loads(raw)
    except json.JSONDecodeError:
        # the value is a secret: do not echo it
        raise RemoteRewardError(f"{HEADERS_ENV} is not JSON; set it to an object such as "
                                '{"Authorization": "Bearer ..."}') from None
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise RemoteRewardError(f"{HEADERS_ENV} must be a JSON object of string header values")
    return headers


class RemoteReward:
    """Scores responses on ``url`` (see the module docstring). ``score`` returns one
    ``(score | None, acc, pred, error | None)`` per response, in order."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, batch_size: int = 64, max_retries: int = 3,
                 backoff_s: float = 0.5, headers: dict[str, str] | None = None, concurrency: int = 4):
        self.url = url
        self.name = f"remote {url}"
        self.timeout_s = float(timeout_s)
        self.batch_size = int(batch_size)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.headers = dict(headers or {})
        self._threads = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="remote-reward")
        self._rng = random.Random()  # retry jitter only: never part of a run's seeded state

    @classmethod
    def from_spec(cls, remote) -> "RemoteReward":
        """From a ``RemoteRewardSpec`` (spec.reward.remote), headers from the environment."""
        return cls(remote.url, timeout_s=remote.timeout_seconds, batch_size=remote.batch_size,
                   max_retries=remote.max_retries, headers=headers_from_env())

    def score(self, solutions: Sequence[str], ground_truths: Sequence[str], data_sources: Sequence[str | None],
              extra_infos: Sequence[dict | None] | None = None) -> list[tuple[float | None, bool, str, str | None]]:
        extra_infos = [None] * len(solutions) if extra_infos is None else list(extra_infos)
        starts = range(0, len(solutions), self.batch_size)
        futures = [self._threads.submit(self._score_batch, solutions[s:s + self.batch_size],
                                        ground_truths[s:s + self.batch_size], data_sources[s:s + self.batch_size],
                                        extra_infos[s:s + self.batch_size])
                   for s in starts]
        out: list[tuple[float | None, bool, str, str | None]] = []
        for future in futures:
            out.extend(future.result())
        return out

    def _score_batch(self, solutions, ground_truths, data_sources, extra_infos):
        payload = {"requests": [
            {"solution_str": s, "ground_truth": g, "data_source": d, "extra_info": e}
            for s, g, d, e in zip(solutions, ground_truths, data_sources, extra_infos)]}
        failures: list[str] = []
        retry_after = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(backoff_delay(attempt, self.backoff_s, retry_after, self._rng))
            try:
                answer = post_json(self.url, payload, self.timeout_s, headers=self.headers)
                results = answer.get("results") if isinstance(answer, dict) else None
                if not isinstance(results, list) or len(results) != len(solutions):
                    got = f"{len(results)} results" if isinstance(results, list) else f"{type(answer).__name__} " \
                          f"without a 'results' list ({str(answer)[:120]!r})"
                    raise RetryableError(f"{self.url} answered {got} for {len(solutions)} requests; the contract is "
                                         '{"results": [score, ...]} in request order')
                return [self._entry(value) for value in results]
            except RetryableError as exc:
                retry_after = exc.retry_after
                failures.append(str(exc))
                log.warning("remote reward %s: attempt %d/%d failed: %s", self.url, attempt + 1,
                            self.max_retries + 1, exc)
            except ServiceError as exc:  # 4xx: the service refuses the request; retrying cannot help
                raise RemoteRewardError(f"remote reward service {self.url} (spec.reward.remote.url) refused a batch "
                                        f"of {len(solutions)} responses: {exc}") from None
        raise RemoteRewardError(
            f"remote reward service {self.url} (spec.reward.remote.url) failed a batch of {len(solutions)} responses "
            f"{len(failures)} times (timeout {self.timeout_s:g} s each, spec.reward.remote.timeoutSeconds): "
            + "; ".join(failures[-3:]) + ". Check that the service is up and answers the documented JSON contract.")

    @staticmethod
    def _entry(value: Any) -> tuple[float | None, bool, str, str | None]:
        try:
            score, acc, pred = read_score(value)
        except (TypeError, ValueError) as exc:
            return None, False, "[INVALID]", f"remote result: {exc}"
        return score, acc, pred, None

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
