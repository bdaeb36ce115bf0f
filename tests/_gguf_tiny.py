"""A tiny Llama written as a real GGUF file, laid out as llama.cpp lays out
SmolLM2-135M-Instruct.Q4_1.gguf, and the steps of `dapo run examples/smollm2-135m-arith.yaml` up to
the checkpoint vLLM serves (shared by tests/test_gguf_checkpoint.py and
tests/test_gguf_checkpoint_vllm.py, whose module fixtures call these functions).

Llama metadata, a "gpt2" tokenizer (tokens, types, merges), tensors under llama.cpp's names with
q/k rows in llama.cpp's rotary order, the embedding in Q8_0 and the block weights in Q4_1;
`dapo.wiring.load_policy` reads it (transformers' GGUF reader, dequantised by
`dapo.model.loading`) and `dapo.storage.checkpointer.Checkpointer` writes the checkpoint into a
`CheckpointStore`. Nothing is downloaded: the file is built in a temporary folder at test time.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from _checkpointable import LearnerCheckpointable
from dapo.spec import parse_run

GGUF_FILE = "tiny-llama.Q4_1.gguf"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's ids: unk/pad 0, bos 1, eos 2
WORDS = ["What", " is", " plus", " minus", " Answer", ":", "?", " 12", " 7", " 45", " the", " sum", " of"]
TEXTS = ["What is 12 plus 7? Answer:", "What is the sum of 45 and 7? Answer:", "What is 45 minus 12?"]
# block weights in Q4_1 and the embedding in Q8_0, as in SmolLM2-135M-Instruct.Q4_1.gguf; norms stay F32
Q = gguf.GGMLQuantizationType


def byte_level_vocab(words: list[str]) -> tuple[list[str], list[str]]:
    """GPT-2 style byte-level BPE: the special tokens, the 256 byte symbols, then for each word
    the merges that join its bytes left to right (each merge adds one token)."""
    symbol = bytes_to_unicode()
    tokens = SPECIALS + [symbol[b] for b in range(256)]
    known, merges = set(tokens), []
    for word in words:
        parts = [symbol[b] for b in word.encode()]
        while len(parts) > 1:
            joined = parts[0] + parts[1]
            if joined not in known:
                merges.append(f"{parts[0]} {parts[1]}")
                tokens.append(joined)
                known.add(joined)
            parts = [joined] + parts[2:]
    return tokens, merges


def llama_cpp_rotary_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows as llama.cpp stores them: per head, the HF layout's two rotary halves
    [x_0..x_{d/2-1}, x_{d/2}..x_{d-1}] interleaved as pairs (x_0, x_{d/2}, x_1, x_{d/2+1}, ...);
    transformers' GGUF reader undoes this for the Llama architecture."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def tensor_type(hf_name: str, tensor: torch.Tensor):
    if tensor.dim() == 1:
        return Q.F32
    return Q.Q8_0 if "embed_tokens" in hf_name else Q.Q4_1


def quantisation_round_trip(tensor: torch.Tensor, qtype) -> torch.Tensor:
    """What a reader of the file gets back for ``tensor`` stored as ``qtype`` (blocks run along
    rows, so the q/k row order does not change it)."""
    data = tensor.numpy()
    return torch.from_numpy(np.array(gguf.dequantize(gguf.quantize(data, qtype), qtype))).reshape(tensor.shape)


def write_gguf(path: Path, model: LlamaForCausalLM, tokens: list[str], merges: list[str]) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("dapo tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight, and the reader ties it back
        base, suffix = hf_name.rsplit(".", 1)
        tensor = tensor.detach().float()
        if base.endswith("self_attn.q_proj"):
            tensor = llama_cpp_rotary_order(tensor, cfg.num_attention_heads)
        elif base.endswith("self_attn.k_proj"):
            tensor = llama_cpp_rotary_order(tensor, cfg.num_key_value_heads)
        qtype = tensor_type(hf_name, tensor)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", gguf.quantize(tensor.numpy(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_gguf_model(folder: Path) -> SimpleNamespace:
    """The GGUF file written into ``folder``: the folder, the float model it was made from, and what
    the file's weights read back as (the ``gguf_model`` fixture of the GGUF test modules)."""
    tokens, merges = byte_level_vocab(WORDS)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked distributions: wrong weights show up in the log-probs
        for name, param in model.named_parameters():
            param.copy_(1.0 + 0.1 * torch.randn_like(param) if param.dim() == 1 else 0.15 * torch.randn_like(param))
    write_gguf(folder / GGUF_FILE, model, tokens, merges)
    expected = {name: quantisation_round_trip(t.detach(), tensor_type(name, t))
                for name, t in model.state_dict().items() if name != "lm_head.weight"}
    expected["lm_head.weight"] = expected["model.embed_tokens.weight"]  # tied
    return SimpleNamespace(folder=folder, model=model, expected=expected)


def run_spec(model: dict, **rollout):
    return parse_run({"metadata": {"name": "gguf-vllm"}, "spec": {
        "model": {"dtype": "float32", **model}, "data": {"train": "t.jsonl"},
        "rollout": {"maxPromptLength": 64, "maxResponseLength": 32, **rollout},
        "algorithm": {"overlong": {"bufferLength": 8}}, "learner": {"seed": 3}}}).spec


def load_gguf_policy(gguf_model: SimpleNamespace) -> SimpleNamespace:
    """The policy as `dapo run` loads spec.model {path, ggufFile} (dequantised, plain): the
    ``loaded`` fixture."""
    from dapo import wiring

    spec = run_spec({"path": str(gguf_model.folder), "ggufFile": GGUF_FILE})
    model, tokenizer = wiring.load_policy(spec, device="cpu")
    return SimpleNamespace(spec=spec, model=model, tokenizer=tokenizer)


def write_checkpoint(loaded: SimpleNamespace, root: Path) -> Path:
    """The model/ folder of a checkpoint committed under ``root`` by the platform's Checkpointer (a
    real TorchLearner on the loaded policy; the trainer's own state is a stand-in): the
    ``checkpoint`` fixture."""
    from dapo import wiring
    from dapo.storage.checkpointer import MODEL_DIR, Checkpointer

    store = wiring.build_checkpoint_store(loaded.spec, root)
    learner = wiring.build_learner(loaded.model, loaded.spec, "cpu")
    info = Checkpointer(store, loaded.tokenizer, root / "staging").save(LearnerCheckpointable(learner, step=1, total_steps=1))
    return Path(store.fetch(info)) / MODEL_DIR
