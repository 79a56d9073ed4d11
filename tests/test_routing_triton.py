"""The fused Triton routing kernel against the PyTorch routing path: on a GPU, and on the CPU under
TRITON_INTERPRET=1 at small sizes. Inference only (the training forward uses the differentiable path)."""

import pytest
import torch

pytest.importorskip("triton")  # on CPU, tests/conftest.py has set TRITON_INTERPRET=1

from memsparse.ops.routing import chunk_scores, document_scores  # noqa: E402
from memsparse.ops.routing_triton import fused_document_scores  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 2e-2 if DEVICE == "cuda" else 1e-5  # the GPU multiplies in bf16 (float32 accumulation)


def _reference(q, mask, keys, chunk_doc, n, cosine, scale):
    cs = chunk_scores(q, mask, keys, torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device),
                      head_reduce="mean", query_reduce="max", cosine=cosine, scale=scale)
    return document_scores(cs, chunk_doc.expand(q.shape[0], -1), n, "max")


@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("S,C,H,Hkv", [(5, 37, 6, 2), (70, 130, 9, 3), (1, 64, 4, 4)],
                         ids=["S5-C37-G3", "S70-C130-G3", "S1-C64-G1"])
def test_fused_scores_match_reference(S, C, H, Hkv, cosine):
    g = torch.Generator().manual_seed(S + C)
    B, D, N = 3, 16, 11
    q = torch.randn(B, S, H, D, generator=g).to(DEVICE)
    mask = (torch.rand(B, S, generator=g) < 0.7).to(DEVICE)
    mask[:, 0] = True
    keys = torch.randn(C, Hkv, D, generator=g).to(DEVICE)
    chunk_doc = torch.sort(torch.randint(0, N - 1, (C,), generator=g)).values.to(DEVICE)  # doc N-1: no chunks
    scale = 1.0 if cosine else D**-0.5
    ref = _reference(q, mask, keys, chunk_doc, N, cosine, scale)
    got = fused_document_scores(q, mask, keys, chunk_doc, N, cosine=cosine, scale=scale)
    assert torch.isinf(got[:, N - 1]).all() and torch.isinf(ref[:, N - 1]).all()
    assert torch.allclose(got[:, : N - 1], ref[:, : N - 1], atol=TOL, rtol=TOL)


def test_tiles_accumulate_and_bf16_keys():
    """Segments scored one after another into the same output equal scoring them together; bf16 keys."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 6, 16, generator=g).to(DEVICE)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    keys = torch.randn(50, 2, 16, generator=g).to(DEVICE, torch.bfloat16)
    doc = torch.arange(50, device=DEVICE) // 5
    whole = fused_document_scores(q, mask, keys, doc, 10, cosine=True, scale=1.0)
    parts = fused_document_scores(q, mask, keys[:20], doc[:20], 10, cosine=True, scale=1.0)
    parts = fused_document_scores(q, mask, keys[20:], doc[20:], 10, cosine=True, scale=1.0, out=parts)
    assert torch.equal(whole, parts)
    ref = _reference(q, mask, keys.float(), doc, 10, True, 1.0)
    assert torch.allclose(whole, ref, atol=TOL)
    with pytest.raises(ValueError, match="power of two"):
        fused_document_scores(q[..., :12], mask, keys[..., :12], doc, 10, cosine=True, scale=1.0)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "dot"])
def test_quantized_keys_match_dequantized_reference(kind, cosine):
    """fp8/int8 keys with per-chunk scales score as their dequantized values (the scale cancels under cosine)."""
    from memsparse.memory.quant import quantize

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 7, 6, 16, generator=g).to(DEVICE)
    mask = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    keys = (torch.randn(40, 2, 16, generator=g) * torch.rand(40, 1, 1, generator=g) * 5).to(DEVICE)
    doc = torch.arange(40, device=DEVICE) // 4
    qk = quantize(keys, kind, per_head=False)
    assert qk.scale.shape == (40,)
    got = fused_document_scores(q, mask, qk.data, doc, 10, cosine=cosine, scale=0.25, key_scale=qk.scale)
    ref = _reference(q, mask, qk.dequantize(torch.float32), doc, 10, cosine, 0.25)
    assert torch.allclose(got, ref, atol=TOL, rtol=TOL)
    unscaled = fused_document_scores(q, mask, qk.data, doc, 10, cosine=cosine, scale=0.25)
    assert torch.allclose(unscaled, got, atol=TOL) == cosine  # the scale matters for dot products only


def test_engine_routing_with_the_fused_kernel():
    """A bank of two segments with a deleted document routes the same with `fused_routing` (on CPU: in
    Triton's interpreter)."""
    import memsparse as ms

    from .conftest import assert_same_routing, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 3}, vocab_size=300, head_dim=16,
                       num_attention_heads=6, num_key_value_heads=2, hidden_size=48).to(DEVICE)
    bank = ms.MemoryBank.build(model, tok, ["Paris is the capital of France.", "Ottawa is in Canada.", "Bananas."])
    bank.add(["Rome is old and has many churches.", "Lisbon is by the sea.", "x"])
    bank.delete([1])
    bank.fused_routing = False  # the PyTorch path first, as the reference
    engine = ms.MSAEngine(model, tok, bank, similarity="train")
    questions = ["Where is Lisbon? Is Rome old?", "Bananas?", "Where is Lisbon? Is Rome old?"]
    refs = [engine.route(q) for q in questions]
    bank.fused_routing, bank._view = True, None
    for ref, q in zip(refs, questions):  # on a GPU: captured graphs, then a replay of the first
        got = engine.route(q)
        assert_same_routing(ref, got, atol=TOL)
        assert all(1 not in [d for d, _ in v] for v in got.values())
