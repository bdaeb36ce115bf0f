"""Learner-0's GET /status (the operator polls it; CONTRACTS.md) and GET /healthz.

A stdlib threading HTTP server: it must answer while the controller thread is busy in a step,
and before the model has even loaded ("starting"). The document comes from a callable (normally
`Trainer.status`) and is scrubbed of secrets before it leaves the process: any value of a
credential environment variable (AWS keys, tokens) and ``key=value`` credential pairs are
replaced by ``***``, since a message can quote an exception that quotes a URL or a config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

log = logging.getLogger("dapo.services.status")

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "DAPO_REWARD_REMOTE_HEADERS")
_SECRET_PAIR = re.compile(
    r"(?i)((?:aws_)?(?:secret_access_key|access_key_id|session_token|password|passwd|token|api_key|secret)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',;&]+)")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)([^@\s/]+)(@)")


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """``value`` (str, list, dict, scalars) with every secret replaced by ``***``: the values of
    SECRET_ENV variables, ``KEY=VALUE`` credential pairs and passwords in URLs."""
    if secrets is None:
        secrets = [v for v in (os.environ.get(k) for k in SECRET_ENV) if v and len(v) >= 4]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        value = _SECRET_PAIR.sub(lambda m: m.group(1) + "***", value)
        return _URL_PASSWORD.sub(lambda m: m.group(1) + "***" + m.group(3), value)
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    return value


def placeholder_status(state: str, message: str = "", total_steps: int = 0, step: int = 0,
                       weight_version: int = 0) -> dict:
    """A /status document before a Trainer exists (or after it could not be built)."""
    return {"state": state, "step": step, "totalSteps": total_steps, "weightVersion": weight_version,
            "metrics": {"critic/score/mean": None, "train/acc/mean": None, "response_length/mean": None,
                        "val/acc/mean": None},
            "lastCheckpoint": None, "message": message, "updatedAt": now_rfc3339()}


class StatusServer:
    """Serves ``source()`` at GET /status and liveness at GET /healthz on ``host:port`` (port 0:
    a free one; read ``.port``). ``set_source`` / ``set_override`` switch what /status shows."""

    def __init__(self, host: str = "0.0.0.0", port: int = 8000):
        self._source: Callable[[], dict] = lambda: placeholder_status("starting", "loading the model and data")
        self._override: dict | None = None
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._answer(200, {"ok": True, "role": "learner"})
                elif path == "/status":
                    try:
                        self._answer(200, server.document())
                    except Exception as exc:  # noqa: BLE001 - never let a status bug kill the server
                        self._answer(500, {"error": redact(f"{type(exc).__name__}: {exc}")})
                else:
                    self._answer(404, {"error": f"no route {path}; use /status or /healthz"})

            def _answer(self, code: int, doc: dict) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # polled every few seconds: keep the log quiet
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="status-http", daemon=True)

    def start(self) -> "StatusServer":
        self._thread.start()
        log.info("serving /status and /healthz on port %d", self.port)
        return self

    def set_source(self, source: Callable[[], dict]) -> None:
        with self._lock:
            self._source, self._override = source, None

    def set_override(self, document: dict) -> None:
        with self._lock:
            self._override = document

    def document(self) -> dict:
        with self._lock:
            doc = dict(self._override) if self._override is not None else self._source()
        return redact(doc)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
