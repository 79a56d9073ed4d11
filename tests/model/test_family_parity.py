"""Each family (Llama, Qwen2, Qwen3) gives transformers' logits; rope variants give transformers' frequencies."""

import json

import pytest
import torch
import transformers

from memsparse import MSAForCausalLM
from memsparse.ops.rope import rope_inv_freq

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(attention_bias=True)),
}


def _hf_model(family, tie, **extra):
    cfg_cls, model_cls, kw = FAMILIES[family]
    cfg = cfg_cls(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, **kw, **extra,
    )
    torch.manual_seed(0)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # make biases / norm weights non-trivial
    return model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, family, tie):
    hf = _hf_model(family, tie)
    hf.save_pretrained(tmp_path)
    ours = MSAForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4


ROPES = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("rope", ROPES, ids=[r["rope_type"] for r in ROPES])
def test_rope_scaling_logits_match_transformers(tmp_path, rope):
    hf = _hf_model("llama", False, rope_scaling=rope, rope_theta=10000.0)
    hf.save_pretrained(tmp_path)
    ours = MSAForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 101, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_transformers4_style_config_loads(tmp_path):
    """config.json written by transformers 4.x (top-level rope_theta / rope_scaling) loads the same."""
    hf = _hf_model("qwen3", False)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["rope_scaling"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = MSAForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_unsupported_rope_is_an_error():
    with pytest.raises(ValueError, match="rope_type"):
        rope_inv_freq({"rope_type": "longrope", "rope_theta": 1e4}, 8)
