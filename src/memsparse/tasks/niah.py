"""RULER NIAH (NVIDIA/RULER ``scripts/data/synthetic/niah.py`` with the ``synthetic.yaml`` arguments) for a
document memory.

Faithful to RULER: the 8 subtasks and their arguments (``num_needle_k = max(k, q)``), the needle, template and
answer-prefix strings, the switch to singular grammar when ``num_needle_q * num_needle_v == 1``, key/value types
(7-digit numbers, ``adjective-noun`` words from the sorted unique set of wonderwords pairs, uuid4 from
``getrandbits(128)``), haystacks (the noise sentence repeated; Paul Graham essays, repeated when too short;
``needle`` lines with fresh random key/value), insertion (essay: depths sampled without replacement from 40 evenly
spaced depths, needle i before sentence ``int(n * (depth / 100))`` in sorted order; noise/needle: ``random.sample``
of line indices, inserted from the highest), the needle shuffle by a fixed-seed ``random.Random(seed)`` (a RULER
quirk: the same permutation every sample), query joining (``"k1, k2, k3, and k4"``) and ``string_match_all``.

Adaptation to a document memory (published decisions):

- **Documents.** The memory is RULER's context split into sentence-aligned (essay) or line-aligned (noise/needle)
  documents of at most ``doc_tokens`` tokens, packed greedily in order. A sentence/line is never split, so every
  needle is whole inside one document (only an essay sentence longer than ``doc_tokens`` is cut at words).
  ``" ".join(documents)`` (essay) or ``"\\n".join(documents)`` (noise/needle) is RULER's context. No document is empty.
- **Query.** The instruction (template preamble), question and answer prefix are not memory and do not count towards
  ``memory_tokens``; the instruction goes with the question.
- **Length.** RULER binary-searches the haystack unit count by tokenizing the whole prompt. Here each unit
  (sentence/line) is counted once, as ``count_tokens(sep + unit + sep) - count_tokens(sep)``, and the largest count
  whose total with the needles fits ``memory_tokens`` is taken: exact for additive counters (whitespace words),
  within about a token per document for BPE tokenizers. The essay haystack ends at a sentence boundary (RULER cuts
  at a word count).
- **Unambiguous gold.** Needle keys are distinct and ``needle``-haystack distractor lines never reuse a needle key
  (RULER does not check; with the real word list a clash is rare).
- Deterministic for a seed: all randomness comes from ``rng``.
"""

from __future__ import annotations

import bisect
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import haystacks

# subtask: (haystack, key type, value type, num_needle_k, num_needle_v, num_needle_q), as in synthetic.yaml
CONFIGS = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
}
SUBTASKS = tuple(CONFIGS)
LINE_BATCH = 512  # needle-haystack distractor lines drawn and counted at a time
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]
RANDOM_SEED = 42


@dataclass
class NiahSample:
    subtask: str
    documents: list[str]  # the memory: haystack with needles, split into documents
    question: str  # RULER's query sentence
    instruction: str  # RULER's preamble, kept apart from the memory
    answers: list[str]  # references for string_match_all
    gold: list[int]  # indices of the documents holding the queried needles
    answer_prefix: str


class _Words:
    """RULER's key words ``sorted(set(f"{adj}-{noun}"))`` (about 6.2M), indexed without building the list.

    Adjectives are grouped by ``adj + "-"`` prefix chains (e.g. ``high-`` and ``high-pitched-``); a group of one
    adjective is a lazy block ``adj-`` + sorted nouns, a larger group is materialized sorted. Groups in sorted order
    of their roots concatenate to the sorted list."""

    def __init__(self, adjectives: list[str], nouns: list[str]):
        self.nouns = sorted(set(nouns))
        groups: list[list[str]] = []
        for key in sorted({a + "-" for a in adjectives}):
            if groups and key.startswith(groups[-1][0]):
                groups[-1].append(key)
            else:
                groups.append([key])
        self.blocks, self.starts, self.size = [], [], 0
        for g in groups:
            block = g[0] if len(g) == 1 else sorted({k + n for k in g for n in self.nouns})
            self.blocks.append(block)
            self.starts.append(self.size)
            self.size += len(self.nouns) if len(g) == 1 else len(block)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> str:
        b = bisect.bisect_right(self.starts, i) - 1
        block, j = self.blocks[b], i - self.starts[b]
        return block + self.nouns[j] if isinstance(block, str) else block[j]


