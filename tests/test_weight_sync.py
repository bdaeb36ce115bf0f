"""dapo.weightsync over real gloo groups between separate processes on loopback.

The receivers are spawned processes (torch threads 1) driven by a command queue, so one set
of processes serves several groups; the sender runs in the test process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

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

SPAWN = mp.get_context("forkserver")
# children fork from one server that imported torch + transformers once (spawn re-imports per child)
SPAWN.set_forkserver_preload(["torch", "transformers.models.qwen2.modeling_qwen2", "dapo.weightsync"])
RESULT_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_qwen2(seed: int):
    """Qwen2 architecture, hidden 64, 2 layers, vocab 512 (~140k parameters, fp32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def sync_config(port: int, rank: int, **overrides) -> WeightSyncConfig:
    fields = dict(host="127.0.0.1", port=port, world_size=3, rank=rank, backend="gloo",
                  timeout_s=10.0)
    fields.update(overrides)
    return WeightSyncConfig(**fields)


# ----------------------------------------------------------------------------- child processes

def receiver_worker(rank: int, commands, results) -> None:
    """Runs commands from the test: join / receive / close / stop; reports every outcome."""
    torch.set_num_threads(1)
    model = tiny_qwen2(seed=100 + rank)
    receiver = None
    while True:
        command, argument = commands.get()
        try:
            if command == "join":
                receiver = WeightReceiver(sync_config(rank=rank, **argument))
                outcome = "joined"
            elif command == "receive":
                version = receiver.receive(load_into_module(model))
                outcome = {"version": version, "reported": receiver.version,
                           "checksum": state_checksum(model)}
            elif command == "receive_retained":
                kept = []
                version = receiver.receive(kept.extend, retain=True)
                outcome = {"version": version, "checksum": state_checksum(kept),
                           "addresses": sorted(tensor.data_ptr() for _, tensor in kept)}
            elif command == "checksum":
                outcome = state_checksum(model)
            elif command == "close":
                receiver.close()
                receiver, outcome = None, "closed"
            else:
                # interpreter teardown of torch + transformers takes seconds here; skip it
                results.put({"rank": rank, "ok": True, "value": "stopped"})
                results.close()
                results.join_thread()
                os._exit(0)
            results.put({"rank": rank, "ok": True, "value": outcome})
        except Exception as exc:  # the test asserts on the text
            results.put({"rank": rank, "ok": False, "value": f"{type(exc).__name__}: {exc}",
                         "version": receiver.version if receiver is not None else None})


def dying_receiver(rank: int, port: int, die_at_bucket: int | None, results) -> None:
    """Receives plain tensors; exits abruptly inside load_fn at bucket ``die_at_bucket``."""
    torch.set_num_threads(1)
    calls = 0

    def load(batch):
        nonlocal calls
        calls += 1
        if calls == die_at_bucket:
            os._exit(3)

    results.put({"rank": rank, "ok": True, "value": "started"})  # imports done
    try:
        receiver = WeightReceiver(sync_config(port, rank, timeout_s=5.0, bucket_bytes=4096))
        results.put({"rank": rank, "ok": True, "value": receiver.receive(load)})
    except Exception as exc:
        results.put({"rank": rank, "ok": False, "value": str(exc)})


# ----------------------------------------------------------------------------- fixtures

class Receivers:
    """Two receiver processes (ranks 1, 2) and their command/result queues."""

    def __init__(self):
        self.results = SPAWN.Queue()
        self.commands = {rank: SPAWN.Queue() for rank in (1, 2)}
        self.processes = [SPAWN.Process(target=receiver_worker,
                                        args=(rank, self.commands[rank], self.results),
                                        daemon=True) for rank in (1, 2)]
        for process in self.processes:
            process.start()

    def post(self, command: str, argument=None) -> None:
        for rank in (1, 2):
            self.commands[rank].put((command, argument))

    def collect(self) -> dict[int, dict]:
        got = {}
        while len(got) < 2:
            item = self.results.get(timeout=RESULT_TIMEOUT_S)
            got[item["rank"]] = item
        return got

    def join(self, port: int, **overrides) -> None:
        self.post("join", dict(port=port, **overrides))

    def stop(self) -> None:
        self.post("stop")
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module")
def receivers():
    torch.manual_seed(0)
    group = Receivers()
    yield group
    group.stop()


def perturb(model, scale: float = 0.01) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)


