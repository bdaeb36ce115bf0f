"""User scorers named in the run file (``spec.reward.scorers[i].function``), and the one rule for
reading what any scorer returns.

A reference is ``package.module:function`` (imported from ``sys.path``, e.g. a module baked into a
derived image) or ``path/to/file.py:function`` (loaded from that file; a relative path is taken
from the current directory, like the data paths of a run file). The function is called as verl
calls a ``compute_score``::

    fn(solution_str=..., ground_truth=..., data_source=..., extra_info=...)

and returns a float, or a mapping with ``score`` and optionally ``acc`` (default ``score > 0``)
and ``pred`` (default ``""``). Anything else (NaN, a string, a mapping without ``score``) is a
bad result: the caller fails that response (see :mod:`dapo.reward.pool`).

This module is imported by the scorer worker processes: no torch here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Callable

from dapo.spec import SCORER_FUNCTION_PATTERN as FUNCTION_REF_PATTERN
from dapo.spec import SpecError

__all__ = ["FUNCTION_REF_PATTERN", "ScorerImportError", "call_user_scorer", "load_function", "normalize_ref",
           "read_score"]

_REF = re.compile(FUNCTION_REF_PATTERN)
_MAX_PRED_CHARS = 1000


class ScorerImportError(SpecError):
    """A scorer reference of the run file that does not resolve to a callable; names the field."""


def _is_file_ref(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def normalize_ref(ref: str) -> str:
    """The reference as worker processes will load it: a file path made absolute (workers may
    run with another current directory), a module reference unchanged."""
    module, _, name = ref.rpartition(":")
    if _is_file_ref(module):
        return f"{os.path.abspath(os.path.expanduser(module))}:{name}"
    return ref


def _load_file_module(path: str):
    """Import the Python file at ``path`` once per process under a stable private module name."""
    module_name = "dapo_user_scorer_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses / pickling inside the file look it up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_function(ref: str, field: str = "spec.reward.scorers[].function") -> Callable[..., Any]:
    """The callable ``ref`` names; :class:`ScorerImportError` naming ``field`` and the fix when it
    does not resolve (no such module or file, import-time exception, no such attribute, not callable)."""
    if not isinstance(ref, str) or not _REF.match(ref):
        raise ScorerImportError(f"{field}: {ref!r} is not a function reference; write 'package.module:function' "
                                "or 'path/to/file.py:function'")
    module_part, _, name = ref.rpartition(":")
    try:
        if _is_file_ref(module_part):
            path = os.path.abspath(os.path.expanduser(module_part))
            if not os.path.isfile(path):
                raise ScorerImportError(f"{field}: {ref!r}: no such file {path} (a relative path is read from the "
                                        "directory `dapo run` starts in; on Kubernetes mount it with "
                                        "spec.reward.scorerConfigMap or bake it into the image)")
            module = _load_file_module(path)
        else:
            module = importlib.import_module(module_part)
    except ScorerImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import-time failure is the user's to fix
        raise ScorerImportError(f"{field}: cannot import {module_part!r} for {ref!r} ({type(exc).__name__}: {exc}); "
                                "install the package in this environment / image, or give a file path "
                                "'path/to/file.py:function'") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ScorerImportError(f"{field}: {module_part!r} has no attribute {name!r} (from {ref!r}); check the "
                                "function name after the colon")
    if not callable(fn):
        raise ScorerImportError(f"{field}: {ref!r} is a {type(fn).__name__}, not a function")
    return fn


def read_score(value: Any) -> tuple[float, bool, str]:
    """``(score, acc, pred)`` from what a scorer returned: a finite number, or a mapping with a
    finite ``score`` and optional ``acc`` / ``pred``. ValueError / TypeError say what is wrong."""
    if isinstance(value, Mapping):
        if "score" not in value:
            raise TypeError(f"scorer returned a mapping without 'score' (keys: {sorted(map(str, value))[:10]})")
        score = _finite(value["score"])
        acc = bool(value["acc"]) if value.get("acc") is not None else score > 0
        pred = value.get("pred")
        return score, acc, ("" if pred is None else str(pred)[:_MAX_PRED_CHARS])
    score = _finite(value)
    return score, score > 0, ""


def _finite(value: Any) -> float:
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"scorer returned a {type(value).__name__} ({str(value)[:80]!r}); return a float or "
                        "a mapping with 'score'")
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"scorer returned a non-finite score ({score})")
    return score


_loaded: dict[str, Callable[..., Any]] = {}


def call_user_scorer(ref: str, solution: str, ground_truth: str, data_source: str | None,
                     extra_info: Any = None) -> tuple[float, bool, str]:
    """Call the function ``ref`` names with verl's keyword arguments (loaded once per process)."""
    fn = _loaded.get(ref)
    if fn is None:
        fn = _loaded[ref] = load_function(ref)
    return read_score(fn(solution_str=solution, ground_truth=ground_truth, data_source=data_source,
                         extra_info=extra_info))
