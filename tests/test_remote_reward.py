"""The remote reward service client (spec.reward.remote) against real HTTP servers that the tests
start on 127.0.0.1: a judge that answers the contract, one that hangs, ones that answer garbage,
a flaky one, one that refuses, and none at all."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import _run_files
from dapo.reward import RewardScorer
from dapo.reward.remote import HEADERS_ENV, RemoteReward, RemoteRewardError, headers_from_env
from dapo.spec import SpecError, parse_run

pytestmark = pytest.mark.timeout(120)


TRICKLE = "trickle"


class Judge:
    """A loopback HTTP server whose answer to each POST is ``behaviour(body, attempt)``:
    ``(status, bytes)`` or ``(status, bytes, headers)``, ``None`` to hang until the test ends, or
    ``TRICKLE``: a 200 whose body comes one byte every 0.1 s, never ending."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.release = threading.Event()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.bodies.append(body)
                judge.headers.append(dict(self.headers))
                answer = judge.behaviour(body, len(judge.bodies))
                if answer is None:
                    judge.release.wait(30)
                    return
                if answer == TRICKLE:
                    self.send_response(200)
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    while not judge.release.wait(0.1):
                        try:
                            self.wfile.write(b" ")
                            self.wfile.flush()
                        except OSError:
                            return
                    return
                status, payload, *extra = answer
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def judge_factory():
    judges = []

    def make(behaviour):
        judges.append(Judge(behaviour))
        return judges[-1]

    yield make
    for judge in judges:
        judge.stop()


def exact_match(body, _attempt):
    """The documented contract: one result per request, in order."""
    results = []
    for item in body["requests"]:
        if item["solution_str"] == "nan":
            results.append(math.nan)  # json.dumps writes NaN: a bad entry
        elif item["solution_str"] == "text":
            results.append("good")
        else:
            right = item["solution_str"] == item["ground_truth"]
            results.append({"score": 1.0 if right else 0.0, "acc": right, "pred": item["data_source"]})
    return 200, json.dumps({"results": results}).encode()


@pytest.mark.integration
def test_batches_follow_the_contract_with_headers_from_the_environment(judge_factory, monkeypatch):
    judge = judge_factory(exact_match)
    monkeypatch.setenv(HEADERS_ENV, json.dumps({"Authorization": "Bearer s3cret"}))
    remote = RemoteReward(judge.url, timeout_s=5, batch_size=2, headers=headers_from_env())
    answers = remote.score(["a", "b", "c", "nan", "text"], ["a", "x", "c", "y", "z"], ["s1", "s2", None, "s4", "s5"])
    assert [a[:3] for a in answers[:3]] == [(1.0, True, "s1"), (0.0, False, "s2"), (1.0, True, "")]  # pred null -> ""
    assert answers[0][3] is None
    assert answers[3][0] is None and "non-finite" in answers[3][3]  # one bad entry fails one response
    assert answers[4][0] is None and "returned a str" in answers[4][3]
    assert sorted(len(b["requests"]) for b in judge.bodies) == [1, 2, 2]  # batchSize 2
    first = next(b for b in judge.bodies if b["requests"][0]["solution_str"] == "a")
    assert first["requests"][0] == {"solution_str": "a", "ground_truth": "a", "data_source": "s1", "extra_info": None}
    judge.bodies.clear()
    remote.score(["a", "b"], ["a", "b"], ["s1", "s2"], [{"tests": [1, 2]}, {"tests": []}])
    assert [r["extra_info"] for r in judge.bodies[0]["requests"]] == [{"tests": [1, 2]}, {"tests": []}]
    assert all(h["Authorization"] == "Bearer s3cret" for h in judge.headers)


