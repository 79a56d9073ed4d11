"""The fused Triton routing kernel against the PyTorch routing path: on a GPU, and on the CPU under
TRITON_INTERPRET=1 at small sizes. Inference only (the training forward uses the differentiable path)."""

import pytest
import torch

pytest.importorskip("triton")  # on CPU, tests/conftest.py has set TRITON_INTERPRET=1

from memsparse.ops.routing import chunk_scores, document_scores  # noqa: E402
from memsparse.ops.routing_triton import (  # noqa: E402
    FILL,
    _split_fp8_rows,
    fused_document_scores,
    inverse_norms,
    routing_rows,
)

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


# split_fp8 tolerance, as a fraction of the score range: each row element x carries |error| <= 2^-8 |x| (hi and
# lo are e4m3 roundings of 4 significant bits each; below 2^-10 of the row scale, an absolute floor), so a score
# errs by a sum of per-element errors of independent signs, ~2^-8 sqrt(sum (x k)^2): about 1e-3 of the range here
# (<= 1.2e-3 over 10 seeds, cosine and dot), 2^-8 relative as bf16 rows. The worst case with aligned signs,
# 2^-8 sum |x k|, is several % of the range and not a useful test; the sm90 fp8 tensor-core accumulation adds
# ~2^-14 relative.
SPLIT_TOL = 5e-3


@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("kind,inv,split", [("model", True, False), ("fp8", True, False), ("int8", True, False),
                                            ("fp8", False, True), ("fp8", True, True)],
                         ids=["fp32-invnorm", "fp8-invnorm", "int8-invnorm", "fp8-split", "fp8-split-invnorm"])
