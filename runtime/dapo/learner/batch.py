"""The training batch: padded (prompt, response) rows and the helpers that slice, order and pad them.

Layout (`TrainBatch`): every row is ``[left-padded prompt | response, right-padded]`` so the
response always starts at column ``prompt_width``; the logits that predict response token t sit
at column ``prompt_width - 1 + t``. The controller builds one per step (`make_batch`); every
learner backend slices it into mini- and micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch


@dataclass
class TrainBatch:
    """A padded batch of (prompt, response) rows, grouped: the n responses of a prompt are
    consecutive rows, so a contiguous slice of whole groups is a mini-batch."""

    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    position_ids: torch.Tensor  # [B, P + R]
    responses: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] float 0/1: real (and not filtered) response tokens
    prompt_width: int
    advantages: torch.Tensor | None = None  # [B] (one per response; DAPO's A_i is per sequence)
    old_log_probs: torch.Tensor | None = None  # [B, R] proximal policy (learner weights at the step's start)
    behaviour_log_probs: torch.Tensor | None = None  # [B, R] the sampling engine's own log-probs, 0-padded
    weight_versions: torch.Tensor | None = None  # [B] long: weight version that sampled each row
    policy_version: int | None = None  # the learner's weight version this step starts from
    is_weights: torch.Tensor | None = None  # [B, R] rollout-correction weights (set by the learner)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def _map_tensors(self, fn) -> "TrainBatch":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def rows(self, start: int, stop: int) -> "TrainBatch":
        return self._map_tensors(lambda t: t[start:stop])

    def permuted(self, order: torch.Tensor) -> "TrainBatch":
        """The rows in ``order`` (a permutation of 0..B-1)."""
        return self._map_tensors(lambda t: t[order])

    def to(self, device) -> "TrainBatch":
        return self._map_tensors(lambda t: t.to(device))

    def trimmed(self) -> "TrainBatch":
        """The same rows without the pad columns none of them uses: prompt columns left of the
        longest prompt, response columns right of the longest response (at least one). A slice
        of a bigger batch is padded to that batch's widths; its forward pass need not be. The
        log-probs of the kept columns are those of the untrimmed rows (padding is masked out of
        attention and positions are unchanged)."""
        width_p = self.prompt_width
        width_r = self.responses.shape[1]
        used_p = int(self.attention_mask[:, :width_p].sum(-1).max()) if self.num_rows else width_p
        used_r = max(1, int(self.attention_mask[:, width_p:].sum(-1).max())) if self.num_rows else width_r
        if used_p == width_p and used_r == width_r:
            return self
        sequence = slice(width_p - used_p, width_p + used_r)
        columns = {name: sequence for name in SEQUENCE_FIELDS}
        columns.update({name: slice(0, used_r) for name in RESPONSE_FIELDS})
        return replace(self, prompt_width=used_p,
                       **{name: getattr(self, name)[:, cut] for name, cut in columns.items()
                          if getattr(self, name) is not None})

    def stale_rows(self) -> torch.Tensor:
        """[B] bool: rows sampled by weights older than ``policy_version`` (surplus carried over)."""
        if self.weight_versions is None or self.policy_version is None:
            return torch.zeros(self.num_rows, dtype=torch.bool)
        return self.weight_versions < self.policy_version


# TrainBatch's per-token fields: [B, P + R] over prompt and response, [B, R] over the response
SEQUENCE_FIELDS = ("input_ids", "attention_mask", "position_ids")
RESPONSE_FIELDS = ("responses", "response_mask", "old_log_probs", "behaviour_log_probs", "is_weights")


def make_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> TrainBatch:
    """Pad prompts on the left and responses on the right into one `TrainBatch`."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: give one prompt per response row")
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(r) for r in responses))
    rows = len(prompts)
    input_ids = torch.full((rows, width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width_p + width_r), dtype=torch.long)
    resp = torch.full((rows, width_r), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((rows, width_r), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, width_p - len(p):width_p] = torch.tensor(list(p), dtype=torch.long)
        attention[i, width_p - len(p):width_p] = 1
        if len(r):
            input_ids[i, width_p:width_p + len(r)] = torch.tensor(list(r), dtype=torch.long)
            attention[i, width_p:width_p + len(r)] = 1
            resp[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            resp_mask[i, : len(r)] = 1.0
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return TrainBatch(input_ids, attention, positions, resp, resp_mask, width_p)


def by_length(rows: TrainBatch) -> tuple[TrainBatch, torch.Tensor]:
    """``rows`` ordered by their token count (prompt + response, a stable sort) and the order
    used (``sorted = rows.permuted(order)``). Consecutive micro-batches of sorted rows have
    similar lengths, so `TrainBatch.trimmed` drops most of their padding (verl's dynamic batch
    size groups rows by length for the same reason). The loss is a sum over rows, so the
    order changes nothing but the rounding."""
    order = torch.sort(rows.attention_mask.sum(-1), stable=True).indices
    return rows.permuted(order), order


def in_row_order(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Undo `by_length`: ``values[k]`` belongs to row ``order[k]``."""
    restored = torch.empty_like(values)
    restored[order] = values
    return restored


def padded_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """[b, r] per-token values of a `TrainBatch.trimmed` slice back at the untrimmed response
    width (0 beyond the slice's longest response)."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


def mini_batch_normalisers(response_mask: torch.Tensor) -> tuple[float, float]:
    """(valid tokens, non-empty responses) of a mini-batch: DAPO's token-mean and seq-mean
    denominators N_tokens = sum_{i,t} m_it and N_seqs = #{i : sum_t m_it > 0}."""
    return float(response_mask.sum()), float((response_mask.sum(-1) > 0).sum())


def split_rows(rows: TrainBatch, micro_batch_rows: int) -> list[TrainBatch]:
    """Consecutive slices of at most ``micro_batch_rows`` rows (none for an empty batch)."""
    return [rows.rows(start, start + micro_batch_rows) for start in range(0, rows.num_rows, micro_batch_rows)]
