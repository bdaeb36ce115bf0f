"""The built-in scorers and the data_source routing table: read-only, defined here.

A scorer is ``fn(solution: str, ground_truth: str) -> mapping with score, acc, pred``
(a :class:`~dapo.reward.ScoreResult` or a verl-style dict). Scorers used through
:class:`~dapo.reward.RewardScorer` run in worker processes and travel there by reference,
so they must be module-level functions of an importable module.

Your own scorer needs no change here: name it in the run file (``spec.reward.scorers``,
dapo.reward.custom) or serve it (``spec.reward.remote``). A new built-in scorer is one entry
of :data:`SCORERS` and, when some data sources should use it by default, rules in
:data:`DATA_SOURCE_RULES`.
"""

from __future__ import annotations

import fnmatch
from types import MappingProxyType
from typing import Callable, Mapping

from dapo.reward.math_dapo import score_math_dapo
from dapo.reward.math_verify_scorer import score_math_verify
from dapo.errors import DapoError

__all__ = [
    "DATA_SOURCE_RULES",
    "SCORERS",
    "Scorer",
    "UnknownScorerError",
    "get_scorer",
    "known_scorers",
    "scorer_for_data_source",
]

Scorer = Callable[[str, str], Mapping]

#: Built-in scorers by name (the values of spec.reward.scorer).
SCORERS: Mapping[str, Scorer] = MappingProxyType({
    "math_dapo": score_math_dapo,
    "math_verify": score_math_verify,
})

# (glob over the lower-cased data_source, scorer name); the first matching rule wins.
# DAPO-Math-17k and the DAPO AIME set prompt for "Answer: $Answer" and have integer answers:
# the reference string scorer. MATH / GSM8K / AMC answers are LaTeX or decimals ("27.0"),
# where string equality under-counts: the symbolic scorer.
DATA_SOURCE_RULES: tuple[tuple[str, str], ...] = (
    ("math_dapo", "math_dapo"),
    ("math_dapo_reasoning", "math_dapo"),
    ("dapo-17k", "math_dapo"),
    ("dapo-math-17k", "math_dapo"),
    ("dapo_math_17k", "math_dapo"),
    ("aime*", "math_dapo"),
    ("math", "math_verify"),
    ("math-500", "math_verify"),
    ("math500", "math_verify"),
    ("math_500", "math_verify"),
    ("lighteval/math", "math_verify"),
    ("hendrycks_math", "math_verify"),
    ("gsm8k*", "math_verify"),
    ("openai/gsm8k", "math_verify"),
    ("amc*", "math_verify"),
)


class UnknownScorerError(DapoError, KeyError):
    """A scorer name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def known_scorers() -> list[str]:
    """The built-in scorer names, sorted."""
    return sorted(SCORERS)


def get_scorer(name: str) -> Scorer:
    """The built-in scorer ``name``; :class:`UnknownScorerError` names the known ones."""
    try:
        return SCORERS[name]
    except (KeyError, TypeError):
        raise UnknownScorerError(
            f"unknown reward scorer {name!r}; known scorers: {', '.join(known_scorers())} "
            "(set spec.reward.scorer to one of them, or score your rows with your own function: spec.reward.scorers)"
        ) from None


def scorer_for_data_source(data_source: str | None, default: str = "math_dapo") -> tuple[str, Scorer]:
    """``(name, fn)`` of the scorer for a row's ``data_source``.

    Matching is case-insensitive against :data:`DATA_SOURCE_RULES` (``math_dapo``,
    ``DAPO-17k``, ``aime-2024`` / ``AIME2024`` / ``aime*``, ``MATH-500``, ``gsm8k``, ``amc*``,
    ...); an unknown or missing data_source gets ``default``.
    """
    if data_source:
        key = str(data_source).strip().lower()
        for pattern, name in DATA_SOURCE_RULES:
            if fnmatch.fnmatchcase(key, pattern):
                return name, get_scorer(name)
    return default, get_scorer(default)
