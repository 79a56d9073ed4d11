"""Quantized banks: fp8 routing keys (scale per chunk), fp8/int8 K̄/V̄ (scale per chunk and head): round-trip error,
routing close to the model-dtype bank, save/load, compaction and gather on quantized segments."""

import pytest
import torch

import memsparse as ms
from memsparse.memory.quant import QTensor, quantize

from ..conftest import assert_same_routing, tiny_model, tiny_tokenizer

DOCS = [f"Document {i} talks about {w} and {w} again, number {i * 7}." for i, w in
        enumerate(["apples", "rivers", "trains", "music", "stone", "glass", "paper", "wind", "salt", "gold"])]
QUESTIONS = ["What about trains?", "Tell me of gold.", "Which one is about rivers?"]


@pytest.mark.parametrize("kind,tol", [("fp8", 0.0625), ("int8", 1 / 127)])
def test_quantize_error_is_bounded_per_chunk(kind, tol):
    x = torch.randn(50, 3, 16) * torch.logspace(-3, 2, 50)[:, None, None]  # chunks of very different magnitude
    for per_head in (False, True):
        q = quantize(x, kind, per_head)
        assert q.scale.shape == ((50, 3) if per_head else (50,))
        amax = x.abs().amax(dim=-1, keepdim=True) if per_head else x.abs().amax(dim=(1, 2), keepdim=True)
        err = (q.dequantize(torch.float32) - x).abs() / amax  # relative to the chunk's (head's) largest value
        assert err.max() <= tol, (kind, per_head, err.max())
    assert quantize(x, "model", True) is x
    with pytest.raises(ValueError, match="bank dtype"):
        quantize(x, "int4", True)


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 3}, vocab_size=300)
    return model, tok


def _routes(model, tok, bank):
    engine = ms.MSAEngine(model, tok, bank)
    return [engine.route(q) for q in QUESTIONS]


@pytest.mark.parametrize("content", ["fp8", "int8"])
def test_quantized_bank_routes_like_the_full_bank_and_round_trips(setup, tmp_path, content):
    model, tok = setup
    full = ms.MemoryBank.build(model, tok, DOCS)
    bank = ms.MemoryBank.build(model, tok, DOCS, key_dtype="fp8", content_dtype=content)
    seg = bank.segments[0]
    layer = model.router_layers[0]
    assert isinstance(seg.route_keys[layer], QTensor) and seg.route_keys[layer].data.dtype == torch.float8_e4m3fn
    assert isinstance(seg.keys[layer], QTensor) and seg.keys[layer].scale.shape[1] == model.config.num_key_value_heads
    assert bank.routing_bytes() < full.routing_bytes() / 2.5 and bank.content_bytes() < full.content_bytes() / 2.5
    # routing: the same top-k documents, scores within fp8 rounding
    for a, b in zip(_routes(model, tok, full), _routes(model, tok, bank)):
        for lay in a:
            assert {d for d, _ in a[lay]} == {d for d, _ in b[lay]}
            assert max(abs(x - y) for (_, x), (_, y) in zip(sorted(a[lay]), sorted(b[lay]))) < 0.05
    # gather dequantizes into the model's dtype, close to the unquantized K̄/V̄
    k_full, v_full = full.gather(layer, [2, 5])
    k_q, v_q = bank.gather(layer, [2, 5])
    assert k_q.dtype == model.dtype and k_q.shape == k_full.shape
    assert (k_q - k_full).abs().max() <= 0.07 * k_full.abs().max()
    # saved and loaded: the same tensors (bitwise), the same routing; compaction keeps quantized segments
    before = _routes(model, tok, bank)
    bank.save(tmp_path / "b")
    again = ms.MemoryBank.load(tmp_path / "b", model, tok)
    assert (again.key_dtype, again.content_dtype) == ("fp8", content)
    assert torch.equal(again.segments[0].keys[layer].data.view(torch.uint8), seg.keys[layer].data.view(torch.uint8))
    for a, b in zip(before, _routes(model, tok, again)):
        assert_same_routing(a, b)
    again.add(["A new document about trains and trains."])
    again.delete([0, 3])
    again.compact()
    assert all(isinstance(s.route_keys[layer], QTensor) for s in again.segments)
    assert torch.equal(again.gather(layer, [4])[0], bank.gather(layer, [4])[0])
    with pytest.raises(ValueError, match="key_dtype"):
        ms.MemoryBank.build(model, tok, DOCS, key_dtype="int4")


def test_set_key_dtype_converts_an_existing_bank(setup):
    model, tok = setup
    built = ms.MemoryBank.build(model, tok, DOCS, key_dtype="fp8")
    bank = ms.MemoryBank.build(model, tok, DOCS).set_key_dtype("fp8")
    assert bank.key_dtype == "fp8" and bank.segments[0].route_keys is not bank.segments[0].keys
    for a, b in zip(_routes(model, tok, built), _routes(model, tok, bank)):
        assert_same_routing(a, b)
    lay = model.router_layers[0]
    bank.set_key_dtype("int8")  # from fp8: through the model's dtype
    assert bank.segments[0].route_keys[lay].data.dtype == torch.int8
    int8 = ms.MemoryBank.build(model, tok, DOCS, key_dtype="int8")
    for a, b in zip(_routes(model, tok, int8), _routes(model, tok, bank)):
        assert all({d for d, _ in a[k]} == {d for d, _ in b[k]} for k in a)
    bank.set_key_dtype("model")
    assert bank.segments[0].route_keys[lay].dtype == model.dtype


