"""Which scorer scores a response: routing on its row's ``data_source`` (case-insensitive globs).

1. the run file's ``spec.reward.scorers`` rules (``dataSource`` glob -> ``function``), first match;
2. the remote reward service (``spec.reward.remote``) when one is set: it takes every other row;
3. the built-in rules (:data:`dapo.reward.registry.DATA_SOURCE_RULES`), then ``spec.reward.scorer``.

A route is a scorer name: a run-file function reference (``pkg.mod:fn`` / ``/abs/file.py:fn``),
the remote service's name, or a built-in scorer's name.
"""

from __future__ import annotations

import fnmatch
import pickle
from collections.abc import Sequence

from dapo.reward.custom import load_function, normalize_ref
from dapo.reward.registry import get_scorer, scorer_for_data_source

__all__ = ["ScorerRoutes"]


class ScorerRoutes:
    """The routing table of one scorer pool. Every run-file function is imported here, so a bad
    reference fails when the pool is built (:class:`~dapo.reward.custom.ScorerImportError`
    naming ``spec.reward.scorers[i].function``); an unknown ``default_scorer`` too."""

    def __init__(self, rules: Sequence[tuple[str, str]] = (), remote=None, default_scorer: str = "math_dapo"):
        get_scorer(default_scorer)  # unknown name -> error listing the known ones
        # (lower-cased glob, normalised reference, run-file field) of each rule, imports checked now
        self.rules: list[tuple[str, str, str]] = []
        for i, (pattern, ref) in enumerate(rules):
            where = f"spec.reward.scorers[{i}].function"
            load_function(ref, where)
            self.rules.append((str(pattern).strip().lower(), normalize_ref(ref), where))
        self.user_refs = {ref: where for _, ref, where in self.rules}
        self.remote = remote
        self.default_scorer = default_scorer

    def route(self, data_source: str | None) -> str:
        """The scorer of a row (see the module docstring)."""
        key = "" if data_source is None else str(data_source).strip().lower()
        for pattern, ref, _ in self.rules:
            if fnmatch.fnmatchcase(key, pattern):
                return ref
        if self.remote is not None:
            return self.remote.name
        return scorer_for_data_source(data_source, self.default_scorer)[0]

    def is_user(self, name: str) -> bool:
        """A run-file scorer (user code: gets extra_info and JSON ground truths)."""
        return name in self.user_refs

    def is_remote(self, name: str) -> bool:
        return self.remote is not None and name == self.remote.name

    def field(self, name: str) -> str | None:
        """The run-file field that named scorer ``name`` (None for a built-in scorer)."""
        if name in self.user_refs:
            return self.user_refs[name]
        return "spec.reward.remote" if self.is_remote(name) else None

    def payload(self, name: str) -> tuple[str, object]:
        """How a worker finds the scorer: a run-file reference it imports itself, or a pickled
        (by reference) built-in function."""
        if name in self.user_refs:
            return ("ref", name)
        fn = get_scorer(name)
        try:
            return ("pickle", pickle.dumps(fn))
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise TypeError(
                f"reward scorer {name!r} ({fn!r}) cannot be sent to worker processes: define it as a "
                f"module-level function of an importable module ({exc})"
            ) from exc
