"""Shared test set-up.

tests/ goes on sys.path first thing: the helper modules here (``_*.py``: run files, the tiny
policy and trainer, reference implementations, the CRD schema checks) import the same way from
tests/, tests/operator/ and tests/faults/, whatever pytest collects first. Test modules never
import each other; what several modules share lives in a helper module.

The thread budget (dapo.controller.threads) is off for the whole suite (DAPO_THREAD_BUDGET=off):
a run's float arithmetic depends on its thread count, and the tests compare runs bit for bit
(resume equal to an uninterrupted run), so torch's thread count must not follow whatever else the
machine is doing while they run; each test module sets its own. tests/test_threads.py tests the
budget itself with its own settings.

Tiers (markers declared in pyproject.toml): ``vllm`` (drives the vLLM engine), ``faults`` (the
fault-injection suite, tests/faults/), ``processes`` (starts OS processes that train, serve or run
the CLI), ``integration`` (starts a server, an engine, a reward worker pool or a training inside
the test process). The fast tier is ``-m "not (vllm or faults or processes)"``; a plain run runs
everything.

The ``run_doc`` fixture builds run files: ``run_doc(name=None, preset="minimal", **sections)``
(tests/_run_files.py: presets, deep merge, ``Replace``).
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import os  # noqa: E402

import pytest  # noqa: E402

import _run_files  # noqa: E402

os.environ.setdefault("DAPO_THREAD_BUDGET", "off")


@pytest.fixture
def run_doc(request):
    """``run_doc(name=None, preset="minimal", *, folder=None, namespace=None, metadata=None, **sections)``:
    a fresh DAPORun document (tests/_run_files.py). A preset that writes data files (``tiny``)
    writes them into the test's tmp_path unless ``folder`` says where."""

    def build(name=None, preset="minimal", **kwargs):
        if _run_files.needs_folder(preset) and kwargs.get("folder") is None:
            kwargs["folder"] = request.getfixturevalue("tmp_path")
        return _run_files.run_doc(name, preset, **kwargs)

    return build


# The tiny GGUF model (tests/_gguf_tiny.py), its loaded policy and a checkpoint of it: shared by
# the transformers test and the vLLM test of the GGUF path, built once per module that asks.
@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    from _gguf_tiny import build_gguf_model
    return build_gguf_model(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def gguf_policy(gguf_model):
    from _gguf_tiny import load_gguf_policy
    return load_gguf_policy(gguf_model)


@pytest.fixture(scope="module")
def gguf_checkpoint(gguf_policy, tmp_path_factory):
    from _gguf_tiny import write_checkpoint
    return write_checkpoint(gguf_policy, tmp_path_factory.mktemp("run"))
