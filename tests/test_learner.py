"""TorchLearner: loss goes down, micro-batching does not change the math, warm-up, state, layout."""

from __future__ import annotations

import copy
from dataclasses import fields, replace

import pytest
import torch

from _adam_bound import assert_same_weights, gradient_errors, record_optimizer_steps, update_tolerance
from _dapo_tiny import tiny_policy
from dapo.algo import PolicyLossConfig, log_probs_from_logits, policy_loss
from dapo.rollout.base import encode_prompt
from dapo.rollout.hf import HFEngine
from dapo.data.sampler import steps_for_epochs
from dapo.learner.batch import TrainBatch, make_batch
from dapo.learner.torch_learner import TorchLearner, warmup_factor

torch.set_num_threads(2)

FLOAT32_EPS = torch.finfo(torch.float32).eps  # 1.2e-7: one rounding of a float32 value
FLOAT64_EPS = torch.finfo(torch.float64).eps  # 2.2e-16
# float32 metrics of these updates (losses and KL of O(0.1-1), entropies ~4.6, clip fractions):
# per-token values whose log-probs two layouts give a few ulp apart (ulp 4.8e-7 at |log p| < 8),
# averaged over the batch: a few x 5e-7 (measured <= 6e-7 on AVX2 and scalar kernels): 1e-5 is ~20 ulp
FLOAT32_METRIC_ATOL = 1e-5


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(hidden=32, layers=2, seed=0)


def _batch(tok, rows=6, seed=0):
    """Prompts and responses of different lengths, advantages +-1 per group of 3."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [encode_prompt(tok, f"q{i}" * (1 + i % 3)) for i in range(rows)]
    responses = [torch.randint(5, 90, (2 + (5 * i) % 7,), generator=gen).tolist() for i in range(rows)]
    batch = make_batch(prompts, responses, tok.pad_token_id)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5] * (rows // 3))
    return batch


def _learner(model, **kw):
    args = dict(lr=1e-2, weight_decay=0.0, warmup_steps=0, grad_clip=1e9, mini_batch_rows=6, micro_batch_rows=6)
    args.update(kw)
    return TorchLearner(model, **args)


def _loss(learner, batch):
    with torch.no_grad():
        logits = learner.response_logits(batch)
        lp = log_probs_from_logits(logits, batch.responses)
        return float(policy_loss(lp, batch.old_log_probs, batch.advantages, batch.response_mask)[0])


def _recorded(learner) -> list[dict]:
    """Every optimizer step's gradients and lr from now on (`_adam_bound.record_optimizer_steps`)."""
    return record_optimizer_steps(learner.optimizer, {id(p): n for n, p in learner.model.named_parameters()})


def _weights(learner) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in learner.model.named_parameters()}


def _summation_error(grad: torch.Tensor, terms: int, eps: float) -> float:
    """How far a gradient tensor may move when its ``terms``-term sums run in another order: the
    worst-case linear growth of a float sum's rounding, terms x eps, of its largest element."""
    return terms * eps * float(grad.abs().max())


def test_make_batch_layout(policy):
    _, tok = policy
    batch = make_batch([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], pad_id=0)
    assert batch.prompt_width == 3
    assert batch.input_ids.tolist() == [[1, 2, 3, 7, 8, 0], [0, 0, 4, 9, 10, 11]]
    assert batch.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.position_ids[1, 2:].tolist() == [0, 1, 2, 3]


