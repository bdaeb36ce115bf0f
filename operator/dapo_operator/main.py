"""`dapo-operator run`: kopf in standalone mode, Prometheus metrics, a liveness endpoint, JSON logs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
import prometheus_client

from .handlers import OperatorConfig, build_registry


def main(args: Any) -> int:
    """Run until interrupted. ``args.namespace`` empty means every namespace (cluster-wide)."""
    kopf.configure(log_format=kopf.LogFormat.JSON, verbose=False)
    logging.getLogger("dapo_operator").setLevel(logging.INFO)
    prometheus_client.start_http_server(int(args.metrics_port))
    registry, _ = build_registry(OperatorConfig())
    namespaces = list(getattr(args, "namespace", None) or [])
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,  # one replica, no peering objects (and no RBAC for them)
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=f"http://0.0.0.0:{int(args.health_port)}/healthz",
        )
    )
    return 0
