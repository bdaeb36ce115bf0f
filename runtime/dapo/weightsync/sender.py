"""Learner rank 0's side of a sync: pack named tensors into double-buffered buckets and broadcast them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from dapo.weightsync.config import SyncStats, WeightSyncConfig, WeightSyncError
from dapo.weightsync.group import Group, first_line
from dapo.weightsync.wire import (
    KIND_BUCKET,
    KIND_END,
    align,
    as_bytes,
    check_item,
    crc32,
    header_tensor,
    manifest_tensor,
)


class WeightSender:
    """Learner rank 0: packs named tensors into buckets and broadcasts them to all receivers.

    ``send`` consumes ``named_tensors`` in order and issues no collective other than this
    group's between the first header and the acknowledgement; each yielded tensor is copied
    into a bucket (or, if larger than a bucket, fully sent) before the iterator is advanced.
    So a ZeRO-3 generator that gathers one parameter at a time on the learner group is safe
    as long as the caller issues no other collectives meanwhile.
    """

    def __init__(self, config: WeightSyncConfig):
        if config.rank != 0:
            raise ValueError(f"WeightSender needs rank 0, got rank {config.rank}")
        self.config = config
        self._group = Group(config)
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
                    check_item(name, tensor, seen)
                    nbytes = tensor.numel() * tensor.element_size()
                    if nbytes > self.config.bucket_bytes:
                        flush()
                        self._send_direct(state, name, tensor)
                        continue
                    offset = align(fill)
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
                end["aborted"] = f"{type(aborted).__name__}: {first_line(aborted)}"
            self._send_manifest(version, KIND_END, json.dumps(end).encode())
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
        group.wait(group.broadcast(header_tensor(version, kind, manifest, group.device)),
                   "header broadcast", version)
        group.wait(group.broadcast(manifest_tensor(manifest, group.device)),
                   "manifest broadcast", version)

    def _finish_manifest(self, state: "_SendState", data: torch.Tensor, entries: list,
                         direct: bool) -> bytes:
        if self.config.verify_checksums:
            for entry in entries:
                offset, nbytes = entry[3], entry[4]
                entry[5] = crc32(data[offset:offset + nbytes])
        manifest = {"index": state.buckets, "nbytes": int(data.numel()), "direct": direct,
                    "tensors": entries}
        state.buckets += 1
        state.tensors += len(entries)
        state.bytes += sum(e[4] for e in entries)
        return json.dumps(manifest).encode()

    def _send_bucket(self, state, data, entries, direct, in_flight, slot) -> None:
        manifest = self._finish_manifest(state, data, entries, direct)
        self._send_manifest(state.version, KIND_BUCKET, manifest)
        in_flight[slot] = self._group.broadcast(data)

    def _send_direct(self, state: "_SendState", name: str, tensor: torch.Tensor) -> None:
        """A tensor larger than a bucket goes alone, from its own storage, synchronously (the
        caller's generator may free it as soon as it is advanced)."""
        flat = tensor.detach().to(self._group.device).contiguous()
        data = as_bytes(flat)
        entry = [name, str(tensor.dtype), list(tensor.shape), 0, data.numel(), None]
        manifest = self._finish_manifest(state, data, [entry], True)
        self._send_manifest(state.version, KIND_BUCKET, manifest)
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
