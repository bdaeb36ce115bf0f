r"""The DAPO rule-based math reward (semantics of verl's ``reward_score/math_dapo.py``).

Recipe (DAPO paper, verl's reference scorer; Minerva / lighteval MATH normalisation):

1. keep only the last ``TAIL_CHARS`` = 300 characters of the response (the prompt asks for a
   last line ``Answer: $Answer``; the longest MATH-500 answer has 159 characters);
2. take the LAST match of ``(?i)Answer\s*:\s*([^\n]+)``; none -> prediction ``[INVALID]``;
3. normalise prediction and ground truth alike (:func:`normalize_final_answer`);
4. reward +1.0 when the two normalised strings are equal, else -1.0.

The normaliser is kept bit-for-bit compatible with the reference, quirks included (e.g. it
deletes every ``"an "`` and ``"a "`` substring, and ``str.isdigit`` accepts Unicode digits),
so rewards and accuracies compare with published DAPO runs.
"""

from __future__ import annotations

import re

from dapo.reward.result import INVALID_PRED, ScoreResult

__all__ = ["ANSWER_PATTERN", "TAIL_CHARS", "extract_answer", "normalize_final_answer", "score_math_dapo"]

TAIL_CHARS = 300
ANSWER_PATTERN = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Plain substring rewrites, applied in this order (order matters: "\$" must go before " ").
_REWRITES: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)

# Units, filler words and decorations deleted outright, in this order.
_DELETIONS: tuple[str, ...] = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
    "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)

# Regex rewrites: the first $...$ span wins; \text{} / \textbf{} / \overline{} unwrap their
# first (shortest) argument; \boxed{} unwraps greedily up to the last "}".
_FIRST_MATH_SPAN = re.compile(r"(.*?)(\$)(.*?)(\$)(.*)")
_UNWRAPS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(\\text\{)(.*?)(\})"),
    re.compile(r"(\\textbf\{)(.*?)(\})"),
    re.compile(r"(\\overline\{)(.*?)(\})"),
    re.compile(r"(\\boxed\{)(.*)(\})"),
)
# TeX shorthands: \frac12 -> \frac{1}{2}, \fracabc -> \frac{a}{b}c, \sqrt2 -> \sqrt{2}.
_FRAC_SHORTHAND = re.compile(r"(frac)([^{])(.)")
_SQRT_SHORTHAND = re.compile(r"(sqrt)([^{])")


def normalize_final_answer(final_answer: str) -> str:
    """Minerva-style normal form of a final answer (both prediction and ground truth).

    Keeps the text after the last ``=``; applies :data:`_REWRITES`, then :data:`_DELETIONS`;
    keeps the first ``$...$`` span; unwraps ``\\text{}``, ``\\textbf{}``, ``\\overline{}``,
    ``\\boxed{}``; expands ``\\frac``/``\\sqrt`` shorthands; drops ``$``; removes the commas
    of a comma-grouped integer (``1,000`` -> ``1000``); strips surrounding whitespace.
    """
    text = final_answer.split("=")[-1]
    for old, new in _REWRITES:
        text = text.replace(old, new)
    for junk in _DELETIONS:
        text = text.replace(junk, "")
    text = _FIRST_MATH_SPAN.sub(r"$\3$", text)
    for pattern in _UNWRAPS:
        text = pattern.sub(r"\2", text)
    text = _FRAC_SHORTHAND.sub(r"frac{\2}{\3}", text)
    text = _SQRT_SHORTHAND.sub(r"sqrt{\2}", text)
    text = text.replace("$", "")
    if text.replace(",", "").isdigit():
        text = text.replace(",", "")
    return text.strip()


def extract_answer(solution: str, tail_chars: int = TAIL_CHARS) -> str | None:
    """The raw text of the LAST ``Answer:`` line within the last ``tail_chars`` characters,
    or ``None`` when there is none."""
    matches = ANSWER_PATTERN.findall(solution[-tail_chars:] if tail_chars else solution)
    return matches[-1] if matches else None


def score_math_dapo(solution: str, ground_truth: str) -> ScoreResult:
    """DAPO reward of one response: +1.0 / -1.0, ``acc``, and the normalised prediction.

    ``pred`` is ``[INVALID]`` (and the response scores -1.0) when the last 300 characters
    hold no ``Answer:`` line.
    """
    raw = extract_answer(solution)
    if raw is None:
        return ScoreResult.graded(False, INVALID_PRED)
    pred = normalize_final_answer(raw)
    return ScoreResult.graded(pred == normalize_final_answer(ground_truth), pred)
