"""What training never sees stays out of training (tasks/heldout.py).

Training samples are drawn from every Mixer task over small inline corpora (the real ones are downloads); the
eval-only loaders are replaced by recording stand-ins. Every sample is checked for RULER's wording, held-out
templates, vocabularies and value formats, and eval-only corpus text; the grammar's two parts are checked to be
disjoint; and the check itself is shown to catch planted leaks.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from memsparse.tasks import corpora, faqs, haystacks, heldout, mix, needles, niah
from memsparse.tasks.mix import TASKS, Mixer
from memsparse.tasks.reading import READING_TASKS

SRC = Path(__file__).resolve().parents[2] / "src" / "memsparse"
FIELDS = {"key": "KEYX", "value": "VALUEX", "noun": "NOUNX", "nouns": "NOUNSX", "query": "QUERYX", "link": "LINKX"}
# eval-only texts, as the stand-ins for the eval-only loaders return them
ESSAY = "Zorblax founders quibble over zorblax margins. Zorblax startups ship zorblax demos."
FORTUNE = "Quuxle says a quuxle in hand is worth two quuxles. -- Old Quuxle"
# training corpora: plain words, none of them in a held-out vocabulary
WORDS = "the a council river town road wide old new green people work plan market city farm bridge year".split()


def sentences(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(10, 20))]
        words.insert(rng.randint(1, len(words) - 1), rng.choice(["in 1911", "42 farms", "$300", "by Tamsworth"]))
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


@pytest.fixture
def inline_corpora(monkeypatch):
    """Every training corpus replaced by a small inline one; the eval-only loaders record their calls."""
    rng = random.Random(0)
    calls: list[str] = []

    def passages(source: str, n: int, title: str) -> list[corpora.Passage]:
        return [corpora.Passage(f"{title} {i}", sentences(rng, 6), source) for i in range(n)]

    sotu, docs, book = passages("sotu", 60, "Address"), passages("python-doc", 40, "Doc"), passages("hb", 40, "Hb")
    faq = [(f"Why does the town plan number {i} work?", sentences(rng, 3)) for i in range(40)]
    entries = [corpora.Passage(f"term{i:03d}", f"n 1: the {rng.choice(WORDS)} of item {i}; \"the market\"", "wn")
               for i in range(300)]
    gcide = [corpora.Passage(f"word{i:03d}", f"A {rng.choice(WORDS)} numbered {i}; another sense.", "gcide")
             for i in range(300)]
    for name, value in (("sotu", sotu), ("python_docs", docs), ("debian_handbook", book), ("python_faq", faq),
                        ("definitions", entries), ("webster", gcide)):
        monkeypatch.setattr(corpora, name, lambda value=value: value)

    def recording(name: str, value):
        def load():
            calls.append(name)
            return value
        return load

    train_faq = {pkg: [(f"Why does the {pkg} plan number {i} work?", sentences(rng, 3)) for i in range(40)]
                 for pkg in faqs.FAQ_PACKAGES}
    monkeypatch.setattr(faqs, "faq_pairs", lambda pkg: train_faq[pkg])
    monkeypatch.setattr(faqs, "faq_documents", lambda pkg, max_words=250: passages(pkg, 30, f"{pkg} page"))
    monkeypatch.setattr(haystacks, "paul_graham_essays", recording("paul_graham_essays", ESSAY))
    monkeypatch.setattr(haystacks, "fortunes", recording("fortunes", [FORTUNE] * 50))
    monkeypatch.setattr(haystacks, "word_lists", recording("word_lists", (["zesty"], ["zebu"])))
    monkeypatch.setattr(mix, "PASSAGE_WORDS", 40)
    return calls


def count(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def template_pattern(template: str) -> re.Pattern:
    """A template as a regex: its fields match any run of up to 80 characters within a sentence."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile(r"[^.?!\n]{1,80}?".join(re.escape(p) for p in parts), re.I)


HELDOUT_TEMPLATES = needles.HELDOUT.templates()
HELDOUT_PATTERNS = [template_pattern(t) for t in HELDOUT_TEMPLATES]
HELDOUT_WORDS = {w.lower() for vocab in (heldout.HELDOUT_ADJECTIVES, heldout.HELDOUT_NOUNS, heldout.HELDOUT_BIRDS,
                                          heldout.HELDOUT_REGIONS) for w in vocab}
HELDOUT_NOUNS = [n for names in heldout.HELDOUT_VALUE_NOUNS.values() for pair in names for n in pair]
HELDOUT_FORMATS = [re.compile(needles.VALUE_PATTERNS[f]) for f in heldout.HELDOUT_VALUE_FORMATS]


