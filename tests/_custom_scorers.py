"""Run-file scorers for tests/test_custom_reward.py, referenced as ``_custom_scorers:NAME``
(the tests folder is on sys.path; worker processes inherit it)."""

from __future__ import annotations

import math
import os
import time


def reverse_score(solution_str, ground_truth, data_source=None, extra_info=None):
    """1.0 when the response is the ground truth reversed, else 0.0 (a verl-style float)."""
    return 1.0 if solution_str.strip() == ground_truth[::-1] else 0.0


def echo_kwargs(*, solution_str, ground_truth, data_source, extra_info):
    """Keyword-only: fails unless called with exactly verl's four keyword arguments."""
    return {"score": 0.5, "acc": True, "pred": f"{data_source}|{extra_info!r}|{len(solution_str)}"}


def nan_score(**_):
    return math.nan


def string_score(**_):
    return "1.0"


def mapping_without_score(**_):
    return {"acc": True}


def raising(**_):
    raise RuntimeError("user scorer bug")


def sleepy(**_):
    time.sleep(60)
    return 1.0


def exits(**_):
    os._exit(7)


NOT_CALLABLE = 42


def picky(solution_str, **_):
    """Raises on the response 'boom', scores 1.0 otherwise."""
    if solution_str == "boom":
        raise ValueError("cannot score boom")
    return 1.0


def poisoned_row(ground_truth, **_):
    """Raises on the ground truth 'poison' (a bad data row), scores 1.0 otherwise."""
    if ground_truth == "poison":
        raise KeyError("tests")
    return 1.0
