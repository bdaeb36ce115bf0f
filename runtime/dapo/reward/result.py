"""Result records of the reward scorers: frozen dataclasses that also read like mappings.

verl's scorers return plain dicts (``{"score", "acc", "pred"}``); callers written against
them index with ``r["score"]``. These records keep that working (``r["score"]``,
``dict(r)``, ``"acc" in r``) while giving typed attribute access (``r.score``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["INVALID_PRED", "RewardResult", "ScoreResult"]

# The prediction reported when no answer could be extracted (verl's marker, kept verbatim).
INVALID_PRED = "[INVALID]"


class _FieldMapping(Mapping):
    """Read-only mapping over a dataclass's fields, in declaration order."""

    def __getitem__(self, key: str) -> Any:
        if isinstance(key, str) and key in self._field_names():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._field_names())

    def __len__(self) -> int:
        return len(self._field_names())

    def _field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict copy (JSON-friendly: every field is a str, float, bool or None)."""
        return {name: getattr(self, name) for name in self._field_names()}


@dataclasses.dataclass(frozen=True)
class ScoreResult(_FieldMapping):
    """One scorer call: ``score`` +1.0 / -1.0, ``acc`` correctness, ``pred`` the extracted
    (normalised) prediction or ``[INVALID]``."""

    score: float
    acc: bool
    pred: str

    @classmethod
    def graded(cls, correct: bool, pred: str) -> "ScoreResult":
        """The DAPO reward: +1.0 when correct, -1.0 otherwise."""
        return cls(score=1.0 if correct else -1.0, acc=bool(correct), pred=pred)


@dataclasses.dataclass(frozen=True)
class RewardResult(_FieldMapping):
    """One response scored by :class:`dapo.reward.RewardScorer`.

    ``score = correctness + overlong_penalty`` (the shaped reward used for advantages);
    ``acc`` is the unshaped correctness, the signal dynamic sampling filters on.
    ``timed_out`` is true when the scorer overran its time bound (the worker was killed);
    ``error`` says why a response was failed without a verdict (timeout, worker crash,
    scorer exception, oversize ground truth), ``None`` when the scorer answered.
    """

    score: float
    acc: bool
    pred: str
    truncated: bool
    correctness: float
    overlong_penalty: float
    timed_out: bool
    scorer: str
    error: str | None = None