def test_inverse_norm_and_split_fp8_variants(kind, inv, split, cosine):
    """Precomputed inverse key norms and fp8 rows split in two terms, alone and combined, against the reference
    on dequantized keys; 3 x 30 rows span two row tiles, 70 chunks several chunk tiles."""
    from memsparse.memory.quant import quantize

    g = torch.Generator().manual_seed(7)
    B, S, H, Hkv, D, C, N = 3, 30, 6, 2, 32, 70, 11
    q = torch.randn(B, S, H, D, generator=g).to(DEVICE)
    mask = (torch.rand(B, S, generator=g) < 0.7).to(DEVICE)
    mask[:, 0] = True
    keys = (torch.randn(C, Hkv, D, generator=g) * torch.rand(C, 1, 1, generator=g) * 5).to(DEVICE)
    doc = torch.sort(torch.randint(0, N - 1, (C,), generator=g)).values.to(DEVICE)  # doc N-1: no chunks
    qk = quantize(keys, kind, per_head=False)
    data, ks = (keys, None) if kind == "model" else (qk.data, qk.scale)
    deq = keys if kind == "model" else qk.dequantize(torch.float32)
    scale = 1.0 if cosine else D**-0.5
    kn = inverse_norms(data) if inv else None
    got = fused_document_scores(q, mask, data, doc, N, cosine=cosine, scale=scale, key_scale=ks, key_inv_norm=kn,
                                split_fp8=split)
    if inv and cosine and kn.dtype == torch.float16:  # one-byte keys: the reference takes the kernel's inverse
        # norms (float16), as products with the keys as stored (their per-chunk scale cancels under cosine)
        ref = _reference(torch.nn.functional.normalize(q, dim=-1), mask, data.float() * kn.float()[..., None], doc,
                         N, False, scale)
    else:
        ref = _reference(q, mask, deq, doc, N, cosine, scale)
    assert torch.isinf(got[:, N - 1]).all()
    got, ref = got[:, : N - 1], ref[:, : N - 1]
    if split:
        assert (got - ref).abs().max() <= SPLIT_TOL * (ref.max() - ref.min())
    else:
        assert torch.allclose(got, ref, atol=TOL, rtol=TOL)
    if inv and cosine:  # the kernel multiplies by the given inverse norms (it computes none)
        twice = fused_document_scores(q, mask, data, doc, N, cosine=True, scale=scale, key_scale=ks,
                                      key_inv_norm=2 * kn, split_fp8=split)[:, : N - 1]
        assert torch.allclose(twice, 2 * got, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("split", [False, True], ids=["rows", "split"])
def test_routing_rows_kernel_matches_torch(cosine, split):
    """The rows kernel (head sum of the G query heads of each key head, scaled; fp8 split) against the same in
    PyTorch (`_split_fp8_rows`), for 3 key heads of 3 query heads (neither a power of two)."""
    g = torch.Generator().manual_seed(3)
    B, S, H, Hkv, D = 2, 5, 9, 3, 32
    q = (torch.randn(B, S, H, D, generator=g) * 3).to(DEVICE)
    mask = torch.rand(B, S, generator=g) < 0.6
    scale = 0.7
    qn = torch.nn.functional.normalize(q.float(), dim=-1) if cosine else q.float()
    ref = (qn.view(B, S, Hkv, H // Hkv, D).sum(3) * (scale / H)).reshape(B * S, Hkv, D)  # (R, Hkv, D)
    fill = torch.zeros(B * S * FILL + 7, device=DEVICE)  # more than the R row programs fill: one program more
    rows, lo, rs, sample = routing_rows(q, mask.to(DEVICE), Hkv, cosine=cosine, scale=scale, split_fp8=split,
                                        fill=fill)
    assert torch.isneginf(fill).all()
    assert sample.tolist() == torch.where(mask, torch.arange(B)[:, None], -1).flatten().tolist()
    if split:
        rs_ref = _split_fp8_rows(ref)[2]
        assert torch.allclose(rs, rs_ref, rtol=1e-5)
        assert rows.dtype == lo.dtype == torch.float8_e4m3fn and rows.float().abs().max() <= 448
        # hi + lo carries 2^-8 relative error down to lo's smallest step (2^-9 of the row scale); the interpreter
        # loses the carry when rounding to e4m3 (-1.99 -> -1, not -2), which can halve lo: 2^-4 on the CPU
        err = ((rows.float() + lo.float()) * rs[:, None, None] - ref).abs()
        rel = 2**-8 if DEVICE == "cuda" else 2**-4
        assert (err <= rel * ref.abs() + 2**-9 * rs[:, None, None]).all()
    else:
        assert lo is None and rs is None
        assert torch.allclose(rows.float(), ref, atol=1e-6, rtol=TOL)


def test_inverse_norms_and_variant_errors():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(23, 3, 32, generator=g)
    keys[4, 1] = 0
    k8 = keys.to(torch.float8_e4m3fn)
    for k, dt, zero in ((keys, torch.float32, 1e12), (k8, torch.float16, 65504.0),
                        (keys.to(torch.int8), torch.float16, 65504.0), (keys.to(torch.bfloat16), torch.float32, 1e12)):
        inv = inverse_norms(k.to(DEVICE), piece=5)  # five pieces, the last one short
        assert inv.shape == (23, 3) and inv.dtype == dt
        live = k.float().norm(dim=-1) > 0
        want = 1 / k.float().norm(dim=-1)
        assert torch.allclose(inv.cpu().float()[live], want[live], rtol=1e-5 if dt == torch.float32 else 1e-3)
        assert inv[~live].cpu().float().eq(zero).all()  # zero keys
    q = torch.randn(1, 4, 6, 32, generator=g).to(DEVICE)
    mask = torch.ones(1, 4, dtype=torch.bool, device=DEVICE)
    doc = torch.arange(23, device=DEVICE)
    for k in (keys, keys.to(torch.bfloat16), keys.to(torch.float8_e5m2)):
        with pytest.raises(ValueError, match="float8_e4m3fn"):
            fused_document_scores(q, mask, k.to(DEVICE), doc, 23, cosine=True, scale=1.0, split_fp8=True)
    with pytest.raises(ValueError, match="head_dim >= 32"):
        fused_document_scores(q[..., :16], mask, k8[..., :16].to(DEVICE), doc, 23, cosine=True, scale=1.0,
                              split_fp8=True)
    with pytest.raises(ValueError, match="key_inv_norm"):
        fused_document_scores(q, mask, k8.to(DEVICE), doc, 23, cosine=True, scale=1.0,
                              key_inv_norm=torch.ones(23, device=DEVICE))


def test_engine_routing_with_the_fused_kernel():
    """A bank of two segments with a deleted document routes the same with `fused_routing` (on CPU: in
    Triton's interpreter)."""
    import memsparse as ms

    from ..conftest import assert_same_routing, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 3}, vocab_size=300, head_dim=16,
                       num_attention_heads=6, num_key_value_heads=2, hidden_size=48).to(DEVICE)
    bank = ms.MemoryBank.build(model, tok, ["Paris is the capital of France.", "Ottawa is in Canada.", "Bananas."])
    bank.add(["Rome is old and has many churches.", "Lisbon is by the sea.", "x"])
    bank.delete([1])
    bank.fused_routing = False  # the PyTorch path first, as the reference
    engine = ms.MSAEngine(model, tok, bank)
    questions = ["Where is Lisbon? Is Rome old?", "Bananas?", "Where is Lisbon? Is Rome old?"]
    refs = [engine.route(q) for q in questions]
    bank.fused_routing = True
    bank.changed()
    for ref, q in zip(refs, questions):  # on a GPU: captured graphs, then a replay of the first
        got = engine.route(q)
        assert_same_routing(ref, got, atol=TOL)
        assert all(1 not in [d for d, _ in v] for v in got.values())


@pytest.mark.skipif(DEVICE != "cuda", reason="routing graphs need a GPU")
def test_routing_round_seconds_replays_the_fused_routing_graphs():
    """`routing_round_seconds` (bench speed's routing time) replays the fused path's graph of each router layer;
    the PyTorch path has none to replay (graphs left in the bank's view from fused routing are not counted)."""
    import memsparse as ms
    from memsparse.engine.prefill import prefill_batch
    from memsparse.engine.routing import kept, routing_round_seconds

    from ..conftest import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300, head_dim=16,
                       num_attention_heads=6, num_key_value_heads=2, hidden_size=48).to(DEVICE)
    bank = ms.MemoryBank.build(model, tok, ["Paris is in France.", "Ottawa is in Canada.", "Bananas.", "Tea."])
    res = prefill_batch(bank, [[5, 6, 7, 8]], [[True] * 4])
    assert len(kept(bank.routing_index(), "graphs")) == len(model.router_layers)
    assert routing_round_seconds(res.memory) > 0
    bank.fused_routing = False
    assert routing_round_seconds(prefill_batch(bank, [[5, 6, 7, 8]], [[True] * 4]).memory) is None


