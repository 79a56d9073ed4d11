"""Document priors (`MSAEngine.calibrate_priors`): each document's mean routing score over calibration questions,
subtracted before top-k; kept for documents added later (the mean prior), saved and loaded with the bank."""

import copy

import pytest
import torch

import memsparse as ms

from ..conftest import assert_same_routing, tiny_model, tiny_tokenizer

DOCS = [f"Document {i} talks about {w} and {w} again, number {i * 7}." for i, w in
        enumerate(["apples", "rivers", "trains", "music", "stone", "glass"])]
QUESTIONS = ["What about trains?", "Tell me of glass.", "Which one is about rivers?", "Is stone music?"]


@pytest.fixture(scope="module")
def setup():
    # k above the bank's size: every layer reads every document whatever the priors, so later layers' router
    # queries do not change with them and scores compare exactly (head_dim 16: the fused kernel's smallest)
    tok = tiny_tokenizer()
    return tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 16}, vocab_size=300, head_dim=16), tok


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
def test_priors_are_mean_scores_and_routing_subtracts_them(setup, fused):
    """With fused routing (on CPU: in Triton's interpreter) the Triton top-k subtracts the priors."""
    if fused:
        pytest.importorskip("triton")
    model, tok = setup
    if fused and torch.cuda.is_available():
        model = copy.deepcopy(model).cuda()
    bank = ms.MemoryBank.build(model, tok, DOCS)
    bank.fused_routing = fused
    # the fused kernel multiplies in bf16 on a GPU: scores of a batch and of one question differ slightly
    tol = 2e-2 if fused and model.device.type == "cuda" else 1e-5
    engine = ms.MSAEngine(model, tok, bank)
    raw = [engine.route(q) for q in QUESTIONS]
    priors = engine.calibrate_priors(questions=QUESTIONS)
    ids = priors["ids"].tolist()
    assert ids == bank.doc_ids()
    for lay in model.router_layers:
        want = torch.tensor([sum(dict(r[lay])[d] for r in raw) / len(raw) for d in ids])
        assert torch.allclose(priors["scores"][lay].cpu(), want, atol=tol)
    for q, r in zip(QUESTIONS, raw):  # the tiny model ties some documents exactly: scores per document, ranked
        got = engine.route(q)
        assert sorted(got) == sorted(r)
        for lay, picked in r.items():
            want = {d: s - priors["scores"][lay][ids.index(d)].item() for d, s in picked}
            assert dict(got[lay]) == pytest.approx(want, abs=tol)
            assert all(a[1] >= b[1] for a, b in zip(got[lay], got[lay][1:]))
        assert any(dict(got[lay]) != dict(r[lay]) for lay in r)
    bank.set_doc_priors(None)
    assert_same_routing(engine.route(QUESTIONS[0]), raw[0])


def test_priors_follow_bank_changes_and_round_trip(setup, tmp_path):
    model, tok = setup
    bank = ms.MemoryBank.build(model, tok, DOCS)
    engine = ms.MSAEngine(model, tok, bank)
    priors = engine.calibrate_priors(n=8)  # pseudo-queries: sentences of the documents
    lay = model.router_layers[-1]
    bank.delete([2])
    new = bank.add(["Document six talks about ice."])[0]
    table = bank.routing_index().ids
    p = bank.prior_scores(lay)  # (N,) per table position
    assert p.shape == (len(table),)
    assert p[table.index(new)] == pytest.approx(priors["scores"][lay].mean().item())
    assert p[table.index(4)] == pytest.approx(priors["scores"][lay][4].item())
    bank.save(tmp_path / "bank")
    loaded = ms.MemoryBank.load(tmp_path / "bank", model, tok)
    assert torch.equal(loaded.doc_priors["ids"], priors["ids"])
    assert all(torch.equal(loaded.doc_priors["scores"][k], v) for k, v in priors["scores"].items())
    assert_same_routing(ms.MSAEngine(model, tok, loaded).route(QUESTIONS[1]),
                        engine.route(QUESTIONS[1]))
    again = engine.calibrate_priors(n=8)  # recalibrated over the changed bank, from raw scores
    assert again["ids"].tolist() == bank.doc_ids() and new in again["ids"].tolist()


def test_priors_bad_input(setup):
    model, tok = setup
    bank = ms.MemoryBank.build(model, tok, DOCS)
    engine = ms.MSAEngine(model, tok, bank)
    with pytest.raises(ValueError, match="no calibration questions"):
        engine.calibrate_priors(questions=[])
    priors = engine.calibrate_priors(questions=QUESTIONS[:1])
    with pytest.raises(ValueError, match="every router layer"):
        first = model.router_layers[0]
        bank.set_doc_priors({"ids": priors["ids"], "scores": {first: priors["scores"][first]}})
