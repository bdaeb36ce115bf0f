"""Learner -> rollout weight broadcast (DESIGN.md step 6).

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

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist

__all__ = [
    "WeightSyncConfig",
    "WeightSyncError",
    "SyncStats",
    "WeightSender",
    "WeightReceiver",
    "load_into_module",
    "state_checksum",
]

MAGIC = 0x44415057  # "DAPW": guards against a peer that speaks another protocol
_KIND_BUCKET = 1
_KIND_END = 2
_ALIGN = 64  # byte alignment of every tensor inside a bucket (any dtype view is legal)
_STORE_PREFIX = "dapo-weight-sync"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class WeightSyncError(RuntimeError):
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
        if self.bucket_bytes < _ALIGN:
            raise ValueError(
                f"WeightSyncConfig.bucket_bytes={self.bucket_bytes}: must be >= {_ALIGN}")
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


# ----------------------------------------------------------------------------- pure helpers

def _align(offset: int, alignment: int = _ALIGN) -> int:
    """Smallest multiple of ``alignment`` that is >= ``offset``."""
    return (offset + alignment - 1) // alignment * alignment


def resolve_backend(backend: str) -> str:
    """'auto' -> 'nccl' when CUDA is available, else 'gloo'; explicit names pass through."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def _dtype_from_name(name: str) -> torch.dtype:
    """Inverse of ``str(dtype)`` ('torch.bfloat16' -> torch.bfloat16)."""
    attr = name.removeprefix("torch.")
    dtype = getattr(torch, attr, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"manifest names unknown dtype {name!r}")
    return dtype


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a contiguous tensor: prod(shape) * itemsize."""
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * torch.empty((), dtype=dtype).element_size()


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of a contiguous tensor's bytes."""
    return tensor.reshape(-1).view(torch.uint8)


def _crc32(byte_tensor: torch.Tensor) -> int:
    """CRC-32 (zlib) of a uint8 tensor's bytes; copies to host memory when on a GPU."""
    host = byte_tensor.detach().cpu().contiguous()
    return zlib.crc32(memoryview(host.numpy())) & 0xFFFFFFFF


def _first_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of an exception's text (c10d errors append long C++ traces)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit]


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _heartbeat_interval(timeout_s: float) -> float:
    """Beat often enough that a dead peer is spotted well inside one timeout."""
    return min(2.0, max(0.2, timeout_s / 20.0))


def _self_address() -> dict:
    """Host name, best-effort IP and pid of this process, for error messages."""
    host = socket.gethostname()
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        ip = "?"
    return {"host": host, "ip": ip, "pid": os.getpid()}


# ----------------------------------------------------------------------------- the group

