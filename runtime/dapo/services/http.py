"""Small shared pieces of the services: JSON over HTTP with bounded retries, and an aiohttp app
running on its own event-loop thread (so the synchronous controller and tests can host one).

The clients use the standard library (urllib in worker threads): the controller is synchronous
and one request per replica at a time is all it issues, so an async client would add nothing.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import random
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from dapo.errors import DapoError

log = logging.getLogger("dapo.services")


class ServiceError(DapoError, RuntimeError):
    """A service request failed for good; the message names the URL(s) and why."""


class RetryableError(ServiceError):
    """The replica failed in a way another replica (or a later attempt) may not: connection,
    timeout, 5xx, 408 / 429 (busy or rate limited), stale weights. ``retry_after``: seconds the
    server asked the client to wait (its Retry-After header), None when it did not say."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# Answers that say "not now" rather than "never": retried like a 5xx. 408 Request Timeout, 429 Too
# Many Requests (rate limits); 5xx includes 503 Service Unavailable.
RETRYABLE_STATUS = frozenset({408, 429})
# A Retry-After longer than this is cut to it: the request's retries stay bounded in time.
MAX_RETRY_AFTER_S = 120.0


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds: delta-seconds ("7") or an HTTP date; None when absent
    or unreadable; never negative, at most MAX_RETRY_AFTER_S."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def backoff_delay(attempt: int, base_s: float, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): the server's Retry-After when it gave
    one, else exponential backoff base_s x 2^(attempt - 1) with equal jitter (half of it fixed,
    half uniform), so clients that failed together do not retry together."""
    if retry_after is not None:
        return retry_after
    step = base_s * 2 ** (attempt - 1)
    return step / 2 + rng.uniform(0.0, step / 2)


def parse_urls(text: str | None, variable: str) -> list[str]:
    """'http://a:8000, http://b:8000' -> ['http://a:8000', 'http://b:8000'] (no trailing slash)."""
    urls = [u.strip().rstrip("/") for u in (text or "").split(",") if u.strip()]
    if not urls:
        raise ServiceError(f"{variable} is empty: give a comma-separated list of http://HOST:PORT URLs "
                           "(the operator sets it on every learner pod)")
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
        raise ServiceError(f"{variable}: {bad} are not http(s):// URLs")
    return urls


def post_json(url: str, payload: Any, timeout_s: float, headers: dict[str, str] | None = None) -> Any:
    """POST ``payload`` as JSON (plus ``headers``), return the decoded JSON answer.

    ``timeout_s`` bounds the whole exchange, not each socket read. Raises RetryableError for
    connection failures, timeouts, 5xx, 408 and 429 answers (with the server's Retry-After),
    ServiceError for other 4xx answers (the request itself is wrong: another replica would
    refuse it too)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={**(headers or {}), "Content-Type": "application/json"})
    return _send(request, url, timeout_s)


def get_json(url: str, timeout_s: float) -> Any:
    return _send(urllib.request.Request(url, method="GET"), url, timeout_s)


