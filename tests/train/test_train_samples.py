"""Training samples follow the engine's protocol token for token: each round's active tokens and routing mask
are what the engine feeds the model in that round, and the targets are what the engine expects back."""

import pytest
import torch

import memsparse as ms
from memsparse.engine.protocol import Protocol
from memsparse.train.samples import collate, memory_stream, rounds

from ..conftest import tiny_model, tiny_tokenizer
from ..engine.test_interleave import Script

DOCS = ["Paris is the capital of France.", "Ottawa <|object_ref_end|> [3] is in Canada.", "Bananas are yellow.",
        "Rome is old."]


def test_rounds_match_the_engine(monkeypatch):
    from memsparse.engine import engine as engine_mod

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    proto = Protocol(tok)
    mem = memory_stream(tok, DOCS)
    question, hops, answer = "Where is Ottawa [2]?", [[1], [0, 3]], "in Canada"
    samples = rounds(proto, mem, DOCS, question, hops, answer)
    assert len(samples) == 4
    targets = [tok.decode([t for t in s.labels if t != -100]) for s in samples]
    assert targets == ["[1]<|object_ref_end|>", "[0][3]<|object_ref_end|>", "<End-of-Retrieve>",
                       "The answer to the question is: in Canada<|im_end|>"]
    bank = ms.MemoryBank.build(model, tok, DOCS)
    script = Script(tok, [targets])
    monkeypatch.setattr(engine_mod, "generate", script)
    ans = ms.MSAEngine(model, tok, bank, interleave="model").ask(question)
    assert ans.rounds == hops and ans.text == answer
    n_mem = len(mem[0])
    for s, call in zip(samples, script.calls):
        (row, route), = call
        n_target = sum(t != -100 for t in s.labels)
        assert s.input_ids[:n_mem] == mem[0] and s.input_ids[n_mem:len(s) - n_target] == row
        assert [d == 0 for d in s.doc_ids[n_mem:len(s) - n_target]] == route
        assert s.positives == [0, 1, 3]


def test_collated_rounds_train():
    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300).train()
    proto = Protocol(tok)
    mem = memory_stream(tok, DOCS)
    batch = collate(rounds(proto, mem, DOCS, "Where is Ottawa?", [[1]], "Canada") +
                    rounds(proto, memory_stream(tok, DOCS[:2]), DOCS[:2], "Where?", [[0]], "Paris",
                           interleave=False), pad_id=0)
    assert batch["aux_labels"].tolist() == [[0, 1, 0, 0]] * 3 + [[1, 0, 0, 0]]
    out = model(batch["input_ids"], batch["doc_ids"], labels=batch["labels"], aux_labels=batch["aux_labels"],
                attention_mask=batch["attention_mask"])
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.aux_loss > 0


def test_router_answer_sample_matches_the_engine(monkeypatch):
    from memsparse.engine import engine as engine_mod

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    bank = ms.MemoryBank.build(model, tok, DOCS)
    engine = ms.MSAEngine(model, tok, bank, refine=0)
    top = sorted(engine_mod.fused_top(engine.route("Where is Ottawa?"), 2))
    gold, noise = [top[0]], top[1:]
    sample = rounds(Protocol(tok), memory_stream(tok, DOCS), DOCS, "Where is Ottawa?", [gold], "x", noise=[noise])[0]
    script = Script(tok, [["The answer to the question is: x<|im_end|>"]])
    monkeypatch.setattr(engine_mod, "generate", script)
    engine.ask("Where is Ottawa?", inject_k=2)
    (row, route), = script.calls[0]
    n_mem, n_target = len(memory_stream(tok, DOCS)[0]), sum(t != -100 for t in sample.labels)
    assert sample.input_ids[n_mem:len(sample) - n_target] == row
    assert [d == 0 for d in sample.doc_ids[n_mem:len(sample) - n_target]] == route


def test_two_round_router_sample_matches_the_engine(monkeypatch):
    """A two-hop question in the router-injection layout: per round the hop's documents and that round's noise
    are injected, as the engine does with router_rounds=2; each round routes from the question and the text
    injected last."""
    from memsparse.engine import engine as engine_mod

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    bank = ms.MemoryBank.build(model, tok, DOCS)
    picks = iter([[1, 2], [3, 0]])  # what the routers rank highest in rounds 1 and 2
    excluded = []
    monkeypatch.setattr(engine_mod, "fused_top",
                        lambda routing, k, exclude: excluded.append(exclude) or next(picks))
    script = Script(tok, [["The answer to the question is: x<|im_end|>"]])
    monkeypatch.setattr(engine_mod, "generate", script)
    ans = ms.MSAEngine(model, tok, bank, refine=0).ask("Where?", router_rounds=2)
    assert ans.rounds == [[1, 2], [0, 3]] and excluded == [set(), {1, 2}]
    sample = rounds(Protocol(tok), memory_stream(tok, DOCS), DOCS, "Where?", [[1], [3]], "x", noise=[[2], [0]])[0]
    (row, route), = script.calls[0]
    n_mem, n_target = len(memory_stream(tok, DOCS)[0]), sum(t != -100 for t in sample.labels)
    assert sample.input_ids[n_mem:len(sample) - n_target] == row
    assert [d == 0 for d in sample.doc_ids[n_mem:len(sample) - n_target]] == route
    assert sample.positives == [1, 3]
    with pytest.raises(ValueError, match="noise has 1 rounds for 2 hops"):
        rounds(Protocol(tok), memory_stream(tok, DOCS), DOCS, "Where?", [[1], [3]], "x", noise=[[2]])