class _Group:
    """Rendezvous, process group, heartbeats and peer naming shared by sender and receiver."""

    def __init__(self, config: WeightSyncConfig):
        self.config = config
        self.rank = config.rank
        self.world_size = config.world_size
        self.timeout = _timedelta(config.timeout_s)
        self.backend = resolve_backend(config.backend)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if self.backend == "nccl" else torch.device("cpu"))
        self.roster: dict[int, dict] = {}
        self.broken: str | None = None
        self._stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.store = self._connect_store()
        self._rendezvous()
        self.pg = self._make_process_group()
        if self.rank != 0:
            self._start_heartbeat()

    # -- rendezvous
    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def _connect_store(self) -> dist.Store:
        cfg = self.config
        try:
            raw = dist.TCPStore(cfg.host, cfg.port, None, self.rank == 0,
                                timeout=self.timeout, wait_for_workers=False)
        except Exception as exc:  # c10d raises DistNetworkError / DistStoreError / RuntimeError
            if self.rank == 0:
                raise WeightSyncError(
                    f"weight-sync sender (rank 0) could not serve its rendezvous store on port "
                    f"{cfg.port}: {_first_line(exc)}. Pick a free port for the weight-sync "
                    "group (it must differ from the learner's MASTER_PORT).") from exc
            raise WeightSyncError(
                f"weight-sync rank {self.rank} could not reach the sender (learner rank 0) at "
                f"{self._where()} within {cfg.timeout_s:g} s: {_first_line(exc)}. Check that "
                "learner rank 0 is running and that host/port are its weight-sync address.") from exc
        return dist.PrefixStore(_STORE_PREFIX, raw)

    def _rendezvous(self) -> None:
        me = _self_address()
        self.roster[self.rank] = me
        self.store.set(f"peer/{self.rank}", json.dumps(me))
        if self.rank == 0:
            self.store.set("meta", json.dumps({"backend": self.backend,
                                               "world_size": self.world_size}))
            deadline = time.monotonic() + self.config.timeout_s
            for rank in range(1, self.world_size):
                left = deadline - time.monotonic()
                try:
                    self.store.wait([f"peer/{rank}"], _timedelta(max(left, 0.01)))
                except Exception as exc:
                    missing = [r for r in range(rank, self.world_size)
                               if not self.store.check([f"peer/{r}"])]
                    raise WeightSyncError(
                        f"weight-sync sender at {self._where()}: rank(s) {missing} did not join "
                        f"within {self.config.timeout_s:g} s ({_first_line(exc)}). Check that "
                        f"every rollout worker is up and configured with world_size="
                        f"{self.world_size} and this host/port.") from exc
                self.roster[rank] = json.loads(self.store.get(f"peer/{rank}"))
        else:
            try:
                meta = json.loads(self.store.get("meta"))
                self.roster[0] = json.loads(self.store.get("peer/0"))
            except Exception as exc:
                raise WeightSyncError(
                    f"weight-sync rank {self.rank}: the sender at {self._where()} did not publish "
                    f"its group settings within {self.config.timeout_s:g} s: "
                    f"{_first_line(exc)}") from exc
            if meta["world_size"] != self.world_size or meta["backend"] != self.backend:
                raise WeightSyncError(
                    f"weight-sync rank {self.rank}: sender at {self._where()} uses "
                    f"world_size={meta['world_size']} backend={meta['backend']}, this rank "
                    f"world_size={self.world_size} backend={self.backend}; give every rank the "
                    "same world_size and backend")

    def _make_process_group(self):
        pg_store = dist.PrefixStore("pg", self.store)
        try:
            if self.backend == "gloo":
                opts = dist.ProcessGroupGloo._Options()
                opts._timeout = self.timeout
                opts._devices = [self._gloo_device()]
                return dist.ProcessGroupGloo(pg_store, self.rank, self.world_size, opts)
            if not hasattr(dist, "ProcessGroupNCCL"):
                raise WeightSyncError("backend 'nccl' needs a CUDA build of torch; use 'gloo'")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            return dist.ProcessGroupNCCL(pg_store, self.rank, self.world_size, opts)
        except WeightSyncError:
            raise
        except Exception as exc:
            raise WeightSyncError(
                f"weight-sync rank {self.rank}: creating the {self.backend} group via "
                f"{self._where()} failed: {_first_line(exc)}. {self.peers_text()}") from exc

    def _gloo_device(self):
        """Bind gloo to GLOO_SOCKET_IFNAME if set, to loopback for a loopback group."""
        iface = os.environ.get("GLOO_SOCKET_IFNAME")
        if iface:
            return dist.ProcessGroupGloo.create_device(interface=iface.split(",")[0])
        if self.config.host in _LOOPBACK_HOSTS:
            return dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
        return dist.ProcessGroupGloo.create_default_device()

    # -- liveness and naming
    def _start_heartbeat(self) -> None:
        interval = _heartbeat_interval(self.config.timeout_s)
        key = f"alive/{self.rank}"

        def beat() -> None:
            while not self._stop.is_set():
                try:
                    self.store.add(key, 1)
                except Exception:  # store gone (sender died): receive() reports that
                    return
                self._stop.wait(interval)

        self._beat_thread = threading.Thread(target=beat, name="weight-sync-heartbeat",
                                             daemon=True)
        self._beat_thread.start()

    def describe(self, rank: int) -> str:
        """'rank 2 (host rollout-1, ip 10.0.0.5, pid 77)'."""
        info = self.roster.get(rank, {})
        text = (f"rank {rank} (host {info.get('host', '?')}, ip {info.get('ip', '?')}, "
                f"pid {info.get('pid', '?')}")
        if rank == 0:
            text += f", store {self._where()}"
        return text + ")"

    def peers_text(self) -> str:
        return "Group: " + "; ".join(self.describe(r) for r in sorted(self.roster)) + "."

    def set_progress(self, text: str) -> None:
        try:
            self.store.set(f"progress/{self.rank}", text)
        except Exception:
            pass  # diagnostics only; a dead store is reported by the collective itself

    def diagnose(self, version: int | None) -> str:
        """Name the peers that stopped beating, their progress and any error they posted."""
        if self.rank != 0:
            return self._diagnose_from_receiver()
        receivers = range(1, self.world_size)
        wait_s = 3 * _heartbeat_interval(self.config.timeout_s)
        try:
            self.store.set_timeout(_timedelta(2.0))
            first = {r: self.store.add(f"alive/{r}", 0) for r in receivers}
            time.sleep(wait_s)
            second = {r: self.store.add(f"alive/{r}", 0) for r in receivers}
        except Exception as exc:
            return f"(could not probe peers: {_first_line(exc)}) {self.peers_text()}"
        dead = [r for r in receivers if first[r] == second[r]]
        parts = []
        if dead:
            parts.append("Peer(s) that stopped heart-beating (process gone or frozen): "
                         + "; ".join(self.describe(r) for r in dead) + ".")
        else:
            parts.append(f"All receivers still heart-beat; one is slow or stuck "
                         f"(e.g. in load_fn) past timeout_s={self.config.timeout_s:g}.")
        for r in receivers:
            progress = self._try_get(f"progress/{r}")
            error = self._try_get(f"err/{version}/{r}") if version is not None else None
            line = f"{self.describe(r)}: last applied {progress or 'nothing'}"
            parts.append(line + (f", reported error: {error}" if error else "") + ";")
        return " ".join(parts)

    def _diagnose_from_receiver(self) -> str:
        try:
            self.store.set_timeout(_timedelta(2.0))
            self.store.check(["meta"])
            return f"The sender {self.describe(0)} still serves its store (it may have failed " \
                   "on another peer or be stuck)."
        except Exception:
            return f"The sender {self.describe(0)} is gone (its store does not answer)."
        finally:
            try:
                self.store.set_timeout(self.timeout)
            except Exception:
                pass

    def _try_get(self, key: str) -> str | None:
        try:
            if self.store.check([key]):
                return self.store.get(key).decode()
        except Exception:
            return None
        return None

    # -- collectives, every one bounded and failing loudly
    def broadcast(self, tensor: torch.Tensor):
        """Post a broadcast from rank 0; a failure to even post it breaks the group too."""
        try:
            return self.pg.broadcast(tensor, 0, self.timeout)
        except Exception as exc:
            self.broken = f"posting a broadcast: {_first_line(exc)}"
            raise WeightSyncError(
                f"weight sync on {self.describe(self.rank)} could not post a broadcast: "
                f"{_first_line(exc)}. {self.peers_text()}") from exc

    def wait(self, work, what: str, version: int | None) -> None:
        try:
            work.wait(self.timeout)
        except Exception as exc:
            self.broken = f"{what}: {_first_line(exc)}"
            raise WeightSyncError(
                f"weight sync of version {version} failed on {self.describe(self.rank)} during "
                f"{what} (timeout {self.config.timeout_s:g} s): {_first_line(exc)}. "
                f"{self.diagnose(version)} The group is unusable now: close() every side and "
                "rendezvous again.") from exc

    def allgather(self, tensor: torch.Tensor, what: str, version: int | None) -> list[torch.Tensor]:
        outputs = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self.wait(self.pg.allgather(outputs, tensor, self.timeout), what, version)
        return outputs

    def check_usable(self) -> None:
        if self.broken is not None:
            raise WeightSyncError(
                f"weight-sync group on {self.describe(self.rank)} is broken by an earlier "
                f"failure ({self.broken}); close() and create a new sender/receiver")

    def close(self) -> None:
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)
        try:
            self.pg.shutdown()
        except Exception:
            pass  # shutting down a group whose peer died may itself fail; nothing to save


