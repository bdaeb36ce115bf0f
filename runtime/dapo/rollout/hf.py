"""`HFEngine`: the `RolloutEngine` (dapo.rollout.base) on Hugging Face transformers, with a
hand-written sampling loop over the model's KV cache (CPU or one GPU).

The engine samples from its own copy of the policy in eval mode (unless it is a rollout pod's only
model); the learner's weights reach it through `update_weights`.

KV cache: `PreallocatedCache` writes each decode step's keys / values into buffers allocated once
for the whole chunk (prompt width + max_new_tokens) instead of growing them with `torch.cat`
(which copies the whole cache every token); attention reads views of the filled prefix.

Random streams: sample j of prompt i in a call with seed S draws from its own stream (SplitMix64
started at `row_seed(S, i, j)`), one uniform per position (inverse-CDF sampling). Its tokens therefore do not
depend on the other prompts of the call, on ``max_batch_rows`` chunking, or on when other rows stop.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field

import torch

from dapo.model.lora import ADAPTER_MARK, adapter_parameters, is_lora
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


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor):
    """Draw one token per row by inversion: token = min{v : CDF(v) > u * CDF(V-1)} for the row's
    uniform u in [0, 1) (float64 cumulative sums; a token of probability 0 has an empty interval
    and is never drawn). Returns (tokens [B], log-probs [B] of those tokens under
    log_softmax(logits / temperature))."""
    scaled = logits.float() / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    probs = log_probs.exp() if top_p >= 1.0 else torch.softmax(top_p_filter(scaled, top_p), dim=-1)
    cdf = probs.double().cumsum(-1)
    target = uniforms.to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of the random stream of sample ``sample_index`` of prompt ``prompt_index`` in a
    generate() call with ``seed``: the first 8 bytes of BLAKE2b over the three numbers, below 2^63
    (distinct triples get independent streams; no arithmetic that two triples could share)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(prompt_index)}:{int(sample_index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio, odd)
_MIX_1, _MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output for state ``x`` (Steele, Lea and Flood, "Fast splittable pseudorandom
    number generators", OOPSLA 2014): z = x + gamma; z = (z ^ z>>30) * m1; z = (z ^ z>>27) * m2;
    z ^ z>>31, on int64 tensors holding the unsigned bits (torch's int64 multiply wraps mod 2^64)."""
    z = x + _int64(_GOLDEN_GAMMA)
    z = (z ^ _shift_right(z, 30)) * _int64(_MIX_1)
    z = (z ^ _shift_right(z, 27)) * _int64(_MIX_2)
    return z ^ _shift_right(z, 31)


def row_uniforms(seed: int, rows, length: int) -> torch.Tensor:
    """[len(rows), length] float64 uniforms in [0, 1): row r = (prompt index, sample index) gets
    the first ``length`` outputs of its own SplitMix64 stream started at `row_seed`
    (u_t = top 53 bits of splitmix64(row_seed + t * gamma) / 2^53), all rows and positions in
    one vectorised pass."""
    base = torch.tensor([_int64(row_seed(seed, p, s)) for p, s in rows], dtype=torch.int64).reshape(-1, 1)
    states = base + torch.arange(length, dtype=torch.int64).reshape(1, -1) * _int64(_GOLDEN_GAMMA)
    return _shift_right(splitmix64(states), 11).double() * 2.0 ** -53


# --------------------------------------------------------------------------- KV cache


