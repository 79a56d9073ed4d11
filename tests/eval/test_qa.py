"""Open-memory QA evaluation: the official answer normalisation and scores, the gold-free answer extraction, standard
errors, retrieval, and the whole evaluation on a tiny QA set with tiny models (no downloads)."""

import io
import json

import pytest
import torch

from memsparse.engine import RetrievalConfig
from memsparse.eval import qa as sq
from memsparse.eval.faqs import QASet

from ..conftest import tiny_model, tiny_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_metrics():
    assert sq.normalize("The  Tögrög!") == "tögrög"
    assert sq.exact_match("the tögrög.", ["Tögrög", "MNT"]) == 1.0
    assert sq.exact_match("tögrög coins", ["Tögrög"]) == 0.0
    assert sq.f1("six grammys", ["Six"]) == pytest.approx(2 / 3)
    assert sq.f1("nothing", ["Six", "6"]) == 0.0


@pytest.mark.parametrize("generated, extracted", [
    ("The answer to the question is: Canada.", "Canada."),
    ("Answer: Use the -L option. It follows redirects.", "Use the -L option."),
    ("According to the context, the answer is Paris", "Paris"),
    ("Based on the provided text, R runs on Unix.\nMore text", "R runs on Unix."),
    ("\"Learn Perl and rewrite it.\" Seriously.", "Learn Perl and rewrite it."),
    ("Version 2.7.0 added it. Then more.", "Version 2.7.0 added it."),
    ("In the beginning was the word.", "In the beginning was the word."),  # not boilerplate: no comma
    ("", ""),
], ids=["answer-is", "answer-colon", "according-then-answer", "based-on-newline", "quoted", "dotted-number",
        "in-the-kept", "empty"])
def test_extract_answer_is_gold_free_and_strips_boilerplate(generated, extracted):
    assert sq.extract_answer(generated) == extracted


def test_scores_extract_before_matching_with_standard_errors():
    refs = [["Canada"], ["Use the -L option."], ["Bananas are yellow."], ["Paris"]]
    texts = ["The answer is: Canada. Ottawa is its capital.", "Use the -L option. Or not.", "Apples.", "paris"]
    summary, em, f = sq.scores(texts, refs)
    assert em == [1.0, 1.0, 0.0, 1.0] and f == [1.0, 1.0, 0.0, 1.0]
    assert summary == {"n": 4, "em": 75.0, "em_se": 25.0, "f1": 75.0, "f1_se": 25.0}  # sd 0.5 / sqrt(4)
    assert sq.scores(["The answer is: Canada. Ottawa is its capital."], [["Canada"]])[0]["em_se"] == 0.0  # n = 1
    assert sq.mean_se([1.0, 0.0, 0.0]) == (33.33, 33.33)
    assert sq.gold_rank_rates([[3, 1, 2, 0, 5], [1, 9], [7, 8, 9, 10, 4]], [3, 9, 4]) == {"gold_top1": 33.33,
                                                                                           "gold_top4": 66.67}


def test_retrieve_faiss_equals_matmul():
    faiss = pytest.importorskip("faiss")
    assert faiss
    g = torch.Generator().manual_seed(0)
    docs = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    qs = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    assert sq.retrieve(qs, docs, 5) == (qs @ docs.T).topk(5, dim=1).indices.tolist()


class BagOfBytes:
    """Stands in for MiniLM: normalised byte histograms."""

    def __init__(self, device="cpu"):
        pass

    def embed(self, texts):
        out = torch.zeros(len(texts), 256)
        for i, t in enumerate(texts):
            for b in t.lower().encode():
                out[i, b] += 1
        return torch.nn.functional.normalize(out, dim=-1)


def test_evaluate_qa_tiny(monkeypatch):
    monkeypatch.setattr(sq, "MiniLM", BagOfBytes)
    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    questions = [("Where is Ottawa?", ["Canada"], 1), ("What is yellow?", ["Bananas"], 2)]
    data = QASet(paragraphs=["Paris is the capital of France.", "Ottawa is in Canada.", "Bananas are yellow."],
                 article=[0, 0, 1], questions=questions)
    assert sq.fit_context(tok, data, 20) == [0]
    lines = io.StringIO()
    systems = ["memsparse", "rag2-msa", "rag1", "rag2", "full"]
    res = sq.evaluate_qa(data, systems, msa=(model, tok), plain=(model, tok), progress=False, answers=lines)
    assert [r["name"] for r in res] == systems
    assert all(0 <= r["em"] <= 100 and 0 <= r["f1"] <= 100 for r in res)
    rows = [json.loads(x) for x in lines.getvalue().splitlines()]  # every system's answer to every question
    assert [(r["system"], r["question"]) for r in rows] == [(s, q) for s in systems for q, _, _ in questions]
    top = sq.retrieve(*reversed(sq.embeddings(data, "cpu")), 2)  # rag2-msa: MiniLM's top 2 injected into the MSA model
    assert [x["injected"] for x in rows if x["system"] == "rag2-msa"] == [sorted(t) for t in top]
    assert set(res[0]) >= {"gold_routed", "gold_injected", "gold_top1", "gold_top4"} and "gold_routed" not in res[1]
    minilm = sq.gold_rank_rates(top, [1, 2])  # ragK and ragK-msa report MiniLM's ranking of the gold passage
    assert all({k: r[k] for k in minilm} == minilm for r in res[1:4]) and "gold_top1" not in res[4]
    assert all(r["n"] == 2 and r["f1_se"] >= 0 and r["em_se"] >= 0 for r in res)
    assert sq.readers(["rag1-msa"]) == (True, False) and sq.readers(["memsparse", "rag5"]) == (True, True)
    assert sq.readers(["full"]) == (False, True)
    c = RetrievalConfig()
    assert sq.system_name(None) == "memsparse" and sq.system_name(c) == "memsparse"
    assert sq.system_name(c.replace(refine_fuse=False), 256) == "memsparse-refine_fuse-False-priors-256"
    assert sq.system_name(c.replace(inject_k=1)) == "memsparse-inject_k-1"
    assert sq.system_name(c.replace(refine=0, inject_k=2)) == "memsparse-inject_k-2_refine-0"  # as in the results
    with pytest.raises(ValueError, match="unknown systems"):
        sq.evaluate_qa(data, ["rag1-plain"], plain=(model, tok), progress=False)
    for r in res:
        mine = [x for x in rows if x["system"] == r["name"]]
        assert r["em"] == round(100 * sum(x["em"] for x in mine) / 2, 2)
        assert r["f1"] == round(100 * sum(x["f1"] for x in mine) / 2, 2)
        assert all(x["answer"] == sq.extract_answer(x["generated"]) for x in mine)
    assert all(1 <= len(x["injected"]) <= 3 for x in rows if x["system"] == "memsparse")
    assert {x["gold_paragraph"] for x in rows} == {1, 2} and all("injected" not in x for x in rows[4:])


