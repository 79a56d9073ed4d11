"""Reading questions that do not copy their passage (tasks/reading.py), on small inline passages."""

import random
import statistics

import pytest

from memsparse.resources import ResourceUnavailable
from memsparse.tasks import reading as r
from memsparse.tasks.corpora import Passage

SYNONYMS = {  # a stand-in for WordNet's: word -> synonyms
    "harbor": ["port"], "bridge": ["span"], "council": ["board"], "build": ["construct"], "river": ["stream"],
    "city": ["town"], "cost": ["price"], "open": ["unlock"], "school": ["academy"], "farmers": ["growers"],
    "railway": ["railroad"], "station": ["depot"], "water": ["liquid"], "storm": ["tempest"], "road": ["route"],
    "complete": ["finish"], "engineers": ["technicians"], "repair": ["mend"], "spring": ["springtime"],
    "library": ["archive"], "grain": ["cereal"], "market": ["bazaar"], "winter": ["wintertime"],
    "archive": ["repository"], "compress": ["pack"], "option": ["choice"], "command": ["instruction"],
    "directory": ["folder"], "error": ["mistake"], "message": ["notice"], "program": ["application"],
    "configuration": ["setup"], "service": ["daemon"], "restart": ["reboot"], "network": ["web"],
    "pipe": ["tube"], "house": ["home"], "fee": ["charge"], "hill": ["mound"], "board": ["panel"],
}
DOCS = {
    "town": [
        ("Harbor report", "In 1884, the city council voted to build a stone bridge across the river near the old "
                          "harbor. The bridge cost $240,000 and took three years to complete, and the engineers "
                          "praised the work of the masons from Ardmore."),
        ("Harbor report", "After the storm of 1891, the engineers had to repair the harbor wall and the road to the "
                          "railway station. The council spent $18,000 on that repair before the winter began."),
        ("Schools", "The first public school of the city opened in 1862 with 140 pupils and two teachers from "
                    "Kellsbridge. By 1870 the school had moved into a larger building beside the market."),
        ("Farming", "Farmers brought grain to the market every spring, and in good years more than 9,000 carts "
                    "crossed the bridge into the city. The railway later carried most of the grain to Dunmore."),
        ("Library", "The city library was founded in 1901 by a gift of 3,000 books from the family of Mary Alden. "
                    "Its reading room stayed open every evening through the winter for the farmers and workers."),
        ("Water", "Clean water came to the city in 1907, when the council finished a pipe from the hills above "
                  "Lake Orrin. The water board charged each house a small fee to pay for the pipe."),
    ],
    "manual": [
        ("tar", "The archive command can compress a directory into a single file, and the option that selects "
                "the compression method must come before the name of the archive. An error message is printed "
                "when the directory does not exist."),
        ("services", "Each network service reads its configuration when it starts, so after a change to the "
                     "configuration file the administrator must restart the service. The program named Vigil "
                     "restarts a service that stopped with an error."),
        ("services", "The configuration of the network service lives in a directory under the system folder, "
                     "and each program there has its own file. A service that fails three times in one minute is "
                     "not restarted again until the administrator asks for it."),
    ],
}
CORPORA = {name: [Passage(t, x, name) for t, x in docs] for name, docs in DOCS.items()}


def _words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def test_overlap_counts_copied_words() -> None:
    passage = DOCS["town"][0][1]
    assert r.overlap("Which council voted to build a stone bridge across the river?", passage)[0] == 1.0
    frac, n = r.overlap("Which board chose to construct a span over the stream?", passage)
    assert n == 5 and frac == pytest.approx(0.0)
    assert r.overlap("When did the councils vote?", passage)[0] == 1.0  # stems: councils ~ council, vote ~ voted


def test_reorder_moves_leading_clause() -> None:
    assert r.reorder("In 1884, the city council voted to build a bridge.") == \
        "The city council voted to build a bridge, in 1884"
    assert r.reorder("The council voted to build a bridge.") == "The council voted to build a bridge"


def test_spans_find_years_amounts_names_and_terms() -> None:
    sent = "The bridge cost $240,000 and took 3 years to complete, and the engineers praised the masons from Ardmore."
    found = {(kind, answer) for _, _, kind, answer in r.spans(sent, terms=False)}
    assert ("money", "$240,000") in found and ("count:years", "3") in found and ("name", "Ardmore") in found
    assert any(kind == "term" for _, _, kind, _ in r.spans(sent, terms=True))
    assert all(sent[a:b] == answer for a, b, _, answer in r.spans(sent, terms=True))


