"""A format reward for examples/custom-scorer.yaml: the reply must be one line ``Answer: N`` whose
number ends in an even digit. It ignores the ground truth on purpose: it is a rule about the
*form* of the answer (what a format checker or a style judge scores), not arithmetic, and none
of the built-in math scorers can express it.

The signature is verl's ``compute_score``, so this file works unchanged as a verl
``custom_reward_function`` too.
"""

import re

FORMAT = re.compile(r"Answer: (\d+)")


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """1.0 for ``Answer: N`` with N even, 0.0 for N odd, -1.0 when the reply is not in format."""
    match = FORMAT.fullmatch(solution_str.strip())
    if match is None:
        return {"score": -1.0, "acc": False, "pred": "[INVALID]"}
    even = int(match.group(1)[-1]) % 2 == 0
    return {"score": 1.0 if even else 0.0, "acc": even, "pred": match.group(1)}
