"""`HFEngine`: the `RolloutEngine` (dapo.rollout.base) on Hugging Face transformers, with a
hand-written sampling loop over the model's KV cache (CPU or one GPU).

The engine samples from its own copy of the policy in eval mode (unless it is a rollout pod's only
model); the learner's weights reach it through `update_weights`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from dapo.rollout.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutEngine,
    Sample,
    eos_token_ids,
)

# --------------------------------------------------------------------------- sampling math


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose cumulative probability
    reaches top_p (the most likely token always stays); others get -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the mass BEFORE it already reaches top_p
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """Draw one token per row. Returns (tokens [B], log-probs [B] of those tokens under
    log_softmax(logits / temperature))."""
    scaled = logits.float() / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    probs = log_probs.exp() if top_p >= 1.0 else torch.softmax(top_p_filter(scaled, top_p), dim=-1)
    # the seeded generator lives on the CPU: draw there so a seed means the same thing on any device
    tokens = torch.multinomial(probs.cpu() if generator is not None else probs, 1,
                               generator=generator).squeeze(-1).to(logits.device)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)


# --------------------------------------------------------------------------- HF engine


@dataclass
class GenerationStats:
    """Counters of the last generate() call (for perf metrics)."""

    new_tokens: int = 0
    seconds: float = 0.0
    forward_passes: int = 0
    extra: dict = field(default_factory=dict)


class HFEngine(RolloutEngine):
    """Batched sampling with transformers models: left-padded prompts, KV cache, per-row EOS stop.

    ``max_batch_rows`` bounds the rows (prompts x n) decoded together; larger requests are split
    into chunks that run one after another.
    """

    def __init__(self, model, tokenizer, *, device: str | torch.device = "cpu", max_batch_rows: int = 64,
                 copy_model: bool = True):
        self.device = torch.device(device)
        self.model = (copy.deepcopy(model) if copy_model else model).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(tokenizer, self.model)
        self.max_batch_rows = max_batch_rows
        self._cache_kwarg = _cache_kwarg(self.model)
        self._version = 0
        self.last_stats = GenerationStats()

    @property
    def weight_version(self) -> int:
        return self._version

    @torch.no_grad()
    def update_weights(self, named_tensors, version: int) -> None:
        """Copy tensors into the engine's model by name. Every parameter and buffer the sender
        names must exist here, and every parameter here must be sent: a partial update would
        serve a mix of two policies, so it fails loudly instead."""
        own = dict(self.model.named_parameters())
        own.update(dict(self.model.named_buffers()))
        seen: set[str] = set()
        for name, tensor in named_tensors:
            if name not in own:
                raise KeyError(f"weight sync: the rollout model has no tensor named {name!r} "
                               "(learner and rollout must load the same architecture)")
            target = own[name]
            if target.shape != tensor.shape:
                raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)} from the learner "
                                 f"but {tuple(target.shape)} in the rollout model")
            target.copy_(tensor.detach().to(device=target.device, dtype=target.dtype))
            seen.add(name)
        missing = [n for n, _ in self.model.named_parameters() if n not in seen]
        # tied weights appear once under one name: a missing alias of a sent tensor is fine
        missing = [n for n in missing if not _is_tied_alias(self.model, n, seen)]
        if missing:
            raise ValueError(f"weight sync for version {version} did not include {len(missing)} parameters "
                             f"(e.g. {missing[:3]}); refusing to serve a partial update")
        self._version = int(version)

    @torch.no_grad()
    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed) -> list[Sample]:
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n ({n}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        rows = [(i, list(p)) for i, p in enumerate(prompts) for _ in range(n)]
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        samples: list[Sample] = []
        stats = GenerationStats()
        t0 = time.perf_counter()
        for start in range(0, len(rows), self.max_batch_rows):
            chunk = rows[start:start + self.max_batch_rows]
            samples.extend(self._generate_chunk(chunk, temperature, top_p, max_new_tokens, generator, stats))
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return samples

    def _generate_chunk(self, rows, temperature, top_p, max_new_tokens, generator, stats) -> list[Sample]:
        batch = len(rows)
        width = max(len(p) for _, p in rows)
        if width == 0:
            raise ValueError("an empty prompt cannot be continued: every prompt needs at least one token")
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for r, (_, p) in enumerate(rows):  # left padding: every row's next token is at the same column
            input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention[r, width - len(p):] = 1
        # one mask for the whole decode (prompt + every new column), sliced per step: no re-allocation
        attention = torch.cat([attention, torch.ones((batch, max_new_tokens), dtype=torch.long)], -1)
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention[:, :width].cumsum(-1) - 1).clamp(min=0)
        eos = torch.tensor(sorted(self.eos_ids), device=self.device)

        out_tokens = torch.full((batch, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        out_logp = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=self.device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=self.device)

        out = self.model(input_ids=input_ids, attention_mask=attention[:, :width], position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        stats.forward_passes += 1
        cache = _cache_of(out)
        logits = out.logits[:, -1, :]
        next_pos = positions[:, -1:] + 1
        for t in range(max_new_tokens):
            tokens, logp = sample_next(logits, temperature, top_p, generator)
            active = ~finished
            out_tokens[:, t] = torch.where(active, tokens, out_tokens[:, t])
            out_logp[:, t] = torch.where(active, logp, out_logp[:, t])
            lengths += active.long()
            hit_eos = active & torch.isin(tokens, eos)
            stopped |= hit_eos
            finished |= hit_eos
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            # finished rows keep decoding pad tokens (their output is ignored) so the batch stays rectangular
            step_ids = torch.where(finished, torch.full_like(tokens, self.pad_id), tokens)[:, None]
            out = self.model(input_ids=step_ids, attention_mask=attention[:, : width + t + 1], position_ids=next_pos,
                             use_cache=True, **{self._cache_kwarg: cache})
            stats.forward_passes += 1
            cache = _cache_of(out)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1

        stats.new_tokens += int(lengths.sum())
        tokens_cpu, logp_cpu, len_cpu, stop_cpu = out_tokens.cpu(), out_logp.cpu(), lengths.cpu(), stopped.cpu()
        return [
            Sample(
                prompt_index=idx,
                response_ids=tokens_cpu[r, : len_cpu[r]].tolist(),
                log_probs=logp_cpu[r, : len_cpu[r]].tolist(),
                finish_reason=FINISH_STOP if bool(stop_cpu[r]) else FINISH_LENGTH,
            )
            for r, (idx, _) in enumerate(rows)
        ]


def _is_tied_alias(model, name: str, sent: set[str]) -> bool:
    """True when parameter ``name`` is the same tensor as one already sent (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(params.get(s) is target for s in sent)


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed the forward argument ``past_key_values`` to ``cache``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
