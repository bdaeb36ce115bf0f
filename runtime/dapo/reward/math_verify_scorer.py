r"""A symbolic math reward on HuggingFace's ``math-verify`` (answers compared with SymPy).

Unlike :func:`dapo.reward.score_math_dapo`, which compares normalised strings, this scorer
parses both answers and checks equivalence: ``\frac12`` = ``1/2`` = ``0.5``, ``2\sqrt2`` =
``\sqrt8``, ``x = 5`` = ``5``. It suits data sets whose ground truths are LaTeX or decimals
(MATH-500, AMC, GSM8K). The ground truth is read as LaTeX (wrapped in ``\boxed{}`` unless it
already carries ``\boxed`` or ``$``); the response is searched for the last boxed / ``$...$``
/ ``Answer:`` expression.

Time bounds: math-verify guards parsing and comparison with ``signal.alarm``, which raises
``ValueError`` outside the main thread. This scorer turns those alarms off when called from
any other thread (the caller must then bound time itself: :class:`dapo.reward.RewardScorer`
runs scorers in killable worker processes). Some inputs (power towers such as
``9^{9^{9^9}}``) block inside one C call that no alarm can interrupt, which is why the
pool, not these alarms, is the real bound.
"""

from __future__ import annotations

import math
import threading

from dapo.reward.result import INVALID_PRED, ScoreResult

__all__ = ["DEFAULT_TIMEOUT_S", "score_math_verify"]

DEFAULT_TIMEOUT_S = 5.0


def _alarm_seconds(timeout_s: float | None) -> int | None:
    """math-verify's timeout argument: whole seconds (``signal.alarm``) in the main thread,
    ``None`` (no alarm) elsewhere or when ``timeout_s`` is ``None`` / <= 0."""
    if timeout_s is None or timeout_s <= 0:
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    return max(1, math.ceil(timeout_s))


def _gold_text(ground_truth: str) -> str:
    r"""The ground truth as math-verify's LaTeX extractor expects it (``\boxed{gt}``)."""
    if "\\boxed" in ground_truth or "$" in ground_truth:
        return ground_truth
    return "\\boxed{" + ground_truth + "}"


def score_math_verify(solution: str, ground_truth: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> ScoreResult:
    """+1.0 / -1.0 by symbolic equivalence of the response's final answer and ground truth.

    ``pred`` is the matched answer text (math-verify's string form), ``[INVALID]`` when
    nothing parseable was found. ``timeout_s`` bounds each parse / comparison through
    math-verify's alarms, in the main thread only (see the module docstring).
    """
    # Imported here: sympy takes ~1 s to import, and math_dapo-only users should not pay it.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    alarm = _alarm_seconds(timeout_s)
    gold = parse(
        _gold_text(ground_truth),
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=alarm,
    )
    answer = parse(
        solution,
        extraction_config=[ExprExtractionConfig(), LatexExtractionConfig()],
        parsing_timeout=alarm,
    )
    if not answer:
        return ScoreResult.graded(False, INVALID_PRED)
    # parse() returns [sympy object, matched string] (or just the string on fallback).
    pred = str(answer[-1])
    if not gold:
        return ScoreResult.graded(False, pred)
    return ScoreResult.graded(bool(verify(gold, answer, timeout_seconds=alarm)), pred)
