"""The environment a scorer worker process starts with: only what Python needs, never the reward
process's credentials.

A reward pod's environment holds secrets the scorer code has no business seeing: the remote reward
service's headers (``DAPO_REWARD_REMOTE_HEADERS``), S3 keys (``AWS_*``), tracker tokens. Run-file
scorers are user code, so their worker processes start from a scrubbed environment: the names in
:data:`WORKER_ENV_KEEP` plus what ``spec.reward.passEnv`` lists. This keeps credentials out of a
scorer's ``os.environ`` and ``/proc/self/environ``; it is not a security boundary (a process of the
same user can still read its parent's ``/proc/PID/environ``): model-written or otherwise untrusted
code belongs behind a remote reward service or a sandbox (docs/rewards.md, "Trust model").

How: the worker processes come from a fork server (or ``spawn``), both of which exec a fresh
Python with the environment of the moment; :func:`start_scrubbed` sets ``os.environ`` to the
scrubbed one for just that moment (under a lock), so the fork server, and every worker forked from
it, never had the secrets. A fork server that something else in this process started first
(with the full environment) is not used: the workers are then spawned instead.
"""

from __future__ import annotations

import contextlib
import fnmatch
import multiprocessing
import os
import threading
from collections.abc import Iterator, Mapping, Sequence

__all__ = ["WORKER_ENV_KEEP", "scorer_environment", "start_scrubbed"]

#: Environment names (globs) a worker keeps: paths, locale, time zone, temp folders, Python's own
#: settings, thread counts and torch's CPU kernel choice (ATEN_CPU_CAPABILITY: the fork server is
#: shared by every forkserver process of the run's process, learner ranks included, so dropping it
#: would give them other float kernels than the process that started them). Anything else must be
#: listed in spec.reward.passEnv.
WORKER_ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR", "TEMP", "TMP",
                   "PYTHON*", "VIRTUAL_ENV", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "ATEN_CPU_CAPABILITY")

_LOCK = threading.Lock()
_forkserver_env: dict[str, str] | None = None  # the environment the fork server was started with, if by us


def scorer_environment(environ: Mapping[str, str], pass_env: Sequence[str] = ()) -> dict[str, str]:
    """The part of ``environ`` a scorer worker gets: names matching :data:`WORKER_ENV_KEEP` or a
    ``pass_env`` glob (spec.reward.passEnv)."""
    patterns = tuple(WORKER_ENV_KEEP) + tuple(pass_env)
    return {key: value for key, value in environ.items() if any(fnmatch.fnmatchcase(key, p) for p in patterns)}


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` is ``env`` inside the block (the process's own environment is restored)."""
    saved = os.environ.copy()
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _forkserver_has(env: Mapping[str, str]) -> bool:
    """True when the fork server runs with exactly ``env``: started here now (under ``env``) if it
    was not running or had died, or earlier by this module. False when something else started it
    (then its children would inherit that process's full environment)."""
    global _forkserver_env
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is None or not hasattr(server, "_forkserver_pid"):
        return False  # another Python's internals: spawn, which is always clean
    pid = server._forkserver_pid
    if not _running(pid):
        with _environment(env):
            server.ensure_running()  # (re)starts it with env
        if server._forkserver_pid != pid:
            _forkserver_env = dict(env)
    return _forkserver_env == dict(env)


def _running(pid: int | None) -> bool:
    """Whether process ``pid`` runs (not exited, not a zombie), without reaping it: the fork
    server's own ensure_running() reaps and restarts a dead one. Unknown (no /proc): False, so the
    caller goes through ensure_running() with the scrubbed environment, which is safe either way."""
    if pid is None:
        return False
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def start_scrubbed(ctx, make_process, env: Mapping[str, str]):
    """Create (``make_process(ctx)``) and start a worker process whose environment is ``env``.
    ``ctx`` is the pool's multiprocessing context (forkserver or spawn). With a fork server that
    has ``env`` the parent's environment is never touched; otherwise (spawn, or a fork server
    started elsewhere) the worker is spawned while ``os.environ`` is ``env``, for that moment."""
    with _LOCK:
        if ctx.get_start_method() == "forkserver":
            if _forkserver_has(env):
                process = make_process(ctx)
                process.start()
                return process
            ctx = multiprocessing.get_context("spawn")
        process = make_process(ctx)
        with _environment(env):
            process.start()
        return process
