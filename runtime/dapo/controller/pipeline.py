"""Asynchronous rollout with bounded staleness (`spec.rollout.maxStaleness` = k >= 1).

A generator thread collects the training batches (steps 1-4 of `controller/trainer.py`: sample,
score, dynamic sampling, surplus carry-over) up to k steps ahead of the learner, while the learner
trains. The schedule is fixed, not timing-dependent:

    the batch of step s is generated with weight version  gen_version(s) = max(V0, v(s) - k)

where v(s) = V0 + (s - S0) is the version the learner trains step s with and (S0, V0) is the
trainer's (step, weight version) when the pipeline starts (0, 0 for a fresh run). Every generation
batch of that step (dynamic sampling's extra batches included) uses exactly that version, so every
group's ``weight_version`` is exact and a run is reproducible whatever the threads' timing.

Weights: after each update the learner publishes version v as a copy of its parameters in host
memory (taken on the learner's thread, so ZeRO-3's gathers stay in rank order) when a later step
will be generated with it; the generator thread loads it into the engine between two collections
(never during a generation batch: it is the only thread that calls the engine while it runs). At
most k + 1 such copies wait at once (when the learner publishes v, the steps not yet started need
versions v - k .. v), and they are never on the learner's GPU: k unsharded copies of a
ZeRO-3 model there would not fit beside the shards, optimizer states and activations the memory
was planned for. On CUDA the host copies are pinned (`host_copy`: the device-to-host copy runs at
full PCIe speed and the engine's load reads them back as fast). The learner therefore never waits
for the rollout to load weights, and the rollout waits for the learner only when it is k steps
ahead.

Evaluation and checkpoints need a quiet engine and a consistent state: `drain()` waits until the
generator has collected every step it may collect before version v exists (steps up to s + k - 1)
and is idle; the controller then evaluates with the current weights and saves the collected but
untrained batches ("in flight") with the sampler and surplus, so a resume continues exactly
(`Trainer.state_dict` / `load_state_dict`).

Staleness: fresh samples of step s are v(s) - gen_version(s) <= k versions old, and k bounds
every trained sample: surplus groups carried to a later collection are kept only while they are at
most k versions behind the version that trains them (in steady state they are k + 1 behind, so
only the first steps reuse surplus); older surplus is dropped (`BatchCollection.surplus_dropped`
/ ``stale_samples_dropped``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import torch

from dapo.controller.threads import thread_budget

log = logging.getLogger("dapo.controller.pipeline")


# How long close() waits for the generator thread: well inside Kubernetes' default 30 s grace period
CLOSE_TIMEOUT_S = 10.0


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in host memory, independent of later in-place updates of the original:
    pinned when the original is on a CUDA device (a synchronous copy, so the learner may update
    the original as soon as this returns)."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor.clone()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.device.type == "cuda")
    out.copy_(tensor)
    return out


def generation_version(step: int, *, max_staleness: int, start_step: int, start_version: int) -> int:
    """gen_version(s) = max(V0, V0 + (s - S0) - k): the weight version that generates step s's batch."""
    return max(start_version, start_version + (step - start_step) - max_staleness)


