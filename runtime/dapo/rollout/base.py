"""What the controller needs from a rollout engine: `RolloutEngine`, the `Sample` it returns,
and how a prompt becomes token ids. Engines: `dapo.rollout.hf` (transformers), `dapo.rollout.vllm`,
and the remote client of the rollout replicas (`dapo.services.rollout.RemoteRolloutEngine`).

An engine holds its OWN copy of the policy. The learner's new weights reach it only through
`update_weights(named_tensors, version)`, the same call the distributed weight sync makes, so
"the engine serves the weights of version v" is something a test can check.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class Sample:
    """One sampled response.

    ``log_probs[t]`` is log pi(response_ids[t] | prefix) under the temperature-scaled distribution
    (see `RolloutEngine.generate`): the BEHAVIOUR policy's log-probs, which the learner's rollout
    correction weighs against its own (``spec.algorithm.rolloutCorrection``). ``finish_reason`` is
    "stop" (an EOS token was sampled; it is the last entry of ``response_ids``) or "length"
    (max_new_tokens reached: truncated). ``weight_version`` is the version of the weights that
    sampled it (None only for samples restored from checkpoints written before it existed).
    """

    prompt_index: int
    response_ids: list[int]
    log_probs: list[float]
    finish_reason: str
    weight_version: int | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == FINISH_LENGTH


class RolloutEngine(abc.ABC):
    """What the controller needs from a generation backend."""

    @abc.abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[Sample]:
        """Sample ``n`` responses for each prompt (token-id lists); returns ``len(prompts) * n``
        samples ordered prompt by prompt (the n samples of prompt i are consecutive).

        Log-probs are of the sampled tokens under softmax(logits / temperature) over the FULL
        vocabulary. top_p (nucleus sampling) restricts which tokens can be drawn (the smallest set
        of most likely tokens whose probability reaches top_p, renormalised) but the reported
        log-prob is NOT renormalised over that set: it is the quantity the learner recomputes
        (log_softmax(logits / T)), so old and new log-probs compare like with like. With
        top_p = 1 it is exactly the sampling log-probability.

        The same (weights, prompts, n, temperature, top_p, max_new_tokens, seed) give the same
        samples.
        """

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new policy weights (by parameter name) and serve them as ``version``."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Version of the weights generate() uses now (0 = the base model)."""

    def close(self) -> None:
        """Stop what the engine started outside this object (vLLM: its engine-core process).
        Nothing to stop for an engine that lives in this process's memory only."""


# --------------------------------------------------------------------------- prompt encoding


def encode_prompt(tokenizer, messages: list[dict] | str) -> list[int]:
    """Prompt -> token ids. Chat messages go through the tokenizer's chat template (with the
    assistant generation prompt) when it has one; otherwise the message contents are joined."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "\n\n".join(m["content"] for m in messages)
    return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]


def eos_token_ids(tokenizer, model=None) -> set[int]:
    """Every token id that ends a response: the tokenizer's EOS plus the model's generation-config
    EOS ids (chat models often end turns with a different token than the tokenizer's EOS)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation_config names none: "
                         "set tokenizer.eos_token so responses can end")
    return ids