@pytest.mark.skipif(DEVICE != "cuda", reason="routing graphs need a GPU")
def test_routing_graph_replay_of_a_shorter_question_ignores_the_longer_ones_tokens():
    """A routing graph replayed for a question shorter than the one before it (same padded length) routes as the
    ungraphed path does: the longer question's routing tokens left in the graph's static input do not count."""
    import memsparse as ms
    from memsparse.engine.routing import kept, top_documents, top_documents_eager

    from ..conftest import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300, head_dim=16,
                       num_attention_heads=6, num_key_value_heads=2, hidden_size=48).to(DEVICE)
    bank = ms.MemoryBank.build(model, tok, ["Paris is in France.", "Ottawa is in Canada.", "Bananas.", "Tea."])
    bank.fused_routing = True
    layer = model.router_layers[0]
    g = torch.Generator().manual_seed(0)
    long, short = (torch.randn(1, n, 6, 16, generator=g).to(DEVICE) for n in (20, 7))
    for rq in (long, short):  # both pad to one 32-token graph: the second is a replay
        mask = torch.ones(rq.shape[:2], dtype=torch.bool, device=DEVICE)
        got = top_documents(bank, layer, rq, mask, True, 4).clone()
        ref = top_documents_eager(bank, layer, rq, mask, True, 4)
        assert torch.equal(got[1], ref[1]) and torch.allclose(got[0], ref[0], atol=TOL)
    assert len(kept(bank.routing_index(), "graphs")) == 1


def _left_padded(lens, H, D, g):
    """Router queries (B, S, H, D) of questions of `lens` routing tokens, left-padded as the engine batches them
    (two non-routing tokens after each question)."""
    S = max(lens) + 2
    q = torch.randn(len(lens), S, H, D, generator=g)
    mask = torch.zeros(len(lens), S, dtype=torch.bool)
    for b, n in enumerate(lens):
        mask[b, S - n - 2:S - 2] = True
    return q.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("lens", [(5, 1, 9), (100, 130, 70)], ids=["one-row-tile", "three-hundred-rows"])
def test_batched_routing_equals_one_question_at_a_time(lens, cosine):
    """A batch of questions of different lengths scores, ranks and breaks ties as each question routed alone, in
    one tile of rows or (past MAX_BLOCK_R rows) several; documents 0 and 1 have the same keys (a tie: the lower
    position ranks first)."""
    from memsparse.ops.routing import one_question_at_a_time, ranked_documents
    from memsparse.ops.routing_triton import MAX_BLOCK_R
    from memsparse.ops.topk_triton import topk

    g = torch.Generator().manual_seed(sum(lens))
    H, Hkv, D, N = 6, 2, 16, 9
    q, mask = _left_padded(lens, H, D, g)
    assert (q.shape[0] * q.shape[1] > MAX_BLOCK_R) == (max(lens) > 9)
    doc = torch.arange(45, device=DEVICE) // 5  # 5 chunks per document
    keys = torch.randn(45, Hkv, D, generator=g).to(DEVICE)
    keys[5:10] = keys[:5]
    scale = 1.0 if cosine else D**-0.5
    batched = fused_document_scores(q, mask, keys, doc, N, cosine=cosine, scale=scale)
    alone = one_question_at_a_time(fused_document_scores, q, mask, keys, doc, N, cosine=cosine, scale=scale)
    ref = one_question_at_a_time(_reference, q, mask, keys, doc, N, cosine, scale)
    assert torch.allclose(batched, alone, atol=TOL / 10, rtol=TOL / 10)
    assert torch.allclose(batched, ref, atol=TOL, rtol=TOL)
    assert torch.equal(batched[:, 0], batched[:, 1])
    top = topk(batched, 4, torch.ones(N, dtype=torch.bool, device=DEVICE), None)
    want = ranked_documents(ref, 4)
    assert torch.equal(top[1], want[1].to(top.device))
    for row in top[1].long().tolist():
        assert 0 not in row or 1 not in row or row.index(0) < row.index(1)


