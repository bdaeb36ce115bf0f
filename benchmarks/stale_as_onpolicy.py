"""`dapo` CLI with stale samples trained as if on-policy: the behaviour before rollout correction,
kept only as the baseline of the off-policy ablation (`benchmarks/losses.py --suite offpolicy`).

The platform itself cannot be configured this way (stale rows always get the truncated
importance weight, whatever `rolloutCorrection.mode` says): here the learner's correction steps
are replaced so every row, stale or not, keeps importance weight 1 and its PPO ratio is taken against
the proximal log-probs recomputed with the current weights, the clip range centred on the current
policy instead of the one that sampled the row. In-process launcher only (the patch lives in this
process).

    python benchmarks/stale_as_onpolicy.py run RUN_FILE [--set ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from dapo.cli import main  # noqa: E402
from dapo.learner.torch_learner import TorchLearner  # noqa: E402


def train_as_on_policy(self, batch):
    """No importance weight and no correction metrics: every row is treated as on-policy."""
    return batch, {}


if __name__ == "__main__":
    if "--launcher" in sys.argv:
        raise SystemExit("stale_as_onpolicy.py patches this process's learner: use the in-process launcher")
    TorchLearner.correct_for_rollout = train_as_on_policy
    # the first optimizer step weighs its own rows from its forward pass: no weights there either
    TorchLearner.needs_importance_weights = lambda self, batch: False
    sys.exit(main(sys.argv[1:]))
