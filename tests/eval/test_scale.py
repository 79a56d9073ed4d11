"""Quality-at-scale helpers: a sized view of a distractor bank routes like a bank of those documents alone, and
a task's documents added to it and deleted again leave it as it was."""

import pytest
import torch

import memsparse as ms
from memsparse.eval.scale import _drop, _with_docs, recall, sized

from ..conftest import assert_same_routing, tiny_model, tiny_tokenizer

DOCS = [f"Passage {i}: the {w} of the {v} is {i * 3}." for i, (w, v) in
        enumerate(zip(["river", "stone", "bell", "wolf", "salt", "lamp", "rope", "seed"] * 2,
                      ["north", "king", "sea", "city", "field", "tower", "road", "hill"] * 2))]


def test_sized_bank_is_a_prefix_view_and_tasks_come_and_go():
    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 3}, vocab_size=300)
    big = ms.MemoryBank.build(model, tok, DOCS)
    budget = sum(big.token_count(d) for d in range(10)) + 1
    small = sized(big, budget)
    assert small.doc_ids() == list(range(10)) and small.text(3) == DOCS[3]
    lay = model.router_layers[0]
    assert small.segments[0].keys[lay].data_ptr() == big.segments[0].keys[lay].data_ptr()  # a view, no copy
    assert small.prefix_kv is big.prefix_kv and small.tier == big.tier  # `like`: the prefix is not recomputed
    alone = ms.MemoryBank.build(model, tok, DOCS[:10])
    q = "Where is the wolf of the city?"
    before = ms.MSAEngine(model, tok, small).route(q)
    assert_same_routing(ms.MSAEngine(model, tok, alone).route(q), before)
    bank, ids = _with_docs(small, model, tok, ["The wolf of the city is 99.", "A lamp."])
    assert ids == [10, 11] and bank is small
    _drop(bank, ids)
    assert len(small.segments) == 1 and torch.equal(small.segments[0].keys[lay], big.segments[0].keys[lay][:len(
        small.segments[0].keys[lay])])
    assert_same_routing(before, ms.MSAEngine(model, tok, small).route(q))
    assert recall([before], [before]) == 1.0


@pytest.mark.slow
def test_a_run_of_some_tasks_keeps_the_others(tmp_path, monkeypatch):
    """`eval scale --scale-tasks qa` after a NIAH run keeps the NIAH points (each names its commit), and points of
    tasks no longer measured (SQuAD before the FAQ set) stay."""
    import json

    from memsparse.eval import scale

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 3}, vocab_size=300)
    monkeypatch.setattr(scale, "distractor_bank", lambda m, t, n, path=None: ms.MemoryBank.build(m, t, DOCS))
    monkeypatch.setattr(scale, "niah_scores", lambda m, t, banks, *a, **k: {s: 50.0 for s in banks})
    out = tmp_path / "scale.json"
    first = scale.measure(model, tok, [64], out, tasks=("niah",), haystack=32)
    assert [(p["task"], p["tokens"]) for p in first["points"]] == [("niah", 32), ("niah", 64)]
    again = scale.measure(model, tok, [64], out, tasks=(), haystack=32)
    assert again["points"] == first["points"] and again["niah_haystack_tokens"] == 32
    assert all(p["commit"] == first["commit"] for p in again["points"])
    fp8 = scale.measure(model, tok, [64], out, tasks=("niah",), haystack=32, fp8_at=64, key_dtypes=("fp8",))
    assert [(p["tokens"], p["key_dtype"]) for p in fp8["points"]] == [(32, "bf16"), (64, "bf16"), (64, "fp8")]
    old = json.loads(out.read_text())
    squad = {"task": "squad_open_em", "tokens": 9, "score": 1.0, "key_dtype": "bf16", "commit": "old"}
    out.write_text(json.dumps({**old, "squad_questions": 200, "points": old["points"] + [squad]}))
    kept = scale.measure(model, tok, [64], out, tasks=("niah",), haystack=32)
    assert squad in kept["points"] and kept["squad_questions"] == 200 and len(kept["points"]) == 4
    from memsparse.eval import faqs

    data = faqs.QASet(["The bell is 7.", "Salt is white."], [0, 1], [("What is the bell?", ["7"], 0)],
                      name="debian-faqs", split="dev")
    monkeypatch.setattr(faqs, "load_qa", lambda split, n: data if (split, n) == ("dev", 5) else None)
    qa = scale.measure(model, tok, [64], out, tasks=("qa",), key_dtypes=("bf16",), haystack=32, qa_questions=5,
                   qa_split="dev")
    assert (qa["qa_source"], qa["qa_split"], qa["qa_questions"]) == ("debian-faqs", "dev", 1)
    points = [p for p in qa["points"] if p["task"] == "qa"]
    assert [p["tokens"] for p in points] == [qa["qa_memory_tokens"], 64] and squad in qa["points"]
    assert all(p["score"] == p["f1"] and p["n"] == 1 and "f1_se" in p for p in points)
    assert [p for p in qa["points"] if p["task"] == "niah"] == [p for p in kept["points"] if p["task"] == "niah"]


@pytest.mark.slow
def test_qa_scores_report_em_f1_and_gold_routing():
    """With k at least the bank's size every document is routed, so every gold passage is found (100%), alone
    or on top of distractors; the distractor bank is left as it was."""
    from memsparse.eval.faqs import QASet
    from memsparse.eval.scale import qa_scores

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 32}, vocab_size=300)
    data = QASet(paragraphs=["The bell is 7.", "Salt is white.", "Seeds grow."], article=[0, 0, 1],
                  questions=[("What is the bell?", ["7"], 0), ("What grows?", ["Seeds"], 2)])
    big = ms.MemoryBank.build(model, tok, DOCS[:5])
    out = qa_scores(model, tok, {40: None, 400: big}, data, inject_k=2)
    assert set(out) == {40, 400} and big.doc_ids() == list(range(5))
    for scores, routes in out.values():
        assert scores["gold_routed"] == 100.0 and 0 <= scores["em"] <= scores["f1"] <= 100 and len(routes) == 2
        assert scores["n"] == 2 and scores["f1_se"] >= 0