def preallocated_cache(model, capacity: int):
    """A transformers Cache whose layers preallocate ``capacity`` positions (None when the
    installed transformers has no per-layer cache API, or the model has sliding-window / non
    full-attention layers: the model's own cache is used then)."""
    try:
        from transformers.cache_utils import Cache, DynamicLayer
    except ImportError:
        return None
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    if config is None or any(t != "full_attention" for t in layer_types):
        return None

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer (same mask and length rules) whose keys / values are views of buffers
        allocated on the first update: a decode step copies only its own new position."""

        def __init__(self):
            super().__init__()
            self.length = 0

        def lazy_initialization(self, key_states, value_states):
            batch, heads, _, _ = key_states.shape
            self.device = key_states.device
            self._keys = key_states.new_empty((batch, heads, capacity, key_states.shape[-1]))
            self._values = value_states.new_empty((batch, value_states.shape[1], capacity, value_states.shape[-1]))
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(f"KV cache overflow: {end} positions in a cache preallocated for {capacity}")
            self._keys[:, :, self.length:end].copy_(key_states)
            self._values[:, :, self.length:end].copy_(value_states)
            self.length = end
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    return Cache(layers=[PreallocatedLayer() for _ in range(config.num_hidden_layers)])


# --------------------------------------------------------------------------- HF engine


@dataclass
class GenerationStats:
    """Counters of the last generate() call (for perf metrics)."""

    new_tokens: int = 0
    seconds: float = 0.0
    forward_passes: int = 0
    extra: dict = field(default_factory=dict)


def kv_bytes_per_row(config, positions: int, element_size: int) -> int | None:
    """Bytes of keys + values one row holds for ``positions`` tokens:
    layers x 2 x kv_heads x head_dim x positions x element size (None when the config does not
    say; the caller then keeps its fixed row count)."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    return int(layers) * 2 * int(kv_heads) * int(head_dim) * int(positions) * int(element_size)


