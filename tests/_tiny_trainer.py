"""The in-process controller on the tiny policy, shared by the trainer tests (tests/test_trainer.py,
test_async.py, test_offpolicy_trainer.py, test_distributed_e2e.py): a deterministic scorer, a
Trainer built from the ``tiny`` run file, and readers of a run folder's metrics and checkpoints.

A random model cannot answer math, so most tests score with `OverlapScorer`, a deterministic
in-process rule with RewardScorer's interface (acc = the response contains a character of the
answer): it gives groups with varying accuracy, which is what exercises dynamic sampling.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from _dapo_tiny import tiny_policy
from _run_files import run_doc


class OverlapScorer:
    """RewardScorer's interface, in process: acc = response shares a character with the answer
    (``mode="overlap"``), every other response right (``"alternate"``: every group of an even n
    is mixed), or always right / always wrong; score = +1 / -1. ``"graded"``: always right, with a
    graded score 0.2 + 0.1 x (response length mod 5), as a run-file scorer giving partial credit."""

    def __init__(self, mode: str = "overlap"):
        self.mode = mode
        self.closed = False

    def score_batch(self, responses, ground_truths, data_sources=None, response_lengths=None, truncated=None,
                    extra_infos=None):
        self.extra_infos = extra_infos
        out = []
        for i, (text, truth, cut) in enumerate(zip(responses, ground_truths, truncated or [False] * len(responses))):
            acc = {"overlap": bool(set(text) & set(truth)), "alternate": i % 2 == 0, "right": True,
                   "wrong": False, "graded": True}[self.mode]
            score = 0.2 + 0.1 * (len(text) % 5) if self.mode == "graded" else 1.0 if acc else -1.0
            out.append(SimpleNamespace(score=score, acc=acc, truncated=cut, correctness=score, pred=text.strip()[:8]))
        return out

    def close(self):
        self.closed = True


def tiny_trainer(folder: Path, scorer, **spec_over):
    """The Trainer of the ``tiny`` run file (data written into ``folder``, output in folder/out) with
    ``spec_over`` deep-merged into it, the tiny policy and ``scorer``."""
    from dapo.entry.inprocess import build_embedded_run
    from dapo.spec import parse_run

    run = parse_run(run_doc(preset="tiny", folder=folder, **spec_over))
    embedded = build_embedded_run(run, folder / "out", resume=False, scorer=scorer, policy=tiny_policy(32, 2, 0))
    return embedded.trainer


def read_lines(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl of a run folder: (step records, evaluation records)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "actor/pg_loss" in r], [r for r in records if "val/acc/mean" in r]


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    """The (sha256-verified) local folder of committed checkpoint ``step``."""
    from dapo.storage import CheckpointStore

    store = CheckpointStore(str(run_dir / "checkpoints"))
    return store.fetch(next(info for info in store.list_committed() if info.step == step))


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_folder(run_dir, step) / "model" / "model.safetensors"))