_TEXT: dict = {}  # haystack loader -> sentences or words (keyed by the loader so a replaced loader reloads)


def _essay_sentences() -> list[str]:
    load = haystacks.paul_graham_essays
    if load not in _TEXT:
        _TEXT[load] = haystacks.split_sentences(load())
    return _TEXT[load]


def _words() -> _Words:
    load = haystacks.word_lists
    if load not in _TEXT:
        _TEXT[load] = _Words(*load())
    return _TEXT[load]


def _draw(kind: str, rng: random.Random, words) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(words)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _essay_fit(sents: list[str], cum: list[int], costs, budget: int) -> int:
    """Largest sentence count (the corpus repeated) whose cost fits ``budget``; extends the cumulative costs ``cum``
    lazily (``costs``: of a list of units)."""
    while len(cum) < len(sents) and (not cum or cum[-1] <= budget):
        for c in costs(sents[len(cum) : len(cum) + 256]):
            cum.append((cum[-1] if cum else 0) + c)
    if len(cum) == len(sents) and cum[-1] <= budget:
        if cum[-1] <= 0:
            raise ValueError("the essay haystack counts no tokens")
        q, r = divmod(budget, cum[-1])
        return q * len(sents) + bisect.bisect_right(cum, r)
    return bisect.bisect_right(cum, budget)


def _cut(text: str, cost, limit: int) -> list[tuple[str, int]]:
    """Cut an over-long haystack sentence at spaces into pieces of at most ``limit`` tokens."""
    out, cur, size = [], [], 0
    for w in text.split(" "):
        c = cost(w)
        if cur and size + c > limit:
            out.append((" ".join(cur), size))
            cur, size = [], 0
        cur.append(w)
        size += c
    return out + [(" ".join(cur), size)]


def _prompt(type_v: str, query: str, singular: bool) -> tuple[str, str, str]:
    """(instruction, question, answer prefix) of RULER's template, with its singular grammar switch."""
    tmpl = TEMPLATE + ANSWER_PREFIX
    if singular:
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            tmpl = tmpl.replace(a, b)
        type_v = type_v[:-1]
    instruction, rest = tmpl.split("\n{context}\n")
    question, prefix = rest.split("?", 1)
    return tuple(t.format(type_needle_v=type_v, query=query) for t in (instruction, question + "?", prefix))