def leaks(text: str) -> list[str]:
    """Every held-out thing found in a training text."""
    low = text.lower()
    found = [f"RULER phrase {p!r}" for p in heldout.RULER_PHRASES if p.lower() in low]
    found += [f"held-out template {t!r}" for t, p in zip(HELDOUT_TEMPLATES, HELDOUT_PATTERNS) if p.search(text)]
    found += [f"held-out filler {s!r}" for s in heldout.HELDOUT_NOISE if s.lower() in low]
    found += [f"held-out word {w!r}" for w in sorted(HELDOUT_WORDS & set(re.findall(r"[a-z]+", low)))]
    found += [f"held-out value name {n!r}" for n in HELDOUT_NOUNS if n.lower() in low]
    found += [f"held-out value format {p.pattern!r}" for p in HELDOUT_FORMATS if p.search(text)]
    found += [f"eval-only text {t!r}" for t in ("zorblax", "quuxle", "zesty-zebu") if t in low]
    return found


def draw_all(mixer: Mixer, n: int) -> list[str]:
    """`n` training questions as text: memory, question and answer."""
    out = []
    for i in range(n):
        q = mixer.draw(600 + 100 * (i % 10))
        out.append("\n".join(q.documents + [q.question, q.answer]))
    return out


def test_training_samples_hold_nothing_held_out(inline_corpora) -> None:
    """A few hundred questions of every training task: no held-out wording, vocabulary, value format or eval-only
    text in them, and no eval-only loader called. (The reading tasks need real sentences to ask about: they read
    the same training corpora, and tests/tasks/test_reading.py checks their questions.)"""
    tasks_here = [t for t in TASKS if t not in READING_TASKS]
    mixer = Mixer(dict.fromkeys(tasks_here, 1.0), count, doc_tokens=128, seed=5)
    tasks: set[str] = set()
    for i in range(320):
        q = mixer.draw(600 + 100 * (i % 10))
        tasks.add(q.task.split(":")[0])
        text = "\n".join(q.documents + [q.question, q.answer])
        assert not leaks(text), (q.task, leaks(text))
    assert tasks == set(tasks_here)
    assert inline_corpora == []


def test_every_training_needle_shape_and_grammar_part_is_drawn(inline_corpora) -> None:
    """The NIAH training task reaches every subtask shape and every training haystack (so the leak check saw
    them all)."""
    mixer = Mixer({"niah": 1.0}, count, doc_tokens=128, seed=1)
    subtasks, sources = set(), set()
    firsts = {name: needles.HAYSTACKS[name]()[0].split(". ")[0] for name in needles.TRAIN.haystacks}
    for i in range(300):
        q = mixer.niah(500 + 50 * (i % 8))
        subtasks.add(q.task)
        assert not leaks("\n".join(q.documents + [q.question, q.answer]))
    for key in mixer._niah_cache:
        sources |= {name for name in needles.TRAIN.haystacks if key[:2] == ("passages", needles.HAYSTACKS[name])}
    assert subtasks == {f"niah:{s}" for s in needles.SUBTASKS} and sources == set(firsts)
    assert inline_corpora == []


def test_grammar_parts_are_disjoint() -> None:
    """Training and held-out templates, key kinds, value formats, value names, vocabularies, fillers and haystacks
    share nothing; no training sentence matches a held-out template (nor the reverse) or holds RULER's wording."""
    train, held = needles.TRAIN, needles.HELDOUT
    train_templates = train.templates() + tuple(t for pair in needles.TRAIN_HOPS for t in pair)
    assert not set(train_templates) & set(held.templates())
    for t in train_templates + train.noise:
        filled = t.format(**FIELDS)
        assert not leaks(filled), (t, leaks(filled))
    train_patterns = [template_pattern(t) for t in train_templates]
    for t in held.templates():
        filled = t.format(**FIELDS)
        assert not any(p.search(filled) for p in train_patterns), t
    for slot in ("name", "long"):
        assert set(held.keys[slot]) <= set(heldout.HELDOUT_KEY_KINDS)
        assert not set(train.keys[slot]) & set(heldout.HELDOUT_KEY_KINDS)
    for slot in ("short", "long"):
        assert set(held.values[slot]) <= set(heldout.HELDOUT_VALUE_FORMATS)
        assert not set(train.values[slot]) & set(heldout.HELDOUT_VALUE_FORMATS)
    assert not {n for v in train.nouns.values() for p in v for n in p} & set(HELDOUT_NOUNS)
    train_words = {w.lower() for vocab in (needles.TRAIN_ADJECTIVES, needles.TRAIN_NOUNS, needles.TRAIN_FIRST_NAMES,
                                           needles.TRAIN_LAST_NAMES, needles.TRAIN_CITIES, needles.TRAIN_SITES,
                                           needles.TRAIN_CODEWORDS, needles.TRAIN_VALUE_WORDS, needles.MONTHS,
                                           *needles.TRAIN_PATH_PARTS) for w in vocab}
    assert not train_words & HELDOUT_WORDS
    assert not set(train.noise) & set(held.noise)
    rng = random.Random(0)
    for kinds in train.values.values():  # no training value looks like a held-out format
        for kind in kinds:
            for _ in range(200):
                v = needles.VALUE_FORMATS[kind](rng)
                assert not any(p.search(v) for p in HELDOUT_FORMATS), (kind, v)
    for kinds in train.keys.values():
        for kind in kinds:
            for _ in range(200):
                assert not leaks(needles.KEY_KINDS[kind](rng)), kind
    assert not set(train.haystacks) & set(heldout.EVAL_ONLY_HAYSTACKS)
    assert set(held.haystacks) <= set(heldout.EVAL_ONLY_HAYSTACKS)
    assert all(hasattr(corpora, h) for h in train.haystacks)  # training haystacks are training corpora