def _header(version: int, kind: int, manifest: bytes, device: torch.device) -> torch.Tensor:
    return torch.tensor([MAGIC, version, kind, len(manifest)], dtype=torch.int64, device=device)


def _manifest_tensor(manifest: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(manifest), dtype=torch.uint8).to(device)


# ----------------------------------------------------------------------------- sender

class WeightSender:
    """Learner rank 0: packs named tensors into buckets and broadcasts them to all receivers.

    ``send`` consumes ``named_tensors`` in order and issues no collective other than this
    group's between the first header and the acknowledgement; each yielded tensor is copied
    into a bucket (or, if larger than a bucket, fully sent) before the iterator is advanced.
    So a ZeRO-3 generator that gathers one parameter at a time on the learner group is safe
    as long as the caller issues no other collectives meanwhile.
    """

    #: Test hook: called as ``hook(bucket_index, bucket_bytes)`` after checksums are taken and
    #: before the bucket is broadcast (used to inject corruption).
    _corrupt_bucket_hook: Callable[[int, torch.Tensor], None] | None = None

    def __init__(self, config: WeightSyncConfig):
        if config.rank != 0:
            raise ValueError(f"WeightSender needs rank 0, got rank {config.rank}")
        self.config = config
        self._group = _Group(config)
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._last_version: int | None = None

    @property
    def backend(self) -> str:
        return self._group.backend

    def _buffer(self, slot: int) -> torch.Tensor:
        """Persistent packing buffer ``slot`` (allocated on first use, reused afterwards)."""
        if self._buffers[slot] is None:
            self._buffers[slot] = torch.empty(self.config.bucket_bytes, dtype=torch.uint8,
                                              device=self._group.device)
        return self._buffers[slot]

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """Broadcast all tensors as weight ``version`` (strictly increasing); returns stats
        once every receiver acknowledged it applied the version; raises WeightSyncError
        naming the peer otherwise."""
        group = self._group
        group.check_usable()
        version = int(version)
        if self._last_version is not None and version <= self._last_version:
            raise ValueError(f"weight version {version} must be greater than the last sent "
                             f"version {self._last_version}")
        self._last_version = version
        start = time.perf_counter()
        state = _SendState(version)
        in_flight: list = [None, None]  # broadcast work per buffer slot
        slot, entries, fill = 0, [], 0

        def flush() -> None:
            nonlocal slot, entries, fill
            if entries:
                self._send_bucket(state, self._buffer(slot)[:fill], entries, False, in_flight, slot)
                slot, entries, fill = 1 - slot, [], 0

        seen: set[str] = set()
        aborted: BaseException | None = None
        with torch.no_grad():
            try:
                for name, tensor in named_tensors:
                    _check_item(name, tensor, seen)
                    nbytes = tensor.numel() * tensor.element_size()
                    if nbytes > self.config.bucket_bytes:
                        flush()
                        self._send_direct(state, name, tensor)
                        continue
                    offset = _align(fill)
                    if entries and offset + nbytes > self.config.bucket_bytes:
                        flush()
                        offset = 0
                    if not entries and in_flight[slot] is not None:
                        # the buffer still feeds the broadcast of two buckets ago
                        group.wait(in_flight[slot], f"bucket broadcast (slot {slot})", version)
                        in_flight[slot] = None
                    buf = self._buffer(slot)
                    buf[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
                    entries.append([name, str(tensor.dtype), list(tensor.shape), offset, nbytes,
                                    None])
                    fill = offset + nbytes
                flush()
            except WeightSyncError:
                raise
            except Exception as exc:  # the caller's iterator failed: tell receivers, then raise
                aborted = exc
            for s, work in enumerate(in_flight):
                if work is not None:
                    group.wait(work, f"bucket broadcast (slot {s})", version)
            end = {"buckets": state.buckets, "tensors": state.tensors, "bytes": state.bytes}
            if aborted is not None:
                end["aborted"] = f"{type(aborted).__name__}: {_first_line(aborted)}"
            self._send_manifest(version, _KIND_END, json.dumps(end).encode())
            if aborted is not None:
                try:
                    self._collect_acks(version)
                except WeightSyncError:
                    pass  # receivers report the abort; the caller's error is the one to raise
                raise aborted
            self._collect_acks(version)
        return SyncStats(version=version, bytes=state.bytes, seconds=time.perf_counter() - start,
                         buckets=state.buckets, tensors=state.tensors)

    def _send_manifest(self, version: int, kind: int, manifest: bytes) -> None:
        group = self._group
        group.wait(group.broadcast(_header(version, kind, manifest, group.device)),
                   "header broadcast", version)
        group.wait(group.broadcast(_manifest_tensor(manifest, group.device)),
                   "manifest broadcast", version)

    def _finish_manifest(self, state: "_SendState", data: torch.Tensor, entries: list,
                         direct: bool) -> bytes:
        if self.config.verify_checksums:
            for entry in entries:
                offset, nbytes = entry[3], entry[4]
                entry[5] = _crc32(data[offset:offset + nbytes])
        if self._corrupt_bucket_hook is not None:
            self._corrupt_bucket_hook(state.buckets, data)
        manifest = {"index": state.buckets, "nbytes": int(data.numel()), "direct": direct,
                    "tensors": entries}
        state.buckets += 1
        state.tensors += len(entries)
        state.bytes += sum(e[4] for e in entries)
        return json.dumps(manifest).encode()

    def _send_bucket(self, state, data, entries, direct, in_flight, slot) -> None:
        manifest = self._finish_manifest(state, data, entries, direct)
        self._send_manifest(state.version, _KIND_BUCKET, manifest)
        in_flight[slot] = self._group.broadcast(data)

    def _send_direct(self, state: "_SendState", name: str, tensor: torch.Tensor) -> None:
        """A tensor larger than a bucket goes alone, from its own storage, synchronously (the
        caller's generator may free it as soon as it is advanced)."""
        flat = tensor.detach().to(self._group.device).contiguous()
        data = _as_bytes(flat)
        entry = [name, str(tensor.dtype), list(tensor.shape), 0, data.numel(), None]
        manifest = self._finish_manifest(state, data, [entry], True)
        self._send_manifest(state.version, _KIND_BUCKET, manifest)
        self._group.wait(self._group.broadcast(data), f"direct broadcast of {name!r}",
                         state.version)

    def _collect_acks(self, version: int) -> None:
        group = self._group
        mine = torch.tensor([0, version, 0], dtype=torch.int64, device=group.device)
        acks = [a.cpu().tolist() for a in group.allgather(mine, "acknowledgement", version)]
        failed = [(rank, ack) for rank, ack in enumerate(acks)
                  if rank > 0 and (ack[0] != 0 or ack[1] != version or ack[2] != rank)]
        if failed:
            reasons = []
            for rank, ack in failed:
                error = group._try_get(f"err/{version}/{rank}") or f"acknowledged {ack}"
                reasons.append(f"{group.describe(rank)}: {error}")
            raise WeightSyncError(
                f"weight version {version} was not applied by every receiver: "
                + "; ".join(reasons) + ". Send again with a higher version.")

    def close(self) -> None:
        """Shut the group down and release the packing buffers."""
        self._buffers = [None, None]
        self._group.close()


@dataclass
class _SendState:
    version: int
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0


def _check_item(name, tensor, seen: set[str]) -> None:
    if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
        raise TypeError(f"send() expects (str, Tensor) pairs, got ({type(name).__name__}, "
                        f"{type(tensor).__name__})")
    if name in seen:
        raise ValueError(f"tensor name {name!r} is sent twice in one sync")
    seen.add(name)


# ----------------------------------------------------------------------------- receiver

class WeightReceiver:
    """A rollout worker: joins the group at construction; ``receive`` applies one sync."""

    def __init__(self, config: WeightSyncConfig):
        if config.rank == 0:
            raise ValueError("WeightReceiver needs rank >= 1 (rank 0 is the sender)")
        self.config = config
        self._group = _Group(config)
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._direct: dict[str, torch.Tensor] = {}
        #: last weight version applied completely; None before the first sync
        self.version: int | None = None

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        """Persistent receive buffer ``slot``, grown once to the sender's bucket size."""
        buf = self._buffers[slot]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, self.config.bucket_bytes if buf is None else nbytes),
                              dtype=torch.uint8, device=self._group.device)
            self._buffers[slot] = buf
        return buf

    def _direct_buffer(self, name: str, nbytes: int) -> torch.Tensor:
        """Persistent byte buffer for a tensor larger than a bucket (same names every sync),
        so a big embedding is not re-allocated (and page-faulted) on every sync. Sized by the
        broadcast itself; ``_unpack`` then checks the bytes against the tensor's entry."""
        buf = self._direct.get(name)
        if buf is None or buf.numel() != nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self._group.device)
            self._direct[name] = buf
        return buf

    def receive(self, load_fn: Callable[[list[tuple[str, torch.Tensor]]], None]) -> int:
        """Receive one sync: calls ``load_fn`` once per bucket with ``(name, tensor)`` views
        that are valid only during the call (copy them, e.g. ``param.copy_``); returns the new
        version. Call it when the controller has ordered a sync: the wait for the first header
        is bounded by ``timeout_s`` like every other wait."""
        group = self._group
        group.check_usable()
        sync = _ReceiveState()
        pending = None  # (manifest, work, data) of the bucket whose bytes are in flight
        buffered = 0
        while True:
            kind, version, manifest = self._receive_manifest(sync.version)
            sync.note_version(version, self.version, self._group.rank)
            if kind == _KIND_END:
                break
            nbytes = int(manifest["nbytes"])
            if manifest.get("direct"):
                data = self._direct_buffer(str(manifest["tensors"][0][0]), nbytes)
            else:
                data = self._buffer(buffered % 2, nbytes)[:nbytes]
                buffered += 1
            work = group.broadcast(data)
            if pending is not None:
                self._apply(sync, *pending, load_fn)
            pending = (manifest, work, data)
        if pending is not None:
            self._apply(sync, *pending, load_fn)
        sync.check_totals(manifest)
        self._acknowledge(sync)
        self.version = sync.version
        return sync.version

    def _receive_manifest(self, version: int | None) -> tuple[int, int, dict]:
        group = self._group
        header = torch.empty(4, dtype=torch.int64, device=group.device)
        group.wait(group.broadcast(header), "header broadcast", version)
        magic, version, kind, length = header.cpu().tolist()
        if magic != MAGIC or kind not in (_KIND_BUCKET, _KIND_END) or length <= 0:
            group.broken = f"bad header {[magic, version, kind, length]}"
            raise WeightSyncError(
                f"weight-sync {group.describe(group.rank)} got a malformed header "
                f"{[magic, version, kind, length]} from {group.describe(0)}; both sides must run "
                "the same dapo version")
        raw = torch.empty(length, dtype=torch.uint8, device=group.device)
        group.wait(group.broadcast(raw), "manifest broadcast", version)
        try:
            manifest = json.loads(bytes(raw.cpu().numpy()))
            if kind == _KIND_BUCKET and not (
                    isinstance(manifest["nbytes"], int) and manifest["nbytes"] >= 0
                    and isinstance(manifest["tensors"], list)
                    and (not manifest.get("direct") or len(manifest["tensors"]) == 1)):
                raise ValueError("bucket manifest fields out of range")
        except (ValueError, KeyError, TypeError) as exc:
            group.broken = "malformed manifest"
            raise WeightSyncError(
                f"weight-sync {group.describe(group.rank)} got a malformed manifest from "
                f"{group.describe(0)} ({type(exc).__name__}); both sides must run the same "
                "dapo version") from exc
        return kind, version, manifest

    def _apply(self, sync: "_ReceiveState", manifest: dict, work, data: torch.Tensor,
               load_fn) -> None:
        """Wait for a bucket's bytes, check them against its manifest, hand them to load_fn.
        After a first error the remaining buckets are still received (so the sender is not
        left hanging) but no longer applied."""
        group = self._group
        group.wait(work, f"bucket {manifest.get('index')} broadcast", sync.version)
        if sync.error is not None:
            return
        try:
            batch = _unpack(manifest, data, self.config.verify_checksums, group.describe(0))
            sync.tensors += len(batch)
            sync.bytes += sum(e[4] for e in manifest["tensors"])
            sync.buckets += 1
            load_fn(batch)
        except Exception as exc:
            sync.error = (f"bucket {manifest.get('index')}: {type(exc).__name__}: "
                          f"{_first_line(exc)}")
            sync.cause = exc
            return
        group.set_progress(f"version {sync.version} bucket {manifest.get('index')}")

    def _acknowledge(self, sync: "_ReceiveState") -> None:
        group = self._group
        status = 0 if sync.error is None else 1
        if sync.error is not None:
            group.store.set(f"err/{sync.version}/{group.rank}", sync.error)
        mine = torch.tensor([status, sync.version, group.rank], dtype=torch.int64,
                            device=group.device)
        group.allgather(mine, "acknowledgement", sync.version)
        if sync.error is not None:
            raise WeightSyncError(
                f"weight version {sync.version} was NOT applied on {group.describe(group.rank)} "
                f"(earlier buckets may have been; the model is mixed until the next good sync): "
                f"{sync.error}") from sync.cause

    def close(self) -> None:
        """Shut the group down and release the receive buffers."""
        self._buffers, self._direct = [None, None], {}
        self._group.close()


