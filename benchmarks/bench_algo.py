"""Benchmark dapo.algo against inline torch expressions of the same formulas.

Prints a table: median wall time over repeats (after warm-up; the two loss variants timed in alternation) of
  * policy_loss forward+backward at BATCH x LENGTH tokens (float32), vs an inline
    expression of the DAPO loss (token-mean) with no validation and no metrics;
  * group_advantages for 512 prompts x 16 responses (string ids, tensor ids), vs a
    per-sample Python dict loop in the style of verl's compute_grpo_outcome_advantage.

Usage: python benchmarks/bench_algo.py [--batch 256] [--length 8192] [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dapo import algo


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns, repeats: int, warmup: int = 2) -> list[float]:
    """Medians for several functions timed in alternation, so a busy shared machine
    slows them alike and the ratio stays meaningful."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for slot, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            slot.append(time.perf_counter() - start)
    return [statistics.median(slot) for slot in times]


def inline_dapo_loss(log_prob, old_log_prob, adv, mask, eps_low=0.2, eps_high=0.28, c=10.0):
    """The formula written inline, as a user would without the library (token-mean)."""
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20, 20))
    a = adv.unsqueeze(-1)
    loss = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    loss = torch.where(a < 0, torch.minimum(loss, -a * c), loss)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def loop_group_advantages(scores, ids, eps=1e-6):
    """Per-sample Python loop over a dict of groups (the shape of verl's reference)."""
    groups: dict = {}
    for i, gid in enumerate(ids):
        groups.setdefault(gid, []).append(scores[i])
    stats = {}
    for gid, vals in groups.items():
        if len(vals) == 1:
            stats[gid] = (torch.tensor(0.0), torch.tensor(1.0))
        else:
            t = torch.stack(vals)
            stats[gid] = (t.mean(), t.std())
    out = scores.clone()
    for i, gid in enumerate(ids):
        mean, std = stats[gid]
        out[i] = (scores[i] - mean) / (std + eps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.length)
    old = -torch.rand(shape, generator=gen) * 3
    base = old + (torch.rand(shape, generator=gen) - 0.5) * 0.8
    adv = torch.randn(args.batch, generator=gen)
    lengths = torch.randint(1, args.length + 1, (args.batch,), generator=gen)
    mask = torch.arange(args.length).unsqueeze(0) < lengths.unsqueeze(1)
    mask_f = mask.float()

    def run_lib():
        lp = base.clone().requires_grad_(True)
        loss, _ = algo.policy_loss(lp, old, adv, mask)
        loss.backward()

    def run_inline():
        lp = base.clone().requires_grad_(True)
        inline_dapo_loss(lp, old, adv, mask_f).backward()

    # same numbers, so the timing compares like with like
    lp1 = base.clone().requires_grad_(True)
    lp2 = base.clone().requires_grad_(True)
    l1, _ = algo.policy_loss(lp1, old, adv, mask)
    l2 = inline_dapo_loss(lp2, old, adv, mask_f)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-5, atol=1e-9)

    num_prompts, group = 512, 16
    scores = torch.where(torch.rand(num_prompts * group, generator=gen) > 0.5, 1.0, -1.0)
    str_ids = [f"prompt-{i // group}" for i in range(num_prompts * group)]
    tensor_ids = torch.arange(num_prompts * group) // group
    torch.testing.assert_close(algo.group_advantages(scores, str_ids), loop_group_advantages(scores, str_ids))

    lib_s, inline_s = interleaved_median_seconds([run_lib, run_inline], args.repeats)
    rows = [
        (f"policy_loss fwd+bwd {args.batch}x{args.length} fp32", lib_s),
        (f"inline torch expression {args.batch}x{args.length} fp32", inline_s),
        (f"group_advantages {num_prompts}x{group} str ids", median_seconds(lambda: algo.group_advantages(scores, str_ids), args.repeats)),
        (f"group_advantages {num_prompts}x{group} tensor ids", median_seconds(lambda: algo.group_advantages(scores, tensor_ids), args.repeats)),
        (f"python dict loop {num_prompts}x{group} (verl-style)", median_seconds(lambda: loop_group_advantages(scores, str_ids), max(3, args.repeats // 2), warmup=1)),
    ]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}")
    width = max(len(name) for name, _ in rows)
    print(f"{'case':<{width}}  {'median ms':>10}")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds * 1e3:>10.2f}")
    lib, inline = rows[0][1], rows[1][1]
    print(f"policy_loss / inline = {lib / inline:.2f}x (policy_loss also computes 3 metrics and validates)")


if __name__ == "__main__":
    main()
