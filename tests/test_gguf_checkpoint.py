"""A GGUF-loaded model and its checkpoint, without vLLM: the SmolLM2 example's path up to the
checkpoint (tests/_gguf_tiny.py builds the file). That vLLM serves the checkpoint is tested in
tests/test_gguf_checkpoint_vllm.py (marker vllm)."""

from __future__ import annotations

import json

import torch

from _gguf_tiny import TEXTS


def test_the_gguf_file_loads_as_the_plain_model_it_stores(gguf_model, gguf_policy):
    """spec.model {path, ggufFile}: the Llama config from the file's metadata, the byte-level
    BPE tokenizer from its vocabulary and merges, and exactly the weights the file stores
    (Q8_0 / Q4_1 dequantised, q/k rows back in HF order, lm_head tied to the embedding)."""
    model, tok = gguf_policy.model, gguf_policy.tokenizer
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == ("llama", 2, 128, 4, 2, 32, len(tok))
    assert cfg.tie_word_embeddings and not hasattr(cfg, "quantization_config")
    assert (tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_start|>")
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and len(ids) < len(text.encode())  # the merges are applied
    state = model.state_dict()
    assert state.keys() == gguf_model.expected.keys()
    for name, want in gguf_model.expected.items():  # the same dequantisation of the same bytes: exact
        assert torch.equal(state[name], want), f"{name} differs from the file's dequantised tensor"
    # and they are the quantised weights, not the float ones the file was made from
    drift = (state["model.layers.0.self_attn.q_proj.weight"] - gguf_model.model.model.layers[0].self_attn.q_proj.weight)
    # Q4_1 rounds each weight to one of 16 levels spanning its 32-weight block (~0.6 for these 0.15-sd
    # weights): <= half a level, 0.031 here, with the same numpy arithmetic on every CPU
    assert 0 < drift.abs().max() < 0.1


def test_the_checkpoint_is_plain_and_reloads_without_the_gguf_file(gguf_policy, gguf_checkpoint):
    from transformers import AutoModelForCausalLM

    config = json.loads((gguf_checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    back = AutoModelForCausalLM.from_pretrained(gguf_checkpoint, dtype=torch.float32)
    mine = gguf_policy.model.state_dict()
    assert all(torch.equal(t, mine[n]) for n, t in back.state_dict().items())  # saved and reloaded: exact
