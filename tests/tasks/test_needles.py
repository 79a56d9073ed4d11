"""The grammar NIAH generator (tasks/needles.py) on inline haystacks, and `eval niah --heldout --split`."""

from __future__ import annotations

import json
import random
import re

import pytest

from memsparse.cli import main
from memsparse.tasks import haystacks, needles

from ..conftest import tiny_model, tiny_tokenizer

VOCAB = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(" ".join(rng.choice(VOCAB) for _ in range(rng.randint(5, 15))).capitalize() + "."
                    for _ in range(n))


@pytest.fixture(autouse=True)
def inline_haystacks(monkeypatch):
    """Every haystack of both grammars: 30 passages of about 60 words, each source its own first word."""
    rng = random.Random(3)
    for name in needles.HAYSTACKS:
        passages = [f"Source {name}. " + text(rng, 6) for _ in range(30)]
        monkeypatch.setitem(needles.HAYSTACKS, name, lambda passages=passages: passages)


def count(s: str) -> int:
    return len(s.split())


@pytest.mark.parametrize("grammar", [needles.TRAIN, needles.HELDOUT], ids=lambda g: g.name)
@pytest.mark.parametrize("subtask", needles.SUBTASKS)
def test_shapes(subtask: str, grammar: needles.Grammar) -> None:
    """Each subtask's shape: memory size and document bounds; the asked values (num_q * num_v of them, distinct)
    each in exactly one needle, the gold documents exactly those holding them; the question names every asked key;
    the haystack is one of the grammar's; held-out samples have held-out values."""
    hay, _, value_slot, k, v, q = needles.SHAPES[subtask]
    for seed, target in ((0, 700), (1, 1500), (2, 3000)):
        s = needles.make_sample(subtask, target, count, random.Random(seed), doc_tokens=64, grammar=grammar)
        sizes = [count(d) for d in s.documents]
        assert 0.9 * target <= sum(sizes) <= target and all(0 < n <= 64 for n in sizes)
        assert len(s.answers) == len(set(s.answers)) == q * v
        found = [d for d, doc in enumerate(s.documents) for a in s.answers
                 if re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", doc)]
        assert len(found) == len(s.answers) and sorted(set(found)) == s.gold
        assert s.question.endswith(("?", ".")) and s.answer_prefix.startswith(" ") and s.instruction
        memory = "\n".join(s.documents)
        if hay == "text":
            assert re.search(r"Source (\w+)\.", memory)[1] in grammar.haystacks
        if hay == "noise":
            assert any(n in memory for n in grammar.noise)
        if grammar is needles.HELDOUT:
            assert all(any(re.fullmatch(needles.VALUE_PATTERNS[f], a) for f in grammar.values[value_slot])
                       for a in s.answers)


def test_deterministic_and_varied() -> None:
    """A seed gives one sample; seeds give many templates, key kinds and value formats."""
    def draw(seed):
        return needles.make_sample("niah_multikey_1", 900, count, random.Random(seed), doc_tokens=64)

    assert draw(5) == draw(5)
    samples = [draw(s) for s in range(80)]
    questions = {" ".join(s.question.split()[:2]) for s in samples}
    shapes = {re.sub(r"[a-z]+", "a", re.sub(r"[0-9]+", "0", s.answers[0].lower())) for s in samples}
    needle_starts = {d.split(". ")[-1][:12] for s in samples for d in s.documents[s.gold[0]:s.gold[0] + 1]}
    assert len(questions) >= 6 and len(shapes) >= 4 and len(needle_starts) >= 6


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown subtask 'niah_nope'"):
        needles.make_sample("niah_nope", 900, count, random.Random(0))
    with pytest.raises(ValueError, match="too small"):
        needles.make_sample("niah_multikey_2", 5, count, random.Random(0))
    with pytest.raises(ValueError, match="too small for a needle"):
        needles.make_sample("niah_single_2", 900, count, random.Random(0), doc_tokens=3)


def test_train_hops() -> None:
    """Two-hop chains in training wording: the value sentence names the link, the question the key only."""
    links, said, question, keys, values = needles.train_hops(random.Random(4), 3)
    assert len(links) == len(said) == len(keys) == len(set(values)) == 3
    for link, value_sentence, key, value in zip(links, said, keys, values):
        target = re.search(rf"{re.escape(key)}\W+(?:\w+ ){{1,3}}(?:the )?([\w-]+)", link)[1]
        assert target in value_sentence and value in value_sentence and key not in value_sentence
    assert "{key}" in question and "{" not in question.replace("{key}", "")


@pytest.mark.slow
def test_eval_niah_heldout_command(tmp_path, monkeypatch, capsys) -> None:
    """`eval niah --heldout --split test`: the held-out samples answered end to end; points and results record the
    data, the split and the test-range seed, with standard errors; a seed outside the split's range, or pooling
    held-out with RULER points, is one clear error."""
    from memsparse import cli

    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    monkeypatch.setattr(cli, "_load_model", lambda *a: (model, tiny_tokenizer()))
    monkeypatch.setattr(haystacks, "paul_graham_essays", lambda: pytest.fail("--heldout read the essays"))
    out, answers = tmp_path / "niah.json", tmp_path / "answers.jsonl"
    argv = ["eval", "niah", "--heldout", "--split", "test", "--seed", "3", "--tokens", "400", "--samples", "2",
            "--subtasks", "niah_single_1,niah_multikey_3", "--out", str(out), "--answers", str(answers)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["data"] == "heldout" and res["split"] == "test"
    assert set(res["averages"]) == set(res["stderrs"]) == {"400"}
    for p in res["points"]:
        assert (p["data"], p["split"], p["seed"], p["samples"]) == ("heldout", "test", 1_000_003, 2)
        acc = p["accuracy"] / 100
        assert p["stderr"] == round(100 * (acc * (1 - acc) / 2) ** 0.5, 2)
        assert f"{p['accuracy']:>7} ± {p['stderr']:<4}" in printed
    assert "average" in printed
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    assert all(x["data"] == "heldout" and x["split"] == "test" for x in lines)
    assert all(re.search(needles.VALUE_PATTERNS["serial"], x["expected"][0]) for x in lines
               if x["subtask"] == "niah_multikey_3")
    assert main(argv[:5] + ["--seed", "1000000"] + argv[7:]) == 2
    assert "must be in [0, 1000000)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "multihop", "--heldout"])
    assert e.value.code == 2 and "eval multihop: error: unrecognized arguments: --heldout" in capsys.readouterr().err

    ruler = tmp_path / "ruler.json"
    res["points"] = [{**p, "data": "ruler", "seed": 9} for p in res["points"]]
    ruler.write_text(json.dumps(res))
    assert main(["eval", "niah", "--pool", f"{out},{ruler}", "--out", str(tmp_path / "pooled.json")]) == 2
    assert "one kind of samples" in capsys.readouterr().err


def test_mixer_counts_each_passage_once() -> None:
    """Training draws keep the haystack passages' sentence counts: once every passage was seen, a NIAH question
    over real text counts only its own needles."""
    from memsparse.tasks.mix import Mixer

    counted: list[str] = []

    def words(texts: list[str]) -> list[int]:
        counted.extend(texts)
        return [count(t) for t in texts]

    mixer = Mixer({"niah": 1.0}, words, doc_tokens=64, seed=1, niah_subtasks={"niah_single_2": 1.0})
    for _ in range(40):  # 30 passages of about 60 words in each of 5 haystacks
        mixer.draw(1500)
    before = len(counted)
    mixer.draw(1500)
    assert len(counted) - before <= 2  # the needle (and nothing of the haystack)
