"""Memory of the weights the async pipeline publishes (`dapo.controller.pipeline`): the copies it
keeps for the generator are host-memory copies, independent of the learner's later in-place
updates, and never more than k + 1 of them wait at once. That they leave the learner's GPU (pinned
host memory) needs a CUDA device: benchmarks/gpu_check.py checks it there."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from dapo.controller.pipeline import RolloutPipeline, host_copy


class RecordingEngine:
    """An engine that records, per version loaded, the value it was given and the tensor's device."""

    def __init__(self):
        self.weight_version = 0
        self.loaded: dict[int, tuple[float, torch.device]] = {}

    def update_weights(self, named_tensors, version):
        for _, tensor in named_tensors:
            self.loaded[version] = (float(tensor.flatten()[0]), tensor.device)
        self.weight_version = version


def test_a_published_version_is_loaded_as_published_after_the_learner_moved_on():
    """The learner publishes version 1, then changes its parameter in place (its next update)
    before the generator loads version 1: the engine still gets version 1's values."""
    engine = RecordingEngine()
    release = [threading.Event() for _ in range(3)]

    def collect(step, version):
        assert release[step].wait(30)
        return SimpleNamespace(rollout_idle_seconds=0.0)

    param = torch.zeros(4, 3)
    pipeline = RolloutPipeline(engine=engine, collect=collect, max_staleness=1, start_step=0, start_version=0,
                               total_steps=3)
    try:
        release[0].set()
        pipeline.take()
        param.fill_(1.0)  # the update that makes version 1
        pipeline.publish(1, lambda: [("w", param)])
        param.fill_(99.0)  # the learner's next update, while the generator is still in step 1's collection
        release[1].set()
        release[2].set()
        pipeline.take()
        pipeline.take()  # step 2 was generated with version 1: it was loaded before this returns
        assert engine.loaded[1][0] == 1.0
        assert engine.loaded[1][1].type == "cpu"
    finally:
        for event in release:
            event.set()
        pipeline.close()


def test_at_most_k_plus_one_published_copies_wait_at_once():
    """A generator slower than the learner (it waits in each collection): the learner trains and
    publishes as the schedule allows, and the copies waiting to be loaded never exceed k + 1 (when
    version v is published, the steps not started yet need versions v - k .. v)."""
    k, steps = 2, 8
    engine = RecordingEngine()
    gate = threading.Semaphore(0)

    def collect(step, version):
        assert gate.acquire(timeout=30)
        return SimpleNamespace(rollout_idle_seconds=0.0)

    param = torch.zeros(2)
    pipeline = RolloutPipeline(engine=engine, collect=collect, max_staleness=k, start_step=0, start_version=0,
                               total_steps=steps)
    waiting = []
    try:
        for version in range(1, steps + 1):
            gate.release()
            pipeline.take()
            param.fill_(float(version))
            pipeline.publish(version, lambda: [("w", param)])
            with pipeline.cond:
                waiting.append(len(pipeline.pending))
    finally:
        for _ in range(steps):
            gate.release()
        pipeline.close()
    assert k <= max(waiting) <= k + 1  # the learner ran k versions ahead of the generator's loads
    # every version a step was generated with reached the engine with its own values
    assert {v: value for v, (value, _) in engine.loaded.items()} == {v: float(v) for v in range(1, steps - k)}


def test_host_copy_is_independent_of_the_original():
    original = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    copy = host_copy(original)
    original.add_(1)
    assert copy.device.type == "cpu" and copy.dtype == torch.bfloat16
    assert torch.equal(copy, torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))
