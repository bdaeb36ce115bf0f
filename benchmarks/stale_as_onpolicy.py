"""`dapo` CLI with stale samples trained as if on-policy: the behaviour before rollout correction,
kept only as the baseline of the off-policy ablation (`benchmarks/losses.py --suite offpolicy`).

The platform itself cannot be configured this way (stale rows always get the truncated
importance weight, whatever `rolloutCorrection.mode` says): here the learner's importance
weights are replaced so every row, stale or not, keeps importance weight 1 and its PPO ratio is taken against
the proximal log-probs recomputed with the current weights, the clip range centred on the current
policy instead of the one that sampled the row. In-process launcher only (the patch lives in this
process).

    python benchmarks/stale_as_onpolicy.py run RUN_FILE [--set ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import torch  # noqa: E402

from dapo.cli import main  # noqa: E402
from dapo.learner.torch_learner import TorchLearner  # noqa: E402


def weights_of_one(self, proximal, rows):
    """Importance weight 1 at every valid position, nothing truncated: every row is treated as
    on-policy (the correction metrics still report the probability gaps, with weight 1)."""
    mask = rows.response_mask.to(proximal.device)
    return mask.float(), torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)


if __name__ == "__main__":
    if "--launcher" in sys.argv:
        raise SystemExit("stale_as_onpolicy.py patches this process's learner: use the in-process launcher")
    TorchLearner.importance_weights = weights_of_one  # the learner's one source of rollout-correction weights
    sys.exit(main(sys.argv[1:]))