def open_group(receivers: Receivers, **overrides) -> WeightSender:
    port = free_port()
    receivers.join(port, **overrides)
    sender = WeightSender(sync_config(port, 0, **overrides))
    assert all(r["ok"] and r["value"] == "joined" for r in receivers.collect().values())
    return sender


def sync(sender: WeightSender, receivers: Receivers, model, version: int):
    receivers.post("receive")
    stats = sender.send(model.state_dict().items(), version)
    return stats, receivers.collect()


def close_group(sender: WeightSender, receivers: Receivers) -> None:
    receivers.post("close")
    sender.close()
    assert all(r["ok"] for r in receivers.collect().values())


# ----------------------------------------------------------------------------- end-to-end tests

# 4 KiB is smaller than most Qwen2 tensors here (embedding 128 KiB, MLP 32 KiB); 8 MiB holds all.
@pytest.mark.parametrize("bucket_bytes", [4 << 10, 64 << 10, 8 << 20])
def test_two_receivers_match_sender_over_two_versions(receivers, bucket_bytes):
    model = tiny_qwen2(seed=0)
    receivers.post("checksum")
    before = receivers.collect()
    assert all(r["value"] != state_checksum(model) for r in before.values())

    sender = open_group(receivers, bucket_bytes=bucket_bytes)
    try:
        stats, got = sync(sender, receivers, model, version=1)
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert stats.bytes == total and stats.tensors == len(model.state_dict())
        if bucket_bytes >= total:
            assert stats.buckets == 1
        for result in got.values():
            assert result["ok"], result
            assert result["value"] == {"version": 1, "reported": 1,
                                       "checksum": state_checksum(model)}
        buffer_address = sender._buffers[0].data_ptr()

        perturb(model)
        stats, got = sync(sender, receivers, model, version=2)
        for result in got.values():
            assert result["ok"], result
            assert result["value"]["version"] == 2
            assert result["value"]["checksum"] == state_checksum(model)
        assert sender._buffers[0].data_ptr() == buffer_address  # packing buffer reused
        assert stats.version == 2 and stats.gb_per_s > 0

        with pytest.raises(ValueError, match="must be greater"):
            sender.send(model.state_dict().items(), 2)
    finally:
        close_group(sender, receivers)


def test_retained_receive_keeps_every_bucket_valid_until_the_next_sync(receivers):
    """receive(retain=True): the views handed to load_fn are still the sender's bytes after
    receive returns, with more buckets than the two alternating receive buffers (the CPU vLLM
    worker reloads from them without copying), and the next sync lands in the same buffers."""
    model = tiny_qwen2(seed=0)
    sender = open_group(receivers, bucket_bytes=4 << 10)
    try:
        receivers.post("receive_retained")
        stats = sender.send(model.state_dict().items(), 1)
        first = receivers.collect()
        assert stats.buckets > 2
        for result in first.values():
            assert result["ok"], result
            assert result["value"]["version"] == 1
            assert result["value"]["checksum"] == state_checksum(model)

        perturb(model)
        receivers.post("receive_retained")
        sender.send(model.state_dict().items(), 2)
        for rank, result in receivers.collect().items():
            assert result["ok"], result
            assert result["value"]["checksum"] == state_checksum(model)
            assert result["value"]["addresses"] == first[rank]["value"]["addresses"]
    finally:
        close_group(sender, receivers)