@pytest.mark.integration
def test_a_hanging_service_is_bounded_per_attempt_and_named(judge_factory):
    judge = judge_factory(lambda body, attempt: None)
    remote = RemoteReward(judge.url, timeout_s=0.5, max_retries=2, backoff_s=0.1)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match=rf"{judge.url} .*failed a batch of 1 responses 3 times .*timed out"):
        remote.score(["a"], ["a"], [None])
    elapsed = time.monotonic() - start
    assert len(judge.bodies) == 3
    assert elapsed < 3 * 0.5 + 0.1 + 0.2 + 3.0, elapsed  # three bounded attempts plus backoff, loose for load


@pytest.mark.integration
@pytest.mark.parametrize("payload, what", [
    (b"<html>502 Bad Gateway</html>", "invalid JSON"),
    (b'{"scores": [1.0]}', "without a 'results' list"),
    (b'{"results": [1.0, 1.0, 1.0]}', "answered 3 results for 1 requests"),
    (b"[1.0]", "list without a 'results' list"),
    (b"\xff\xfe\x00garbage", "invalid JSON"),
])
def test_garbage_answers_are_retried_then_name_the_url(judge_factory, payload, what):
    judge = judge_factory(lambda body, attempt: (200, payload))
    remote = RemoteReward(judge.url, timeout_s=2, max_retries=1, backoff_s=0.05)
    with pytest.raises(RemoteRewardError, match=judge.url) as info:
        remote.score(["a"], ["a"], [None])
    assert what in str(info.value) and len(judge.bodies) == 2


@pytest.mark.integration
@pytest.mark.parametrize("status", [503, 429, 408])
def test_a_busy_or_rate_limited_service_succeeds_after_jittered_backoff(judge_factory, status):
    """503, 429 (rate limit) and 408 without Retry-After: retried after exponential backoff with
    equal jitter, 0.2 s then 0.4 s, each between half and all of it."""
    judge = judge_factory(lambda body, attempt: (status, b"busy") if attempt < 3 else exact_match(body, attempt))
    remote = RemoteReward(judge.url, timeout_s=2, max_retries=3, backoff_s=0.2)
    start = time.monotonic()
    assert remote.score(["a"], ["a"], ["s"])[0][:2] == (1.0, True)
    assert len(judge.bodies) == 3 and time.monotonic() - start >= 0.1 + 0.2  # at least half of 0.2 s + 0.4 s


@pytest.mark.integration
def test_retry_after_is_honoured(judge_factory):
    """A 429 with Retry-After: 1 (seconds) then success: the client waits the second the server
    asked for, not its own 0.05 s backoff; an HTTP-date Retry-After is read too."""
    judge = judge_factory(lambda body, attempt: (429, b"slow down", {"Retry-After": "1"}) if attempt == 1
                          else exact_match(body, attempt))
    remote = RemoteReward(judge.url, timeout_s=2, max_retries=2, backoff_s=0.05)
    start = time.monotonic()
    assert remote.score(["a"], ["a"], ["s"])[0][:2] == (1.0, True)
    assert len(judge.bodies) == 2 and 1.0 <= time.monotonic() - start < 1.0 + 2.0
    from email.utils import formatdate

    from dapo.services.http import MAX_RETRY_AFTER_S, retry_after_seconds

    assert retry_after_seconds(formatdate(1000.0 + 30, usegmt=True), now=1000.0) == pytest.approx(30.0)
    assert retry_after_seconds("86400") == MAX_RETRY_AFTER_S and retry_after_seconds("soon") is None


@pytest.mark.integration
def test_a_trickling_service_times_out_as_a_whole(judge_factory):
    """A server that sends one byte every 0.1 s never trips a per-read timeout; timeoutSeconds
    bounds the whole request, so each attempt ends after ~1 s."""
    judge = judge_factory(lambda body, attempt: TRICKLE)
    remote = RemoteReward(judge.url, timeout_s=1.0, max_retries=1, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match=r"timed out: no complete answer within 1 s \(the whole request\)"):
        remote.score(["a"], ["a"], [None])
    elapsed = time.monotonic() - start
    assert len(judge.bodies) == 2 and 2 * 1.0 <= elapsed < 2 * 1.0 + 0.05 + 3.0, elapsed  # 2 attempts, loose for load


