"""A verified weight sync (``verify_checksums``, the run file's ``verifyWeightSync``) without a
whole state of receive buffers: the receiver computes the state's checksum bucket by bucket
(`WeightReceiver.checksum`), so it keeps only its two bucket buffers, and the checksum still tells
a state that differs in one element from the learner's. Sender and receiver run in this process
on two threads over a real gloo group (loopback)."""

from __future__ import annotations

import threading

import pytest
import torch

from _weight_sync_kit import free_port, sync_config
from dapo.weightsync import WeightReceiver, WeightSender, state_checksum

BUCKET = 16 << 10


def model_state() -> dict[str, torch.Tensor]:
    """40 tensors of 4 KiB (160 KiB, ten buckets) and a bias, in a non-alphabetical order."""
    generator = torch.Generator().manual_seed(3)
    state = {f"layer.{i}.weight": torch.randn(32, 32, generator=generator) for i in range(39, -1, -1)}
    state["bias"] = torch.randn(7, generator=generator).to(torch.bfloat16)
    return state


class Pair:
    """A sender and one receiver (world size 2) with verified checksums."""

    def __init__(self):
        port = free_port()
        made: dict = {}
        thread = threading.Thread(target=lambda: made.setdefault(
            "sender", WeightSender(sync_config(port, 0, world_size=2, bucket_bytes=BUCKET, verify_checksums=True))))
        thread.start()
        self.receiver = WeightReceiver(sync_config(port, 1, world_size=2, bucket_bytes=BUCKET,
                                                   verify_checksums=True))
        thread.join(30)
        self.sender = made["sender"]

    def sync(self, state: dict[str, torch.Tensor], version: int, *, retain: bool = False) -> dict:
        """Send ``state`` as ``version``; the receiver copies each tensor (as a loader does)."""
        loaded: dict[str, torch.Tensor] = {}
        sent: dict = {}
        thread = threading.Thread(target=lambda: sent.setdefault("stats", self.sender.send(state.items(), version)))
        thread.start()
        self.receiver.receive(lambda batch: loaded.update((n, t.clone()) for n, t in batch), retain=retain)
        thread.join(30)
        assert "stats" in sent
        return loaded

    def close(self):
        self.receiver.close()
        self.sender.close()


@pytest.fixture
def pair():
    made = Pair()
    yield made
    made.close()


@pytest.mark.integration  # the sender's rendezvous store listens in this process
def test_verified_sync_checksums_the_state_without_keeping_it(pair):
    """The state (160 KiB) is ten buckets: with checksums verified the receiver holds at most its
    two 16 KiB bucket buffers between syncs, and its checksum is the learner's state_checksum."""
    state = model_state()
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert state_bytes > 8 * BUCKET
    loaded = pair.sync(state, 1)
    assert state_checksum(loaded) == state_checksum(state)
    assert pair.receiver.checksum == state_checksum(state)
    assert pair.receiver.retained_bytes <= 2 * BUCKET


@pytest.mark.integration
def test_the_streamed_checksum_tells_one_changed_element(pair):
    """A state that differs from the learner's in one element of one tensor gets a checksum that
    differs from the learner's (and equals that of what was sent)."""
    state = model_state()
    pair.sync(state, 1)
    assert pair.receiver.checksum == state_checksum(state)
    changed = {name: tensor.clone() for name, tensor in state.items()}
    changed["layer.17.weight"][5, 9] += 1.0
    pair.sync(changed, 2)
    assert pair.receiver.checksum == state_checksum(changed) != state_checksum(state)


@pytest.mark.integration
def test_retained_receive_measures_a_whole_state(pair):
    """retained_bytes counts what receive(retain=True) keeps: every bucket of the state."""
    state = model_state()
    pair.sync(state, 1, retain=True)
    assert pair.receiver.retained_bytes >= sum(t.numel() * t.element_size() for t in state.values())
    assert pair.receiver.checksum == state_checksum(state)
