"""Helpers of the weight-sync tests (tests/test_weight_sync.py, tests/test_weight_sync_local.py):
a free loopback port and the WeightSyncConfig of one rank of a 3-rank gloo group on it."""

from __future__ import annotations

import socket

from dapo.weightsync import WeightSyncConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sync_config(port: int, rank: int, **overrides) -> WeightSyncConfig:
    fields = dict(host="127.0.0.1", port=port, world_size=3, rank=rank, backend="gloo",
                  timeout_s=10.0)
    fields.update(overrides)
    return WeightSyncConfig(**fields)
