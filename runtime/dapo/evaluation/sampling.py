"""n scored samples per prompt: the one evaluation loop of the trainer and of `dapo eval`.

The prompts go to the engine in chunks of ``chunk`` prompts (the run's genBatchSize), chunk c
sampled with seed ``seed_for(seed + EVALUATION, step, c)``, and every response is scored with the
run's scorer. The trainer's evaluation at step s and `dapo eval` of the step-s checkpoint with
the same run file make exactly the same calls, so they give the same samples and the same figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from dapo.evaluation.metrics import PromptSamples
from dapo.rollout.base import encode_prompt
from dapo.seeding import EVALUATION, seed_for

__all__ = ["sample_prompts"]


def sample_prompts(engine, tokenizer, scorer, records: Sequence, *, n: int, temperature: float, top_p: float,
                   max_new_tokens: int, seed: int, step: int, chunk: int,
                   progress: Callable[[int, int, float], None] | None = None) -> list[PromptSamples]:
    """``n`` scored samples of each record (a `dapo.data.prompts.PromptRecord`), in record order.
    ``progress(done, total, seconds)`` is called after each chunk."""
    chunk = max(1, int(chunk))
    out: list[PromptSamples] = []
    t0 = time.perf_counter()
    for call, start in enumerate(range(0, len(records), chunk)):
        rows = records[start:start + chunk]
        prompts = [encode_prompt(tokenizer, r.prompt) for r in rows]
        samples = engine.generate(prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  seed=seed_for(seed + EVALUATION, step, call))
        texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        of = [rows[s.prompt_index] for s in samples]
        results = scorer.score_batch(texts, [r.ground_truth for r in of], [r.data_source for r in of],
                                     [len(s.response_ids) for s in samples], [s.truncated for s in samples],
                                     extra_infos=[r.extra_info for r in of])
        for k, record in enumerate(rows):
            part = slice(k * n, (k + 1) * n)
            out.append(PromptSamples(
                data_source=record.data_source, prompt=record.text, responses=texts[part],
                preds=[r.pred for r in results[part]], accs=[bool(r.acc) for r in results[part]],
                scores=[float(r.score) for r in results[part]],
                lengths=[len(s.response_ids) for s in samples[part]], truncated=[s.truncated for s in samples[part]]))
        if progress is not None:
            progress(min(start + chunk, len(records)), len(records), time.perf_counter() - t0)
    return out
