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


def code_tests(solution_str, ground_truth, data_source, extra_info=None):
    """A verl-style code scorer: ``ground_truth`` is the row's test cases as data,
    {"inputs": [...], "outputs": [...]}; the score is the share of expected outputs the reply
    prints (a stand-in for running the program). Raises on a ground truth that is not that dict."""
    if not isinstance(ground_truth, dict) or not isinstance(ground_truth.get("outputs"), list):
        raise TypeError(f"expected the test cases as a dict, got {type(ground_truth).__name__}")
    outputs = ground_truth["outputs"]
    passed = sum(1 for out in outputs if out in solution_str)
    return {"score": passed / len(outputs), "acc": passed == len(outputs), "pred": f"{passed}/{len(outputs)}"}


def environment_report(**_):
    """Scores 1.0; pred lists which of the names below the worker's environment (os.environ and
    /proc/self/environ) holds: what a scorer could read and leak."""
    import os

    watched = ("AWS_SECRET_ACCESS_KEY", "DAPO_REWARD_REMOTE_HEADERS", "TRACKER_TOKEN", "SCORER_SETTING")
    try:
        with open("/proc/self/environ", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        raw = ""
    seen = [name for name in watched if name in os.environ or f"{name}=" in raw]
    return {"score": 1.0, "pred": ",".join(seen) or "-"}


def length_parity(solution_str, **_):
    """1.0 when the reply has an even number of characters, else -1.0 (acc: even), pred its length:
    a random model's replies vary under it, so accuracies and pass@k are neither all 0 nor all 1."""
    even = len(solution_str) % 2 == 0
    return {"score": 1.0 if even else -1.0, "acc": even, "pred": str(len(solution_str))}