def test_one_update_lowers_the_loss(policy):
    model, tok = policy
    learner = _learner(copy.deepcopy(model))
    batch = _batch(tok)
    batch.old_log_probs = learner.compute_log_probs(batch)
    before = _loss(learner, batch)
    metrics = learner.update(batch)
    after = _loss(learner, batch)
    assert after < before - 1e-3  # it drops by 0.17 (0.145 -> -0.027): 1e-3 is far above float32 noise (~1e-6)
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/entropy",
                "actor/grad_norm", "actor/lr"):
        assert key in metrics
    # ratio 1 at the first mini-batch: the update's forward and the no-grad one give log-probs a few ulp apart
    assert metrics["actor/pg_loss"] == pytest.approx(before, abs=FLOAT32_METRIC_ATOL)
    assert metrics["actor/entropy"] > 0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_size_does_not_change_the_update(policy, mode):
    model, tok = policy
    batch = _batch(tok)
    loss = PolicyLossConfig(loss_agg_mode=mode)
    full = _learner(copy.deepcopy(model), loss_config=loss, micro_batch_rows=6)
    micro = _learner(copy.deepcopy(model), loss_config=loss, micro_batch_rows=1)
    exact = _learner(copy.deepcopy(model).double(), loss_config=loss, micro_batch_rows=6)  # float64: the exact update
    full_steps, exact_steps = _recorded(full), _recorded(exact)
    batch.old_log_probs = full.compute_log_probs(batch)
    # perturb old log-probs so ratios differ from 1 and clipping is exercised
    batch.old_log_probs = batch.old_log_probs + 0.3 * torch.randn(batch.old_log_probs.shape,
                                                                  generator=torch.Generator().manual_seed(1))
    m_full, m_micro = full.update(batch), micro.update(batch)
    exact.update(batch)
    # a gradient element sums over the batch's token positions; one row per micro-batch sums them in
    # another float32 order (measured: <= 4 x eps32 x the tensor's largest gradient)
    positions = int(batch.attention_mask.sum())
    for (name, a), (_, b) in zip(full.model.named_parameters(), micro.model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=_summation_error(a.grad, positions, FLOAT32_EPS), rtol=0,
                                   msg=name)
    # AdamW's first step is ~lr * sign(grad): a gradient within its rounding of 0 can flip the whole
    # step, so the weights are compared within the per-element AdamW bound of the gradients' float32
    # rounding, measured against the float64 update (tests/_adam_bound.py)
    tolerance = update_tolerance(exact_steps, gradient_errors(full_steps, exact_steps))
    assert_same_weights(_weights(micro), _weights(full), tolerance, exact_steps)
    assert m_full["actor/pg_loss"] == pytest.approx(m_micro["actor/pg_loss"], abs=FLOAT32_METRIC_ATOL)
    # equal clip counts / tokens: float32 division rounding only; one flipped count would move it by 1/31
    assert m_full["actor/pg_clipfrac"] == pytest.approx(m_micro["actor/pg_clipfrac"], abs=1e-6)
    assert m_full["actor/entropy"] == pytest.approx(m_micro["actor/entropy"], abs=FLOAT32_METRIC_ATOL)


def test_mini_batches_make_several_optimizer_steps(policy):
    model, tok = policy
    learner = _learner(copy.deepcopy(model), mini_batch_rows=3, micro_batch_rows=2, ppo_epochs=2)
    batch = _batch(tok)
    batch.old_log_probs = learner.compute_log_probs(batch)
    learner.update(batch)
    state = learner.optimizer.state[next(iter(learner.model.parameters()))]
    assert int(state["step"]) == 4  # 2 mini-batches x 2 epochs


def test_warmup_schedule(policy):
    # Python float64 arithmetic of a few operations: within an ulp; approx's default rel 1e-6 is far above
    assert [warmup_factor(s, 3) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    assert warmup_factor(0, 0) == 1.0
    model, tok = policy
    learner = _learner(copy.deepcopy(model), lr=0.3, warmup_steps=3)
    batch = _batch(tok)
    lrs = []
    for _ in range(4):
        batch.old_log_probs = learner.compute_log_probs(batch)
        lrs.append(learner.update(batch)["actor/lr"])
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.3])  # lr x warm-up factor in float64: within an ulp