def test_no_training_task_reads_the_eval_only_loaders() -> None:
    """Structurally: the training tasks' source names no eval-only loader (essays, fortunes, RULER's words or
    generator), and the training grammar's haystacks are tasks/corpora.py sources."""
    source = (SRC / "tasks" / "mix.py").read_text()
    for name in (*heldout.EVAL_ONLY_HAYSTACKS, "_essay_sentences", "word_lists", "_words(", "from .niah import",
                 "HELDOUT"):
        assert not re.search(rf"(?<!\w){re.escape(name)}", source), name
    trainer = (SRC / "train" / "trainer.py").read_text()
    assert "tasks.niah" not in trainer and "haystacks" not in trainer and "HELDOUT" not in trainer


def test_the_check_catches_planted_leaks(inline_corpora, monkeypatch) -> None:
    """The checks above can fail: RULER's samples, a held-out template, value format or key kind planted in the
    training grammar, and an eval-only haystack among training's, are each caught."""
    ruler = niah.make_sample("niah_single_2", 300, lambda s: len(s.split()), random.Random(0))
    assert any("RULER phrase" in x for x in leaks("\n".join(ruler.documents + [ruler.question])))
    assert set(inline_corpora) == {"paul_graham_essays", "word_lists"}  # the recorder sees the RULER generator
    inline_corpora.clear()

    def first_leaks(grammar: needles.Grammar) -> list[str]:
        monkeypatch.setattr(needles, "TRAIN", grammar)
        mixer = Mixer({"niah": 1.0}, count, doc_tokens=128, seed=2)
        return [x for text in draw_all(mixer, 30) for x in leaks(text)]

    base = needles.TRAIN
    plants = {
        "held-out template": base.__class__(**{**base.__dict__, "needles": heldout.HELDOUT_NEEDLES[:1]}),
        "held-out value format": base.__class__(**{**base.__dict__, "values": {"short": ("phone",),
                                                                               "long": ("serial",)},
                                                   "nouns": {**base.nouns, "phone": (("code", "codes"),),
                                                             "serial": (("code", "codes"),)}}),
        "held-out word": base.__class__(**{**base.__dict__, "keys": {"name": ("heldout_pair",), "long": ("uuid",)}}),
        "eval-only text": base.__class__(**{**base.__dict__, "haystacks": ("fortunes",)}),
    }
    for what, grammar in plants.items():
        assert any(x.startswith(what) for x in first_leaks(grammar)), what
    assert "fortunes" in inline_corpora


@pytest.mark.slow
def test_real_training_corpora_hold_no_eval_only_text() -> None:
    """With the real corpora: training NIAH and multihop questions hold no RULER wording or held-out template, their
    answers no held-out value format, and no sentence of the Paul Graham essays or the fortunes (the eval-only
    haystacks) turns up in them."""
    from memsparse.resources import ResourceUnavailable

    try:
        essays, fortunes = haystacks.paul_graham_essays(), haystacks.fortunes()
        mixer = Mixer({"niah": 1.0, "multihop": 1.0}, count, seed=7)
    except ResourceUnavailable as e:
        pytest.skip(f"a corpus is not reachable: {e}")
    rng = random.Random(0)
    eval_only = [s for s in rng.sample(haystacks.split_sentences(essays), 400) if len(s.split()) >= 12]
    eval_only += [c for c in rng.sample(fortunes, 400) if len(c.split()) >= 12]
    for i in range(40):
        q = mixer.draw(2048 + 512 * (i % 4))
        text = "\n".join(q.documents + [q.question])
        assert not [x for x in leaks(text) if x.startswith(("RULER", "held-out template"))], q.task
        assert not [p for p in HELDOUT_FORMATS if p.search(q.answer)], q.answer
        assert not [s for s in eval_only if s in text], q.task
