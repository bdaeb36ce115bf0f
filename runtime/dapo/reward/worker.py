"""The scorer worker process's main loop (no torch import: workers must start fast and small).

Protocol over one duplex pipe, parent <-> worker:
  worker -> ("ready", pid)                           once, after warm-up imports
  parent -> [(task_id, scorer, solution, ground_truth, data_source), ...]   tasks, run in order
             scorer: ("pickle", bytes) a registered fn(solution, ground_truth), or
                     ("ref", "pkg.mod:fn" | "/abs/file.py:fn") a run-file scorer called with verl's
                     keyword arguments (dapo.reward.custom)
  worker -> ("ok", task_id, score, acc, pred) | ("error", task_id, message)   one per task, as it ends
A result that is not a finite score (dapo.reward.custom.read_score) is an "error" like an exception.
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


def _score_one(scorer: tuple[str, object], solution: str, ground_truth: str, data_source: str | None,
               extra_info: dict | None = None) -> tuple:
    """Run one scorer; ("ok", score, acc, pred) or ("error", message)."""
    from dapo.reward.custom import call_user_scorer, read_score

    try:
        kind, payload = scorer
        if kind == "ref":
            score, acc, pred = call_user_scorer(payload, solution, ground_truth, data_source, extra_info)
        else:
            score, acc, pred = read_score(pickle.loads(payload)(solution, ground_truth))
        return ("ok", score, acc, pred)
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
        for task_id, scorer, solution, ground_truth, data_source, extra_info in message:
            outcome = _score_one(scorer, solution, ground_truth, data_source, extra_info)
            try:
                conn.send((outcome[0], task_id, *outcome[1:]))
            except (BrokenPipeError, OSError):
                return
