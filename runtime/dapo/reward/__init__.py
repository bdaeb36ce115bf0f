"""Rule-based math rewards for DAPO.

- :func:`score_math_dapo`: the DAPO reference scorer (``Answer:`` line, Minerva
  normalisation, string equality; +1 / -1).
- :func:`score_math_verify`: symbolic equivalence on ``math-verify``.
- The built-in scorers and routing: :func:`get_scorer`, :func:`scorer_for_data_source`
  (read-only; your own scorers come from the run file).
- :class:`RewardScorer`: batch scoring in killable worker processes, a time bound per
  response, DAPO overlong shaping.

Importing this package does not import torch or sympy (worker processes stay light).
"""

from dapo.reward.math_dapo import normalize_final_answer, score_math_dapo
from dapo.reward.math_verify_scorer import score_math_verify
from dapo.reward.pool import RewardScorer
from dapo.reward.registry import (
    UnknownScorerError,
    get_scorer,
    known_scorers,
    scorer_for_data_source,
)
from dapo.reward.result import INVALID_PRED, RewardResult, ScoreResult

__all__ = [
    "INVALID_PRED",
    "RewardResult",
    "RewardScorer",
    "ScoreResult",
    "UnknownScorerError",
    "get_scorer",
    "known_scorers",
    "normalize_final_answer",
    "score_math_dapo",
    "score_math_verify",
    "scorer_for_data_source",
]
