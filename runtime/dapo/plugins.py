"""Where policy losses and advantage estimators come from, and what the run file may name.

A loss or estimator is registered by a decorator (``@register_policy_loss("name")``,
``@register_advantage_estimator("name")``, `dapo.algo`) in one of the *algorithm modules*:

- ``dapo.algo`` itself (dapo, grpo, dr-grpo, gspo, cispo; grpo, dr-grpo, rloo);
- every module named in the ``dapo.algorithms`` entry-point group of an installed package, e.g.
  in that package's pyproject.toml::

      [project.entry-points."dapo.algorithms"]
      my_losses = "my_package.losses"

Two readers, one source. Training imports the modules (`load_algorithm_modules`: the decorators
run and fill the registries the learner dispatches through). The run-file spec, the CRD and the
operator must not import torch, so they read the same modules' *source* without executing it
(`declared`): the decorator calls give the names, and a policy loss's keyword-only parameters
give what ``spec.algorithm.policyLossParams`` accepts for it. A test checks that both readers
agree (tests/test_offpolicy.py).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["ENTRY_POINT_GROUP", "Declaration", "algorithm_modules", "declared", "load_algorithm_modules"]

ENTRY_POINT_GROUP = "dapo.algorithms"
BUILTIN_MODULE = "dapo.algo"


@dataclass(frozen=True)
class Declaration:
    """One ``@decorator("name")`` found in an algorithm module's source."""

    name: str
    module: str
    params: tuple[str, ...]  # keyword-only parameters (a policy loss's own hyperparameters)


@lru_cache(maxsize=None)
def algorithm_modules() -> tuple[str, ...]:
    """``dapo.algo`` and the modules of the ``dapo.algorithms`` entry points, in that order."""
    plugins = sorted({entry.value.split(":")[0].strip()
                      for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})
    return (BUILTIN_MODULE, *[m for m in plugins if m != BUILTIN_MODULE])


def _source(module: str) -> str:
    found = importlib.util.find_spec(module)
    if found is None or not found.origin or not found.origin.endswith(".py"):
        where = "reinstall the dapo package" if module == BUILTIN_MODULE else \
            f"it is named in the {ENTRY_POINT_GROUP!r} entry points; install it, or uninstall the package naming it"
        raise RuntimeError(f"algorithm module {module} cannot be read as Python source: {where}")
    return Path(found.origin).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def declared(decorator: str) -> tuple[Declaration, ...]:
    """Every ``@<decorator>("name")`` at the top level of the algorithm modules, in module and
    file order, read from source (nothing is imported). Two modules declaring one name is an
    error naming both."""
    found: dict[str, Declaration] = {}
    for module in algorithm_modules():
        for node in ast.parse(_source(module)).body:
            for deco in getattr(node, "decorator_list", []):
                if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Name) and deco.func.id == decorator
                        and deco.args and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)):
                    continue
                name = deco.args[0].value
                if name in found:
                    raise RuntimeError(f"@{decorator}({name!r}) is declared in {found[name].module} and in {module}: "
                                       "rename one")
                params = tuple(arg.arg for arg in node.args.kwonlyargs) if isinstance(node, ast.FunctionDef) else ()
                found[name] = Declaration(name, module, params)
    if not found:
        raise RuntimeError(f"no @{decorator}(...) found in {', '.join(algorithm_modules())}")
    return tuple(found.values())


def load_algorithm_modules() -> None:
    """Import every algorithm module, so their decorators fill `dapo.algo`'s registries."""
    for module in algorithm_modules():
        importlib.import_module(module)
