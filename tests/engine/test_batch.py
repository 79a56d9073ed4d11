"""Batching across questions: the engine's batched routing and answers against the same questions one at a time
(greedy), per-question budgets and cancellation, and answer text passed on as it is decoded."""

import threading

import pytest

import memsparse as ms

from ..conftest import assert_same_routing, tiny_model, tiny_tokenizer

DOCS = ["Paris is the capital of France.", "Ottawa is the capital of Canada.", "Bananas are yellow and sweet.",
        "Rome is in Italy, and it is old.", "A long one. " * 12]
QUESTIONS = ["Where is Ottawa?", "Bananas?", "Which capital is very old, Rome? Or is it Paris, in France?"]


@pytest.fixture(scope="module")
def engine():
    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 3}, vocab_size=300, head_dim=16)
    bank = ms.MemoryBank.build(model, tok, DOCS)
    return ms.MSAEngine(model, tok, bank)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
def test_route_batch_equals_one_question_at_a_time(engine, fused):
    """Same documents in the same order and the same scores, with the PyTorch path and the fused kernel (on the
    CPU: in Triton's interpreter). Ties: tests/ops/test_routing_triton.py (documents with the same keys)."""
    if fused:
        pytest.importorskip("triton")
    engine.bank.fused_routing = fused
    engine.bank.changed()
    try:
        batched = engine.route_batch(QUESTIONS)
        for q, got in zip(QUESTIONS, batched):
            assert_same_routing(engine.route(q), got, atol=1e-5)
    finally:
        engine.bank.fused_routing = None
    engine.bank.changed()


@pytest.mark.parametrize("interleave", [False, "router", True], ids=["off", "router", "model"])
def test_ask_batch_equals_one_question_at_a_time(engine, interleave):
    budgets = [6, 9, 4]
    batched = engine.ask_batch(QUESTIONS, max_new_tokens=budgets, interleave=interleave, inject_k=2)
    for q, n, a in zip(QUESTIONS, budgets, batched):
        alone = engine.ask(q, max_new_tokens=n, interleave=interleave, inject_k=2)
        assert (a.text, a.finish, a.rounds, a.transcript) == (alone.text, alone.finish, alone.rounds, alone.transcript)
        assert_same_routing(a.routing, alone.routing, atol=1e-5)


def test_a_cancelled_question_leaves_the_batch(engine):
    """A question whose event is set stops at its next token ('cancelled'); the others answer as alone."""
    events = [threading.Event() for _ in QUESTIONS]
    events[1].set()
    answers = engine.ask_batch(QUESTIONS, max_new_tokens=8, interleave=False, cancel=events)
    assert answers[1].finish == "cancelled"
    for n in (0, 2):
        alone = engine.ask(QUESTIONS[n], max_new_tokens=8, interleave=False)
        assert (answers[n].text, answers[n].finish) == (alone.text, alone.finish)
    with pytest.raises(ValueError, match="one per question"):
        engine.ask_batch(QUESTIONS, max_new_tokens=[4, 4], interleave=False)


@pytest.mark.parametrize("interleave", [False, "router"], ids=["off", "router"])
def test_answer_text_is_passed_on_as_it_is_decoded(engine, interleave):
    pieces = {n: [] for n in range(len(QUESTIONS))}
    answers = engine.ask_batch(QUESTIONS, max_new_tokens=16, interleave=interleave, inject_k=2,
                               on_text=lambda n, text: pieces[n].append(text))
    for n, a in enumerate(answers):
        assert "".join(pieces[n]) == a.text
    assert max(len(p) for p in pieces.values()) > 2  # several pieces, not the answer at the end
