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
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from dapo.errors import DapoError

log = logging.getLogger("dapo.services")


class ServiceError(DapoError, RuntimeError):
    """A service request failed for good; the message names the URL(s) and why."""


class RetryableError(ServiceError):
    """The replica failed in a way another replica may not (connection, 5xx, timeout, stale weights)."""


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

    Raises RetryableError for connection failures, timeouts and 5xx answers, ServiceError for
    4xx answers (the request itself is wrong: another replica would refuse it too)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={**(headers or {}), "Content-Type": "application/json"})
    return _send(request, url, timeout_s)


def get_json(url: str, timeout_s: float) -> Any:
    return _send(urllib.request.Request(url, method="GET"), url, timeout_s)


def _send(request: urllib.request.Request, url: str, timeout_s: float) -> Any:
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = _error_text(exc)
        error = RetryableError if exc.code >= 500 else ServiceError
        raise error(f"{url} answered HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RetryableError(f"{url} did not answer: {reason}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RetryableError(f"{url} answered with invalid JSON ({exc})") from None
    except http.client.HTTPException as exc:  # e.g. a peer that closes mid-answer or speaks no HTTP
        raise RetryableError(f"{url} broke the HTTP exchange ({type(exc).__name__}: {exc})") from None


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


class ReplicaPool:
    """The replicas of one role, with the order to try them in and the failures seen.

    A replica that failed recently goes to the back of every candidate list (it is still tried
    when nothing else is left: it may have been a blip)."""

    def __init__(self, urls: Sequence[str], role: str):
        self.urls = list(urls)
        self.role = role
        self._failed_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def candidates(self, preferred: int) -> list[str]:
        """Every URL, starting at ``preferred`` (round robin), recently failed ones last."""
        ring = [self.urls[(preferred + k) % len(self.urls)] for k in range(len(self.urls))]
        with self._lock:
            return sorted(ring, key=lambda u: self._failed_at.get(u, 0.0))

    def mark_failed(self, url: str) -> None:
        with self._lock:
            self._failed_at[url] = time.monotonic()

    def mark_ok(self, url: str) -> None:
        with self._lock:
            self._failed_at.pop(url, None)

    def call(self, what: str, preferred: int, attempt: Callable[[str], Any], max_retries: int) -> Any:
        """Run ``attempt(url)`` on the preferred replica; on a RetryableError on the next one, at
        most ``max_retries`` more times. Raises ServiceError naming every URL tried and why."""
        tried: list[str] = []
        for url in self.candidates(preferred)[: max_retries + 1]:
            try:
                result = attempt(url)
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
                                   + f". Check that they are running and their logs (model loading can take a while: "
                                     f"raise DAPO_SERVICE_WAIT_S).")
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
