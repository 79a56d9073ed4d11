"""Decoding with the preallocated KV cache against recomputing the whole prefill each step; batching;
sampling; stop conditions."""

import pytest
import torch

import memsparse as ms
from memsparse.engine import Sampling, prefill, prefill_batch
from memsparse.engine.generate import generate, sample
from memsparse.model import cached

from ..conftest import assert_same_routing, tiny_model, tiny_tokenizer

DOCS = ["Paris is the capital of France.", "Ottawa is the capital of Canada.", "Bananas are yellow and sweet.",
        "Rome is in Italy, and it is old.", "A long one. " * 12]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    return model, tok, ms.MemoryBank.build(model, tok, DOCS)


def _naive_greedy(bank, ids, mask, n):
    """Reference: re-run the full prefill over [prompt; generated] for every new token (no cache)."""
    out, steps = list(ids), []
    for _ in range(n):
        logits, _ = prefill(bank, out, mask + [False] * (len(out) - len(mask)), similarity="train")
        steps.append(logits[-1])
        out.append(int(logits[-1].argmax()))
    return out[len(ids):], torch.stack(steps)


def test_cached_decode_equals_recompute(setup):
    model, tok, bank = setup
    engine = ms.MSAEngine(model, tok, bank)
    ids, mask = engine.encode_question("Where is Ottawa?")
    ref_tokens, ref_logits = _naive_greedy(bank, ids, mask, 10)
    res = prefill_batch(bank, [ids], [mask], extra=10)
    logits, got = [res.logits[0]], []
    for _ in range(9):
        got.append(int(logits[-1].argmax()))
        logits.append(cached.decode(model, torch.tensor([got[-1]]), res.cache)[0])
    got.append(int(logits[-1].argmax()))
    assert got == ref_tokens
    assert (torch.stack(logits) - ref_logits).abs().max() < 1e-5
    cached.decode(model, torch.tensor([1]), res.cache)  # the 10th column of room
    with pytest.raises(RuntimeError, match="cache is full"):
        cached.decode(model, torch.tensor([1]), res.cache)


def test_batch_equals_single_rows(setup):
    model, tok, bank = setup
    engine = ms.MSAEngine(model, tok, bank)
    rows = [engine.encode_question(q) for q in ["Where is Ottawa?", "Bananas?", "Which capital is very old, Rome?"]]
    never = lambda b, ids: None  # noqa: E731
    batch = generate(bank, [r[0] for r in rows], [r[1] for r in rows], 8, never)
    for (ids, mask), toks, routing in zip(rows, batch.tokens, batch.routing):
        single = generate(bank, [ids], [mask], 8, never)
        assert single.tokens[0] == toks and single.routing[0].keys() == routing.keys()
        for layer in routing:
            assert [d for d, _ in routing[layer]] == [d for d, _ in single.routing[0][layer]]
    assert batch.events == ["length"] * 3 and all(len(t) == 8 for t in batch.tokens)
    assert batch.timings["decode_tokens"] == 7
    stop = lambda b, ids: "stop" if len(ids) >= 2 + b else None  # noqa: E731  (rows stop after 2, 3, 4 tokens)
    cut = generate(bank, [r[0] for r in rows], [r[1] for r in rows], 8, stop)
    assert cut.tokens == [t[:2 + b] for b, t in enumerate(batch.tokens)] and cut.events == ["stop"] * 3
    assert cut.timings["decode_tokens"] == 3  # on the CPU no step runs ahead of the stop checks


def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]] * 4)
    assert sample(logits, Sampling()).tolist() == [1] * 4
    assert sample(logits, Sampling(temperature=1.0, top_p=0.01)).tolist() == [1] * 4  # nucleus = the top token
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draws = sample(logits.repeat(100, 1), Sampling(temperature=1.0), g1)
    assert torch.equal(draws, sample(logits.repeat(100, 1), Sampling(temperature=1.0), g2))
    assert len(set(draws.tolist())) > 1
    nucleus = sample(logits.repeat(200, 1), Sampling(temperature=1.0, top_p=0.9), g1)
    assert set(nucleus.tolist()) <= {1, 2}  # p(1)+p(2) = 0.95 > 0.9 >= p(1) = 0.84: index 3 and 0 are cut
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_ask_stops_and_reports(setup):
    model, tok, bank = setup
    engine = ms.MSAEngine(model, tok, bank)
    ans = engine.ask("Where is Ottawa?", max_new_tokens=5, interleave=False)
    assert ans.finish == "length" and ans.rounds == [] and set(ans.routing) == set(model.router_layers)
    assert {"route", "prefill", "decode"} <= set(ans.timings) and ans.timings["prefill"] > 0
    first = tok.decode(tok(ans.transcript, add_special_tokens=False)["input_ids"][:1])
    stopped = engine.ask("Where is Ottawa?", max_new_tokens=5, interleave=False, stop=[first])
    assert stopped.finish == "stop" and len(tok(stopped.transcript)["input_ids"]) <= 2
    same = engine.ask("Where is Ottawa?", max_new_tokens=5, temperature=0.8, seed=7)
    assert same.transcript == engine.ask("Where is Ottawa?", max_new_tokens=5, temperature=0.8, seed=7).transcript
    both = engine.ask(["Where is Ottawa?", "Bananas?"], max_new_tokens=5, interleave=False)
    assert [a.transcript for a in both][0] == ans.transcript
    assert engine.route("Where is Ottawa?") == ans.routing


def test_rows_padded_further_left_change_nothing(setup):
    """What the graphed prefill relies on: rows left-padded beyond the longest (to a fixed length) give the same
    last-token logits, routing and greedy continuation (on the CPU: the same code the GPU graph captures)."""
    from memsparse.engine.bank_memory import BankMemory
    from memsparse.engine.prefill import batch_rows, query_offset

    model, tok, bank = setup
    rows, masks = [[5, 6, 7, 8, 9], [11, 12, 13]], [[True] * 4 + [False], [True, True, False]]
    outs = []
    for length in (0, 32):
        ids, pos, valid, rmask = batch_rows(rows, masks, query_offset(bank, 2), model.device, length=length)
        assert ids.shape == (2, max(length, 5))
        memory = BankMemory(bank, rmask, True, 2)
        logits, cache = cached.prefill(model, ids, pos, valid, memory, extra=4)
        steps = [logits]
        for _ in range(3):
            steps.append(cached.decode(model, steps[-1].argmax(-1), cache))
        outs.append((torch.stack(steps), memory.routing))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert_same_routing(a, b)