class _ReceiveState:
    """Running totals of one sync, checked against the sender's end manifest."""

    def __init__(self):
        self.version: int | None = None
        self.buckets = self.tensors = self.bytes = 0
        self.error: str | None = None
        self.cause: BaseException | None = None

    def note_version(self, version: int, applied: int | None, rank: int) -> None:
        if self.version is None:
            self.version = version
            if applied is not None and version <= applied and self.error is None:
                self.error = (f"version {version} is not newer than the applied version "
                              f"{applied} on rank {rank}")
        elif version != self.version and self.error is None:
            self.error = f"bucket headers changed version from {self.version} to {version}"

    def check_totals(self, end: dict) -> None:
        if self.error is not None:
            return
        if end.get("aborted"):
            self.error = f"the sender aborted this sync: {end['aborted']}"
            return
        got = {"buckets": self.buckets, "tensors": self.tensors, "bytes": self.bytes}
        want = {k: end.get(k) for k in got}
        if got != want:
            self.error = f"received {got} but the sender's end manifest says {want}"


def _unpack(manifest: dict, data: torch.Tensor, want_checksums: bool,
            sender: str) -> list[tuple[str, torch.Tensor]]:
    """Views of each tensor in a received bucket, validated against the manifest:
    offsets inside the bucket and non-overlapping, nbytes = prod(shape) * itemsize, and
    CRC-32 equal to the sender's when it sent checksums."""
    nbytes = int(manifest["nbytes"])
    if data.numel() != nbytes:
        raise WeightSyncError(f"bucket has {data.numel()} bytes, manifest says {nbytes}")
    batch, end_of_previous = [], 0
    for name, dtype_name, shape, offset, size, crc in manifest["tensors"]:
        dtype = _dtype_from_name(dtype_name)
        if size != _nbytes(shape, dtype):
            raise WeightSyncError(f"{name!r}: {size} bytes do not fit shape {shape} {dtype_name}")
        if offset < end_of_previous or offset + size > nbytes:
            raise WeightSyncError(f"{name!r}: bytes [{offset}, {offset + size}) overlap or leave "
                                  f"the {nbytes}-byte bucket")
        end_of_previous = offset + size
        piece = data[offset:offset + size]
        if crc is None and want_checksums:
            raise WeightSyncError(
                f"this receiver verifies checksums but {sender} sends none; set "
                "verify_checksums=True on the sender too")
        if crc is not None:
            got = _crc32(piece)
            if got != crc:
                raise WeightSyncError(
                    f"checksum mismatch for {name!r}: crc32 {got:#010x} received, {crc:#010x} "
                    f"sent by {sender}")
        batch.append((name, piece.view(dtype).view(shape)))
    return batch


