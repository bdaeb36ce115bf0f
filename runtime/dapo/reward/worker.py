"""The scorer worker process's main loop (no torch import: workers must start fast and small).

Protocol over one duplex pipe, parent <-> worker:
  worker -> ("ready", pid)                           once, after warm-up imports
  parent -> (task_id, scorer_pickle, solution, ground_truth)
  worker -> ("ok", task_id, score, acc, pred) | ("error", task_id, message)
  parent -> None                                     clean shutdown
The parent enforces the time bound by killing the whole process, so nothing here tries to
interrupt a scorer.
"""

from __future__ import annotations

import importlib
import os
import pickle

__all__ = ["worker_main"]

_MAX_ERROR_CHARS = 500


def _limit_memory(memory_limit_mb: int | None) -> None:
    """Cap the address space so a memory bomb (e.g. 9^(9^9) as an exact integer) raises
    MemoryError here instead of pushing the host into the OOM killer."""
    if not memory_limit_mb:
        return
    try:
        import resource

        limit = int(memory_limit_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # not supported on this platform: the time bound still holds


def _score_one(scorer_pickle: bytes, solution: str, ground_truth: str) -> tuple:
    """Run one scorer; ("ok", score, acc, pred) or ("error", message)."""
    try:
        scorer = pickle.loads(scorer_pickle)
        result = scorer(solution, ground_truth)
        return ("ok", float(result["score"]), bool(result["acc"]), str(result["pred"]))
    except BaseException as exc:  # noqa: BLE001 - a scorer bug must not take the worker down
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return ("error", f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS])


def worker_main(conn, warm_modules: tuple[str, ...] = (), memory_limit_mb: int | None = None) -> None:
    """Serve scoring tasks from ``conn`` until the parent sends ``None`` or goes away."""
    _limit_memory(memory_limit_mb)
    for module in warm_modules:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the scorer that needs it will report the error per task
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # parent gone
        if message is None:
            return
        task_id, scorer_pickle, solution, ground_truth = message
        outcome = _score_one(scorer_pickle, solution, ground_truth)
        try:
            conn.send((outcome[0], task_id, *outcome[1:]))
        except (BrokenPipeError, OSError):
            return
