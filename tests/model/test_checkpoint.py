"""Checkpoints: the official MSA layout, save -> load, router/layer mismatches, sharding, `memsparse convert`."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from memsparse import MSAForCausalLM, resources
from memsparse.cli import main as cli_main
from memsparse.model import checkpoint

from ..conftest import batch, make_sample


def _hf_qwen3(tmp_path, layers=36):
    cfg = transformers.Qwen3Config(
        vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(cfg).float().eval()
    hf.save_pretrained(tmp_path)
    return hf


def _make_official(tmp_path, routers=range(18, 36)):
    """An official-format directory: Qwen3 config + model_type msa + msa_config (values as the release's
    converter writes them) + router weights on the router layers + the scalar temperature."""
    hf = _hf_qwen3(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="msa", architectures=["MSAForCausalLM"], msa_config={
        "router_layer_idx": ",".join(map(str, routers)), "top_k_docs": 2, "pooling_kernel_size": 4,
        "head_reduce_method": "mean", "query_reduce_method": "max", "chunk_reduce_method": "max",
        "decouple_pooling_mode": "mean", "decouple_router": "true", "aux_loss": "false",
        "aux_loss_method": "INFONCE_DECOUPLE", "infonce_loss_temp": 0.1, "lmloss_weigth": 1.0,
        "auxloss_weight": 0.1, "recloss_weight": 0.0, "ansloss_weight": 1.0, "rewrite_position": "true",
    })
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(tmp_path / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    for i in routers:
        state[f"model.layers.{i}.self_attn.router_q_proj.0.weight"] = torch.randn(16, 16, generator=g)
        state[f"model.layers.{i}.self_attn.router_k_proj.0.weight"] = torch.randn(8, 16, generator=g)
    state["temperature"] = torch.tensor(0.1)
    save_file(state, str(tmp_path / "model.safetensors"))
    return hf, state


def _sample_batch():
    g = torch.Generator().manual_seed(4)
    return batch([make_sample([5, 9, 3], gen=g), make_sample([7, 2], n_query=3, gen=g)])


def test_official_layout_loads(tmp_path):
    hf, state = _make_official(tmp_path)
    model = MSAForCausalLM.from_pretrained(tmp_path)
    assert model.router_layers == list(range(18, 36))
    assert model.msa_config.decouple_router is True and model.msa_config.aux_loss is False
    w = model.model.layers[20].self_attn.router_q_proj[0].weight
    assert torch.equal(w, state["model.layers.20.self_attn.router_q_proj.0.weight"])
    assert not hasattr(model.model.layers[3].self_attn, "router_q_proj")
    assert float(model.temperature) == pytest.approx(0.1) and not model.temperature.requires_grad
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4  # no documents: the plain backbone
        ids, doc, mask = _sample_batch()
        out = model(ids, doc, attention_mask=mask)
    assert sorted(out.doc_scores) == list(range(18, 36))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_load_identical_outputs(tmp_path, dtype):
    _make_official(tmp_path / "src")
    model = MSAForCausalLM.from_pretrained(tmp_path / "src", dtype=dtype)
    model.save_pretrained(tmp_path / "dst")
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cfg["model_type"] == "msa" and cfg["msa_config"]["router_layer_idx"] == ",".join(map(str, range(18, 36)))
    assert cfg["msa_config"]["lmloss_weigth"] == 1.0 and cfg["msa_config"]["recloss_weight"] == 0.0
    keys = load_file(str(tmp_path / "dst" / "model.safetensors")).keys()
    assert "model.layers.18.self_attn.router_k_proj.0.weight" in keys and "temperature" in keys
    assert not any("layers.17.self_attn.router" in k for k in keys)
    again = MSAForCausalLM.from_pretrained(tmp_path / "dst")
    assert again.dtype == dtype
    ids, doc, mask = _sample_batch()
    with torch.no_grad():
        a, b = model(ids, doc, attention_mask=mask), again(ids, doc, attention_mask=mask)
    assert torch.equal(a.logits, b.logits)
    for L in a.doc_scores:
        assert torch.equal(a.doc_scores[L], b.doc_scores[L])


def test_sharded_save_loads(tmp_path, monkeypatch):
    _make_official(tmp_path / "src")
    model = MSAForCausalLM.from_pretrained(tmp_path / "src")
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 20_000)
    model.save_pretrained(tmp_path / "dst")
    assert (tmp_path / "dst" / "model.safetensors.index.json").exists()
    again = MSAForCausalLM.from_pretrained(tmp_path / "dst")
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n


def test_router_weights_must_match_router_layers(tmp_path):
    _make_official(tmp_path, routers=range(18, 36))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["msa_config"]["router_layer_idx"] = ",".join(map(str, range(17, 36)))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"router weights exist for layers \[18, .*layers \[17, 18"):
        MSAForCausalLM.from_pretrained(tmp_path)


def test_plain_checkpoint_gets_fresh_routers(tmp_path):
    _hf_qwen3(tmp_path, layers=4)
    model = MSAForCausalLM.from_pretrained(tmp_path, msa_config={"router_layer_idx": "2,3"})
    w = model.model.layers[2].self_attn.router_k_proj[0].weight
    assert float(w.detach().std()) == pytest.approx(0.02, rel=0.3)
    assert model.router_layers == [2, 3]


def test_truncated_weights_are_refused(tmp_path):
    _hf_qwen3(tmp_path, layers=2)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        MSAForCausalLM.from_pretrained(tmp_path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        MSAForCausalLM.from_pretrained(tmp_path)


def test_cli_convert(tmp_path, capsys):
    try:
        resources.qwen_tiktoken_file()
    except resources.ResourceUnavailable as e:
        pytest.skip(f"Qwen tokenizer files not reachable: {e}")
    hf = _hf_qwen3(tmp_path / "src", layers=4)
    rc = cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--router-layers", "2-3",
                   "--top-k", "4", "--chunk-size", "8", "--msa", "head_reduce_method=max", "--qwen-tokenizer"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())["msa_config"]
    assert cfg["router_layer_idx"] == "2,3" and cfg["top_k_docs"] == 4 and cfg["pooling_kernel_size"] == 8
    assert cfg["head_reduce_method"] == "max"
    assert (tmp_path / "dst" / "tokenizer.json").exists()
    model = MSAForCausalLM.from_pretrained(tmp_path / "dst")
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4
    assert cli_main(["convert", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