def test_checksums_catch_corruption_and_abort_is_reported(receivers, monkeypatch):
    model = tiny_qwen2(seed=1)
    sender = open_group(receivers, bucket_bytes=16 << 10, verify_checksums=True)
    try:
        finish_manifest = sender._finish_manifest

        def corrupt(state, data, entries, direct):
            # after the checksums are taken, before the bucket is broadcast
            bucket_index = state.buckets
            manifest = finish_manifest(state, data, entries, direct)
            if bucket_index == 1:
                data[7] ^= 0xFF
            return manifest

        monkeypatch.setattr(sender, "_finish_manifest", corrupt)
        receivers.post("receive")
        with pytest.raises(WeightSyncError, match="checksum mismatch") as caught:
            sender.send(model.state_dict().items(), 1)
        assert "rank 1 (host" in str(caught.value) and "rank 2 (host" in str(caught.value)
        for result in receivers.collect().values():
            assert not result["ok"] and "checksum mismatch" in result["value"]
            assert result["version"] is None  # not applied

        monkeypatch.setattr(sender, "_finish_manifest", finish_manifest)
        _, got = sync(sender, receivers, model, version=2)
        assert all(r["ok"] and r["value"]["checksum"] == state_checksum(model)
                   for r in got.values())

        def failing_gather():  # e.g. a ZeRO-3 gather that fails half way
            items = list(model.state_dict().items())
            yield from items[:5]
            raise RuntimeError("gather failed on learner rank 3")

        receivers.post("receive")
        with pytest.raises(RuntimeError, match="gather failed on learner rank 3"):
            sender.send(failing_gather(), 3)
        for result in receivers.collect().values():
            assert not result["ok"] and "sender aborted" in result["value"]
            assert result["version"] == 2

        perturb(model)
        _, got = sync(sender, receivers, model, version=4)
        assert all(r["ok"] and r["value"]["version"] == 4
                   and r["value"]["checksum"] == state_checksum(model) for r in got.values())
    finally:
        close_group(sender, receivers)


def test_receiver_rejects_unknown_names_and_sender_hears_why(receivers):
    model = tiny_qwen2(seed=2)
    sender = open_group(receivers)
    try:
        receivers.post("receive")
        named = list(model.state_dict().items()) + [("not.a.param", torch.zeros(3))]
        with pytest.raises(WeightSyncError, match="not.a.param"):
            sender.send(named, 1)
        for result in receivers.collect().values():
            assert not result["ok"] and "not.a.param" in result["value"]
    finally:
        close_group(sender, receivers)


def test_receiver_dying_mid_broadcast_makes_sender_raise_naming_it():
    port = free_port()
    results = SPAWN.Queue()
    children = [SPAWN.Process(target=dying_receiver, args=(rank, port, die, results), daemon=True)
                for rank, die in ((1, None), (2, 2))]
    for child in children:
        child.start()
    # a loaded machine can take longer than the 5 s timeout just to import torch in a child
    assert [results.get(timeout=RESULT_TIMEOUT_S)["value"] for _ in children] == ["started"] * 2
    sender = WeightSender(sync_config(port, 0, timeout_s=5.0, bucket_bytes=4096))
    tensors = [(f"layer.{i}.weight", torch.full((1024,), float(i))) for i in range(40)]
    started = time.monotonic()
    try:
        with pytest.raises(WeightSyncError) as caught:
            sender.send(tensors, 1)
        elapsed = time.monotonic() - started
    finally:
        sender.close()
        for child in children:
            child.join(timeout=15)
            if child.is_alive():
                child.kill()
    message = str(caught.value)
    assert elapsed < 15, f"sender took {elapsed:.1f} s to notice"
    assert re.search(r"stopped heart-beating \(process gone or frozen\): rank 2 \(host", message), \
        message
    assert children[1].exitcode == 3


def test_receiver_without_sender_fails_rendezvous_with_clear_timeout():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(WeightSyncError, match=rf"could not reach the sender .* 127.0.0.1:{port}"):
        WeightReceiver(sync_config(port, 1, timeout_s=1.0))
    assert time.monotonic() - started < 10


def test_sender_names_receivers_that_never_join():
    port = free_port()
    with pytest.raises(WeightSyncError, match=r"rank\(s\) \[1, 2\] did not join"):
        WeightSender(sync_config(port, 0, timeout_s=1.0))


# ----------------------------------------------------------------------------- pure parts

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
