"""HFEngine: batched KV-cache sampling on a tiny Qwen2 (random weights, char tokenizer)."""

from __future__ import annotations

import pytest
import torch

from _dapo_tiny import tiny_policy
from dapo.rollout.base import FINISH_LENGTH, FINISH_STOP, encode_prompt
from dapo.rollout.hf import HFEngine, top_p_filter

torch.set_num_threads(2)

# float32 log-probs (|log p| < 8 here, ulp 4.8e-7) of the same tokens from two layouts of one forward
# (decode batches of other sizes, another KV cache, padded vs unpadded): other summation orders, a few
# ulp apart; measured <= 1 ulp on AVX2 and scalar kernels with 1 and 2 threads. 1e-5 is ~20 ulp
LOGPROB_ATOL = 1e-5
# Sampled tokens from two such layouts are equal unless a row's uniform lands within that noise of a
# step of its CDF: 103 steps, each moved by <= ~1 ulp (5e-7) x the CDF, <= 2.5e-5 of probability per
# draw, so a few hundred draws agree with probability > 99% on any CPU (fixed by the seed on one machine)


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(hidden=32, layers=2, seed=0)


def _prompts(tok):
    # different lengths: exercises left padding and position ids
    return [encode_prompt(tok, [{"role": "user", "content": text}]) for text in ("1+1", "12+345=?", "x")]


