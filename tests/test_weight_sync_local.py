"""dapo.weightsync in the test process alone: configuration errors naming the field, the wire
format (unpacking checks the manifest), loading into a module and state checksums, and the
rendezvous timeouts when the other side never comes. Groups of real processes are
tests/test_weight_sync.py (marker processes)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from _weight_sync_kit import free_port, sync_config
from dapo.weightsync import (
    WeightReceiver,
    WeightSender,
    WeightSyncConfig,
    WeightSyncError,
    load_into_module,
    state_checksum,
)
from dapo.weightsync.wire import MAGIC
from dapo.weightsync.wire import unpack as _unpack


def test_receiver_without_sender_fails_rendezvous_with_clear_timeout():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(WeightSyncError, match=rf"could not reach the sender .* 127.0.0.1:{port}"):
        WeightReceiver(sync_config(port, 1, timeout_s=1.0))
    assert time.monotonic() - started < 10


@pytest.mark.integration  # the sender's rendezvous store listens in this process
def test_sender_names_receivers_that_never_join():
    port = free_port()
    with pytest.raises(WeightSyncError, match=r"rank\(s\) \[1, 2\] did not join"):
        WeightSender(sync_config(port, 0, timeout_s=1.0))


def test_config_rejects_bad_values_with_the_field_name():
    with pytest.raises(ValueError, match="world_size"):
        WeightSyncConfig("h", 1234, world_size=1, rank=0)
    with pytest.raises(ValueError, match="rank=3"):
        WeightSyncConfig("h", 1234, world_size=3, rank=3)
    with pytest.raises(ValueError, match="backend"):
        WeightSyncConfig("h", 1234, world_size=2, rank=0, backend="mpi")
    with pytest.raises(ValueError, match="WeightSender needs rank 0"):
        WeightSender(WeightSyncConfig("h", 1234, world_size=2, rank=1))


def _bucket(tensors: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """Pack by hand the way the sender does (64-byte aligned offsets)."""
    entries, chunks, offset = [], [], 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().reshape(-1).view(torch.uint8)
        pad = (-offset) % 64
        chunks.append(torch.zeros(pad, dtype=torch.uint8))
        offset += pad
        entries.append([name, str(tensor.dtype), list(tensor.shape), offset, raw.numel(), None])
        chunks.append(raw)
        offset += raw.numel()
    return {"index": 0, "nbytes": offset, "tensors": entries}, torch.cat(chunks)


def test_unpack_round_trips_dtypes_and_checks_the_manifest():
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.tensor(7, dtype=torch.int64),
               "c": torch.tensor([True, False]), "d": torch.randn(2, 2, dtype=torch.float64)}
    manifest, data = _bucket(tensors)
    unpacked = dict(_unpack(manifest, data, False, "rank 0"))
    assert state_checksum(unpacked) == state_checksum(tensors)

    bad = json.loads(json.dumps(manifest))
    bad["tensors"][0][4] += 2
    with pytest.raises(WeightSyncError, match="do not fit shape"):
        _unpack(bad, data, False, "rank 0")
    bad = json.loads(json.dumps(manifest))
    bad["tensors"][1][3] = 0
    with pytest.raises(WeightSyncError, match="overlap"):
        _unpack(bad, data, False, "rank 0")
    with pytest.raises(WeightSyncError, match="sends none"):
        _unpack(manifest, data, True, "rank 0")
    assert MAGIC == 0x44415057


def test_load_into_module_and_state_checksum():
    source, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    assert state_checksum(source) != state_checksum(target)
    load = load_into_module(target)
    load(list(source.state_dict().items()))
    assert state_checksum(source) == state_checksum(target)
    with pytest.raises(KeyError, match="'nope'"):
        load([("nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        load([("bias", torch.zeros(4))])
    flipped = dict(source.state_dict())
    flipped["bias"] = flipped["bias"].clone()
    flipped["bias"].view(torch.int32)[0] ^= 1  # one bit
    assert state_checksum(flipped) != state_checksum(source)