def test_results_keep_earlier_systems_of_the_same_questions(tmp_path, monkeypatch):
    """Systems measured again replace their namesakes, the others stay (with where they were measured); results over
    another split, memory, question count or part of the split are refused, the file left as it was."""
    out = tmp_path / "qa_test.json"
    data = QASet(["a", "b"], [0, 1], [("q", ["a"], 0)] * 10, name="faqs", split="test")
    monkeypatch.setattr(sq, "run_meta", lambda: {"gpu": "A", "date": "d1", "commit": "c1"})
    sq.write_results([{"name": "memsparse", "em": 1.0, "f1": 2.0}, {"name": "rag1", "em": 0.0, "f1": 9.0}], data,
                     500, out)
    monkeypatch.setattr(sq, "run_meta", lambda: {"gpu": "B", "date": "d2", "commit": "c2"})
    res = sq.write_results([{"name": "memsparse", "em": 3.0, "f1": 4.0}, {"name": "memsparse-k1", "em": 0.5,
                                                                          "f1": 1.5}], data, 500, out)
    assert res == json.loads(out.read_text()) and res["commit"] == "c2"
    assert (res["source"], res["split"], res["questions"], res["memory_passages"]) == ("faqs", "test", 10, 2)
    assert [(s["name"], s["f1"], s["commit"]) for s in res["systems"]] == [
        ("memsparse", 4.0, "c2"), ("rag1", 9.0, "c1"), ("memsparse-k1", 1.5, "c2")]
    before = out.read_text()
    dev = QASet(data.paragraphs, data.article, data.questions, name="faqs", split="dev")
    fewer = QASet(data.paragraphs, data.article, data.questions[:5], name="faqs", split="test")
    later = QASet(data.paragraphs, data.article, data.questions, name="faqs", split="test", skip=10)  # other 10
    for other, tokens in ((data, 600), (dev, 500), (fewer, 500), (later, 500)):
        with pytest.raises(ValueError, match="holds results over source faqs, split test, memory_passages 2"):
            sq.write_results([{"name": "rag5", "em": 0.0, "f1": 7.0}], other, tokens, out)
    assert out.read_text() == before
    res = sq.write_results([{"name": "rag5", "em": 0.0, "f1": 7.0}], dev, 500, tmp_path / "qa_dev.json")
    assert [s["name"] for s in res["systems"]] == ["rag5"] and res["split"] == "dev"


def test_gold_shares_count_routed_and_injected_gold_paragraphs():
    from types import SimpleNamespace as A

    data = QASet(paragraphs=["a", "b", "c"], article=[0, 0, 0], questions=[("q1", ["x"], 0), ("q2", ["y"], 2)])
    answers = [A(routing={15: [(0, 0.9), (1, 0.5)], 16: [(1, 0.7)]}, rounds=[[1]]),  # routed, not injected
               A(routing={15: [(0, 0.9)], 16: [(1, 0.7)]}, rounds=[[2]])]  # injected, not routed
    assert sq.gold_shares(answers, data) == {"gold_routed": 50.0, "gold_injected": 50.0}
    # bank ids other than the paragraph index: paragraph 0 is document 7, paragraph 2 is document 1
    assert sq.gold_shares(answers, data, ids=[7, 8, 1]) == {"gold_routed": 50.0, "gold_injected": 0.0}


def test_generate_plain_batches_equal_single_rows():
    """Left-padded batches of prompts of different lengths answer exactly as each prompt alone."""
    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    model = tiny_model("qwen3", vocab_size=300)
    prompts = ["Where is Ottawa?", "A much longer question about bananas, colours and capitals?", "x"]
    one = [sq.generate_plain(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert sq.generate_plain(model, tok, prompts, max_new_tokens=6, batch_size=3) == one
    assert any(one)
