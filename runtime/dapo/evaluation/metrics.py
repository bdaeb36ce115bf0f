"""The estimators of an evaluation: avg@n, unbiased pass@k, maj@k; per prompt, then per data source.

With n samples of a prompt of which c are correct:

    avg@n  = c / n                                          (the DAPO paper's AIME avg@32)
    pass@k = 1 - C(n - c, k) / C(n, k)                      (Chen et al. 2021, eq. 1: unbiased;
                                                             the probability that k of the n
                                                             samples drawn without replacement
                                                             hold a correct one)
    maj@k  = whether the most frequent answer of the first k samples is correct

maj@k votes on the scorers' extracted answers (``pred``); an unparsed answer (``[INVALID]``) does
not vote; a tie goes to the answer that appeared first among the k samples; with no vote at all
the prompt counts as wrong. A data source's figure is the mean over its prompts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from dapo.reward.result import INVALID_PRED

__all__ = ["PromptSamples", "maj_at_k", "pass_at_k", "summarize", "validation_metrics"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt: 1 - C(n - c, k) / C(n, k), computed as a product (no huge
    binomials): 1 - prod_{i = n - c + 1}^{n} (1 - k / i)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k takes integers, got n={n!r}, c={c!r}, k={k!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: correct samples c={c} must be in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k={k} must be in [1, n={n}] (draw at most the samples there are)")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(preds: Sequence[str], accs: Sequence[bool], k: int) -> bool:
    """Whether the majority answer of the first ``k`` samples is correct (module docstring)."""
    if not 1 <= k <= len(preds):
        raise ValueError(f"maj@k: k={k} must be in [1, {len(preds)}]")
    if len(accs) != len(preds):
        raise ValueError(f"maj@k: {len(preds)} answers but {len(accs)} correctness flags")
    votes = Counter()
    first: dict[str, int] = {}
    for i, pred in enumerate(preds[:k]):
        if pred and pred != INVALID_PRED:
            votes[pred] += 1
            first.setdefault(pred, i)
    if not votes:
        return False
    best = max(votes.values())
    winner = min((p for p, v in votes.items() if v == best), key=first.__getitem__)
    return bool(accs[first[winner]])


@dataclass
class PromptSamples:
    """The n scored samples of one prompt."""

    data_source: str
    prompt: str
    responses: list[str]
    preds: list[str]
    accs: list[bool]
    scores: list[float]
    lengths: list[int]
    truncated: list[bool]

    @property
    def n(self) -> int:
        return len(self.accs)


def summarize(prompts: Sequence[PromptSamples], ks: Sequence[int] = ()) -> dict[str, dict[str, float]]:
    """Per data source (and "all"): avg@n, pass@k and maj@k for each k (k <= n), mean score,
    mean response length (tokens), the share of truncated responses, prompt and sample counts."""
    groups: dict[str, list[PromptSamples]] = {}
    for p in prompts:
        groups.setdefault(p.data_source, []).append(p)
    if len(groups) > 1:
        groups["all"] = list(prompts)
    out: dict[str, dict[str, float]] = {}
    for source, items in groups.items():
        samples = [a for p in items for a in p.accs]
        row = {"prompts": len(items), "samples": len(samples),
               f"avg@{items[0].n}" if len({p.n for p in items}) == 1 else "avg@n": sum(samples) / len(samples),
               "score": sum(s for p in items for s in p.scores) / len(samples),
               "response_length": sum(x for p in items for x in p.lengths) / len(samples),
               "truncated": sum(t for p in items for t in p.truncated) / len(samples)}
        for k in ks:
            if all(k <= p.n for p in items):
                row[f"pass@{k}"] = sum(pass_at_k(p.n, sum(p.accs), k) for p in items) / len(items)
                row[f"maj@{k}"] = sum(maj_at_k(p.preds, p.accs, k) for p in items) / len(items)
        out[source] = row
    return out


def validation_metrics(prompts: Sequence[PromptSamples], n: int, pass_k: Sequence[int] = ()) -> dict[str, float]:
    """The metrics a training run logs for an evaluation: verl's ``val-core/<data_source>/acc/mean@n``
    (and ``.../acc/pass@k``, ``.../acc/maj@k`` for each k of spec.eval.passK) per data source, and
    the names dashboards already read: ``val/acc/mean`` (avg@n over all samples),
    ``val/score/mean``, ``val/response_length/mean``, ``val/pass@k``, and ``val/acc/<source>``
    when there are several data sources."""
    accs = [a for p in prompts for a in p.accs]
    scores = [s for p in prompts for s in p.scores]
    lengths = [x for p in prompts for x in p.lengths]
    out: dict[str, float] = {
        "val/acc/mean": sum(accs) / len(accs),
        "val/score/mean": sum(scores) / len(scores),
        "val/response_length/mean": sum(lengths) / len(lengths),
        "val/num_prompts": len(prompts),
        "val/n": n,
    }
    by_source: dict[str, list[PromptSamples]] = {}
    for p in prompts:
        by_source.setdefault(p.data_source, []).append(p)
    if len(by_source) > 1:
        for source, items in sorted(by_source.items()):
            values = [a for p in items for a in p.accs]
            out[f"val/acc/{source}"] = sum(values) / len(values)
    for k in pass_k:
        out[f"val/pass@{k}"] = sum(pass_at_k(p.n, sum(p.accs), k) for p in prompts) / len(prompts)
    for source, items in sorted(by_source.items()):
        values = [a for p in items for a in p.accs]
        out[f"val-core/{source}/acc/mean@{n}"] = sum(values) / len(values)
        for k in pass_k:
            out[f"val-core/{source}/acc/pass@{k}"] = sum(pass_at_k(p.n, sum(p.accs), k) for p in items) / len(items)
            out[f"val-core/{source}/acc/maj@{k}"] = sum(maj_at_k(p.preds, p.accs, k) for p in items) / len(items)
    return out
