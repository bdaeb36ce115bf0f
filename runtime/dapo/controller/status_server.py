"""Learner-0's GET /status (the operator polls it; dapo.contracts.LearnerStatus), GET /healthz and
GET /metrics.

GET /metrics is the Prometheus text format of the training: every numeric metric of the latest
metrics.jsonl records as a gauge named ``dapo_`` + the verl name with ``/`` and other symbols made
``_`` (``critic/score/mean`` -> ``dapo_critic_score_mean``, ``val/acc/mean`` ->
``dapo_val_acc_mean``), plus ``dapo_step``, ``dapo_total_steps``, ``dapo_weight_version``,
``dapo_last_checkpoint_step`` and ``dapo_training_state{state}``; every series carries the
server's constant labels (``run``). The chart's Grafana dashboard reads these.

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from dapo.contracts import EnvVar, LearnerStatus

log = logging.getLogger("dapo.controller.status_server")

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              EnvVar.REWARD_REMOTE_HEADERS)
_SECRET_PAIR = re.compile(
    r"(?i)((?:aws_)?(?:secret_access_key|access_key_id|session_token|password|passwd|token|api_key|secret)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',;&]+)")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)([^@\s/]+)(@)")


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


def prometheus_name(key: str) -> str:
    """``critic/score/mean`` -> ``dapo_critic_score_mean``; camelCase status keys snake_cased."""
    key = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key) if "/" not in key else key
    return "dapo_" + re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_]", "_", key)).strip("_").lower()


def placeholder_status(state: str, message: str = "", total_steps: int = 0, step: int = 0,
                       weight_version: int = 0) -> dict:
    """A /status document before a Trainer exists (or after it could not be built)."""
    return LearnerStatus(state=state, step=step, total_steps=total_steps, weight_version=weight_version,
                         message=message).document()


class StatusServer:
    """Serves ``source()`` at GET /status and liveness at GET /healthz on ``host:port`` (port 0:
    a free one; read ``.port``). ``set_source`` / ``set_override`` switch what /status shows."""

    def __init__(self, host: str = "0.0.0.0", port: int = 8000, labels: dict[str, str] | None = None):
        self._source: Callable[[], dict] = lambda: placeholder_status("starting", "loading the model and data")
        self._latest: Callable[[], dict] = dict
        self.labels = dict(labels or {})
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
                elif path == "/metrics":
                    try:
                        body = server.prometheus_text()
                    except Exception as exc:  # noqa: BLE001
                        self._answer(500, {"error": redact(f"{type(exc).__name__}: {exc}")})
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self._answer(404, {"error": f"no route {path}; use /status, /metrics or /healthz"})

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

    def set_source(self, source: Callable[[], dict], latest: Callable[[], dict] | None = None) -> None:
        """``source``: the /status document; ``latest``: the latest value of every metric (verl
        names; ``MetricsWriter.latest_values``) for /metrics."""
        with self._lock:
            self._source, self._override = source, None
            if latest is not None:
                self._latest = latest

    def set_override(self, document: dict) -> None:
        with self._lock:
            self._override = document

    def document(self) -> dict:
        with self._lock:
            doc = dict(self._override) if self._override is not None else self._source()
        return redact(doc)

    def prometheus_text(self) -> bytes:
        """GET /metrics (see the module docstring)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import GaugeMetricFamily

        doc = self.document()
        with self._lock:
            latest = dict(self._latest())
        names = sorted(self.labels)
        values = [self.labels[k] for k in names]

        def gauge(name: str, help_text: str, value: float, extra: dict[str, str] | None = None):
            keys = names + sorted(extra or {})
            family = GaugeMetricFamily(name, help_text, labels=keys)
            family.add_metric(values + [(extra or {})[k] for k in sorted(extra or {})], value)
            return family

        class Training:
            def collect(self):
                for key in ("step", "totalSteps", "weightVersion"):
                    if isinstance(doc.get(key), (int, float)):
                        yield gauge(prometheus_name(key), f"/status {key}", float(doc[key]))
                checkpoint = doc.get("lastCheckpoint") or {}
                if isinstance(checkpoint.get("step"), int):
                    yield gauge("dapo_last_checkpoint_step", "step of the last committed checkpoint",
                                float(checkpoint["step"]))
                state = doc.get("state")
                yield gauge("dapo_training_state", "1 for the learner's current state", 1.0, {"state": str(state)})
                seen = {prometheus_name(k) for k in ("step", "totalSteps", "weightVersion")}
                for key, value in sorted(latest.items()):
                    name = prometheus_name(key)
                    if name in seen or isinstance(value, bool) or not isinstance(value, (int, float)):
                        continue
                    seen.add(name)
                    yield gauge(name, f"metrics.jsonl {key} (latest value)", float(value))

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Training())
        return generate_latest(registry)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
