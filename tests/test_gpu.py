"""The training forward on a CUDA device agrees with the CPU reference (float32) and runs in bfloat16."""

import copy

import pytest
import torch

from .conftest import batch, make_sample, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids, doc, mask = batch([make_sample([70, 5, 130], gen=g), make_sample([64, 9], n_query=3, gen=g)])
    labels = torch.where(doc == -1, ids, -100)
    aux = torch.tensor([[1, 0, 0], [0, 1, 0]])
    return ids, doc, mask, labels, aux


def _run(model, device):
    ids, doc, mask, labels, aux = (t.to(device) for t in _inputs())
    out = model(ids, doc, labels=labels, aux_labels=aux, attention_mask=mask)
    out.loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cuda_float32_matches_cpu(family):
    cpu = tiny_model(family, msa={"pooling_kernel_size": 16, "top_k_docs": 2}).train()
    gpu = copy.deepcopy(cpu).cuda()
    a, ga = _run(cpu, "cpu")
    b, gb = _run(gpu, "cuda")
    assert torch.allclose(a.logits, b.logits.cpu(), atol=1e-4)
    assert torch.allclose(a.loss, b.loss.cpu(), atol=1e-4)
    for L in a.doc_scores:
        assert torch.allclose(a.doc_scores[L], b.doc_scores[L].cpu(), atol=1e-4)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-3, rtol=1e-3), n


def test_cuda_bfloat16_close_to_float32():
    ref = tiny_model("qwen3", msa={"pooling_kernel_size": 16, "top_k_docs": 3}).cuda().train()
    half = copy.deepcopy(ref).to(torch.bfloat16)
    a, _ = _run(ref, "cuda")
    b, gb = _run(half, "cuda")
    assert abs(a.loss.item() - b.loss.item()) / a.loss.item() < 0.03
    assert all(torch.isfinite(g).all() for g in gb.values())


def test_cuda_engine_matches_cpu_across_tiers(tmp_path):
    """Bank encoding, routing, prefill logits and greedy answers on CUDA (device and pinned-host tiers, and a
    bank saved on CPU and loaded onto the GPU) agree with the CPU in float32."""
    import memsparse as ms

    from .conftest import assert_same_routing, tiny_tokenizer

    tok = tiny_tokenizer()
    docs = ["Paris is the capital of France.", "Ottawa is in Canada.", "Bananas are yellow.", "Rome is old. " * 9]
    cpu = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    gpu = copy.deepcopy(cpu).cuda()
    ref_bank = ms.MemoryBank.build(cpu, tok, docs)
    ref = ms.MSAEngine(cpu, tok, ref_bank, interleave="model").ask(["Where is Ottawa?", "Old?"], max_new_tokens=8)
    path = ref_bank.save(tmp_path / "bank")
    banks = [ms.MemoryBank.build(gpu, tok, docs, tier="device"), ms.MemoryBank.build(gpu, tok, docs, tier="host"),
             ms.MemoryBank.load(path, gpu, tok, tier="host")]
    assert banks[1].segments[0].keys[3].is_pinned() and banks[0].segments[0].keys[3].is_cuda
    for bank in banks:
        got = ms.MSAEngine(gpu, tok, bank, interleave="model").ask(["Where is Ottawa?", "Old?"], max_new_tokens=8)
        for a, b in zip(ref, got):
            assert a.transcript == b.transcript
            assert_same_routing(a.routing, b.routing, atol=2e-2)  # the kernel multiplies in bf16