def test_fused_routing_over_a_quantized_bank(setup):
    """The Triton kernel (interpreted on CPU) routes an fp8-key bank of two segments like the PyTorch path."""
    pytest.importorskip("triton")
    _, tok = setup
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 3}, vocab_size=300, head_dim=32,
                       num_attention_heads=6, num_key_value_heads=2, hidden_size=48)  # D >= 32: split fp8 products
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    bank = ms.MemoryBank.build(model, tok, DOCS[:6], key_dtype="fp8", content_dtype="int8")
    bank.add(DOCS[6:])
    bank.delete([2])
    bank.fused_routing = False  # the PyTorch path first, as the reference
    ref = _routes(model, tok, bank)
    bank.fused_routing = True
    bank.changed()
    for a, b in zip(ref, _routes(model, tok, bank)):
        # GPU: fp8 products of rows split in two fp8 terms; the CPU interpreter splits the rows with its float32 ->
        # e4m3 rounding, which loses the mantissa carry (-1.99 -> -1), so the lo term errs by up to ~2^-5
        assert_same_routing(a, b, atol=2e-2 if torch.cuda.is_available() else 2e-3)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_rounding_for_the_queries(kind):
    """Error-feedback rounding under query moments M: identity M gives plain rounding; for queries in a subspace
    the squared score error e^T M e falls several times, with every element still a grid value."""
    from memsparse.memory.quant import dense

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, 32, generator=g)
    eye = torch.eye(32).expand(2, 32, 32)
    assert torch.equal(quantize(x, kind, False, moments=eye).data.float(), quantize(x, kind, False).data.float())
    basis = torch.randn(2, 32, 4, generator=g)  # queries live in 4 of 32 directions
    M = basis @ basis.transpose(1, 2)
    def cost(t):
        e = dense(t, torch.float32) - x
        return float(torch.einsum("chd,hde,che->", e, M, e))

    plain, shaped = quantize(x, kind, False), quantize(x, kind, False, moments=M)
    assert cost(shaped) < cost(plain) / 4
    assert torch.equal(shaped.scale, plain.scale) and shaped.data.dtype == plain.data.dtype


def test_calibrated_keys(setup, tmp_path):
    """`calibrate_keys`: moments per router layer from pseudo-queries, the bank's keys in 8 bits rounded for them,
    documents added later rounded the same way, also after a save and load."""
    from memsparse.engine.calibrate import pseudo_queries
    from memsparse.memory.quant import quantize as q8

    model, tok = setup
    docs = ["Paris is the capital of France and old.", "Ottawa is in Canada, where it is cold.",
            "Bananas are yellow and grow in warm places."]
    bank = ms.MemoryBank.build(model, tok, docs)
    engine = ms.MSAEngine(model, tok, bank)
    assert len(pseudo_queries(bank, 10)) == 3
    moments = engine.calibrate_keys("fp8")
    D, Hkv = model.config.head_dim, model.config.num_key_value_heads
    assert set(moments) == set(model.router_layers) and bank.key_dtype == "fp8"
    for m in moments.values():
        assert m.shape == (Hkv, D, D) and torch.allclose(m, m.transpose(1, 2))
        assert (m.diagonal(dim1=1, dim2=2) > 0).all()
    assert all(len(v) == 3 for v in engine.route("Where is Ottawa?").values())
    bank.save(tmp_path / "bank")
    bank = ms.MemoryBank.load(tmp_path / "bank", model, tok)
    assert all(torch.equal(bank.key_moments[lay], moments[lay]) for lay in moments)
    bank.add(["Rome is old."])
    ref = ms.MemoryBank.build(model, tok, docs + ["Rome is old."])  # same ids, so the same rendering
    for lay in model.router_layers:
        n = bank.segments[-1].route_keys[lay].shape[0]
        want = q8(ref.segments[0].route_keys[lay][-n:], "fp8", False, moments[lay])
        assert torch.equal(bank.segments[-1].route_keys[lay].data.float(), want.data.float())
    with pytest.raises(ValueError, match="expected 'fp8' or 'int8'"):
        engine.calibrate_keys("model")
    with pytest.raises(ValueError, match="every router layer"):
        bank.set_key_dtype("fp8", {model.router_layers[0]: moments[model.router_layers[0]]})


def test_blocked_feedback_rounding_matches_element_by_element():
    """The lazy-batch rounding (errors pushed past a block by one product) against one block spanning the whole
    head (every error pushed element by element): the same grid values up to float summation order."""
    from memsparse.memory.quant import _feedback_round, feedback_factor

    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 2, 64, generator=g) * 50
    basis = torch.randn(2, 64, 6, generator=g)
    U = feedback_factor(basis @ basis.transpose(1, 2))
    for dt in (torch.float8_e4m3fn, torch.int8):
        fast, ref = _feedback_round(x, dt, U, block=16), _feedback_round(x, dt, U, block=64)
        assert (fast.float() == ref.float()).float().mean() > 0.999