@pytest.mark.parametrize("kind", ["cloze", "rewrite", "paraphrase"])
def test_questions_are_well_formed_answerable_and_reworded(kind) -> None:
    rw, rng = r.Rewriter(SYNONYMS), random.Random(0)
    overlaps = []
    for i in range(120):
        _, passage = DOCS["town"][i % len(DOCS["town"])]
        asked = r.ask(kind, passage, rw, rng)
        if asked is None:  # no sentence of this passage rewords enough with the small synonym map
            continue
        q, answer = asked
        frac, n = r.overlap(q, passage)
        assert answer in passage and n >= 2 and 0 < frac <= r.OVERLAP_MAX
        assert answer.lower() not in q.lower()  # the question never gives its answer away
        if kind == "cloze":
            assert q.count("_____") == 1 and q.endswith(".")
        else:
            assert q.endswith("?") or kind == "paraphrase" and q.endswith(".")
        overlaps.append(frac)
    assert len(overlaps) >= 100 and statistics.mean(overlaps) < 0.5


def test_rewrite_fronts_the_wh_phrase() -> None:
    rw = r.Rewriter(SYNONYMS)
    sent = "In 1884, the city council voted to build a stone bridge across the river near the old harbor."
    span = next(s for s in r.spans(sent, terms=False) if s[2] == "year")
    seen = {r.wh_question(sent, span, rw, random.Random(seed)) for seed in range(40)}
    assert any(q.startswith("In which year was it that ") or q.startswith("In what year was it that ") for q in seen)
    assert all("1884" not in q for q in seen)
    assert any(q.endswith("; which year was that?") and "a certain year" in q for q in seen)


def test_reword_keeps_identifiers_and_names() -> None:
    rw = r.Rewriter({"name": ["call"], "open": ["unlock"], "bridge": ["span"]})
    out = rw.reword("Use os.open and resolve_name to open the Bridge file, then open it.", random.Random(1))
    assert "os.open" in out and "resolve_name" in out and "Bridge" in out and "unlock it" in out


def test_wordnet_synonyms_parse_dictd_entries() -> None:
    raw = ("treaty\n    n 1: a written agreement between two states or sovereigns [syn: {treaty},\n"
           "         {pact}, {accord}]\n    2: a second sense [syn: {compact}]\n")
    raw_verb = ("spend\n    v 1: pay out; \"spend money\" [syn: {spend}, {expend}, {drop}]\n"
                "    2: pass time in a specific way [syn: {spend}, {pass}]\n    3: use up [syn: {spend}]\n"
                "    n 1: a noun sense [syn: {spendings}]\n")
    syn = r.wordnet_synonyms([("treaty", raw), ("spend", raw_verb), ("Paris", raw)])
    assert syn == {"treaty": ["pact", "accord"], "spend": ["expend", "drop"]}


def test_hard_negatives_share_rare_words_and_document() -> None:
    passages = CORPORA["manual"] + CORPORA["town"]
    neg = r.HardNegatives([p.title for p in passages], [p.text for p in passages])
    assert neg.of(1)[0] == 2  # the next passage of the same document
    assert neg.of(0) and set(neg.of(0)) <= {1, 2}  # "archive" passage: only the manual shares its rare words


@pytest.mark.parametrize("kind", r.READING_TASKS)
def test_memory_holds_gold_and_same_corpus_negatives(kind) -> None:
    tasks = r.ReadingTasks(_words, random.Random(3), corpora=CORPORA, synonyms=SYNONYMS)
    for _ in range(30):
        q = tasks.draw(kind, 400)
        gold = [q.documents[i] for i in q.hops[0]]
        assert len(q.hops) == 1 and len(set(q.hops[0])) == len(q.hops[0]) >= 1
        for answer in q.answer.split("; "):
            assert any(answer in g.split("\n", 1)[1] for g in gold)
        source = next(name for name, ps in CORPORA.items() if any(g == f"{p.title}\n{p.text}" for p in ps
                                                                   for g in gold[:1]))
        corpus = {f"{p.title}\n{p.text}" for p in CORPORA[source]}
        assert set(q.documents) <= corpus and len(q.documents) == len(set(q.documents))
        frac, _ = r.overlap(q.question, "\n".join(gold))
        assert frac <= r.OVERLAP_MAX
    with pytest.raises(ValueError, match="unknown reading task"):
        tasks.draw("reading", 400)


@pytest.mark.slow
def test_real_corpora_questions_reword_their_passage() -> None:
    try:
        tasks = r.ReadingTasks(_words, random.Random(0))
    except ResourceUnavailable as e:
        pytest.skip(f"source unavailable: {e}")
    for kind in r.READING_TASKS:
        overlaps = []
        for _ in range(100):
            q = tasks.draw(kind, 3000)
            gold = "\n".join(q.documents[i] for i in q.hops[0])
            assert all(a in gold for a in q.answer.split("; "))
            overlaps.append(r.overlap(q.question, gold)[0])
        assert statistics.mean(overlaps) < 0.55, kind
