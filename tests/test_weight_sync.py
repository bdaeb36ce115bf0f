"""dapo.weightsync over real gloo groups between separate processes on loopback.

The receivers are spawned processes (torch threads 1) driven by a command queue, so one set
of processes serves several groups; the sender runs in the test process. What needs no second
process (configuration, the wire format, loading and checksums, rendezvous timeouts) is
tests/test_weight_sync_local.py.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import torch
import torch.multiprocessing as mp

from _weight_sync_kit import free_port, sync_config
from dapo.weightsync import (
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    load_into_module,
    state_checksum,
)

pytestmark = pytest.mark.processes  # receiver processes (spawned from a forkserver) for every test
SPAWN = mp.get_context("forkserver")
# children fork from one server that imported torch + transformers once (spawn re-imports per child)
SPAWN.set_forkserver_preload(["torch", "transformers.models.qwen2.modeling_qwen2", "dapo.weightsync"])
RESULT_TIMEOUT_S = 60


def tiny_qwen2(seed: int):
    """Qwen2 architecture, hidden 64, 2 layers, vocab 512 (~140k parameters, fp32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


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