def test_state_dict_round_trip(policy):
    model, tok = policy
    a = _learner(copy.deepcopy(model), warmup_steps=5)
    batch = _batch(tok)
    batch.old_log_probs = a.compute_log_probs(batch)
    a.update(batch)
    b = _learner(copy.deepcopy(a.model), warmup_steps=5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as a checkpoint would: no shared tensors
    assert b.lr == pytest.approx(a.lr)  # the same float64 schedule arithmetic: within an ulp
    a.update(batch)
    b.update(batch)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        # the same update from the same state on the same machine: bit-exact by design (measured 0);
        # any difference means the round trip lost state, since AdamW would amplify it
        torch.testing.assert_close(pa, pb, atol=0, rtol=0)


@pytest.mark.integration
def test_learner_log_probs_match_engine_sampling_log_probs(policy):
    """The batch layout lines up: recomputed old log-probs equal the engine's at the same weights."""
    model, tok = policy
    engine = HFEngine(model, tok)
    learner = _learner(copy.deepcopy(model), micro_batch_rows=4, temperature=0.7)
    prompts = [encode_prompt(tok, t) for t in ("1+2", "long prompt here", "z")]
    samples = engine.generate(prompts, n=2, temperature=0.7, top_p=1.0, max_new_tokens=9, seed=4)
    batch = make_batch([prompts[s.prompt_index] for s in samples], [s.response_ids for s in samples], tok.pad_token_id)
    recomputed = learner.compute_log_probs(batch)
    for row, s in enumerate(samples):
        # float32 log-probs (|log p| < 8, ulp 4.8e-7) of two layouts (engine: KV cache, decode steps;
        # learner: one padded pass): measured <= 1 ulp (AVX2, scalar kernels); 3e-5 + 1e-4 |log p| >= 60 ulp
        torch.testing.assert_close(recomputed[row, : len(s.log_probs)], torch.tensor(s.log_probs), atol=3e-5, rtol=1e-4)
        assert float(recomputed[row, len(s.log_probs):].abs().sum()) == 0.0  # padding is written as 0, not computed


def test_trimmed_drops_only_the_pad_columns_no_row_uses():
    batch = make_batch([[1, 2, 3], [4], [5, 6]], [[7, 8], [9, 10, 11], [12]], pad_id=0)
    tail = batch.rows(1, 3).trimmed()  # prompts of 1-2 tokens, responses of 1-3
    assert tail.prompt_width == 2
    assert tail.input_ids.tolist() == [[0, 4, 9, 10, 11], [5, 6, 12, 0, 0]]
    assert tail.position_ids.tolist() == batch.position_ids[1:3, 1:].tolist()
    assert tail.responses.tolist() == [[9, 10, 11], [12, 0, 0]]
    short = batch.rows(2, 3).trimmed()
    assert short.input_ids.tolist() == [[5, 6, 12]] and short.response_mask.tolist() == [[1.0]]
    # every per-token field is trimmed with the rows: [B, P + R] ones to 3 columns, [B, R] ones to 1
    per_token = {f.name: torch.rand(3, 3) for f in fields(TrainBatch) if f.name in
                 ("old_log_probs", "behaviour_log_probs", "is_weights")}
    full = replace(batch, **per_token, advantages=torch.ones(3), weight_versions=torch.zeros(3, dtype=torch.long),
                   policy_version=1)
    assert all(getattr(full, f.name) is not None for f in fields(TrainBatch))
    trimmed = full.rows(2, 3).trimmed()
    for f in fields(TrainBatch):
        value = getattr(trimmed, f.name)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            assert value.shape[1] == (3 if f.name in ("input_ids", "attention_mask", "position_ids") else 1), f.name
    assert torch.equal(trimmed.old_log_probs, per_token["old_log_probs"][2:3, :1])  # a slice, not computed: exact


def _forward_widths(model) -> list[tuple[int, int]]:
    """(rows, columns) of every forward pass ``model`` runs, in order."""
    shapes: list[tuple[int, int]] = []
    model.register_forward_hook(lambda module, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
                                with_kwargs=True)
    return shapes


def test_micro_batches_group_rows_by_length_and_run_at_their_own_widths(policy):
    """Rows are grouped by length into micro-batches, and each micro-batch's forward pass sees
    only the columns its own rows use (not the whole batch's padding); the log-probs (float64,
    back in row order) and the update equal one pass over the full width."""
    model, tok = policy
    model64 = copy.deepcopy(model).double()
    short, long = encode_prompt(tok, "q"), encode_prompt(tok, "q" * 9)
    kinds = ["short", "long", "long", "short", "long", "long"]  # split in order, every pair holds a long row
    batch = make_batch([short if k == "short" else long for k in kinds],
                       [[5, 6] if k == "short" else list(range(5, 16)) for k in kinds], tok.pad_token_id)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])
    trimmed, full = _learner(copy.deepcopy(model64), micro_batch_rows=2), _learner(copy.deepcopy(model64))
    widths = _forward_widths(trimmed.model)
    own = [len(short) + 2, len(long) + 11, len(long) + 11]
    logp = trimmed.compute_log_probs(batch)
    assert widths == [(2, own[0]), (2, own[1]), (2, own[2])] and own[0] < batch.input_ids.shape[1]
    with torch.no_grad():
        reference = log_probs_from_logits(full.response_logits(batch), batch.responses) * batch.response_mask
    # float64 log-probs of two widths differ by ~1e-15; rounded to float32 (ulp >= 6e-8 here) they are
    # equal unless one lies within 1e-15 of a rounding midpoint (chance ~1e-8 per value): equal floats
    torch.testing.assert_close(logp, reference.float(), atol=1e-12, rtol=0)
    batch.old_log_probs = logp.double() + 0.2 * torch.sin(torch.arange(logp.numel()).reshape(logp.shape))
    widths.clear()
    full_steps = _recorded(full)
    trimmed.update(batch)
    full.update(batch)
    assert [w for _, w in widths] == own
    # float64 gradients of the two widths differ by their summation order's rounding, at most
    # positions x eps64 of each tensor's largest gradient; AdamW's first step (~lr * sign(grad))
    # amplifies that near a zero gradient, so the weights are compared within the per-element AdamW
    # bound of that rounding (tests/_adam_bound.py; measured differences <= 2e-14)
    positions = int(batch.attention_mask.sum())
    errors = [{name: _summation_error(grad, positions, FLOAT64_EPS) for name, grad in step["grads"].items()}
              for step in full_steps]
    tolerance = update_tolerance(full_steps, errors)
    assert_same_weights(_weights(trimmed), _weights(full), tolerance, full_steps, eps=FLOAT64_EPS)


