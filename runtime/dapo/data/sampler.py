"""``PromptSampler`` hands out prompt indices in a seeded, epoch-shuffled order that crosses epoch
boundaries without stopping and restores its exact position from a tiny JSON-able state. Its
shuffle is a self-contained Fisher-Yates driven by SplitMix64, so the order depends only on
(seed, epoch, num_items): not on torch/numpy/python RNG state or library versions, which is
what makes "resume replays or skips data" impossible by construction.
"""

from __future__ import annotations

import math

import hashlib
from collections.abc import Mapping
from typing import Any

_MASK64 = (1 << 64) - 1
_SAMPLER_FORMAT = "dapo.PromptSampler/1"


def _splitmix64_stream(state: int):
    """SplitMix64 (Steele, Lea, Flood 2014): state += 0x9E3779B97F4A7C15; mix; yields 64-bit words."""
    while True:
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        yield z ^ (z >> 31)


def epoch_permutation(num_items: int, seed: int, epoch: int) -> list[int]:
    """The order of epoch ``epoch``: Fisher-Yates over range(num_items) driven by SplitMix64.

    The generator is seeded by sha256("seed:epoch"), so each epoch's permutation is a pure function
    of (num_items, seed, epoch). Index j for position i is floor(u * (i + 1) / 2^64) with u a
    64-bit word (bias <= num_items / 2^64, negligible).
    """
    digest = hashlib.sha256(f"dapo-sampler:{seed}:{epoch}".encode()).digest()
    words = _splitmix64_stream(int.from_bytes(digest[:8], "little"))
    order = list(range(num_items))
    for i in range(num_items - 1, 0, -1):
        j = (next(words) * (i + 1)) >> 64
        order[i], order[j] = order[j], order[i]
    return order


class PromptSampler:
    """Deterministic, seeded, epoch-shuffled source of prompt indices that resumes exactly.

    Epoch e visits every index once in the order ``epoch_permutation(num_items, seed, e)``
    (identity when ``shuffle`` is False). ``next_indices(k)`` never stops at the end of an epoch:
    a request that crosses it takes the tail of epoch e and the head of epoch e+1.
    ``state_dict()`` is five small fields; loading it into a sampler built with the same
    num_items / seed / shuffle (and fingerprint, when given) continues with the very same indices.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True, *, fingerprint: str | None = None):
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"PromptSampler: num_items must be a positive integer, got {num_items!r} (is the data set empty?)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"PromptSampler: seed must be an integer, got {seed!r}")
        self._num_items = num_items
        self._seed = seed
        self._shuffle = bool(shuffle)
        self._fingerprint = fingerprint
        self._epoch = 0
        self._position = 0
        self._order_cache: dict[int, list[int]] = {}

    # ----- read-only views
    @property
    def num_items(self) -> int:
        return self._num_items

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of the current epoch were already handed out (0 <= position < num_items)."""
        return self._position

    @property
    def consumed(self) -> int:
        """Indices handed out since the start: epoch * num_items + position."""
        return self._epoch * self._num_items + self._position

    # ----- drawing
    def _order(self, epoch: int) -> list[int]:
        order = self._order_cache.get(epoch)
        if order is None:
            if self._shuffle:
                order = epoch_permutation(self._num_items, self._seed, epoch)
            else:
                order = list(range(self._num_items))
            # Two orders suffice (a batch crossing a boundary needs epoch e and e+1); more would
            # only hold memory, ~num_items ints each.
            while len(self._order_cache) >= 2:
                self._order_cache.pop(next(iter(self._order_cache)))
            self._order_cache[epoch] = order
        return order

    def _take(self, k: int, advance: bool) -> list[int]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"PromptSampler: k must be a non-negative integer, got {k!r}")
        epoch, position = self._epoch, self._position
        taken: list[int] = []
        while len(taken) < k:
            order = self._order(epoch)
            stop = min(self._num_items, position + (k - len(taken)))
            taken.extend(order[position:stop])
            position = stop
            if position == self._num_items:
                epoch, position = epoch + 1, 0
        if advance:
            self._epoch, self._position = epoch, position
        return taken

    def next_indices(self, k: int) -> list[int]:
        """The next ``k`` indices, crossing into later epochs as needed; advances the sampler."""
        return self._take(k, advance=True)

    def peek(self, k: int) -> list[int]:
        """What ``next_indices(k)`` would return, without advancing."""
        return self._take(k, advance=False)

    # ----- resume
    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able state: identity (num_items, seed, shuffle, fingerprint) and position."""
        return {
            "format": _SAMPLER_FORMAT,
            "num_items": self._num_items,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "fingerprint": self._fingerprint,
            "epoch": self._epoch,
            "position": self._position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the exact position; refuse a state from a different data set size / seed / order."""
        if not isinstance(state, Mapping) or state.get("format") != _SAMPLER_FORMAT:
            raise ValueError(f"PromptSampler: not a sampler state (expected format {_SAMPLER_FORMAT!r}): {state!r}")
        mismatches = [
            f"{name} {state.get(name)!r} in the checkpoint vs {mine!r} now"
            for name, mine in (("num_items", self._num_items), ("seed", self._seed), ("shuffle", self._shuffle))
            if state.get(name) != mine
        ]
        if self._fingerprint is not None and state.get("fingerprint") not in (None, self._fingerprint):
            mismatches.append(f"data fingerprint {state.get('fingerprint')!r} in the checkpoint vs {self._fingerprint!r} now")
        if mismatches:
            raise ValueError(
                "PromptSampler: the checkpoint's sampler state does not match this run ("
                + "; ".join(mismatches)
                + "): the data set or data seed changed since the checkpoint; resume with the same data and seed, or start a new run"
            )
        epoch, position = state.get("epoch"), state.get("position")
        integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, position))
        if not (integers and epoch >= 0 and 0 <= position < self._num_items):
            raise ValueError(
                f"PromptSampler: invalid position in state (epoch={epoch!r}, position={position!r}); "
                f"need epoch >= 0 and 0 <= position < {self._num_items}"
            )
        self._epoch, self._position = epoch, position

    def __repr__(self) -> str:
        return (
            f"PromptSampler(num_items={self._num_items}, seed={self._seed}, shuffle={self._shuffle}, "
            f"epoch={self._epoch}, position={self._position})"
        )


def steps_for_epochs(total_epochs: int, num_prompts: int, train_batch_size: int) -> int:
    """Training steps for ``total_epochs`` passes: ceil(epochs * prompts / train_batch_size)."""
    return max(1, math.ceil(total_epochs * num_prompts / train_batch_size))
