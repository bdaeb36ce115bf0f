"""Learner -> rollout weight broadcast (step 6 of a training step; docs/architecture.md).

One process group holds learner rank 0 (the sender, rank 0 here) and every rollout worker
(ranks 1..M). It is built from its own TCP-store rendezvous at ``host:port`` (the store is
served by the sender), so it neither needs nor touches the learner's default process group.
Backend: NCCL when the tensors live on a GPU, gloo on CPU (``backend="auto"`` picks by
``torch.cuda.is_available()``).

Wire protocol of one sync, every step a collective over the whole group:

1. per bucket: a fixed header ``int64[4] = [MAGIC, version, kind, manifest_len]``, then the
   bucket manifest as JSON bytes (``index``, ``nbytes``, ``direct`` and per tensor
   ``[name, dtype, shape, offset, nbytes, crc32 | null]``), then the bucket's bytes;
2. an end header whose manifest holds the totals (buckets, tensors, bytes) the receiver checks;
3. an acknowledgement: an all-gather of ``int64[3] = [status, version, rank]``; a receiver
   that failed stores its error text under ``err/<version>/<rank>`` first, so the sender
   raises naming that rank and why.

Each bucket's manifest goes before its bytes (instead of one manifest for the whole model)
so a generator that gathers parameters one at a time can feed ``send`` with one bucket of
memory. Tensors are packed at 64-byte aligned offsets into persistent byte buffers that are
reused across syncs; two buffers alternate so packing bucket k+1 overlaps the broadcast of
bucket k (and on the receiver, ``load_fn`` on bucket k overlaps receiving bucket k+1).
A tensor larger than a bucket is sent on its own straight from its (contiguous) storage.

Checksums (``verify_checksums=True`` on the sender; a receiver verifies whenever they are
present): CRC-32 (zlib) of each tensor's packed bytes, computed on the sender after packing
and on the receiver after receiving: it catches any corruption in transport, exactly.

Every wait is bounded by ``timeout_s``. A failed collective raises ``WeightSyncError``
naming the peers: receivers run a heartbeat counter in the store, and the sender reports
which ranks stopped beating (rank, host, address, pid) and how far each got.
"""

from dapo.weightsync.config import (
    SyncStats,
    WeightSyncConfig,
    WeightSyncError,
    resolve_backend,
)
from dapo.weightsync.receiver import WeightReceiver, load_into_module, state_checksum
from dapo.weightsync.sender import WeightSender

__all__ = [
    "SyncStats",
    "WeightReceiver",
    "WeightSender",
    "WeightSyncConfig",
    "WeightSyncError",
    "load_into_module",
    "resolve_backend",
    "state_checksum",
]