def _reference_log_probs(model, prompt, response, temperature):
    """log_softmax(logits / T) at the sampled tokens, from one unpadded forward without cache."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(response) - 1]
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.integration
def test_shapes_order_and_lengths(policy):
    model, tok = policy
    engine = HFEngine(model, tok, max_batch_rows=4)  # 3 prompts x 3 = 9 rows: three chunks
    samples = engine.generate(_prompts(tok), n=3, temperature=1.0, top_p=1.0, max_new_tokens=7, seed=0)
    assert len(samples) == 9
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for s in samples:
        assert 1 <= len(s.response_ids) <= 7
        assert len(s.log_probs) == len(s.response_ids)
        assert all(lp <= 0.0 for lp in s.log_probs)
        assert s.finish_reason in (FINISH_STOP, FINISH_LENGTH)


@pytest.mark.integration
def test_eos_stops_each_row_and_finish_reasons(policy):
    model, tok = policy
    engine = HFEngine(model, tok)
    engine.eos_ids = set(range(10, 40))  # ~30% of the vocabulary ends a row: some stop, some run out
    samples = engine.generate(_prompts(tok), n=8, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3)
    reasons = {s.finish_reason for s in samples}
    assert reasons == {FINISH_STOP, FINISH_LENGTH}
    for s in samples:
        inside = [t for t in s.response_ids[:-1] if t in engine.eos_ids]
        assert not inside, "tokens after EOS must not be returned"
        if s.finish_reason == FINISH_STOP:
            assert s.response_ids[-1] in engine.eos_ids
        else:
            assert len(s.response_ids) == 6 and s.response_ids[-1] not in engine.eos_ids
            assert s.truncated
    engine.eos_ids = set(range(len(tok)))  # every token ends the row: one token each, all "stop"
    samples = engine.generate(_prompts(tok), n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3)
    assert all(len(s.response_ids) == 1 and s.finish_reason == FINISH_STOP for s in samples)


@pytest.mark.integration
@pytest.mark.parametrize("preallocate", [True, False])
def test_finished_rows_leave_the_decode_batch_and_the_samples_stay(policy, preallocate):
    """Once half the rows have ended they leave the batch and its KV cache (fewer row passes);
    every row's tokens, log-probs, length and finish reason are those of the engine that keeps
    decoding pads for them."""
    model, tok = policy
    engines = [HFEngine(model, tok, preallocate_cache=preallocate, compact_finished=c) for c in (True, False)]
    for engine in engines:
        engine.eos_ids = set(range(10, 25))  # ~15 % of the vocabulary ends a row: they end at many lengths
    compact, full = (e.generate(_prompts(tok), n=8, temperature=1.0, top_p=1.0, max_new_tokens=10, seed=5)
                     for e in engines)
    assert len({len(s.response_ids) for s in full}) >= 4
    assert [s.response_ids for s in compact] == [s.response_ids for s in full]  # up to the CDF-step chance above
    assert [s.finish_reason for s in compact] == [s.finish_reason for s in full]
    for a, b in zip(compact, full):
        torch.testing.assert_close(torch.tensor(a.log_probs), torch.tensor(b.log_probs), atol=LOGPROB_ATOL, rtol=0)
    rows, passes = len(full), engines[1].last_stats.forward_passes
    assert engines[1].last_stats.extra["row_passes"] == rows * passes
    assert engines[0].last_stats.forward_passes == passes
    assert engines[0].last_stats.extra["row_passes"] < 0.8 * rows * passes


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_are_model_log_softmax_at_temperature(policy, temperature):
    model, tok = policy
    engine = HFEngine(model, tok)
    prompts = _prompts(tok)
    samples = engine.generate(prompts, n=2, temperature=temperature, top_p=1.0, max_new_tokens=8, seed=5)
    for s in samples:
        ref = _reference_log_probs(engine.model, prompts[s.prompt_index], s.response_ids, temperature)
        # KV-cache decode vs one unpadded forward: measured <= 1 ulp; 2e-5 + 1e-4 |log p| >= 40 ulp
        torch.testing.assert_close(torch.tensor(s.log_probs), ref, atol=2e-5, rtol=1e-4)


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1e-9)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)  # top-p 1 filters nothing: the same tensor values


@pytest.mark.integration
def test_tiny_top_p_is_greedy(policy):
    model, tok = policy
    engine = HFEngine(model, tok)
    prompt = _prompts(tok)[1]
    samples = engine.generate([prompt], n=4, temperature=1.0, top_p=1e-6, max_new_tokens=6, seed=11)
    assert len({tuple(s.response_ids) for s in samples}) == 1
    # greedy = the engine's argmax, compared with an uncached forward's: equal unless two logits tie
    # within float32 noise (~1e-6), which these random logits do not
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(samples[0].response_ids)):
            ids.append(int(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert samples[0].response_ids == ids[len(prompt):]


@pytest.mark.integration
def test_seed_determinism(policy):
    model, tok = policy
    engine = HFEngine(model, tok)
    run = lambda seed: [s.response_ids for s in engine.generate(_prompts(tok), 3, 1.0, 1.0, 8, seed)]  # noqa: E731
    assert run(42) == run(42)  # the same computation twice on one machine: exact by design
    assert run(42) != run(43)


@pytest.mark.integration
def test_update_weights_changes_outputs_and_version(policy):
    model, tok = policy
    engine = HFEngine(model, tok)
    assert engine.weight_version == 0
    before = engine.generate(_prompts(tok), 4, 1.0, 1.0, 8, seed=1)

    other, _ = tiny_policy(hidden=32, layers=2, seed=123)
    engine.update_weights(other.named_parameters(), version=7)
    assert engine.weight_version == 7
    after = engine.generate(_prompts(tok), 4, 1.0, 1.0, 8, seed=1)
    assert [s.response_ids for s in after] != [s.response_ids for s in before]
    prompts = _prompts(tok)
    for s in after[:3]:  # the engine now samples from `other`
        ref = _reference_log_probs(other.eval(), prompts[s.prompt_index], s.response_ids, 1.0)
        # as above: measured <= 1 ulp; 2e-5 + 1e-4 |log p| >= 40 ulp (other weights would be off by > 0.1)
        torch.testing.assert_close(torch.tensor(s.log_probs), ref, atol=2e-5, rtol=1e-4)


def test_engine_owns_its_copy_and_refuses_partial_updates(policy):
    model, tok = policy
    engine = HFEngine(model, tok)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the learner's model moves; the engine must not
        try:
            assert not torch.equal(next(model.parameters()), next(engine.model.parameters()))
        finally:
            next(model.parameters()).sub_(1.0)
    partial = list(model.named_parameters())[:2]
    with pytest.raises(ValueError, match="partial update"):
        engine.update_weights(partial, version=1)
    with pytest.raises(KeyError, match="no tensor named"):
        engine.update_weights([("nope.weight", torch.zeros(1))], version=1)
    assert engine.weight_version == 0


@pytest.mark.integration
def test_each_prompt_sample_has_its_own_reproducible_stream(policy):
    """Sample j of prompt i is the same whatever the chunking (max_batch_rows) and whatever other
    prompts share the call (equal-length prompts, so padding is the same); samples of one prompt
    differ (distinct streams, not one stream reused)."""
    model, tok = policy
    prompts = [encode_prompt(tok, [{"role": "user", "content": text}]) for text in ("1+2", "3+4", "5+6")]
    assert len({len(p) for p in prompts}) == 1
    # other chunkings are other batch layouts: equal tokens up to the CDF-step chance above LOGPROB_ATOL
    one_chunk = HFEngine(model, tok, max_batch_rows=64).generate(prompts, 4, 1.0, 1.0, 8, seed=9)
    small_chunks = HFEngine(model, tok, max_batch_rows=3).generate(prompts, 4, 1.0, 1.0, 8, seed=9)
    assert [s.response_ids for s in one_chunk] == [s.response_ids for s in small_chunks]
    alone = HFEngine(model, tok).generate(prompts[:1], 4, 1.0, 1.0, 8, seed=9)
    assert [s.response_ids for s in alone] == [s.response_ids for s in one_chunk[:4]]
    assert len({tuple(s.response_ids) for s in one_chunk[:4]}) > 1


def test_row_uniforms_are_splitmix64_streams_and_uniform():
    """row_uniforms equals SplitMix64 written with Python integers (mod 2^64, logical shifts),
    stream by stream; its draws look uniform (mean, variance, no value outside [0, 1)), and
    neighbouring rows are uncorrelated."""
    from dapo.rollout.hf import row_seed, row_uniforms

    mask = (1 << 64) - 1

    def reference(state: int) -> float:
        z = (state + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return ((z ^ (z >> 31)) >> 11) / 2.0 ** 53

    rows = [(0, 0), (0, 1), (7, 3), (123456, 999)]
    got = row_uniforms(42, rows, 6)
    for r, (p, j) in enumerate(rows):
        start = row_seed(42, p, j)
        assert got[r].tolist() == [reference((start + t * 0x9E3779B97F4A7C15) & mask) for t in range(6)]
    many = row_uniforms(3, [(i, j) for i in range(200) for j in range(8)], 64)
    assert float(many.min()) >= 0.0 and float(many.max()) < 1.0
    # statistics of 102400 integer-generated draws (the same bits on every CPU): the mean's std is
    # sqrt(1/12 / N) = 9e-4 (0.005 is 5.5 sigma), the variance's 2.3e-4 (0.002 is 8.6 sigma), a lag-1
    # correlation's 1/sqrt(N) = 3e-3 (0.01 is 3.2 sigma)
    assert abs(float(many.mean()) - 0.5) < 0.005 and abs(float(many.var()) - 1 / 12) < 0.002
    assert abs(float(torch.corrcoef(torch.stack([many[:-1].flatten(), many[1:].flatten()]))[0, 1])) < 0.01


@pytest.mark.integration
def test_preallocated_kv_cache_samples_what_the_model_cache_samples(policy):
    """The preallocated KV cache gives the same tokens and log-probs as the model's own cache."""
    model, tok = policy
    ours = HFEngine(model, tok, max_batch_rows=4).generate(_prompts(tok), 3, 1.0, 0.9, 9, seed=4)
    theirs = HFEngine(model, tok, max_batch_rows=4, preallocate_cache=False).generate(_prompts(tok), 3, 1.0, 0.9, 9,
                                                                                      seed=4)
    assert [s.response_ids for s in ours] == [s.response_ids for s in theirs]  # up to the CDF-step chance above
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(torch.tensor(a.log_probs), torch.tensor(b.log_probs), atol=LOGPROB_ATOL, rtol=0)