class RolloutPipeline:
    """The generator thread and its hand-offs; see the module docstring."""

    def __init__(self, *, engine, collect: Callable[[int, int], object], max_staleness: int, start_step: int,
                 start_version: int, total_steps: int, in_flight: list | None = None):
        if max_staleness < 1:
            raise ValueError("RolloutPipeline needs max_staleness >= 1 (0 is the synchronous loop)")
        self.engine = engine
        self.collect = collect
        self.k = max_staleness
        self.start_step, self.start_version = start_step, start_version
        self.total_steps = total_steps
        self.ready: deque = deque(in_flight or [])
        self.next_step = start_step + len(self.ready)  # the step the generator collects next
        self.loaded_version = engine.weight_version
        self.pending: dict[int, list[tuple[str, torch.Tensor]]] = {}  # version -> weights not loaded yet
        self.published = start_version  # newest version the learner has made available
        self.busy = False
        self.error: BaseException | None = None
        self.stopping = False
        self.learner_idle = 0.0  # seconds the learner waited, since the last take()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="dapo-rollout", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ schedule

    def gen_version(self, step: int) -> int:
        return generation_version(step, max_staleness=self.k, start_step=self.start_step,
                                  start_version=self.start_version)

    def needs_version(self, version: int) -> bool:
        """True when a step not yet collected will be generated with ``version``."""
        if version == self.loaded_version:
            return False
        first = max(self.next_step, self.start_step + (version - self.start_version) + self.k)
        return first < self.total_steps and self.gen_version(first) == version

    # ------------------------------------------------------------------ generator thread

    def _run(self) -> None:
        try:
            while True:
                t_wait = time.perf_counter()
                with self.cond:
                    while not self.stopping and self.next_step < self.total_steps and \
                            self.gen_version(self.next_step) > self.published:
                        self.cond.wait()
                    if self.stopping or self.next_step >= self.total_steps:
                        return
                    step, version = self.next_step, self.gen_version(self.next_step)
                    weights = self.pending.pop(version, None)
                    for old in [v for v in self.pending if v < version]:
                        del self.pending[old]
                    self.busy = True
                idle = time.perf_counter() - t_wait
                if version != self.loaded_version:
                    if weights is None:
                        raise RuntimeError(f"rollout pipeline: weight version {version} was published without "
                                           f"its weights (loaded: {self.loaded_version})")
                    self.engine.update_weights(weights, version)
                    self.loaded_version = version
                    del weights
                thread_budget().apply()  # this thread's torch threads (dapo.controller.threads)
                collection = self.collect(step, version)
                collection.rollout_idle_seconds += idle
                with self.cond:
                    self.ready.append(collection)
                    self.next_step += 1
                    self.busy = False
                    self.cond.notify_all()
        except BaseException as exc:  # handed to the learner's thread, which raises it
            with self.cond:
                self.error = exc
                self.busy = False
                self.cond.notify_all()

    # ------------------------------------------------------------------ learner side

    def _wait(self, predicate) -> None:
        """Wait (counted as learner idle time) until predicate() or the generator failed."""
        t0 = time.perf_counter()
        with self.cond:
            while not predicate() and self.error is None:
                self.cond.wait()
            if self.error is not None and not predicate():
                raise self.error
        self.learner_idle += time.perf_counter() - t0

    def take(self):
        """The next step's collected batch (blocks until the generator has it)."""
        self._wait(lambda: bool(self.ready))
        with self.cond:
            collection = self.ready.popleft()
            self.cond.notify_all()
        collection.learner_idle_seconds = self.learner_idle
        self.learner_idle = 0.0
        return collection

    def publish(self, version: int, named_tensors_fn: Callable) -> None:
        """The learner made ``version``: copy its weights for the generator if a step needs them."""
        weights = None
        if self.needs_version(version):
            weights = [(name, host_copy(t)) for name, t in named_tensors_fn()]
        with self.cond:
            if weights is not None:
                self.pending[version] = weights
            self.published = version
            self.cond.notify_all()

    def drain(self) -> None:
        """Wait until the generator has collected every step it can before the next version is
        published, and is idle: the engine is free and sampler / surplus / ready are consistent."""
        def quiet() -> bool:
            blocked = self.next_step >= self.total_steps or self.gen_version(self.next_step) > self.published
            return blocked and not self.busy
        self._wait(quiet)

    def engine_loaded(self, version: int) -> None:
        """The controller loaded ``version`` into the engine itself (while drained, for evaluation)."""
        with self.cond:
            self.loaded_version = version
            self.pending.pop(version, None)

    def in_flight(self) -> list:
        """Collected, untrained batches (call after drain())."""
        return list(self.ready)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Stop the generator thread: it ends after the collection it is in; wait at most
        ``timeout_s`` for that. A collection can take long (a remote generation of many long
        responses), and a SIGTERM must end the process within the pod's grace period: past the
        bound the (daemon) thread is left to die with the process. True when it ended."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.warning("rollout pipeline: the generator thread is still in a collection after %.0f s; "
                        "not waiting for it (it ends with the process)", timeout_s)
            return False
        return True