# ----------------------------------------------------------------------------- helpers for callers

def load_into_module(module: torch.nn.Module) -> Callable[[list[tuple[str, torch.Tensor]]], None]:
    """A ``load_fn`` that copies received tensors into ``module``'s parameters and buffers by
    name (tied aliases included); casts dtype/device as ``Tensor.copy_`` does. Raises
    KeyError on an unknown name, ValueError on a shape mismatch."""
    targets: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    targets.update(module.named_buffers(remove_duplicate=False))

    def load(batch: list[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for name, tensor in batch:
                target = targets.get(name)
                if target is None:
                    sample = ", ".join(sorted(targets)[:3])
                    raise KeyError(f"received tensor {name!r} is no parameter or buffer of "
                                   f"{type(module).__name__} (names look like: {sample})")
                if target.shape != tensor.shape:
                    raise ValueError(f"received {name!r} with shape {tuple(tensor.shape)}, the "
                                     f"module has {tuple(target.shape)}")
                target.copy_(tensor)

    return load


def state_checksum(source: torch.nn.Module | Mapping[str, torch.Tensor]
                   | Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, sorted by name; a module
    contributes its ``state_dict()``. Equal digests <=> bit-identical named tensors."""
    if isinstance(source, torch.nn.Module):
        items = source.state_dict().items()
    elif isinstance(source, Mapping):
        items = source.items()
    else:
        items = source
    digest = hashlib.sha256()
    for name, tensor in sorted(items, key=lambda item: item[0]):
        host = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{host.dtype}|{tuple(host.shape)}|".encode())
        digest.update(memoryview(_as_bytes(host).numpy()))
    return digest.hexdigest()
