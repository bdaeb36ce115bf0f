"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's ThreadedMotoServer in tests).

Real sockets and real HTTP, no mocks of boto3: every request goes through ``fault(method, path,
index)`` first (``index`` counts requests from 0). It returns

    None                  forward the request to the upstream unchanged
    (status, code)        answer an S3-style XML error itself, e.g. (500, "InternalError"),
                          (503, "SlowDown"), (403, "AccessDenied")
    RESET                 read the request, then drop the connection with a TCP reset (no answer)

A fault function may also block (sleep, wait on an event) before returning: that holds the one
request it was called for, which is how a test catches a process in the middle of an upload.
Used by tests/test_storage.py and the fault-injection suite (tests/faults/).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

RESET = "reset"

Fault = Callable[[str, str, int], "tuple[int, str] | str | None"]
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class _DroppedConnection(Exception):
    """Raised inside a handler after it reset its connection on purpose."""


def _make_handler(proxy: "FaultProxy"):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _reset(self) -> None:
            # SO_LINGER with a zero timeout turns close() into a RST: the client sees
            # "connection reset by peer", as from a crashed load balancer
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            raise _DroppedConnection()

        def _error(self, status: int, code: str) -> None:
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by test proxy</Message></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            index = proxy._next_index()
            fault = proxy.fault(self.command, self.path, index) if proxy.fault else None
            if fault is not None:
                proxy._count_fault()
                if fault == RESET:
                    self._reset()
                self._error(*fault)
                return
            upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"expect"}}
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() in _HOP_BY_HOP or key.lower() == "content-length":
                        continue
                    self.send_header(key, value)
                # HEAD keeps the upstream's Content-Length (the object size) and sends no body
                length_header = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length_header or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # resets and clients that went away are expected
        pass


class FaultProxy:
    """``with FaultProxy(host, port, fault) as proxy: proxy.url`` -> http://127.0.0.1:PORT.

    ``requests_seen`` / ``faults_sent`` count requests; ``fault`` may be replaced while running."""

    def __init__(self, upstream_host: str, upstream_port: int, fault: Fault | None = None):
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.fault = fault
        self.requests_seen = 0
        self.faults_sent = 0
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _next_index(self) -> int:
        with self._lock:
            self.requests_seen += 1
            return self.requests_seen - 1

    def _count_fault(self) -> None:
        with self._lock:
            self.faults_sent += 1

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