@pytest.mark.skipif(DEVICE != "cuda", reason="routing graphs need a GPU")
def test_batched_routing_graph_equals_one_question_at_a_time():
    """On a GPU a batch of 8 questions routes through one captured routing graph per layer: the same top documents
    and scores as each question routed alone."""
    import memsparse as ms
    from memsparse.engine.routing import top_documents

    from ..conftest import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300, head_dim=16,
                       num_attention_heads=6, num_key_value_heads=2, hidden_size=48).to(DEVICE)
    bank = ms.MemoryBank.build(model, tok, ["Paris is in France.", "Ottawa is in Canada.", "Bananas.", "Tea.", "Rome."])
    bank.fused_routing = True
    layer = model.router_layers[0]
    q, mask = _left_padded([3, 17, 9, 30, 1, 12, 25, 8], 6, 16, torch.Generator().manual_seed(0))
    batched = top_documents(bank, layer, q, mask, True, 3).clone()
    for b in range(q.shape[0]):
        alone = top_documents(bank, layer, q[b:b + 1, mask[b]], mask[b:b + 1, mask[b]], True, 3)
        assert torch.equal(batched[1, b], alone[1, 0]) and torch.allclose(batched[0, b], alone[0, 0], atol=TOL)


def test_the_tiles_tried_for_a_batch():
    """The autotuner tries a row tile of all the rows up to 64; past that 64, 128 or 256 rows (up to the rows there
    are), each with a chunk tile whose accumulator fits ACC_BUDGET."""
    import triton

    from memsparse.ops.routing_triton import ACC_BUDGET, MAX_BLOCK_R, _fitting

    configs = [triton.Config({"BLOCK_R": r, "BLOCK_C": c}) for r in (16, 32, 64, 128, MAX_BLOCK_R)
               for c in (32, 64, 128, 256)]

    def tiles(rows):
        return {(c.kwargs["BLOCK_R"], c.kwargs["BLOCK_C"]) for c in _fitting(configs, {}, R_BUCKET=rows)}

    assert tiles(16) == {(16, c) for c in (32, 64, 128, 256)}
    assert {r for r, _ in tiles(64)} == {64}
    assert {r for r, _ in tiles(512)} == {64, 128, MAX_BLOCK_R}
    assert all(r * c <= ACC_BUDGET for r, c in tiles(512)) and (MAX_BLOCK_R, 64) in tiles(512)


@pytest.mark.parametrize("tile", [(16, 32, 4, 2), (64, 16, 4, 3), (32, 64, 8, 2)],
                         ids=["R16-C32", "R64-C16", "R32-C64"])
@pytest.mark.parametrize("variant", ["bf16", "fp8-split-invnorm"])
def test_a_fixed_tile_scores_as_the_autotuned_kernel(tile, variant):
    """`route_rows_kernel(config=...)` (benchmarks/routing_kernel.py times each tile this way) scores as the
    autotuned entry point, with several row tiles (50 rows in tiles of 16 or 32) and chunk tiles."""
    import triton

    from memsparse.memory.quant import quantize
    from memsparse.ops.routing_triton import route_rows_kernel

    g = torch.Generator().manual_seed(11)
    B, S, H, Hkv, D, C, N = 2, 25, 4, 2, 32, 90, 13
    q = torch.randn(B, S, H, D, generator=g).to(DEVICE)
    mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    keys = torch.randn(C, Hkv, D, generator=g).to(DEVICE)
    doc = torch.sort(torch.randint(0, N, (C,), generator=g)).values.to(DEVICE)
    split = variant != "bf16"
    if split:
        qk = quantize(keys, "fp8", per_head=False)
        keys, ks, kn = qk.data, qk.scale, inverse_norms(qk.data)
    else:
        keys, ks, kn = keys.to(torch.bfloat16), None, None
    want = fused_document_scores(q, mask, keys, doc, N, cosine=True, scale=1.0, key_scale=ks, key_inv_norm=kn,
                                 split_fp8=split)
    got = torch.empty(B, N, device=DEVICE)
    rows, lo, rs, sample = routing_rows(q, mask, Hkv, cosine=True, scale=1.0, split_fp8=split, fill=got)
    r, c, w, s = tile
    route_rows_kernel(rows, lo, rs, sample, keys, doc, got, cosine=True, key_scale=ks, key_inv_norm=kn,
                      config=triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w, num_stages=s))
    assert torch.allclose(got, want, atol=TOL, rtol=TOL)