class _TrackedConnections:
    """urllib handlers that remember each connection they open, so a timer can close its socket:
    urllib's own ``timeout`` bounds each socket operation, and a server that trickles one byte
    at a time never trips it."""

    def __init__(self):
        # the sockets themselves: urllib drops the connection's reference once the headers are in,
        # while the response keeps reading the body from the same socket
        self.sockets: list[socket.socket] = []

    def factory(self, cls):
        def make(*args, **kwargs):
            connection = cls(*args, **kwargs)
            connect = connection.connect

            def connect_and_track() -> None:
                connect()
                self.sockets.append(connection.sock)

            connection.connect = connect_and_track
            return connection
        return make

    def opener(self) -> urllib.request.OpenerDirector:
        tracked = self

        class Http(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(tracked.factory(http.client.HTTPConnection), req)

        class Https(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(tracked.factory(http.client.HTTPSConnection), req,
                                    context=self._context)

        return urllib.request.build_opener(Http, Https)  # proxies from the environment still apply

    def abort(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _send(request: urllib.request.Request, url: str, timeout_s: float) -> Any:
    """One HTTP exchange bounded by ``timeout_s`` as a whole (connect, send, headers and body)."""
    tracked = _TrackedConnections()
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        tracked.abort()

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        with tracked.opener().open(request, timeout=timeout_s) as response:
            body = response.read()
        if expired.is_set():
            raise OSError("deadline")
        return json.loads(body)
    except urllib.error.HTTPError as exc:
        detail = _error_text(exc)
        retryable = exc.code >= 500 or exc.code in RETRYABLE_STATUS
        if retryable:
            raise RetryableError(f"{url} answered HTTP {exc.code}: {detail}",
                                 retry_after=retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
                                 ) from None
        raise ServiceError(f"{url} answered HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, OSError,
            http.client.HTTPException) as exc:
        if expired.is_set():
            raise RetryableError(f"{url} timed out: no complete answer within {timeout_s:g} s (the whole request)") from None
        if isinstance(exc, http.client.HTTPException):  # e.g. a peer that closes mid-answer or speaks no HTTP
            raise RetryableError(f"{url} broke the HTTP exchange ({type(exc).__name__}: {exc})") from None
        reason = getattr(exc, "reason", exc)
        raise RetryableError(f"{url} did not answer: {reason}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RetryableError(f"{url} answered with invalid JSON ({exc})") from None
    finally:
        timer.cancel()


def _error_text(exc: urllib.error.HTTPError, limit: int = 2000) -> str:
    try:
        raw = exc.read()[:limit].decode(errors="replace")
    except Exception:  # noqa: BLE001 - the status code alone still says enough
        return exc.reason or ""
    try:
        return str(json.loads(raw).get("error", raw))
    except (json.JSONDecodeError, AttributeError):
        return raw


def split_evenly(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges cutting ``count`` items into at most ``parts`` contiguous, non-empty
    pieces whose sizes differ by at most one (sizes ceil/floor of count / parts)."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for k in range(parts):
        stop = start + base + (1 if k < extra else 0)
        if stop > start:
            ranges.append((start, stop))
        start = stop
    return ranges


class RequestThreads:
    """Runs client requests each in its own daemon thread and hands back a Future.

    Not a ThreadPoolExecutor: Python joins an executor's threads at exit, so one request blocked
    on a frozen replica (up to its HTTP timeout) kept a failed controller alive for that long
    after its error; a daemon thread ends with the process. Requests are few (one per replica and
    call), so a thread each costs nothing."""

    def __init__(self, name: str):
        self.name = name

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the caller's future.result() raises it
                future.set_exception(exc)

        threading.Thread(target=run, name=self.name, daemon=True).start()
        return future


#: Default of DAPO_REPLICA_LIVENESS_S: a replica with a request outstanding whose /healthz has not
#: answered for this long is taken out of rotation (a frozen process: alive for Kubernetes and the
#: launcher, silent for its peers), and the request goes to another replica.
REPLICA_LIVENESS_S = 5.0


class ReplicaPool:
    """The replicas of one role, with the order to try them in and the failures seen.

    A replica that failed recently goes to the back of every candidate list (it is still tried
    when nothing else is left: it may have been a blip). While a request is outstanding, the pool
    watches the replica's GET /healthz (``liveness_s``): the services answer it from their event
    loop while the work runs in an executor, so a replica that stops answering it is frozen or
    gone, not busy. It is taken out of rotation at once and the request is re-dispatched (chunks
    are seeded by their content, so another replica's answer is the same). A replica out of
    rotation rejoins when its /healthz answers again (checked at most every ``liveness_s``)."""

    def __init__(self, urls: Sequence[str], role: str, *, liveness_s: float | None = REPLICA_LIVENESS_S):
        self.urls = list(urls)
        self.role = role
        self.liveness_s = liveness_s
        self._failed_at: dict[str, float] = {}
        self._out: dict[str, float] = {}  # out of rotation (liveness): url -> when last probed
        self._lock = threading.Lock()

    def candidates(self, preferred: int) -> list[str]:
        """Every URL, starting at ``preferred`` (round robin), recently failed ones last."""
        self._probe_out_of_rotation()
        ring = [self.urls[(preferred + k) % len(self.urls)] for k in range(len(self.urls))]
        with self._lock:
            return sorted(ring, key=lambda u: self._failed_at.get(u, 0.0))

    def mark_failed(self, url: str) -> None:
        with self._lock:
            self._failed_at[url] = time.monotonic()

    def mark_ok(self, url: str) -> None:
        with self._lock:
            self._failed_at.pop(url, None)
            self._out.pop(url, None)

    def out_of_rotation(self) -> list[str]:
        with self._lock:
            return sorted(self._out)

    def call(self, what: str, preferred: int, attempt: Callable[[str], Any], max_retries: int) -> Any:
        """Run ``attempt(url)`` on the preferred replica; on a RetryableError (a stalled replica
        included) on the next one, at most ``max_retries`` more times. Raises ServiceError naming
        every URL tried and why."""
        tried: list[str] = []
        urls = self.candidates(preferred)[: max_retries + 1]
        for k, url in enumerate(urls):
            try:
                # watched only while another replica is left to re-dispatch to: the last one is
                # waited for up to the request's own timeout (a slow answer beats no answer)
                result = self._watched(url, attempt) if k + 1 < len(urls) else attempt(url)
            except RetryableError as exc:
                self.mark_failed(url)
                tried.append(str(exc))
                log.warning("%s replica %s failed (%s); %s", self.role, url, exc,
                            "retrying on another replica" if len(tried) <= max_retries else "giving up")
                continue
            self.mark_ok(url)
            return result
        raise ServiceError(f"{what} failed on {len(tried)} {self.role} replica(s) "
                           f"(max retries {max_retries}): " + "; ".join(tried)
                           + f". Check those {self.role} pods / processes (logs, OOM kills).")

    def _watched(self, url: str, attempt: Callable[[str], Any]) -> Any:
        """``attempt(url)`` in a worker thread while this thread probes the replica's /healthz; a
        replica silent for ``liveness_s`` raises RetryableError (the worker thread is left to its
        own request timeout: urllib cannot be interrupted from outside)."""
        if self.liveness_s is None:
            return attempt(url)
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                outcome["value"] = attempt(url)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name=f"{self.role}-request", daemon=True).start()
        # a probe every `interval` (a silent one takes that long itself): out after liveness_s
        interval = max(0.2, self.liveness_s / 3)
        last_answer = time.monotonic()
        next_probe = last_answer + interval
        while not done.wait(max(0.0, next_probe - time.monotonic())):
            probe_at = time.monotonic()
            next_probe = probe_at + interval
            if self._answers(url, timeout_s=interval):
                last_answer = probe_at
            elif time.monotonic() - last_answer >= self.liveness_s - 0.05:
                silent = time.monotonic() - last_answer
                with self._lock:
                    self._out[url] = time.monotonic()
                log.warning("%s replica %s taken out of rotation: a request is outstanding and its /healthz has not "
                            "answered for %.1f s (frozen or unreachable); re-dispatching", self.role, url, silent)
                raise RetryableError(f"{url} stopped answering (/healthz silent for {silent:.1f} s with a request "
                                     f"outstanding; DAPO_REPLICA_LIVENESS_S={self.liveness_s:g})")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    @staticmethod
    def _answers(url: str, timeout_s: float) -> bool:
        try:
            get_json(url + "/healthz", timeout_s=timeout_s)
            return True
        except ServiceError:
            return False

    def _probe_out_of_rotation(self) -> None:
        """Put a replica taken out of rotation back once its /healthz answers (a thawed or
        replaced process); each is probed at most once per ``liveness_s``."""
        now = time.monotonic()
        with self._lock:
            due = [u for u, probed in self._out.items() if now - probed >= (self.liveness_s or 0.0)]
            for url in due:
                self._out[url] = now
        for url in due:
            if self._answers(url, timeout_s=min(1.0, self.liveness_s or 1.0)):
                log.info("%s replica %s answers again: back in rotation", self.role, url)
                self.mark_ok(url)

    def wait_ready(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Block until every replica answers GET /healthz, at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.urls)
        last_error: dict[str, str] = {}
        while pending:
            for url in list(pending):
                try:
                    get_json(url + "/healthz", timeout_s=5.0)
                    pending.remove(url)
                except ServiceError as exc:
                    last_error[url] = str(exc)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.role} replica(s) not ready after {timeout_s:g} s: "
                                   + "; ".join(f"{u} ({last_error.get(u, '?')})" for u in pending)
                                   + ". Check that they are running and their logs (model loading can take a while: "
                                     "raise DAPO_SERVICE_WAIT_S).")
            time.sleep(poll_s)


# --------------------------------------------------------------------------- hosting aiohttp apps


@dataclass
class AppThread:
    """An aiohttp application served on its own event-loop thread (``port=0`` picks a free port;
    read ``.port`` after ``start()``)."""

    make_app: Callable[[], Any]
    host: str = "127.0.0.1"
    port: int = 0

    def start(self) -> "AppThread":
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dapo-http", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.runner = self.loop.run_until_complete(_start_app(self.make_app(), self.host, self.port))
            self.port = _bound_port(self.runner)
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if getattr(self, "loop", None) is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


async def _start_app(app, host: str, port: int):
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner


def _bound_port(runner) -> int:
    for server in runner.sites:
        sockets = getattr(getattr(server, "_server", None), "sockets", None) or []
        for sock in sockets:
            return int(sock.getsockname()[1])
    raise RuntimeError("the HTTP server bound no socket")


def serve_forever(make_app: Callable[[], Any], host: str, port: int, on_stop: Callable[[], None] | None = None) -> int:
    """Serve an aiohttp app in this thread until SIGTERM / SIGINT (what the pods and the local
    launcher send); returns 0."""

    async def main() -> None:
        runner = await _start_app(make_app(), host, port)
        log.info("serving on http://%s:%d", host, _bound_port(runner))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        if on_stop is not None:
            on_stop()
    return 0