def test_steps_for_epochs():
    assert steps_for_epochs(1, 10, 4) == 3
    assert steps_for_epochs(2, 10, 4) == 5


def test_single_step_update_runs_no_proximal_pass(policy):
    """One optimizer step on the whole batch: the update's own forward pass gives the old
    log-probs, and the result equals the update with recomputed old log-probs."""
    model, tok = policy
    with_old, without_old = _learner(copy.deepcopy(model)), _learner(copy.deepcopy(model))
    batch = _batch(tok)
    assert without_old.proximal_pass_rows(batch) == 0
    exact = _learner(copy.deepcopy(model).double())  # the same single-step update in float64: the exact one
    without_steps, exact_steps = _recorded(without_old), _recorded(exact)
    recomputed = copy.deepcopy(batch)
    recomputed.old_log_probs = with_old.compute_log_probs(recomputed)
    m1 = with_old.update(recomputed)
    m2 = without_old.update(batch)
    exact.update(copy.deepcopy(batch))
    assert m2["actor/ppo_kl"] == 0.0 and m2["actor/pg_clipfrac"] == 0.0  # log-ratio exactly 0: old is the forward's own
    # the recomputed old log-probs (a no-grad pass) may sit a few ulp off the update's forward (equal here)
    assert m1["actor/pg_loss"] == pytest.approx(m2["actor/pg_loss"], abs=FLOAT32_METRIC_ATOL)
    # those ulps would move AdamW's first step (~lr * sign(grad)) near a zero gradient: the weights are
    # compared within the per-element AdamW bound of the float32 gradients' rounding (tests/_adam_bound.py)
    tolerance = update_tolerance(exact_steps, gradient_errors(without_steps, exact_steps))
    assert_same_weights(_weights(with_old), _weights(without_old), tolerance, exact_steps)