@pytest.mark.parametrize("compile,fused", [(False, False), (True, False), (True, True)])
def test_cuda_graph_decode_equals_eager(compile, fused):
    """The CUDA-graph decode step (with and without torch.compile, with and without the fused Triton attention)
    gives the eager step's tokens and logits, in a batch with padding."""
    import memsparse as ms
    from memsparse.engine import prefill_batch
    from memsparse.model import cached

    from .conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300, head_dim=16).cuda()
    bank = ms.MemoryBank.build(model, tok, ["Paris is in France.", "Ottawa is in Canada.", "Bananas are yellow."])
    rows, masks = [[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[True] * 5 + [False], [True, True, False]]
    runs = []
    for graphed in (False, True):
        res = prefill_batch(bank, rows, masks, extra=12)
        eager = lambda i, c=res.cache: cached.decode(model, i, c)  # noqa: E731
        step = cached.GraphedDecode(model, res.cache, compile=compile, fused=fused) if graphed else eager
        logits, out = res.logits, []
        for _ in range(12):
            nxt = logits.argmax(-1)
            out.append(logits.clone())
            logits = step(nxt)
        runs.append(torch.stack(out))
        with pytest.raises(RuntimeError, match="cache is full"):
            step(nxt)
    assert torch.allclose(runs[0], runs[1], atol=1e-4 if compile or fused else 1e-5)


@pytest.mark.parametrize("tier,dtype", [("device", "model"), ("host", "model"), ("host", "fp8")])
def test_graphed_prefill_equals_eager(tier, dtype):
    """The whole prefill replayed from a CUDA graph (rows padded, K̄/V̄ gathered on the device or read zero-copy
    from pinned memory) gives the eager prefill's logits and routing, for several questions sharing one graph,
    and `generate` through it gives the eager tokens."""
    import memsparse as ms
    from memsparse.engine import prefill_batch
    from memsparse.engine.generate import generate
    from memsparse.engine.prefill import graphed_prefill
    from memsparse.engine.routing import kept

    from .conftest import assert_same_routing, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300).cuda()
    docs = ["Paris is in France.", "Ottawa is in Canada.", "Bananas are yellow.", "Rome is old. " * 9, "Tea."]
    bank = ms.MemoryBank.build(model, tok, docs, tier=tier, key_dtype=dtype, content_dtype=dtype)
    questions = [([[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[True] * 5 + [False], [True, True, False]]),
                 ([[40, 41, 42], [43, 44, 45, 46, 47]], [[True, True, False], [True] * 4 + [False]])]
    for rows, masks in questions * 2:  # the second round replays the captured graph
        ref = prefill_batch(bank, rows, masks, extra=6)
        got, _ = graphed_prefill(bank, rows, masks, extra=6)
        assert torch.allclose(got.logits, ref.logits, atol=1e-4)
        for a, b in zip(got.memory.routing, ref.memory.routing, strict=True):
            assert_same_routing(a, b, atol=1e-4)
        tokens = [generate(bank, rows, masks, 6, lambda b, ids: None, cuda_graph=c).tokens for c in (False, True)]
        assert tokens[0] == tokens[1]
    assert len(kept(bank.routing_index(), "prefill_graphs")) == 1  # both question sets pad to one shape


def test_generate_on_cuda_stops_rows_where_asked():
    """generate's loop on a GPU enqueues each step before the host reads the token before it: rows still stop at
    the token their stop check names, a step after the batch's last token is taken and dropped (none when the
    length limit ends it), and later calls on the bank (same graphs, same cache) decode as before."""
    import memsparse as ms
    from memsparse.engine.generate import generate

    from .conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300).cuda()
    bank = ms.MemoryBank.build(model, tok, ["Paris is in France.", "Ottawa is in Canada.", "Bananas.", "Tea."])
    rows, masks = [[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[True] * 5 + [False], [True, True, False]]
    full = generate(bank, rows, masks, 6, lambda b, ids: None)
    assert full.events == ["length"] * 2 and full.timings["decode_tokens"] == 5
    for n in ([2, 4], [3, 3], [1, 6]):
        got = generate(bank, rows, masks, 6, lambda b, ids, n=n: "stop" if len(ids) >= n[b] else None)
        assert got.tokens == [t[:k] for t, k in zip(full.tokens, n)]
        assert got.events == ["stop"] * 2
        assert got.timings["decode_tokens"] == min(max(n), 5)  # one step past the last token, within the limit
    assert generate(bank, rows, masks, 6, lambda b, ids: None).tokens == full.tokens


def test_continuous_batching_on_cuda_decodes_as_alone():
    """generate_continuous on a GPU (graphed first prefill, each step enqueued ahead, the cache regrown and its
    decode graph captured again as rows join): every row's tokens are those it decodes alone with `generate`."""
    import memsparse as ms
    from memsparse.engine.generate import Entry, generate, generate_continuous

    from .conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300).cuda()
    bank = ms.MemoryBank.build(model, tok, ["Paris is in France.", "Ottawa is in Canada.", "Bananas.", "Tea."])
    rows = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [30, 31, 32, 33], [40, 41]]
    masks = [[True] * (len(r) - 1) + [False] for r in rows]
    budgets, joins_at = [5, 9, 12, 3], [0, 2, 2, 6]
    alone = [generate(bank, [r], [m], n, lambda b, ids: None).tokens[0] for r, m, n in zip(rows, masks, budgets)]
    got, calls, taken = {}, [0], set()

    def admit(n):  # row i is offered from the joins_at[i]-th step on
        calls[0] += 1
        ready = [i for i in range(4) if joins_at[i] < calls[0] and i not in taken][:n]
        taken.update(ready)
        return [Entry(rows[i], masks[i], budgets[i], lambda ids: None,
                      lambda ids, ev, routing, t, i=i: got.__setitem__(i, ids)) for i in ready]

    generate_continuous(bank, admit, slots=4)
    assert [got[i] for i in range(4)] == alone