class HFEngine(RolloutEngine):
    """Batched sampling with transformers models: left-padded prompts, KV cache, per-row EOS stop.

    Rows (prompts x n) are decoded in chunks that run one after another. A chunk holds
    ``max_batch_rows`` rows, or more when ``kv_budget_bytes`` is set and the KV cache of more rows
    (at this call's prompt width + max_new_tokens) fits in it: small models then decode a whole
    batch at once (fewer forward passes), large ones keep the fixed row count. Once half of a
    chunk's rows have ended, the finished ones leave the decode batch and its KV cache
    (``compact_finished``), so a few long answers do not keep every short one decoding pads; at
    most log2(rows) such copies per chunk. ``last_stats.extra["row_passes"]`` counts the rows of
    every forward pass.
    """

    def __init__(self, model, tokenizer, *, device: str | torch.device = "cpu", max_batch_rows: int = 64,
                 kv_budget_bytes: int = 0, copy_model: bool = True, preallocate_cache: bool = True,
                 compact_finished: bool = True):
        self.device = torch.device(device)
        self.model = (copy.deepcopy(model) if copy_model else model).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(tokenizer, self.model)
        self.max_batch_rows = max_batch_rows
        self.kv_budget_bytes = kv_budget_bytes
        self.preallocate_cache = preallocate_cache  # False: the model's own (torch.cat-grown) cache
        self.compact_finished = compact_finished  # False: finished rows decode pads to the end of the chunk
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
        serve a mix of two policies, so it fails loudly instead. A LoRA policy (a PeftModel, whose
        base this engine loaded once and keeps) takes its adapter tensors, all of them, and nothing else."""
        own = dict(self.model.named_parameters())
        own.update(dict(self.model.named_buffers()))
        lora = is_lora(self.model)  # only adapters may arrive: the base is frozen on both sides
        seen: set[str] = set()
        for name, tensor in named_tensors:
            if lora and ADAPTER_MARK not in name:
                raise KeyError(f"weight sync: the rollout policy is LoRA (spec.model.lora) and takes adapter tensors "
                               f"only; the learner sent {name!r} (learner and rollout must both train adapters)")
            if name not in own:
                raise KeyError(f"weight sync: the rollout model has no tensor named {name!r} "
                               "(learner and rollout must load the same architecture)")
            target = own[name]
            if target.shape != tensor.shape:
                raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)} from the learner "
                                 f"but {tuple(target.shape)} in the rollout model")
            target.copy_(tensor.detach().to(device=target.device, dtype=target.dtype))
            seen.add(name)
        expected = adapter_parameters(self.model) if lora else self.model.named_parameters()
        missing = [n for n, _ in expected if n not in seen]
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
        streams = [(i, j) for i in range(len(prompts)) for j in range(n)]
        samples: list[Sample] = []
        stats = GenerationStats()
        t0 = time.perf_counter()
        size = self.chunk_rows(max(len(p) for _, p in rows) + max_new_tokens) if rows else 1
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            uniforms = row_uniforms(seed, streams[start:start + size], max_new_tokens)
            samples.extend(self._generate_chunk(chunk, temperature, top_p, max_new_tokens, uniforms, stats))
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return samples

    def chunk_rows(self, positions: int) -> int:
        """Rows decoded together when each holds ``positions`` tokens (prompt width + new tokens):
        ``max_batch_rows``, or as many as ``kv_budget_bytes`` of KV cache hold, if more."""
        per_row = kv_bytes_per_row(self.model.config, positions, next(self.model.parameters()).element_size())
        if not self.kv_budget_bytes or not per_row:
            return self.max_batch_rows
        return max(self.max_batch_rows, self.kv_budget_bytes // per_row)

    def _generate_chunk(self, rows, temperature, top_p, max_new_tokens, uniforms, stats) -> list[Sample]:
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
        stopped = torch.zeros(batch, dtype=torch.bool, device=self.device)
        # the rows still in the decode batch (chunk row numbers) and which of them are done
        alive = torch.arange(batch, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        uniforms = uniforms.to(self.device)

        cache = preallocated_cache(self.model, width + max_new_tokens) if self.preallocate_cache else None
        out = self.model(input_ids=input_ids, attention_mask=attention[:, :width], position_ids=positions, use_cache=True,
                         logits_to_keep=1, **({self._cache_kwarg: cache} if cache is not None else {}))
        stats.forward_passes += 1
        stats.extra["row_passes"] = stats.extra.get("row_passes", 0) + batch
        cache = _cache_of(out)
        logits = out.logits[:, -1, :]
        next_pos = positions[:, -1:] + 1
        for t in range(max_new_tokens):
            tokens, logp = sample_next(logits, temperature, top_p, uniforms[:, t])
            active = ~finished
            decoding = alive[active]
            out_tokens[decoding, t] = tokens[active]
            out_logp[decoding, t] = logp[active]
            lengths[decoding] += 1
            hit_eos = active & torch.isin(tokens, eos)
            stopped[alive[hit_eos]] = True
            finished |= hit_eos
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            if (self.compact_finished and 2 * int(finished.sum()) >= len(finished)
                    and hasattr(cache, "batch_select_indices")):
                # half the decode batch is done: drop those rows (KV cache included) rather than
                # decode pad tokens for them. Each row keeps its own random stream, so its sample
                # does not depend on the others, up to how a smaller batch's matrix products round
                keep = (~finished).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                alive, tokens, finished = alive[keep], tokens[keep], finished[keep]
                attention, next_pos, uniforms = attention[keep], next_pos[keep], uniforms[keep]
            # finished rows still in the batch decode pad tokens (their output is ignored)
            step_ids = torch.where(finished, torch.full_like(tokens, self.pad_id), tokens)[:, None]
            out = self.model(input_ids=step_ids, attention_mask=attention[:, : width + t + 1], position_ids=next_pos,
                             use_cache=True, **{self._cache_kwarg: cache})
            stats.forward_passes += 1
            stats.extra["row_passes"] += len(alive)
            cache = _cache_of(out)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1

        stats.new_tokens += int(lengths.sum())
        # one tolist() per tensor: per-row tensor slicing cost more than the decode's sampling math
        tokens, logps = out_tokens.cpu().tolist(), out_logp.cpu().tolist()
        lens, stops = lengths.cpu().tolist(), stopped.cpu().tolist()
        return [
            Sample(
                prompt_index=idx,
                response_ids=tokens[r][: lens[r]],
                log_probs=logps[r][: lens[r]],
                finish_reason=FINISH_STOP if stops[r] else FINISH_LENGTH,
                weight_version=self._version,
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
