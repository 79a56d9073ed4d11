"""The Memory Sparse Attention layer against explicit loop references (float64)."""

import math

import pytest
import torch

from memsparse.model.layout import SequenceLayout
from memsparse.ops.pooling import chunk_ids_for_documents, chunk_mean_pool, chunk_mean_pool_reference
from memsparse.ops.routing import chunk_scores, document_scores, routing_reference, select_top_k

from ..conftest import batch, make_sample, tiny_model


def _rope_ref(x, pos, theta):
    """Rotate (H, D) by position `pos`: pairs (i, i + D/2) turn by pos * theta^(-2i/D)."""
    D = x.shape[-1]
    out = x.clone()
    for i in range(D // 2):
        ang = pos * theta ** (-2 * i / D)
        c, s = math.cos(ang), math.sin(ang)
        a, b = x[..., i].clone(), x[..., i + D // 2].clone()
        out[..., i], out[..., i + D // 2] = a * c - b * s, a * s + b * c
    return out


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def reference_router_layer(attn, h, doc, P, k, offset):
    """Loop reference of one router layer for one sample: h (T, hidden) float64, doc (T,) doc_ids."""
    cfg, msa = attn.cfg, attn.msa
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    G, T = H // Hkv, len(doc)
    theta = cfg.rope["rope_theta"]
    # explicit document-wise positions
    docs = sorted({int(d) for d in doc if d > 0})
    first_doc = min(t for t in range(T) if doc[t] > 0)
    pos, j = [], 0
    for t in range(T):
        if doc[t] > 0:
            pos.append(t - min(u for u in range(T) if doc[u] == doc[t]))
        else:
            pos.append(j if t < first_doc else j + (k if offset == "template+k" else k - first_doc))
            j += 1
    W = {n: getattr(attn, n).weight.double() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q = (h @ W["q_proj"].T).view(T, H, D)
    kk = (h @ W["k_proj"].T).view(T, Hkv, D)
    v = (h @ W["v_proj"].T).view(T, Hkv, D)
    if cfg.qk_norm:
        q = _rms(q, attn.q_norm.weight.double(), cfg.rms_norm_eps)
        kk = _rms(kk, attn.k_norm.weight.double(), cfg.rms_norm_eps)
    q = torch.stack([_rope_ref(q[t], pos[t], theta) for t in range(T)])
    kk = torch.stack([_rope_ref(kk[t], pos[t], theta) for t in range(T)])
    # routing: router projections of the raw layer input, chunk means, loop scores
    rq = (h @ attn.router_q_proj[0].weight.double().T).view(T, H, D)
    rk = (h @ attn.router_k_proj[0].weight.double().T).view(T, Hkv, D)
    chunks = []  # (doc, first token index, K̄, V̄, K̄r)
    for d in docs:
        toks = [t for t in range(T) if doc[t] == d]
        for c in range(0, len(toks), P):
            sel = toks[c : c + P]
            chunks.append((d, sel[0], kk[sel].mean(0), v[sel].mean(0), rk[sel].mean(0)))
    route = [t for t in range(T) if doc[t] == 0]
    scores = routing_reference(
        rq[route], torch.stack([c[4] for c in chunks]), [docs.index(c[0]) for c in chunks], len(docs),
        head_reduce=msa.head_reduce_method, query_reduce=msa.query_reduce_method,
        chunk_reduce=msa.chunk_reduce_method, cosine=msa.uses_cosine, scale=msa.score_scale(D),
    )
    chosen = {docs[i] for i in scores.topk(min(msa.top_k_docs, len(docs))).indices.tolist()}
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for t in range(T):
        if doc[t] > 0:
            keys = [(kk[u], v[u]) for u in range(t + 1) if doc[u] == doc[t]]
        else:
            keys = [(c[2], c[3]) for c in chunks if c[0] in chosen and c[1] < t]
            keys += [(kk[u], v[u]) for u in range(t + 1) if doc[u] <= 0]
        for hh in range(H):
            logits = torch.stack([q[t, hh] @ kv[0][hh // G] for kv in keys]) / math.sqrt(D)
            w = torch.softmax(logits, 0)
            out[t, hh] = sum(w[n] * kv[1][hh // G] for n, kv in enumerate(keys))
    return out.view(T, H * D) @ W["o_proj"].T, scores


CASES = [
    pytest.param(1, 8, "template+k", id="P1-all-docs"),
    pytest.param(1, 2, "template+k", id="P1-top2"),
    pytest.param(3, 8, "k", id="P3-all-docs-paper-offset"),
    pytest.param(4, 1, "template+k", id="P4-top1"),
]


@pytest.mark.parametrize("P,k,offset", CASES)
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_router_layer_matches_loop_reference(P, k, offset, family):
    msa = {"pooling_kernel_size": P, "top_k_docs": k, "router_layer_idx": "0,1", "query_position_offset": offset}
    model = tiny_model(family, msa=msa, dtype=torch.float64, num_hidden_layers=2)
    attn = model.model.layers[1].self_attn
    g = torch.Generator().manual_seed(5)
    samples = [make_sample([5, 1, 7], gen=g), make_sample([9, 4], n_query=3, gen=g)]
    ids, doc, mask = batch(samples)
    lay = SequenceLayout.build(doc, model.msa_config, mask)
    h = torch.randn(*ids.shape, model.config.hidden_size, dtype=torch.float64, generator=g)
    cos, sin = model.rope(lay.positions, torch.float64)
    got, scores = attn(lay.pack(h), lay, lay.pack(cos), lay.pack(sin))
    got = lay.unpack(got)
    for b, (_, d) in enumerate(samples):
        ref, ref_scores = reference_router_layer(attn, h[b, : len(d)], d, P, k, offset)
        assert torch.allclose(got[b, : len(d)], ref, atol=1e-10), (got[b, : len(d)] - ref).abs().max()
        n = int(d.max())
        assert torch.allclose(scores[b, :n], ref_scores, atol=1e-10)
        assert torch.isinf(scores[b, n:]).all()


@pytest.mark.parametrize("lengths", [[1, 63, 64, 65, 200], [64], [1], [130, 2]], ids=str)
def test_pooling_matches_loop_reference(lengths):
    x = torch.randn(sum(lengths), 3, 4, dtype=torch.float64)
    chunk_of_token, counts = chunk_ids_for_documents(torch.tensor(lengths), 64)
    got = chunk_mean_pool(x, chunk_of_token, counts)
    assert torch.allclose(got, chunk_mean_pool_reference(x, lengths, 64), atol=1e-12)
    assert len(counts) == sum(math.ceil(n / 64) for n in lengths)


def test_pooling_bf16_accumulates_in_float32():
    x = torch.randn(200, 2, 8).to(torch.bfloat16)
    chunk_of_token, counts = chunk_ids_for_documents(torch.tensor([200]), 64)
    got = chunk_mean_pool(x, chunk_of_token, counts).double()
    ref = chunk_mean_pool_reference(x.double(), [200], 64)
    assert got.dtype == torch.float64 and (got - ref).abs().max() < 1e-2


@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("chunk_reduce", ["max", "mean"])
@pytest.mark.parametrize("query_reduce", ["max", "mean", "last"])
@pytest.mark.parametrize("head_reduce", ["mean", "max"])
def test_routing_matches_loop_reference(head_reduce, query_reduce, chunk_reduce, cosine):
    g = torch.Generator().manual_seed(7)
    B, S, H, Hkv, D, C = 2, 5, 6, 2, 4, 7
    q = torch.randn(B, S, H, D, dtype=torch.float64, generator=g)
    keys = torch.randn(B, C, Hkv, D, dtype=torch.float64, generator=g)
    q_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    key_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)
    chunk_doc = torch.tensor([[0, 0, 1, 2, 2, 2, 3], [1, 0, 0, 0, 2, -1, -1]])
    opts = dict(head_reduce=head_reduce, query_reduce=query_reduce, cosine=cosine, scale=0.5)
    cs = chunk_scores(q, q_mask, keys, key_mask, **opts)
    ds = document_scores(cs, chunk_doc, 5, chunk_reduce)
    for b in range(B):
        n_q, n_c = int(q_mask[b].sum()), int(key_mask[b].sum())
        ref = routing_reference(
            q[b, :n_q], keys[b, :n_c], chunk_doc[b, :n_c].tolist(), 5, chunk_reduce=chunk_reduce, **opts
        )
        assert torch.allclose(ds[b], ref, atol=1e-12)
    sel = select_top_k(ds, 2)
    assert sel.sum(1).tolist() == [2, 2]
    assert not sel[:, 4].any()  # absent document never selected
    assert select_top_k(ds, 10).sum(1).tolist() == [4, 3]  # k larger than the documents present


def test_document_scores_unchanged_when_documents_reordered():
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    texts = [torch.randint(0, 97, (n,), generator=g) for n in (6, 11, 3)]
    query = torch.randint(0, 97, (5,), generator=g)

    def run(order):
        ids = [torch.tensor([1, 2, 3])] + [texts[i] for i in order] + [query]
        doc = [torch.full((3,), -2)] + [torch.full((len(texts[i]),), n + 1) for n, i in enumerate(order)]
        doc.append(torch.zeros(5, dtype=torch.long))
        with torch.no_grad():
            out = model(torch.cat(ids)[None], torch.cat(doc)[None])
        # column of original document i = its position in `order`
        return {L: s[0, [order.index(i) for i in range(3)]] for L, s in out.doc_scores.items()}, out.logits

    a, la = run([0, 1, 2])
    b, lb = run([2, 0, 1])
    for L in a:
        assert torch.allclose(a[L], b[L], atol=1e-12)
    assert torch.allclose(la[0, -5:], lb[0, -5:], atol=1e-10)  # the question sees the same memory


def test_caller_positions_are_used():
    """position_ids equal to the default layout give the same result; other positions change it."""
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, dtype=torch.float64)
    ids, doc, mask = batch([make_sample([6, 3])])
    lay = SequenceLayout.build(doc, model.msa_config, mask)
    assert lay.positions[0, :3].tolist() == [0, 1, 2] and lay.positions[0, 3:9].tolist() == list(range(6))
    assert lay.positions[0, 12].item() == 3 + model.msa_config.engine_top_k  # first question token: p + k
    with torch.no_grad():
        default = model(ids, doc).logits
        same = model(ids, doc, position_ids=lay.positions).logits
        other = model(ids, doc, position_ids=torch.arange(ids.shape[1])[None]).logits
    assert torch.equal(default, same) and not torch.allclose(default, other)
