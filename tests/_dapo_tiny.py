"""Tiny char-level Qwen2 policy for fast tests (no downloads): tokenizer + model built from configs."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Every printable ASCII character is one token; three special tokens for pad / chat / eos."""
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.train()
    return model


def write_tiny_model_folder(folder: Path, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A Hugging Face folder (config, weights, tokenizer) of `tiny_model`, its generation config
    ending at the tokenizer's eos: what the vLLM engine tests start engines on."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, hidden=hidden, layers=layers, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_policy(hidden: int = 64, layers: int = 2, seed: int = 0):
    tok = tiny_tokenizer()
    return tiny_model(tok, hidden, layers, seed), tok


def inject_tiny_policy(monkeypatch, hidden: int = 32, layers: int = 2, seed: int = 0) -> None:
    """Make `dapo run`'s model the tiny policy: dapo.model.loading.load_policy returns it, and the
    check `dapo run` runs first (dapo.preflight) reads its config and tokenizer."""
    import dapo.model.loading
    import dapo.preflight

    monkeypatch.setattr(dapo.model.loading, "load_policy",
                        lambda spec, device="cpu", cache_dir=None: tiny_policy(hidden, layers, seed))
    tokenizer = tiny_tokenizer()
    config = tiny_model(tokenizer, hidden, layers, seed).config
    monkeypatch.setattr(dapo.preflight, "load_model_facts",
                        lambda spec, scratch: dapo.preflight.ModelFacts(config, tokenizer, "the injected tiny policy"))
