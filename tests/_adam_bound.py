"""How far AdamW's weights can move when its gradients carry float rounding: the tolerance for
comparing two float32 computations of the same training update (for example data-parallel ranks
against one process), derived from the arithmetic instead of tuned on one CPU.

Why a plain ``atol`` is not enough: AdamW's first steps move each weight by about lr x
m_hat / sqrt(v_hat), which depends on the gradient's *direction* history, not its size. A
gradient of 1e-6 whose float32 sum (taken in another order, or with other SIMD kernels) is off
by 4e-9 changes the second step's m_hat / sqrt(v_hat) by ~4e-3, i.e. the weight by 4e-3 x lr;
an element whose gradient is within its own rounding error of 0 can flip the sign of its whole
step. So which elements can be compared, and how tightly, follows from each step's gradient and
that gradient's rounding error:

1. `record_optimizer_steps` snapshots, at every optimizer step, the gradients the optimizer is
   about to apply (after clipping) and the learning rate;
2. the rounding error of each step's gradients is measured (a float32 reference against the
   same update in float64);
3. `update_tolerance` replays AdamW elementwise in float64 and moves every step's gradient by
   +- the error (all sign combinations: AdamW is elementwise, so this is the worst case per
   element to first order); the largest change of the total displacement is the tolerance;
4. `assert_same_weights` compares every element whose tolerance is below a tenth of a step
   (the update is determined by the gradient), and requires most elements to be such.
"""

from __future__ import annotations

import itertools

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7: one rounding of a float32 value
# A differently ordered float32 sum has its own rounding error, of the same order as the one
# measured against float64 but not the same; the difference of two such sums is at most their
# sum. 4 = 2 (two sums) x 2 (margin for the first-order replay).
ERROR_MARGIN = 4.0


def record_optimizer_steps(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[dict]:
    """Snapshot, before each ``optimizer.step()``, the gradients it is about to apply (already
    clipped) by parameter name, and the step's learning rate. ``names``: id(param) -> name.
    Returns the list the hook appends to: one {"lr": float, "grads": {name: tensor}} per step."""
    steps: list[dict] = []

    def snapshot(opt, args, kwargs):
        group = opt.param_groups[0]
        steps.append({"lr": float(group["lr"]), "betas": tuple(group["betas"]), "eps": float(group["eps"]),
                      "weight_decay": float(group["weight_decay"]),
                      "grads": {names[id(p)]: p.grad.detach().double().clone()
                                for g in opt.param_groups for p in g["params"] if p.grad is not None}})

    optimizer.register_step_pre_hook(snapshot)
    return steps


def _displacement(grads: list[torch.Tensor], lrs: list[float], betas, eps: float) -> torch.Tensor:
    """theta_T - theta_0 of T AdamW steps (weight decay 0, bias-corrected moments), float64."""
    beta1, beta2 = betas
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    total = torch.zeros_like(grads[0])
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        total = total - lr * m_hat / (v_hat.sqrt() + eps)
    return total


def gradient_errors(approx_steps: list[dict], exact_steps: list[dict]) -> list[dict[str, float]]:
    """Per step and tensor: the largest |approx - exact| gradient element (the measured rounding
    error of the approximate, e.g. float32, computation)."""
    assert len(approx_steps) == len(exact_steps), (len(approx_steps), len(exact_steps))
    return [{name: float((a["grads"][name] - e["grads"][name]).abs().max()) for name in e["grads"]}
            for a, e in zip(approx_steps, exact_steps)]


def update_tolerance(steps: list[dict], errors: list[dict[str, float]],
                     margin: float = ERROR_MARGIN) -> dict[str, torch.Tensor]:
    """Per tensor, per element: the largest change of AdamW's total displacement over ``steps``
    (recorded with `record_optimizer_steps`, ideally from the float64 computation) when each
    step's gradient moves by up to ``margin`` x that step's measured error (``errors``)."""
    first = steps[0]
    assert all(s["weight_decay"] == 0.0 for s in steps), "the replay covers weight decay 0 only"
    lrs = [s["lr"] for s in steps]
    out: dict[str, torch.Tensor] = {}
    for name in first["grads"]:
        grads = [s["grads"][name] for s in steps]
        nominal = _displacement(grads, lrs, first["betas"], first["eps"])
        worst = torch.zeros_like(nominal)
        for signs in itertools.product((-1.0, 1.0), repeat=len(steps)):
            moved = [g + sign * margin * err[name] for g, sign, err in zip(grads, signs, errors)]
            worst = torch.maximum(worst, (_displacement(moved, lrs, first["betas"], first["eps"]) - nominal).abs())
        out[name] = worst
    return out


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                        tolerance: dict[str, torch.Tensor], steps: list[dict], min_compared: float = 0.5,
                        eps: float = FLOAT32_EPS) -> int:
    """|actual - expected| <= tolerance + the weights' own rounding (``eps``: their dtype's, float32
    by default), on every element whose update is determined by its gradient (tolerance below a
    tenth of the smallest step's lr); at least ``min_compared`` of all elements must be compared.
    Returns how many elements were."""
    step_size = min(s["lr"] for s in steps)
    compared = total = 0
    for name, want in expected.items():
        bound = tolerance[name].to(want.device)
        determined = bound < 0.1 * step_size
        # the arithmetic of the step itself, per step: the new weight is rounded (eps x |theta|) and
        # the update lr x m_hat / (sqrt(v_hat) + eps) passes ~8 operations (moments, bias
        # corrections, sqrt, division), each off by <= eps relative; both doubled as margin
        rounding = len(steps) * eps * (2 * want.double().abs() + 16 * step_size)
        diff = (actual[name].double() - want.double()).abs()
        bad = determined & (diff > bound + rounding)
        assert not bool(bad.any()), (
            f"{name}: {int(bad.sum())} of {int(determined.sum())} determined elements differ by more than their "
            f"AdamW bound; worst excess {float((diff - bound - rounding)[bad].max()):.3g}")
        compared += int(determined.sum())
        total += want.numel()
    assert compared >= min_compared * total, f"only {compared} of {total} elements have a determined update"
    return compared
