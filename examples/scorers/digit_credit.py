"""A graded reward for examples/graded-scorer.yaml: partial credit for the digits of a sum.

The quickstart's model answers "Answer: N" to "a+b"; a wrong sum is usually off in one digit.
This scorer gives each reply the share of the true sum's digits it has right, aligned from the
units digit (85 vs 84: 0.5, vs 85: 1.0), -1.0 out of format; ``acc`` is the exact answer. A group
of replies all off by one digit scores [0.5, 0.5, 0.0, 0.5, ...]: no reply is right (acc is all
false), but the scores still rank them, which is what dynamic sampling on the score keeps
(spec.algorithm.dynamicSampling.metric: score, the default for run-file scorers).

The signature is verl's ``compute_score``; it works unchanged as a verl custom reward function.
"""

import re

FORMAT = re.compile(r"Answer: (-?\d+)")


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """Share of the digits of ``ground_truth`` that the reply's number has right (units first)."""
    match = FORMAT.fullmatch(solution_str.strip())
    if match is None:
        return {"score": -1.0, "acc": False, "pred": "[INVALID]"}
    answer, truth = match.group(1), str(ground_truth).strip()
    right = sum(1 for a, t in zip(reversed(answer), reversed(truth)) if a == t)
    score = right / max(len(truth), len(answer))
    return {"score": score, "acc": answer == truth, "pred": answer}
