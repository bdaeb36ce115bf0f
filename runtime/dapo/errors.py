"""The one error base class of the platform.

Every error the platform raises on purpose derives from :class:`DapoError`, so a caller (the CLI,
a pod's entry point, a user's script) can tell "the platform refused, and says why" from a bug.
Subclasses keep a standard base too (``ValueError`` for bad input, ``RuntimeError`` for failures
at run time, ``KeyError`` for an unknown name) so code written against those keeps working.

Messages name what to change: the run-file field (``spec.rollout.engine``), the environment
variable, the file or the peer, and the fix.
"""

from __future__ import annotations


class DapoError(Exception):
    """Base of every error the platform raises on purpose; the message says what to change."""


class ConfigError(DapoError, ValueError):
    """A setting outside the run file (an environment variable, a command-line argument) that
    cannot be used; the message names the variable and the expected form."""
