"""The runtime package never needs the operator package: the runtime image and its pods run
`dapo` without `dapo_operator` (the operator imports the runtime, never the other way round)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "runtime" / "dapo"
OPERATOR_MODULE = re.compile(r"^dapo_operator(\.\w+)*$")


def _operator_references(path: Path) -> list[str]:
    """Imports of dapo_operator in one module, and strings that name one of its modules (what a
    lazy ``importlib.import_module`` would load)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "dapo_operator"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dapo_operator":
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and OPERATOR_MODULE.match(node.value):
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_no_runtime_module_imports_the_operator_package():
    offenders = {str(p.relative_to(ROOT)): refs for p in sorted(RUNTIME.rglob("*.py")) if (refs := _operator_references(p))}
    assert not offenders, f"runtime modules that reach the operator package: {offenders}"


# dapo_operator made unimportable, as in a runtime image without it
_WITHOUT_OPERATOR = """
import contextlib, io, sys
sys.modules["dapo_operator"] = None
import dapo.cli, dapo.entry.roles, dapo.entry.inprocess, dapo.entry.processes
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = dapo.cli.main(["crd"])
assert code == 0 and "kind: CustomResourceDefinition" in out.getvalue(), (code, out.getvalue()[:200])
print(sorted(m for m in sys.modules if m.split(".")[0] == "dapo_operator" and sys.modules[m] is not None))
"""


@pytest.mark.processes
def test_runtime_cli_and_roles_run_without_the_operator_package():
    """`dapo` and the modules the pods' roles start from import, and `dapo crd` prints the CRD,
    with dapo_operator unimportable; none of its modules is loaded."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_OPERATOR], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.processes
def test_operator_command_renders_and_reports_a_bad_file_like_dapo(tmp_path):
    """`python -m dapo_operator render` prints the pods of a run file; a bad file is one line
    naming the field, exit 2."""
    good = ROOT / "examples" / "k8s-run.yaml"
    done = subprocess.run([sys.executable, "-m", "dapo_operator", "render", str(good)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kind: Pod" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("apiVersion: dapo.dev/v1alpha1", "apiVersion: dapo.dev/v9"))
    done = subprocess.run([sys.executable, "-m", "dapo_operator", "render", str(bad)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "apiVersion" in done.stderr
