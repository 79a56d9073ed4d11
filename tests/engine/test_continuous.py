"""Continuous batching (`MSAEngine.ask_continuous`, `generate_continuous`): questions that join a running decode
batch at different steps answer as they do alone (greedy), whatever shares the batch and however the cache grew;
budgets, cancellation, streamed text and the slot limit."""

import threading

import pytest
import torch

import memsparse as ms
from memsparse.engine import Question
from memsparse.engine.generate import Sampling, generate_continuous
from memsparse.engine.prefill import prefill_batch
from memsparse.model import cached

from ..conftest import assert_same_routing, tiny_model, tiny_tokenizer
from .test_batch import DOCS

QUESTIONS = ["Where is Ottawa?", "Bananas?", "Which capital is very old, Rome? Or is it Paris, in France? " * 3,
             "Rome?", "Is Paris the capital of France, or is it Ottawa, or Rome, or Bananas?"]


@pytest.fixture(scope="module")
def engine():
    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 3}, vocab_size=300, head_dim=16)
    return ms.MSAEngine(model, tok, ms.MemoryBank.build(model, tok, DOCS))


def run(engine, schedule, budgets, slots=8, cancels=None, on_text=None, **kw):
    """ask_continuous with question i offered from the schedule[i]-th call of admit on; returns the answers and
    the n each admit call got."""
    answers, asked, calls = {}, [], [0]
    waiting = list(range(len(schedule)))

    def admit(n):
        asked.append(n)
        calls[0] += 1
        ready = [i for i in waiting if schedule[i] < calls[0]][:n]
        for i in ready:
            waiting.remove(i)
        return [Question(QUESTIONS[i], done=lambda a, i=i: answers.__setitem__(i, a), budget=budgets[i],
                      cancel=cancels and cancels[i], on_text=on_text and (lambda t, i=i: on_text(i, t)))
                for i in ready]

    while waiting:  # (the engine returns when its batch empties and nothing is ready yet)
        engine.ask_continuous(admit, slots=slots, **kw)
    return [answers[i] for i in range(len(schedule))], asked


@pytest.mark.parametrize("interleave", ["off", "router"])
def test_questions_joining_at_different_steps_answer_as_alone(engine, interleave, monkeypatch):
    """Joins at steps 0, 2, 3 and 5 (two at once), budgets from 3 to 12: the batch grows in rows, in columns before
    the write column (the long question joins a batch of short ones) and after it (a larger budget)."""
    schedule, budgets = [0, 2, 3, 5, 5], [4, 3, 12, 9, 6]
    grows = []
    regrow = cached.regrow
    monkeypatch.setattr(cached, "regrow", lambda c, batch, left, right: grows.append(
        (batch - c.positions.shape[0], max(left), right)) or regrow(c, batch, left, right))
    got, _ = run(engine, schedule, budgets, interleave=interleave, inject_k=2)
    assert any(g[0] for g in grows) and any(g[1] for g in grows) and any(g[2] for g in grows)
    for q, n, a in zip(QUESTIONS, budgets, got):
        alone = engine.ask(q, max_new_tokens=n, interleave=interleave, inject_k=2)
        assert (a.text, a.finish, a.rounds, a.transcript) == (alone.text, alone.finish, alone.rounds, alone.transcript)
        assert_same_routing(a.routing, alone.routing, atol=1e-5)


def test_no_more_rows_than_slots(engine):
    """Five questions ready at once, 2 slots: admit never gets more than the free rows, and all are answered."""
    budgets = [5, 3, 7, 2, 4]
    got, asked = run(engine, [0] * 5, budgets, slots=2, interleave="off")
    assert max(asked) == 2 and len([n for n in asked if n]) >= 3  # the batch refilled as questions left
    for q, n, a in zip(QUESTIONS, budgets, got):
        assert a.text == engine.ask(q, max_new_tokens=n, interleave="off").text


def test_cancel_and_streamed_text(engine):
    events = [threading.Event() for _ in range(3)]
    events[1].set()
    pieces = {i: [] for i in range(3)}
    got, _ = run(engine, [0, 1, 1], [16, 16, 16], cancels=events, on_text=lambda i, t: pieces[i].append(t),
                 interleave="router", inject_k=2)
    assert got[1].finish == "cancelled"
    for i in (0, 2):
        assert "".join(pieces[i]) == got[i].text == engine.ask(QUESTIONS[i], max_new_tokens=16, interleave="router",
                                                                inject_k=2).text


def test_one_round_only(engine):
    with pytest.raises(ValueError, match="one round"):
        engine.ask_continuous(lambda n: [], interleave="model")
    with pytest.raises(ValueError, match="no seed"):
        generate_continuous(engine.bank, lambda n: [], 4, Sampling(seed=1))


def test_placed_row_decodes_as_its_own_prefill(engine):
    """The cache operations alone: a long row placed into a short row's running cache, grown for it, gives the
    logits of its own prefill and decode at every step (the reference), and the running row keeps its own."""
    bank, model = engine.bank, engine.model
    (a, ma), (b, mb) = engine.encode_question(QUESTIONS[0]), engine.encode_question(QUESTIONS[2])
    short, other = prefill_batch(bank, [a], [ma], extra=2), prefill_batch(bank, [b], [mb])
    short_alone = prefill_batch(bank, [a], [ma], extra=8)
    t_short = short.logits.argmax(-1)
    cached.decode(model, t_short, short.cache)  # the running batch has taken a step
    cached.decode(model, t_short, short_alone.cache)
    left = cached.shortfall(short.cache, other.cache)
    assert any(left)  # the long row's prefix does not fit before the short row's write column
    with pytest.raises(ValueError, match="regrow"):
        cached.place(short.cache, 0, other.cache, 0)
    grown = cached.regrow(short.cache, 3, left, 8)
    cached.place(grown, 2, other.cache, 0)
    alone = prefill_batch(bank, [b], [mb], extra=8)
    ref, got = alone.logits[0], other.logits[0]
    torch.testing.assert_close(got, ref)
    for _ in range(5):
        t = ref.argmax()
        ref = cached.decode(model, t[None], alone.cache)[0]
        ref_short = cached.decode(model, t_short, short_alone.cache)[0]
        out = cached.decode(model, torch.stack([t_short[0], t, t]), grown)
        torch.testing.assert_close(out[2], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[0], ref_short, atol=1e-5, rtol=1e-5)
        t_short = ref_short.argmax()[None]