@pytest.mark.integration
def test_a_refusing_service_is_not_retried(judge_factory):
    judge = judge_factory(lambda body, attempt: (401, b'{"error": "bad token"}'))
    remote = RemoteReward(judge.url, timeout_s=2, max_retries=3)
    with pytest.raises(RemoteRewardError, match=rf"{judge.url} .*refused .*HTTP 401: bad token"):
        remote.score(["a"], ["a"], [None])
    assert len(judge.bodies) == 1


def test_a_service_that_is_down_names_the_url():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    remote = RemoteReward(url, timeout_s=1, max_retries=1, backoff_s=0.05)
    with pytest.raises(RemoteRewardError, match=rf"remote reward service {url} \(spec.reward.remote.url\).*did not answer"):
        remote.score(["a"], ["a"], [None])


def test_headers_env_must_be_a_json_object_and_is_not_echoed(monkeypatch):
    monkeypatch.setenv(HEADERS_ENV, "Bearer topsecret")
    with pytest.raises(RemoteRewardError) as info:
        headers_from_env()
    assert "topsecret" not in str(info.value)
    monkeypatch.setenv(HEADERS_ENV, '{"X-Count": 3}')
    with pytest.raises(RemoteRewardError, match="string header values"):
        headers_from_env()


def _spec(url: str, **reward):
    """The minimal run file (tests/_run_files.py) scoring through the remote service at ``url``."""
    return parse_run(_run_files.run_doc(
        "remote", data={"train": "x.jsonl"}, rollout={"maxResponseLength": 10, "genBatchSize": 8},
        learner={"trainBatchSize": 4, "miniBatchSize": 4}, algorithm={"overlong": {"bufferLength": 4}},
        reward={"workers": 1, "remote": {"url": url, "timeoutSeconds": 5, "batchSize": 8}, **reward})).spec


@pytest.mark.integration
def test_reward_scorer_routes_unmatched_rows_to_the_service_and_shapes_them(judge_factory):
    """Run-file rules first, the remote service for every other row; overlong shaping on top."""
    judge = judge_factory(exact_match)
    spec = _spec(judge.url, scorers=[{"dataSource": "reverse", "function": "_custom_scorers:reverse_score"}])
    with RewardScorer.from_spec(spec) as scorer:
        results = scorer.score_batch(["cba", "same", "diff", "text"], ["abc", "same", "x", "y"],
                                     ["reverse", "judge", "aime2024", "judge"], [2, 2, 10, 2])
    assert [r.scorer for r in results] == ["_custom_scorers:reverse_score"] + [f"remote {judge.url}"] * 3
    assert [r.correctness for r in results] == [1.0, 1.0, 0.0, -1.0]  # "text" is a bad entry: failed score
    assert results[2].score == -1.0 and results[2].overlong_penalty == -1.0  # 0.0 + full penalty at L_max
    assert results[3].error is not None and not results[3].acc
    assert len(judge.bodies) == 1 and len(judge.bodies[0]["requests"]) == 3


@pytest.mark.integration
def test_a_service_answering_only_garbage_entries_stops_the_run(judge_factory):
    judge = judge_factory(lambda body, attempt: (200, json.dumps({"results": ["?"] * len(body["requests"])}).encode()))
    with RewardScorer.from_spec(_spec(judge.url)) as scorer:
        with pytest.raises(Exception, match=rf"reward scorer remote {judge.url} \(spec.reward.remote\) failed every "
                                            r"response of each of its last 8 data rows"):
            scorer.score_batch(["a"] * 8, [str(k) for k in range(8)], [None] * 8, [1] * 8)


def test_remote_spec_keeps_credentials_out_of_the_url():
    with pytest.raises(SpecError, match="spec.reward.remote.url"):
        _spec("http://user:pw@judge:8000/score")
