"""Configuration, statistics and the error of the weight-sync group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dapo.errors import DapoError

ALIGN = 64  # byte alignment of every tensor inside a bucket (any dtype view is legal)

class WeightSyncError(DapoError, RuntimeError):
    """A weight sync failed; the message names the peer (rank, host, address) and the fix."""


@dataclass
class WeightSyncConfig:
    """Where and how the weight-sync group meets.

    ``host``/``port``: address of the sender's TCP store (learner rank 0), the same on every
    rank. ``world_size``: 1 sender + number of rollout workers. ``rank``: 0 for the sender,
    1..world_size-1 for receivers. ``bucket_bytes``: size of one packed bucket (the sender
    keeps two such buffers). ``timeout_s``: bound on every wait (rendezvous, each collective).
    """

    host: str
    port: int
    world_size: int
    rank: int
    backend: str = "auto"
    bucket_bytes: int = 256 << 20
    timeout_s: float = 120.0
    verify_checksums: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise ValueError(
                f"WeightSyncConfig.world_size={self.world_size}: needs the sender plus at least "
                "one rollout worker (world_size = 1 + rollout replicas)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"WeightSyncConfig.rank={self.rank} is outside 0..{self.world_size - 1}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(
                f"WeightSyncConfig.backend={self.backend!r}: use 'auto', 'gloo' or 'nccl'")
        if self.bucket_bytes < ALIGN:
            raise ValueError(
                f"WeightSyncConfig.bucket_bytes={self.bucket_bytes}: must be >= {ALIGN}")
        if not self.timeout_s > 0:
            raise ValueError(f"WeightSyncConfig.timeout_s={self.timeout_s}: must be > 0")
        if not 0 < self.port < 65536:
            raise ValueError(f"WeightSyncConfig.port={self.port}: must be in 1..65535")


@dataclass
class SyncStats:
    """What one ``send`` moved: ``bytes`` of tensor data in ``buckets`` in ``seconds``."""

    version: int
    bytes: int
    seconds: float
    buckets: int
    tensors: int

    @property
    def gb_per_s(self) -> float:
        """Throughput in GB/s (10^9 bytes), tensor bytes / wall seconds incl. acknowledgement."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

def resolve_backend(backend: str) -> str:
    """'auto' -> 'nccl' when CUDA is available, else 'gloo'; explicit names pass through."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend
