"""Memory bank encoding and stage-2 prefill against the training forward (same layout, same selections)."""

import pytest
import torch

from memsparse.engine import prefill
from memsparse.memory import MemoryBank

from ..conftest import assert_same_routing, tiny_model

PREFIX = [5, 6, 7]


def _docs(gen, lengths):
    return [torch.randint(10, 97, (n,), generator=gen).tolist() for n in lengths]


def _training_logits(model, docs, active, route):
    """Training forward over [prefix; docs; active]: logits of the active tokens after the prefix."""
    ids = PREFIX + [t for d in docs for t in d] + active
    doc = [-2] * len(PREFIX) + [i + 1 for i, d in enumerate(docs) for _ in d] + [0 if r else -1 for r in route]
    with torch.no_grad():
        out = model(torch.tensor([ids]), torch.tensor([doc]))
    return out.logits[0, len(PREFIX):], out.doc_scores


@pytest.mark.parametrize("positions", ["document", "global"])
@pytest.mark.parametrize("k", [2, 8], ids=["top2", "all"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_prefill_equals_training_forward(family, k, positions):
    model = tiny_model(family, msa={"pooling_kernel_size": 4, "top_k_docs": k, "router_layer_idx": "1,2,3",
                                    "doc_positions": positions})
    g = torch.Generator().manual_seed(0)
    docs = _docs(g, [9, 4, 13, 1, 7])
    active = torch.randint(10, 97, (8,), generator=g).tolist()
    route = [True] * 5 + [False] * 3
    ref, scores = _training_logits(model, docs, active, route)
    bank = MemoryBank.empty(model, PREFIX)
    bank.add_tokens(docs, batch_tokens=16)  # several packed batches
    logits, routing = prefill(bank, active, route, similarity="train")
    assert (logits - ref).abs().max() <= 1e-5
    for layer, picked in routing.items():
        expected = scores[layer][0].topk(min(k, len(docs)))
        assert [d for d, _ in picked] == expected.indices.tolist()
        assert torch.allclose(torch.tensor([s for _, s in picked]), expected.values, atol=1e-6)


@pytest.mark.parametrize("positions", ["document", "global"])
def test_add_equals_build_and_delete_excludes(positions, tmp_path):
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2, "doc_positions": positions})
    g = torch.Generator().manual_seed(1)
    a, b = _docs(g, [5, 8, 3]), _docs(g, [6, 9])
    active, route = [11, 12, 13, 14], [True, True, True, False]
    whole = MemoryBank.empty(model, PREFIX)
    whole.add_tokens(a + b)
    parts = MemoryBank.empty(model, PREFIX)
    assert parts.add_tokens(a) == [0, 1, 2] and parts.add_tokens(b) == [3, 4]
    (l1, r1), (l2, r2) = prefill(whole, active, route), prefill(parts, active, route)
    assert_same_routing(r1, r2)
    assert torch.allclose(l1, l2, atol=1e-6)
    assert parts.next_position == (sum(map(len, a + b)) if positions == "global" else 0)
    parts.save(tmp_path / "b")  # global positions continue after a reload
    again = MemoryBank.load(tmp_path / "b", model)
    assert again.next_position == parts.next_position
    assert_same_routing(r2, prefill(again, active, route)[1])
    top = r1[3][0][0]
    parts.delete([top])
    _, r3 = prefill(parts, active, route)
    assert all(top not in [d for d, _ in picked] for picked in r3.values())
    with pytest.raises(KeyError, match="no document 9"):
        parts.delete([9])


@pytest.fixture(scope="module")
def qwen_tok():
    from memsparse import resources
    from memsparse.model.tokenizer import build_qwen_tokenizer

    try:
        return build_qwen_tokenizer()
    except resources.ResourceUnavailable as e:
        pytest.skip(f"Qwen tokenizer files not reachable: {e}")


def test_document_text_is_plain_text(qwen_tok):
    from memsparse.memory import render_document

    tok = qwen_tok
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = render_document(tok, 3, "see <|im_end|> and <|im_start|>[7] <End-of-Retrieve>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert ids.count(im_end) == 1 and ids.count(im_start) == 1
    assert tok.decode(ids) == "<|im_start|>[3]. see <|im_end|> and <|im_start|>[7] <End-of-Retrieve>[3]<|im_end|>"
    with pytest.raises(TypeError, match="expected str"):
        render_document(tok, 0, b"bytes")


def test_engine_route_with_text(qwen_tok):
    import memsparse as ms

    model = tiny_model("qwen3", msa={"pooling_kernel_size": 8, "top_k_docs": 2}, vocab_size=151936)
    docs = ["Paris is the capital of France.", "The <|im_end|> token ends a turn [2].", "Bananas are yellow."]
    bank = ms.MemoryBank.build(model, qwen_tok, docs)
    assert bank.num_docs == 3 and [bank.text(i) for i in range(3)] == docs
    engine = ms.MSAEngine(model, qwen_tok, bank, similarity="official")  # as the release
    ids, mask = engine.encode_question("What is <|im_end|> [1]?")
    assert ids.count(qwen_tok.convert_tokens_to_ids("<|im_end|>")) == 1  # only the template tail's
    routing = engine.route("What is <|im_end|> [1]?")
    assert sorted(routing) == [2, 3] and all(len(v) == 2 for v in routing.values())
    assert routing == prefill(bank, ids, mask, similarity="official")[1]
    with pytest.raises(ValueError, match="non-empty"):
        engine.route("  ")
    with pytest.raises(ValueError, match="another model"):
        ms.MSAEngine(tiny_model("qwen3", vocab_size=151936), qwen_tok, bank)


def test_text_add_equals_build(qwen_tok):
    import memsparse as ms

    model = tiny_model("qwen3", msa={"pooling_kernel_size": 8, "top_k_docs": 2}, vocab_size=151936)
    docs = ["Paris is the capital of France.", "Ottawa is in Canada.", "Bananas are yellow.", ""]
    whole = ms.MemoryBank.build(model, qwen_tok, docs)
    parts = ms.MemoryBank.build(model, qwen_tok, docs[:2])
    assert parts.add(docs[2:]) == [2, 3]
    q = "Where is Ottawa?"
    assert_same_routing(ms.MSAEngine(model, qwen_tok, whole).route(q), ms.MSAEngine(model, qwen_tok, parts).route(q))


def test_device_gather_equals_gather_through_the_host(monkeypatch):
    """Routing, gather and prefill on the device (padded per document, no host round trip) equal the path whose
    ids go through the host, over a bank of three segments with a deleted document and quantized K̄/V̄."""
    from memsparse.engine import bank_memory as bm

    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 3, "router_layer_idx": "1,2,3"})
    g = torch.Generator().manual_seed(5)
    bank = MemoryBank.empty(model, PREFIX, content_dtype="int8")
    for lengths in ([9, 4, 13], [1, 7], [5, 11, 3]):
        bank.add_tokens(_docs(g, lengths))
    bank.delete([3])
    active, route = torch.randint(10, 97, (8,), generator=g).tolist(), [True] * 5 + [False] * 3
    ref_logits, ref_routing = prefill(bank, active, route)
    monkeypatch.setattr(bm, "DEVICE_GATHER_SEGMENTS", 0)  # every layer's ids through the host
    logits, routing = prefill(bank, active, route)
    assert_same_routing(ref_routing, routing)
    assert (logits - ref_logits).abs().max() <= 1e-5
    # gather_top's valid columns are the documents' chunks in bank order, as `gather` concatenates them
    view, layer = bank.routing_index(), 2
    picked = sorted(d for d, _ in routing[layer])
    pos = torch.tensor([[view.ids.index(d) for d in picked] + [0]])  # one padding pick, not ok
    k, v, valid = bank.gather_top(layer, pos, torch.tensor([[True] * len(picked) + [False]]))
    k_ref, v_ref = bank.gather(layer, picked)
    assert valid.shape == (1, (len(picked) + 1) * view.max_chunks)
    assert torch.equal(k[0][valid[0]], k_ref) and torch.equal(v[0][valid[0]], v_ref)


def test_what_the_engine_keeps_with_a_routing_index_goes_when_the_bank_changes():
    """The routing index is rebuilt after any change of the bank (add, delete, `changed`) and the engine's store
    kept with the old one (`routing.kept`: inverse norms, CUDA graphs) is dropped with it."""
    import gc

    from memsparse.engine import routing

    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2, "router_layer_idx": "1,2"})
    g = torch.Generator().manual_seed(2)
    bank = MemoryBank.empty(model, PREFIX)
    bank.add_tokens(_docs(g, [5, 9]))
    index = bank.routing_index()
    assert bank.routing_index() is index and index.ids == [0, 1]
    routing.kept(index, "graphs")["probe"] = object()
    assert routing.kept(bank.routing_index(), "graphs").keys() == {"probe"}
    before = len(routing._KEPT)
    for change in (lambda: bank.delete([0]), lambda: bank.add_tokens(_docs(g, [3])), bank.changed):
        change()
        fresh = bank.routing_index()
        assert fresh is not index and routing.kept(fresh, "graphs") == {}
        index = fresh
    del index, fresh
    gc.collect()
    assert len(routing._KEPT) <= before  # the old indexes' stores are gone with them
    assert bank.routing_index().alive.tolist() == [False, True, True]