def _no_grad_rows(model) -> list[int]:
    """Rows of every forward pass ``model`` runs without autograd (the proximal pass), in order."""
    rows: list[int] = []
    model.register_forward_hook(lambda module, args, kwargs, out: None if torch.is_grad_enabled()
                                else rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return rows


@pytest.mark.parametrize("mode,level", [("truncate", "token"), ("mask", "sequence"), ("none", "token")])
def test_update_takes_the_first_mini_batchs_proximal_log_probs_from_its_own_forward(policy, mode, level):
    """Without old_log_probs the update runs the no-grad proximal pass only over the rows after
    the first mini-batch, and the step equals one given the fully recomputed proximal log-probs:
    same weights, same loss, clip and rollout-correction metrics (float64 model; behaviour
    log-probs that differ from the policy, two stale rows, 2 mini-batches x 2 epochs)."""
    from dapo.algo import RolloutCorrection

    model, tok = policy
    model = copy.deepcopy(model).double()
    batch = _batch(tok, rows=9)
    correction = RolloutCorrection(mode=mode, level=level, threshold=1.5)
    kw = dict(mini_batch_rows=6, micro_batch_rows=4, ppo_epochs=2, rollout_correction=correction)
    given, taken = _learner(copy.deepcopy(model), **kw), _learner(copy.deepcopy(model), **kw)
    current = given.compute_log_probs(batch)
    noise = 0.4 * torch.randn(current.shape, generator=torch.Generator().manual_seed(3))
    batch.behaviour_log_probs = (current + noise) * batch.response_mask
    batch.weight_versions, batch.policy_version = torch.tensor([4, 3, 4, 4, 4, 4, 4, 3, 4]), 4
    recomputed = copy.deepcopy(batch)
    recomputed.old_log_probs = given.compute_log_probs(batch)
    passes = _no_grad_rows(taken.model)
    assert taken.proximal_pass_rows(batch) == 3
    m_given, m_taken = given.update(recomputed), taken.update(batch)
    assert passes == [3]  # one micro-batch: rows 6..8; rows 0..5 came from the first step's forward
    # both sides hold float32 proximal log-probs of the same float64 forward (they differ only in pad
    # columns: ~1e-16 per op): the float64 updates agree to rounding
    for (name, a), (_, b) in zip(given.model.named_parameters(), taken.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)
    assert m_given.keys() == m_taken.keys()
    assert "rollout_corr/is_weight_mean" in m_taken
    for key in m_given:
        if not key.startswith("timing_s/"):
            # the same float32 proximal log-probs on both sides, float64 arithmetic otherwise (forwards
            # differ only in pad columns, ~1e-16 per op): rel 1e-9 is far above that, abs 1e-12 for zeros
            assert m_taken[key] == pytest.approx(m_given[key], rel=1e-9, abs=1e-12), key


def test_proximal_pass_covers_the_rows_after_the_first_mini_batch(policy):
    """Rows of the no-grad proximal pass: none for one optimizer step (correction or stale rows
    included: the step's own forward gives the proximal log-probs), the rows after the first
    mini-batch for several mini-batches, and every row for several epochs or mini-batches of a
    model with dropout, whose training forward samples another network."""
    from dapo.algo import RolloutCorrection

    model, tok = policy
    batch = _batch(tok)
    batch.behaviour_log_probs = torch.zeros_like(batch.response_mask)
    batch.weight_versions, batch.policy_version = torch.tensor([3, 2, 3, 3, 3, 3]), 3
    for mode in ("none", "truncate"):
        assert _learner(copy.deepcopy(model), rollout_correction=RolloutCorrection(mode=mode)).proximal_pass_rows(batch) == 0
    assert _learner(copy.deepcopy(model), mini_batch_rows=2).proximal_pass_rows(batch) == 4
    assert _learner(copy.deepcopy(model), ppo_epochs=2).proximal_pass_rows(batch) == 0
    given = copy.deepcopy(batch)
    given.old_log_probs = torch.zeros_like(batch.response_mask)
    assert _learner(copy.deepcopy(model), mini_batch_rows=2).proximal_pass_rows(given) == 0

    dropout = copy.deepcopy(model)
    dropout.config.attention_dropout = 0.1
    assert _learner(copy.deepcopy(dropout), mini_batch_rows=2).proximal_pass_rows(batch) == 6
    assert _learner(copy.deepcopy(dropout), ppo_epochs=2).proximal_pass_rows(batch) == 6
    assert _learner(copy.deepcopy(dropout)).proximal_pass_rows(batch) == 6  # stale rows: weights need pi_prox
    fresh = copy.deepcopy(batch)
    fresh.weight_versions[:] = 3
    assert _learner(copy.deepcopy(dropout), rollout_correction=RolloutCorrection(mode="none")).proximal_pass_rows(fresh) == 0


def test_shuffle_trains_the_same_rows_in_an_order_fixed_by_seed_and_version(policy):
    """With shuffle_seed, update() trains exactly what an unshuffled learner trains on the
    `shuffled` rows; the order is a permutation of the rows (each keeps its advantage), fixed by
    (seed, policy_version)."""
    model, tok = policy
    batch = _batch(tok, rows=12)
    batch.policy_version = 3
    shuffling = _learner(copy.deepcopy(model), mini_batch_rows=6, micro_batch_rows=4, shuffle_seed=5)
    plain = _learner(copy.deepcopy(model), mini_batch_rows=6, micro_batch_rows=4)
    order = shuffling.shuffled(batch)
    m_shuffled, m_plain = shuffling.update(batch), plain.update(order)
    # the same rows in the same order through the same arithmetic on one machine: bit-exact by design
    for (name, a), (_, b) in zip(shuffling.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert m_shuffled["actor/pg_loss"] == m_plain["actor/pg_loss"]

    rows = lambda b: sorted(map(tuple, b.input_ids.tolist()))  # noqa: E731
    assert rows(order) == rows(batch) and order.input_ids.tolist() != batch.input_ids.tolist()
    assert shuffling.shuffled(batch).input_ids.tolist() == order.input_ids.tolist()
    later = copy.deepcopy(batch)
    later.policy_version = 4
    assert shuffling.shuffled(later).input_ids.tolist() != order.input_ids.tolist()
    # every row keeps its own advantage and mask: (tokens, advantage) pairs are the same set
    pairs = lambda b: sorted((tuple(r), a) for r, a in zip(b.input_ids.tolist(), b.advantages.tolist()))  # noqa: E731
    assert pairs(order) == pairs(batch)
    assert plain.shuffled(batch) is batch


def test_shuffle_follows_the_run_file(run_doc):
    from dapo.learner.torch_learner import learner_kwargs_from_spec
    from dapo.spec import parse_run

    doc = run_doc("s", model={"path": "m"}, data={"train": "t.jsonl"}, learner={"seed": 7})
    assert learner_kwargs_from_spec(parse_run(doc).spec)["shuffle_seed"] == 7
    doc["spec"]["learner"]["shuffle"] = False
    assert learner_kwargs_from_spec(parse_run(doc).spec)["shuffle_seed"] is None


def test_unknown_policy_loss_fails_when_the_learner_is_built(policy):
    model, _ = policy
    with pytest.raises(ValueError, match="spec.algorithm.policyLoss: unknown policy loss 'ppo'"):
        _learner(copy.deepcopy(model), policy_loss="ppo")
    with pytest.raises(ValueError, match="policyLossParams"):
        _learner(copy.deepcopy(model), policy_loss="dapo", loss_config=PolicyLossConfig(params={"eps_low": 0.1}))


def test_later_epochs_clip_against_the_log_probs_the_step_started_from(policy):
    """spec.learner.ppoEpochs = 2 with one mini-batch (no proximal pass, no rollout correction):
    the second epoch's ratio is taken against the log-probs of the step's starting weights, as PPO
    defines it, so the update equals one given those log-probs explicitly (float64) and the second
    epoch clips (lr high enough that the first epoch moves the policy past the clip range)."""
    model, tok = policy
    model = copy.deepcopy(model).double()
    batch = _batch(tok)
    kw = dict(lr=5e-2, ppo_epochs=2)
    given, taken = _learner(copy.deepcopy(model), **kw), _learner(copy.deepcopy(model), **kw)
    assert taken.proximal_pass_rows(batch) == 0
    with torch.no_grad():  # the proximal log-probs from the same forward, float32 values as the learner keeps them
        start = log_probs_from_logits(given.response_logits(batch), batch.responses).float() * batch.response_mask
    explicit = replace(batch, old_log_probs=start)
    m_given, m_taken = given.update(explicit), taken.update(batch)
    assert m_given["actor/pg_clipfrac"] > 0.05  # epoch 2 really clips
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/pg_loss"):
        # float64 throughout; the two forwards differ only in pad columns (rounding ~1e-16 per op)
        assert m_taken[key] == pytest.approx(m_given[key], rel=1e-9, abs=1e-12), key
    for (name, a), (_, b) in zip(given.model.named_parameters(), taken.model.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0, msg=name)


# --------------------------------------------------------------------------- dapo.learner.distributed without ranks
# (the ranks themselves, over gloo in child processes, are tests/test_dist_learner.py: marker processes)


def test_shard_bounds_cover_rows_once():
    from dapo.learner.distributed import micro_batch_count, shard_bounds

    for rows in range(0, 11):
        for world in range(1, 5):
            spans = [shard_bounds(rows, world, r) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            sizes = [b - a for a, b in spans]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert micro_batch_count(5, 2) == 3 and micro_batch_count(0, 2) == 0 and micro_batch_count(4, 2) == 2


def test_without_environment_the_error_names_the_variables(monkeypatch):
    from dapo.algo import RolloutCorrection
    from dapo.learner.distributed import DistributedLearner, DistributedLearnerError

    # the learner arguments of tests/test_dist_learner.py's ranks
    learner_args = dict(lr=1e-2, weight_decay=0.0, warmup_steps=2, grad_clip=0.5, mini_batch_rows=4,
                        micro_batch_rows=2, ppo_epochs=1, rollout_correction=RolloutCorrection(mode="none"))
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    model, _ = tiny_policy(hidden=32, layers=2, seed=0)
    model = model.to(torch.float32)
    with pytest.raises(DistributedLearnerError, match="RANK"):
        DistributedLearner(model, **learner_args)
