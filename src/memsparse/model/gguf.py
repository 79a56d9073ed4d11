"""Read llama.cpp GGUF checkpoints (llama / qwen2 / qwen3 architectures) into HF-style config and weights."""

from __future__ import annotations

import os
import re
from typing import Any

import gguf
import numpy as np
import torch

# general.architecture -> (HF model_type, HF architecture class name)
_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def _field_value(field: gguf.ReaderField) -> Any:
    """Python value of a scalar or string metadata field (float32 values rounded to their shortest repr)."""
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        raise ValueError(f"GGUF metadata {field.name} is an array, expected a scalar")
    part = field.parts[field.data[0]]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    value = part[0]
    if isinstance(value, np.floating):
        return float(str(value))  # e.g. float32 1e-5 -> 1e-05, not 9.99999974e-06
    return value.item()


class _Metadata:
    """Typed access to ``<arch>.*`` and ``tokenizer.ggml.*`` GGUF key/values."""

    def __init__(self, reader: gguf.GGUFReader, path: str):
        self.reader = reader
        self.path = path
        self.arch = ""
        self.arch = self.get("general.architecture", required=True)

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        key = key.replace("{arch}", self.arch)
        field = self.reader.get_field(key)
        if field is None:
            if required:
                raise ValueError(f"{self.path}: GGUF metadata {key!r} is missing")
            return default
        return _field_value(field)


def _rope_scaling(meta: _Metadata) -> dict[str, Any] | None:
    kind = meta.get("{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = meta.get("{arch}.rope.scaling.factor", required=True)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        optional = {
            "original_max_position_embeddings": "{arch}.rope.scaling.original_context_length",
            "attention_factor": "{arch}.rope.scaling.attn_factor",
            "beta_fast": "{arch}.rope.scaling.yarn_beta_fast",
            "beta_slow": "{arch}.rope.scaling.yarn_beta_slow",
        }
        for hf_key, gguf_key in optional.items():
            value = meta.get(gguf_key)
            if value is not None:
                scaling[hf_key] = value
        return scaling
    raise ValueError(f"{meta.path}: unsupported rope scaling type {kind!r} (supported: none, linear, yarn)")


def _config(meta: _Metadata, tensors: dict[str, gguf.ReaderTensor]) -> dict[str, Any]:
    model_type, class_name = _ARCHITECTURES[meta.arch]
    hidden = meta.get("{arch}.embedding_length", required=True)
    n_head = meta.get("{arch}.attention.head_count", required=True)
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{meta.path}: tensor 'token_embd.weight' is missing")
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [class_name],
        "vocab_size": meta.get("{arch}.vocab_size", int(embed.shape[-1])),
        "hidden_size": hidden,
        "intermediate_size": meta.get("{arch}.feed_forward_length", required=True),
        "num_hidden_layers": meta.get("{arch}.block_count", required=True),
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get("{arch}.attention.head_count_kv", n_head),
        "head_dim": meta.get(
            "{arch}.attention.key_length", meta.get("{arch}.rope.dimension_count", hidden // n_head)
        ),
        "rms_norm_eps": meta.get("{arch}.attention.layer_norm_rms_epsilon", required=True),
        "rope_theta": meta.get("{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": meta.get("{arch}.context_length", required=True),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _hf_name(name: str, path: str) -> tuple[str, str | None]:
    """HF parameter name of GGUF tensor ``name`` and its GGUF layer-tensor kind (None for global tensors)."""
    if m := _LAYER_RE.fullmatch(name):
        layer, kind, suffix = m.groups()
        if kind in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}", kind
    elif (m := _GLOBAL_RE.fullmatch(name)) and m.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}", None
    if name == "rope_freqs.weight":
        raise ValueError(f"{path}: Llama-3 rope frequency factors ('rope_freqs.weight') are not supported")
    raise ValueError(f"{path}: unexpected GGUF tensor {name!r}")


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (interleaved rotary pairs -> HF rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_array(t: gguf.ReaderTensor) -> np.ndarray:
    """Dequantized float32 array of ``t`` in HF (row-major, reversed ggml) shape."""
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {t.name!r}: unsupported type {t.tensor_type.name}") from e
    arr = arr.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
    return arr.astype(np.float32, copy=False)


def _open(path: str) -> tuple[gguf.GGUFReader, _Metadata]:
    reader = gguf.GGUFReader(path)
    meta = _Metadata(reader, path)
    if meta.arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {meta.arch!r} (supported: {', '.join(_ARCHITECTURES)})"
        )
    return reader, meta


def read_gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the HF-style config of a GGUF checkpoint (no tensor is dequantized)."""
    reader, meta = _open(os.fspath(path))
    return _config(meta, {t.name: t for t in reader.tensors})


def read_gguf(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a GGUF checkpoint as ``(config, state_dict)`` in Hugging Face conventions.

    ``config`` has the keys of a HF ``config.json`` for the matching ``model_type``; ``state_dict``
    uses HF parameter names, with every tensor dequantized and cast to ``dtype``. When the file has
    no ``output.weight`` the embeddings are tied and ``lm_head.weight`` is omitted.
    Supported ``general.architecture`` values: llama, qwen2, qwen3.
    """
    path = os.fspath(path)
    reader, meta = _open(path)
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, tensors)
    head_dim = config["head_dim"]
    n_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    state_dict: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        hf_name, kind = _hf_name(name, path)
        arr = _tensor_array(t)
        if kind in n_heads:
            rows = n_heads[kind] * head_dim
            if arr.shape[0] != rows:
                raise ValueError(
                    f"{path}: {name} has {arr.shape[0]} rows, expected {n_heads[kind]} heads x {head_dim}"
                )
            if meta.arch == "llama":
                arr = _unpermute_rotary(arr, n_heads[kind])
        if not arr.flags.writeable:  # F32 data is a read-only view of the memory-mapped file
            arr = arr.copy()
        state_dict[hf_name] = torch.from_numpy(arr).to(dtype)
    return config, state_dict
