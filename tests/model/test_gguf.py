"""read_gguf: synthetic files for each supported architecture; the real SmolLM2 GGUF against transformers."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from memsparse import resources
from memsparse.model.gguf import read_gguf

VOCAB, HIDDEN, FFN, N_HEAD, N_KV, HEAD_DIM, LAYERS = 64, 32, 48, 4, 2, 8, 2


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k projections (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(arch: str, tied: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": rand(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rand(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rand(N_HEAD * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = rand(N_KV * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = rand(N_KV * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rand(HIDDEN, N_HEAD * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
        w[p + "input_layernorm.weight"] = rand(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = rand(HIDDEN)
        if arch == "qwen2":
            for proj, rows in (("q", N_HEAD), ("k", N_KV), ("v", N_KV)):
                w[p + f"self_attn.{proj}_proj.bias"] = rand(rows * HEAD_DIM)
        if arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = rand(HEAD_DIM)
            w[p + "self_attn.k_norm.weight"] = rand(HEAD_DIM)
    return w


GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, module = base.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[module]}.{suffix}"
    return f"{GGUF_NAMES[base]}.{suffix}"


def write_synthetic(path: Path, arch: str, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a GGUF the way llama.cpp would; returns the HF weights read_gguf must reproduce."""
    weights = hf_weights(arch, tied, np.random.default_rng(seed))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if arch == "qwen3":
        writer.add_key_length(HEAD_DIM)
    else:
        writer.add_rope_dimension_count(HEAD_DIM)
    if arch == "qwen2":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(1024)

    expected = {}
    for name, w in weights.items():
        stored = w
        if arch == "llama" and ".q_proj." in name:
            stored = llama_cpp_permute(w, N_HEAD)
        elif arch == "llama" and ".k_proj." in name:
            stored = llama_cpp_permute(w, N_KV)
        if name == "model.embed_tokens.weight":
            q8 = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
        elif name.endswith("mlp.down_proj.weight"):
            writer.add_tensor(gguf_name(name), stored.astype(np.float16))
            expected[name] = w.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(gguf_name(name), stored)
            expected[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize(
    ("arch", "tied"), [("llama", False), ("llama", True), ("qwen2", True), ("qwen3", False)]
)
def test_synthetic_roundtrip(tmp_path: Path, arch: str, tied: bool) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_synthetic(path, arch, tied)
    config, state_dict = read_gguf(path)

    assert set(state_dict) == set(expected)
    for name, w in expected.items():
        assert state_dict[name].dtype == torch.float32
        assert torch.equal(state_dict[name], torch.from_numpy(w)), name

    assert config["model_type"] == arch
    assert config["tie_word_embeddings"] is tied
    assert config["attention_bias"] is (arch == "qwen2")
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (VOCAB, HIDDEN, FFN)
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (LAYERS, N_HEAD)
    assert (config["num_key_value_heads"], config["head_dim"]) == (N_KV, HEAD_DIM)
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 500000.0
    assert config["max_position_embeddings"] == 4096
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)
    if arch == "qwen2":
        expected_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
        assert config["rope_scaling"] == expected_scaling
    else:
        assert "rope_scaling" not in config


def test_dtype_cast(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_synthetic(path, "llama", tied=True)
    _, state_dict = read_gguf(path, dtype=torch.bfloat16)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert state_dict[name].dtype == torch.bfloat16
    assert torch.equal(state_dict[name], torch.from_numpy(expected[name]).to(torch.bfloat16))


def test_unknown_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        read_gguf(path)


@pytest.mark.slow
def test_smollm2_matches_transformers() -> None:
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    from transformers import AutoModelForCausalLM

    try:
        path = resources.smollm2_gguf()
    except resources.ResourceUnavailable as e:
        pytest.skip(str(e))
    config, state_dict = read_gguf(path)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ref_state = ref.state_dict()

    assert config["tie_word_embeddings"] is True and ref.config.tie_word_embeddings is True
    assert set(ref_state) - set(state_dict) == {"lm_head.weight"}  # tied: not stored separately
    assert set(state_dict) <= set(ref_state)
    for name, tensor in state_dict.items():
        assert tensor.shape == ref_state[name].shape, name
        assert (tensor - ref_state[name]).abs().max().item() <= 1e-6, name

    ref_cfg = ref.config
    keys = (
        "model_type vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
        "num_key_value_heads head_dim max_position_embeddings hidden_act attention_bias mlp_bias "
        "bos_token_id eos_token_id pad_token_id"
    )
    for key in keys.split():
        assert config[key] == getattr(ref_cfg, key), key
    assert math.isclose(config["rms_norm_eps"], ref_cfg.rms_norm_eps, rel_tol=1e-6)
    rope_parameters = getattr(ref_cfg, "rope_parameters", None) or {}  # transformers 5 moved rope_theta here
    ref_theta = rope_parameters.get("rope_theta", getattr(ref_cfg, "rope_theta", None))
    assert config["rope_theta"] == ref_theta
    assert rope_parameters.get("rope_type", "default") == "default" and "rope_scaling" not in config
