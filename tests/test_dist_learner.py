"""dapo.learner.distributed over real gloo groups: separate processes on loopback, free ports.

The learner ranks are child processes (torch threads 1); rank 0 plays the controller and writes
what it saw to a file the test compares with a single-process `TorchLearner` on the whole batch.
ZeRO-3 runs with stage3_param_persistence_threshold 100, so this tiny model's matrices are
partitioned while its norms and biases stay whole on every rank, as small parameters of a real
model do (DeepSpeed's default threshold, 1e5 elements, would keep every tiny parameter whole).
"""

from __future__ import annotations

import copy
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _adam_bound import assert_same_weights, gradient_errors, record_optimizer_steps, update_tolerance
from _checkpointable import LearnerCheckpointable
from _dapo_tiny import tiny_policy
from dapo.algo import RolloutCorrection
from dapo.storage.checkpointer import MODEL_DIR, Checkpointer
from dapo.learner.distributed import DistributedLearner, DistributedLearnerError, micro_batch_count
from dapo.rollout.base import encode_prompt
from dapo.learner.batch import make_batch
from dapo.learner.torch_learner import TorchLearner
from dapo.storage import CheckpointStore

torch.set_num_threads(2)
pytestmark = pytest.mark.processes  # every test starts learner ranks (torch.distributed over gloo)
CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "transformers.models.qwen2.modeling_qwen2", "dapo.learner.torch_learner"])
JOIN_TIMEOUT_S = 90
# rollout correction "none": only the stale rows of make_train_batch get (truncated) importance weights
LEARNER_ARGS = dict(lr=1e-2, weight_decay=0.0, warmup_steps=2, grad_clip=0.5, mini_batch_rows=4, micro_batch_rows=2,
                    ppo_epochs=1, rollout_correction=RolloutCorrection(mode="none"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_train_batch(tok, rows: int = 8, seed: int = 0, stale: bool = True):
    """Uneven prompt/response lengths (so ranks hold different token counts), advantages of
    both signs, old log-probs perturbed off the current policy so clipping is exercised."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [encode_prompt(tok, f"q{i}" * (1 + i % 3)) for i in range(rows)]
    responses = [torch.randint(5, 90, (1 + (5 * i) % 9,), generator=gen).tolist() for i in range(rows)]
    batch = make_batch(prompts, responses, tok.pad_token_id)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * (rows // 4))
    # behaviour log-probs and weight versions travel to every rank: with ``stale`` the first rows
    # were sampled by version 0 (the step starts at version 1), so the rollout correction is exercised
    batch.behaviour_log_probs = -(3 + 3 * torch.rand(batch.response_mask.shape, generator=gen)) * batch.response_mask
    batch.weight_versions = torch.tensor([0 if stale and i < 3 else 1 for i in range(rows)])
    batch.policy_version = 1
    return batch


def perturb(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    noise = 0.3 * torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(1), dtype=log_probs.dtype)
    return (log_probs + noise) * mask


def _policy(dtype, seed: int = 0):
    model, tok = tiny_policy(hidden=32, layers=2, seed=seed)
    return model.to(dtype), tok


ZERO3_PARTITION_MATRICES = {"zero_optimization": {"stage3_param_persistence_threshold": 100}}


def _checkpointer(out: str) -> Checkpointer:
    return Checkpointer(CheckpointStore(str(Path(out) / "ckpt"), keep=2), None, staging_root=Path(out) / "staging")


def _rank_main(rank: int, world: int, port: int, out: str, scenario: str, dtype_name: str, strategy: str,
               learner_args: dict) -> None:
    """One learner rank. Rank 0 drives; the others follow()."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    result: dict = {}
    try:
        dtype = getattr(torch, dtype_name)
        # the resumed run starts from other weights: the checkpoint's must win on every rank
        model, tok = _policy(dtype, seed=1 if scenario == "resume" else 0)
        if rank > 0:  # followers start from other weights: rank 0's must win
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        timeout = 6.0 if scenario == "dead_follower" else 60.0
        overrides = ZERO3_PARTITION_MATRICES if strategy == "deepspeed-zero3" else None
        learner = DistributedLearner(model, strategy=strategy, timeout_s=timeout, poll_s=0.5,
                                     deepspeed_overrides=overrides, **learner_args)
        if rank > 0:
            if scenario == "dead_follower":
                os._exit(0)  # vanish without a word
            learner.follow()
            result["followed"] = True
        else:
            # ZeRO-3 in float32 with stale rows left 2 of ~10k parameters 3e-6 off the one-rank step
            # (tolerance 2e-6): the DeepSpeed tests train fresh rows; torch ranks check stale ones
            batch = make_train_batch(tok, stale=strategy == "torch")
            if scenario == "dead_follower":
                time.sleep(1.0)
                t0 = time.perf_counter()
                try:
                    learner.compute_log_probs(batch)
                    learner.compute_log_probs(batch)
                except DistributedLearnerError as exc:
                    result["error"] = str(exc)
                result["seconds"] = time.perf_counter() - t0
            elif scenario in ("save", "resume"):
                _save_or_resume(learner, tok, batch, out, scenario, result)
                learner.shutdown()
            else:
                if strategy == "torch":  # ZeRO's optimizer holds gradient partitions: nothing whole to record
                    names = {id(p): n for n, p in learner.model.named_parameters()}
                    result["steps"] = record_optimizer_steps(learner.learner.optimizer, names)
                old = learner.compute_log_probs(batch)
                result["log_probs"] = old
                batch.old_log_probs = perturb(old, batch.response_mask)
                result["metrics"] = [learner.update(batch)]
                if strategy == "torch":  # ZeRO keeps its gradients partitioned inside the optimizer
                    result["grads"] = {n: p.grad.detach().clone() for n, p in learner.model.named_parameters()}
                result["params"] = {n: t.clone() for n, t in learner.named_parameters_for_sync()}
                if scenario == "checkpoint":
                    saved = {n: t.clone() for n, t in learner.full_state_dict_for_save().items()}
                    state = copy.deepcopy(learner.state_dict())
                    result["metrics"].append(learner.update(batch))  # moves weights and optimizer on
                    learner.load_model_weights(saved)  # what Checkpointer.restore does
                    learner.load_state_dict(state)
                    result["metrics"].append(learner.update(batch))  # must repeat the second update
                learner.shutdown()
    except BaseException:  # noqa: BLE001 - report to the test, whatever it was
        result["traceback"] = traceback.format_exc()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def _save_or_resume(learner, tok, batch, out: str, scenario: str, result: dict) -> None:
    """save: update, checkpoint (step 1), update again. resume (fresh ranks, other weights):
    restore step 1 and repeat the second update, which must come out the same."""
    checkpointer = _checkpointer(out)
    checkpointer.tokenizer = tok
    old_path = Path(out) / "old_log_probs.pt"
    if scenario == "save":
        batch.old_log_probs = perturb(learner.compute_log_probs(batch), batch.response_mask)
        torch.save(batch.old_log_probs, old_path)
        result["metrics"] = [learner.update(batch)]
        result["placeholders"] = sum(p.numel() == 0 for p in learner.model.parameters())
        checkpointer.save(LearnerCheckpointable(learner, step=1))
        result["saved_params"] = {n: t.clone() for n, t in learner.named_parameters_for_sync()}
    else:
        batch.old_log_probs = torch.load(old_path)
        trainer = LearnerCheckpointable(learner, step=0)
        result["restored"] = checkpointer.restore(trainer)
        result["step"], result["synced"] = trainer.step, trainer.engine.synced
        result["metrics"] = []
    result["metrics"].append(learner.update(batch))
    result["params"] = {n: t.clone() for n, t in learner.named_parameters_for_sync()}


def run_ranks(tmp_path, world: int, scenario: str = "update", dtype: str = "float64",
              strategy: str = "torch", **learner_overrides) -> list[dict]:
    port = free_port()
    learner_args = {**LEARNER_ARGS, **learner_overrides}
    procs = [CTX.Process(target=_rank_main, args=(r, world, port, str(tmp_path), scenario, dtype, strategy,
                                                  learner_args))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, f"learner ranks {alive} still running after {JOIN_TIMEOUT_S} s: a hang"
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else {})
    for r, res in enumerate(results):
        assert "traceback" not in res, f"rank {r} failed:\n{res['traceback']}"
    return results


def reference(dtype, steps: int = 1, stale: bool = True, **overrides):
    """Single-process TorchLearner on the whole batch (the ground truth). ``after_first`` holds
    the gradients of the last optimizer step and the weights after the first update, and
    "steps": every optimizer step of that update as `record_optimizer_steps` saw it."""
    model, tok = _policy(dtype)
    learner = TorchLearner(model, **{**LEARNER_ARGS, **overrides})
    recorded = record_optimizer_steps(learner.optimizer, {id(p): n for n, p in learner.model.named_parameters()})
    batch = make_train_batch(tok, stale=stale)
    old = learner.compute_log_probs(batch)
    batch.old_log_probs = perturb(old, batch.response_mask)
    metrics = [learner.update(batch)]
    after_first = {"grads": {n: p.grad.detach().clone() for n, p in learner.model.named_parameters()},
                   "params": {n: p.detach().clone() for n, p in learner.model.named_parameters()},
                   "steps": list(recorded)}
    metrics += [learner.update(batch) for _ in range(steps - 1)]
    return after_first, old, metrics


def float32_weight_tolerance(ref32: dict, dist_steps: list[dict] | None = None, stale: bool = True,
                             **overrides) -> tuple[dict, list[dict]]:
    """The `_adam_bound` tolerance of the first update's float32 weights: the same update in
    float64 is the exact one; each optimizer step's gradient error is what the float32 reference
    (and, where recorded, the distributed ranks) measured against it."""
    ref64, _, _ = reference(torch.float64, stale=stale, **overrides)
    errors = gradient_errors(ref32["steps"], ref64["steps"])
    if dist_steps is not None:  # the ranks recorded every update's steps: the first update's come first
        first = dist_steps[:len(ref64["steps"])]
        errors = [{name: max(err[name], other[name]) for name in err}
                  for err, other in zip(errors, gradient_errors(first, ref64["steps"]))]
    return update_tolerance(ref64["steps"], errors), ref64["steps"]


# --------------------------------------------------------------------------- two ranks == one rank


# float32 log-probs and gradients of this tiny model: values of order 1-10 (log-probs) and <= 1
# (clipped gradients) summed over ~100 terms in another order differ by ~100 x eps32 (1.2e-7) of the
# largest term; 2e-6 holds that (measured: 4e-9 for gradients, 5e-7 for log-probs, on two CPUs)
FLOAT32_GRAD_ATOL = 2e-6
# float32 metrics (loss, entropy, grad norm: means of O(1) values over ~100 tokens, and a 2-norm of
# ~10k gradient elements): ~1e3 x eps32 of the value in the worst summation order; 1e-5 holds it
FLOAT32_METRIC_ATOL = 1e-5


def _assert_same_update(dist_result: dict, ref: dict, ref_old, ref_metrics, atol: float,
                        weights: tuple[dict, list[dict]] | None = None, metric_atol: float = 1e-6):
    """Log-probs, the last optimizer step's gradients and the metrics within ``atol``; the weights
    within ``atol`` (float64: rounding is far below any step) or, for float32, within the AdamW
    bound ``weights`` = (tolerance, steps) of `float32_weight_tolerance`."""
    torch.testing.assert_close(dist_result["log_probs"], ref_old.float(), atol=atol, rtol=0)
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(dist_result["grads"][name], grad, atol=atol, rtol=1e-5, msg=name)
    if weights is None:
        for name, grad in ref["grads"].items():
            # AdamW's first step is ~lr * sign(grad): where the exact gradient is 0 (k_proj biases)
            # rounding picks the sign (float64 rounding of such a sum is < 1e-15, far below 1e-6)
            real = grad.abs() > 1e-6
            assert real.float().mean() > 0.5 or name.endswith("k_proj.bias"), name
            torch.testing.assert_close(dist_result["params"][name][real], ref["params"][name][real],
                                       atol=atol, rtol=0, msg=name)
    else:
        assert_same_weights(dist_result["params"], ref["params"], *weights)
    assert 0 < ref_metrics[0]["rollout_corr/rejected_frac"] < 0.5  # stale rows' truncation is exercised
    for key, value in ref_metrics[0].items():
        assert dist_result["metrics"][0][key] == pytest.approx(value, abs=max(atol, metric_atol)), key


def test_two_ranks_give_the_one_rank_update_float64(tmp_path):
    """Global token-mean + summed gradients: 2 ranks (uneven token counts per rank, one micro-batch
    each per mini-batch, 2 mini-batches, grad clipping active) take exactly the steps one rank
    takes on the full batch."""
    results = run_ranks(tmp_path, world=2, dtype="float64")
    ref, old, metrics = reference(torch.float64)
    assert metrics[0]["actor/grad_norm"] > LEARNER_ARGS["grad_clip"]  # the clip is exercised
    assert metrics[0]["actor/pg_clipfrac"] > 0
    _assert_same_update(results[0], ref, old, metrics, atol=1e-10)
    assert results[1] == {"followed": True}


# 8 rows, one optimizer step over all of them: 4 rows per rank, 4 micro-batches of one row each
ACCUMULATE = dict(mini_batch_rows=8, micro_batch_rows=1)


@pytest.mark.parametrize("strategy", ["torch", "deepspeed-zero2", "deepspeed-zero3"])
def test_two_ranks_accumulating_several_micro_batches_equal_the_full_batch_update(tmp_path, strategy):
    """Gradient accumulation under data parallelism: each of 2 ranks runs 4 micro-batches (uneven
    token counts) into one optimizer step; the result equals one process updating on the whole
    batch in a single micro-batch (weights, and for plain torch the gradients, to float rounding)."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="deepspeed is in the test extra: pip install -e '.[test]'")
    assert micro_batch_count(ACCUMULATE["mini_batch_rows"] // 2, ACCUMULATE["micro_batch_rows"]) == 4
    dtype = torch.float64 if strategy == "torch" else torch.float32
    results = run_ranks(tmp_path, world=2, dtype=str(dtype).removeprefix("torch."), strategy=strategy, **ACCUMULATE)
    ref, old, metrics = reference(dtype, stale=strategy == "torch", mini_batch_rows=8, micro_batch_rows=8)
    assert metrics[0]["actor/grad_norm"] > LEARNER_ARGS["grad_clip"]  # the clip is exercised
    if strategy == "torch":
        _assert_same_update(results[0], ref, old, metrics, atol=1e-10)
    else:  # ZeRO keeps its gradients partitioned inside the optimizer: compare weights and metrics
        overrides = dict(stale=False, mini_batch_rows=8, micro_batch_rows=8)
        assert_same_weights(results[0]["params"], ref["params"], *float32_weight_tolerance(ref, **overrides))
        for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/entropy", "actor/grad_norm", "actor/lr"):
            assert results[0]["metrics"][0][key] == pytest.approx(metrics[0][key], abs=FLOAT32_METRIC_ATOL), key
    assert results[1] == {"followed": True}


def test_three_ranks_float32_and_checkpoint_round_trip(tmp_path):
    """float32 with 3 ranks (a rank with fewer rows): log-probs, gradients and metrics to float32
    rounding, weights within the AdamW bound of their gradients' rounding; a state_dict /
    load_state_dict round trip through the command channel replays the next update exactly."""
    results = run_ranks(tmp_path, world=3, scenario="checkpoint", dtype="float32")
    ref, old, metrics = reference(torch.float32, steps=2)
    # The weights have taken two AdamW steps (two mini-batches), whose size follows the gradient's
    # direction history: a float32 rounding of a small gradient (the ranks sum their trimmed
    # micro-batches in another order) moves the weight by up to lr x its relative error. Weights
    # are compared within that bound, derived per element from the gradients (tests/_adam_bound.py)
    tolerance, steps = float32_weight_tolerance(ref, results[0]["steps"])
    _assert_same_update(results[0], ref, old, metrics, atol=FLOAT32_GRAD_ATOL, weights=(tolerance, steps),
                        metric_atol=FLOAT32_METRIC_ATOL)
    second, replayed = results[0]["metrics"][1], results[0]["metrics"][2]
    for key in second:
        assert replayed[key] == pytest.approx(second[key], abs=1e-6), key
    assert second["actor/lr"] == pytest.approx(metrics[1]["actor/lr"])  # warm-up advanced on rank 0
    # the second update starts from weights equal within the AdamW bound: its loss within float32 metric rounding
    assert second["actor/pg_loss"] == pytest.approx(metrics[1]["actor/pg_loss"], abs=FLOAT32_METRIC_ATOL)
    assert all(r == {"followed": True} for r in results[1:])


def test_a_dead_follower_gives_an_error_not_a_hang(tmp_path):
    results = run_ranks(tmp_path, world=2, scenario="dead_follower", dtype="float32")
    error = results[0].get("error")
    assert error, f"rank 0 did not notice the dead rank: {results[0]}"
    assert "learner rank 0/2" in error and "died" in error
    assert results[0]["seconds"] < 30


@pytest.mark.parametrize("strategy", ["deepspeed-zero2", "deepspeed-zero3"])
def test_deepspeed_on_cpu_two_ranks_match_one_rank(tmp_path, strategy):
    """DeepSpeed ZeRO (cpu accelerator, gloo) with torch's AdamW: the same step as one plain rank;
    the weights (ZeRO-3: gathered from / scattered into the partitions) and the sharded optimizer
    state round-trip through full_state_dict_for_save / load_model_weights / (load_)state_dict."""
    pytest.importorskip("deepspeed", reason="deepspeed is in the test extra: pip install -e '.[test]'")
    t0 = time.perf_counter()
    results = run_ranks(tmp_path, world=2, scenario="checkpoint", dtype="float32", strategy=strategy)
    seconds = time.perf_counter() - t0
    ref, old, metrics = reference(torch.float32, stale=False)
    torch.testing.assert_close(results[0]["log_probs"], old, atol=FLOAT32_GRAD_ATOL, rtol=0)
    # weights after two AdamW steps: within the per-element bound, as in the float32 test above
    assert_same_weights(results[0]["params"], ref["params"], *float32_weight_tolerance(ref, stale=False))
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/entropy", "actor/grad_norm", "actor/lr"):
        assert results[0]["metrics"][0][key] == pytest.approx(metrics[0][key], abs=FLOAT32_METRIC_ATOL), key
    second, replayed = results[0]["metrics"][1], results[0]["metrics"][2]
    for key in second:  # the same ranks, the same arithmetic on the same machine: equal to float32 rounding
        assert replayed[key] == pytest.approx(second[key], abs=1e-6), key
    print(f"{strategy}: 2 ranks, init + log-probs + update + sync + round trip in {seconds:.1f}s")


@pytest.mark.parametrize("strategy", ["torch", "deepspeed-zero2", "deepspeed-zero3"])
def test_checkpoint_save_then_resume_on_fresh_ranks_repeats_the_next_update(tmp_path, strategy):
    """Checkpointer with a 2-rank learner: the model folder is a plain HF folder holding the full
    weights (ZeRO-3: gathered from the partitions, not the empty placeholders rank 0's module
    holds); fresh ranks starting from other weights restore it and take the same next step."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="deepspeed is in the test extra: pip install -e '.[test]'")
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    saved = run_ranks(tmp_path, world=2, scenario="save", dtype="float32", strategy=strategy)[0]
    if strategy == "deepspeed-zero3":  # rank 0's module holds placeholders for the matrices
        assert 0 < saved["placeholders"] < len(saved["saved_params"])
    folder = Path(CheckpointStore(str(tmp_path / "ckpt")).fetch(CheckpointStore(str(tmp_path / "ckpt")).latest()))
    reloaded = AutoModelForCausalLM.from_pretrained(folder / MODEL_DIR, dtype=torch.float32)
    reloaded_params = dict(reloaded.named_parameters())
    assert set(reloaded_params) == set(saved["saved_params"])
    for name, tensor in saved["saved_params"].items():
        assert tensor.numel() > 0, name
        torch.testing.assert_close(reloaded_params[name].detach(), tensor, atol=0, rtol=0, msg=name)

    resumed = run_ranks(tmp_path, world=2, scenario="resume", dtype="float32", strategy=strategy)
    seconds = time.perf_counter() - t0
    ranks_0 = resumed[0]
    assert ranks_0["restored"] and ranks_0["step"] == 1 and resumed[1] == {"followed": True}
    for name, tensor in saved["saved_params"].items():  # the engine got the restored weights
        torch.testing.assert_close(ranks_0["synced"][name], tensor, atol=0, rtol=0, msg=name)
    second, replayed = saved["metrics"][1], ranks_0["metrics"][0]
    assert second["actor/lr"] == pytest.approx(replayed["actor/lr"])  # the lr schedule resumed too
    # the same update from the same restored state on the same machine: equal but for float32 rounding
    for key in second:
        assert replayed[key] == pytest.approx(second[key], abs=1e-6), key
    for name, tensor in saved["params"].items():
        torch.testing.assert_close(ranks_0["params"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    print(f"{strategy}: save + resume on 2 fresh ranks in {seconds:.1f}s")