def test_inverse_cdf_sampling_never_draws_a_filtered_token_and_matches_frequencies():
    """sample_next: tokens outside the top-p nucleus are never drawn; the draws' frequencies match
    the nucleus probabilities."""
    from dapo.rollout.hf import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens, logp = sample_next(logits, 1.0, 0.7, uniforms)
    counts = torch.bincount(tokens, minlength=4).double() / len(tokens)
    assert counts[2] == 0 and counts[3] == 0
    # a binomial frequency of 20000 seeded draws: std sqrt(0.625 x 0.375 / 20000) = 3.4e-3, 0.015 is 4.4
    # sigma (measured 5.6e-3 off)
    torch.testing.assert_close(counts[:2], torch.tensor([0.625, 0.375], dtype=torch.float64), atol=0.015, rtol=0)
    # float32 log_softmax of log(probs) against log(0.5): a few ulp (measured <= 1), float32 default tolerance
    torch.testing.assert_close(logp[tokens == 0], torch.full_like(logp[tokens == 0], float(torch.log(torch.tensor(0.5)))))


@pytest.mark.integration
def test_decode_chunks_grow_to_the_kv_budget_and_keep_the_samples(policy):
    """With a KV budget, a chunk holds as many rows as the budget's KV cache does (never fewer
    than max_batch_rows): the whole 9-row batch decodes in one chunk (fewer forward passes than
    three chunks of 4) and gives the same samples; without a budget the row count stays."""
    from dapo.rollout.hf import kv_bytes_per_row

    model, tok = policy
    per_row = kv_bytes_per_row(model.config, 100, 4)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert per_row == config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 100 * 4
    fixed = HFEngine(model, tok, max_batch_rows=4)
    budget = HFEngine(model, tok, max_batch_rows=4, kv_budget_bytes=9 * per_row)
    assert fixed.chunk_rows(100) == 4
    assert budget.chunk_rows(100) == 9
    assert HFEngine(model, tok, max_batch_rows=4, kv_budget_bytes=per_row).chunk_rows(100) == 4
    prompts = _prompts(tok)
    chunked = fixed.generate(prompts, n=3, temperature=1.0, top_p=1.0, max_new_tokens=7, seed=2)
    whole = budget.generate(prompts, n=3, temperature=1.0, top_p=1.0, max_new_tokens=7, seed=2)
    assert [s.response_ids for s in whole] == [s.response_ids for s in chunked]  # up to the CDF-step chance above
    assert budget.last_stats.forward_passes < fixed.last_stats.forward_passes