def make_sample(subtask: str, memory_tokens: int, count_tokens: Callable[[str], int], rng: random.Random,
                doc_tokens: int = 512, haystack_cache: dict | None = None, *,
                shuffle_seed: int = RANDOM_SEED) -> NiahSample:
    """One RULER sample whose memory holds about ``memory_tokens`` tokens (see the module docstring).

    ``haystack_cache``: a dict reused across calls to keep per-sentence token counts (``generate`` passes one).
    ``shuffle_seed``: RULER's ``random_seed``, which seeds the fixed needle shuffle."""
    hay, type_k, type_v, num_k, num_v, num_q = CONFIGS[subtask]
    num_k = max(num_k, num_q)
    cache = {} if haystack_cache is None else haystack_cache
    words = _words() if "words" in (type_k, type_v) else None
    sep = " " if hay == "essay" else "\n"
    base = count_tokens(sep)

    many = getattr(count_tokens, "many", None) or (lambda texts: [count_tokens(t) for t in texts])

    def costs(units: list[str]) -> list[int]:  # marginal tokens of units between separators (BPE may merge ".\n")
        return [c - base for c in many([sep + s + sep for s in units])] if units else []

    def cost(s: str) -> int:
        return costs([s])[0]

    keys, values, needles = [], [], []
    for k in range(num_k):
        key = _draw(type_k, rng, words)
        while key in keys:
            key = _draw(type_k, rng, words)
        keys.append(key)
        values.append([])
        for _ in range(num_v):
            values[-1].append(_draw(type_v, rng, words))
            text = NEEDLE.format(type_needle_v=type_v, key=key, value=values[-1][-1])
            needles.append((text, cost(text), k))
    random.Random(shuffle_seed).shuffle(needles)
    if max(c for _, c, _ in needles) > doc_tokens:
        raise ValueError(f"doc_tokens={doc_tokens} is too small for a needle")
    budget = memory_tokens - sum(c for _, c, _ in needles)

    if hay == "essay":
        sents = _essay_sentences()
        cum = cache.setdefault(("essay", haystacks.paul_graham_essays, count_tokens), [])
        n = _essay_fit(sents, cum, costs, budget)
        if n < 1:
            raise ValueError(f"memory_tokens={memory_tokens} is too small for {subtask}")
        depths = sorted(int(n * (d / 100)) for d in rng.sample(DEPTHS, len(needles)))
        units, prev = [], 0
        for pos, needle in zip(depths + [n], needles + [None]):
            for i in range(prev, pos):
                j = i % len(sents)
                units.append((sents[j], cum[j] - (cum[j - 1] if j else 0), -1))
            units += [needle] if needle else []
            prev = pos
    else:
        if hay == "noise":
            c = cost(NOISE)
            units = [(NOISE, c, -1)] * max(0, budget // c)
        else:
            def line() -> str:  # a distractor needle line with a fresh key
                key = _draw(type_k, rng, words)
                while key in keys:
                    key = _draw(type_k, rng, words)
                return NEEDLE.format(type_needle_v=type_v, key=key, value=_draw(type_v, rng, words))

            # lines are drawn and counted in batches; the line that overflows the budget is the last one drawn, as
            # when drawing one by one (the random stream is replayed up to it)
            units, used, full = [], 0, False
            while not full:
                state = rng.getstate()
                lines = [line() for _ in range(LINE_BATCH)]
                for j, (text, c) in enumerate(zip(lines, costs(lines))):
                    if used + c > budget:
                        rng.setstate(state)
                        for _ in range(j + 1):
                            line()
                        full = True
                        break
                    units.append((text, c, -1))
                    used += c
        scatter_needles(units, needles, rng, f"memory_tokens={memory_tokens} is too small for {subtask}")

    indices = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in indices]
    answers = [a for i in indices for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    instruction, question, prefix = _prompt(type_v, query, num_q * num_v == 1)

    docs, gold = pack_documents(units, sep, doc_tokens, cost, set(indices))
    return NiahSample(subtask, docs, question, instruction, answers, gold, prefix)


def scatter_needles(units: list, needles: list, rng: random.Random, too_small: str) -> None:
    """Insert the needles among the haystack's line units at random distinct places (RULER's order of draws);
    `too_small` is the error when there are fewer units than needles."""
    if len(units) < len(needles):
        raise ValueError(too_small)
    for index, needle in zip(sorted(rng.sample(range(len(units)), len(needles)), reverse=True), needles):
        units.insert(index, needle)


def pack_documents(units: list[tuple[str, int, int]], sep: str, doc_tokens: int, cost,
                   asked: set[int]) -> tuple[list[str], list[int]]:
    """(documents, gold): units (text, tokens, needle key index or -1) packed greedily in order into documents of at
    most ``doc_tokens`` tokens joined by ``sep`` (a unit longer than that cut at spaces, ``cost`` counting a piece);
    gold: the sorted indices of the documents holding a needle of a key in ``asked``."""
    docs, gold, cur, size = [], set(), [], 0
    for text, c, k in units:
        pieces = _cut(text, cost, doc_tokens) if c > doc_tokens else [(text, c)]
        for piece, pc in pieces:
            if cur and size + pc > doc_tokens:
                docs.append(sep.join(cur))
                cur, size = [], 0
            cur.append(piece)
            size += pc
            if k in asked:
                gold.add(len(docs))
    docs.append(sep.join(cur))
    return docs, sorted(gold)


def generate(subtask: str, n: int, memory_tokens: int, count_tokens: Callable[[str], int], seed: int = RANDOM_SEED,
             doc_tokens: int = 512) -> list[NiahSample]:
    """``n`` samples of ``subtask`` from ``random.Random(seed)`` (RULER: ``random_seed=42``)."""
    rng, cache = random.Random(seed), {}
    return [make_sample(subtask, memory_tokens, count_tokens, rng, doc_tokens, cache, shuffle_seed=seed)
            for _ in range(n)]


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's metric for one sample: the fraction of ``answers`` found case-insensitively in the prediction
    (stripped, control characters mapped to newlines first)."""
    pred = re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip().lower()
    return sum(a.lower() in pred for a in answers) / len(answers)