def test_document_priors_on_cuda_match_cpu():
    """Document priors computed on the GPU (fused routing kernel) equal the CPU's, and the routing of questions
    asked there (routing graphs, graphed prefill) subtracts them as on the CPU, in float32. k covers the bank, so
    every document is scored in every layer (the tiny model ties some documents exactly: compared per document)."""
    import memsparse as ms

    from .conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    docs = ["Paris is the capital of France.", "Ottawa is in Canada.", "Bananas are yellow.", "Rome is old. " * 9,
            "Tea is hot."]
    questions = ["Where is Ottawa?", "Old?", "Which fruit is yellow?"]
    cpu = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 16}, vocab_size=300)
    runs = []
    for model in (cpu, copy.deepcopy(cpu).cuda()):
        engine = ms.MSAEngine(model, tok, ms.MemoryBank.build(model, tok, docs))
        priors = engine.calibrate_priors(questions=questions)
        runs.append((priors, engine.ask(questions, max_new_tokens=2, interleave=False)))
    (p_cpu, a_cpu), (p_gpu, a_gpu) = runs
    assert torch.equal(p_cpu["ids"], p_gpu["ids"])
    assert all(torch.allclose(p_cpu["scores"][k], p_gpu["scores"][k], atol=1e-4) for k in p_cpu["scores"])
    for a, b in zip(a_cpu, a_gpu, strict=True):
        assert sorted(a.routing) == sorted(b.routing)
        for layer in a.routing:
            assert dict(a.routing[layer]) == pytest.approx(dict(b.routing[layer]), abs=1e-4)


def test_cuda_question_stream_routes_as_the_pytorch_path():
    """Questions of different lengths asked one after another and in batches over one bank (routing graphs
    captured, then replayed for shorter and longer questions) inject, route and answer as the PyTorch routing
    path does."""
    import memsparse as ms

    from .conftest import assert_same_routing, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 3}, vocab_size=300, head_dim=16,
                       num_attention_heads=6, num_key_value_heads=2, hidden_size=48).cuda()
    docs = ["Paris is the capital of France.", "Ottawa is the capital of Canada.", "Bananas are yellow and sweet.",
            "Rome is old and has many churches.", "Tea.", "Lisbon is by the sea."]
    bank = ms.MemoryBank.build(model, tok, docs)
    # no refinement: its gate (a margin on bf16 kernel scores against float ones) could flip on a tiny random model
    engine = ms.MSAEngine(model, tok, bank, refine=0)
    questions = ["Where is Paris, is it in France or in Canada, and is Rome old?", "Tea?", "Where is Ottawa?",
                 "Bananas?", "Is Lisbon by the sea or is Rome by the sea?", "Rome?"]

    def ask() -> list:
        single = [engine.ask(q, max_new_tokens=4, inject_k=2) for q in questions]
        return single + engine.ask_batch(questions[::-1], max_new_tokens=4, inject_k=2)

    got = ask()  # fused routing: the default on a GPU
    bank.fused_routing = False
    bank.changed()
    ref = ask()
    for a, b in zip(got, ref, strict=True):
        assert a.rounds == b.rounds and a.text == b.text
        assert_same_routing(a.routing, b.routing, atol=2e-2)  # the kernel multiplies in bf16


@pytest.mark.parametrize("heads", [(9, 3), (4, 4)], ids=["gqa-9-3", "mha-4"])
def test_varlen_document_attention_matches_buckets_forward_and_backward(heads):
    """The variable-length flash path against the padded-bucket path (bf16, awkward lengths), values and
    gradients of q, k and v."""
    from memsparse.model.layout import _buckets
    from memsparse.ops.attention import bucketed_document_attention, varlen_causal_attention, varlen_usable

    H, Hkv = heads
    lengths = torch.tensor([1, 63, 64, 65, 200, 511, 7], device="cuda")
    n = int(lengths.sum())
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(n, h, 64, device="cuda", generator=g, dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
    if not varlen_usable(q):
        pytest.skip("this torch has no varlen_attn")
    w = torch.randn(n, H, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    results = []
    for path in (lambda a, b, c: varlen_causal_attention(a, b, c, cu, int(lengths.max())),
                 lambda a, b, c: bucketed_document_attention(a, b, c, _buckets(lengths))):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = path(*leaves)
        (out.float() * w.float()).sum().backward()
        results.append([out.float()] + [t.grad.float() for t in leaves])
    for a, b in zip(*results):
        assert (a - b).abs().max() < 2e-2 * max(1.0, b.abs().max().item()), (a - b).abs().max()
