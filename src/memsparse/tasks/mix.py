"""Training questions from every task, as (memory documents, question, documents to name, answer).

- `niah`: needle-in-a-haystack samples in the training grammar (needles.py `TRAIN`: templated needles, questions,
  key kinds and value formats over training corpora), all 8 RULER subtask shapes (equally often, or with the
  `niah_subtasks` weights); the model names the documents holding the queried needles and answers with the values.
  RULER itself (niah.py: its wording, the Paul Graham essays) is evaluation only (heldout.py).
- `faq`: human-written FAQ pairs of the packages of `faqs.FAQ_PACKAGES` (docs/training-data.md), or of those a
  recipe names in `faq_packages` (packages `eval qa` asks, `heldout.EVAL_ONLY_FAQ_PACKAGES`, are never read): the
  memory holds the answer passage among distractors from the same package (its other FAQ answers and its
  documentation); the model names it and answers with its first sentence. The last `FAQ_HELD_OUT` Python FAQ
  questions are never trained on (the demo uses them).
- `cloze`, `rewrite`, `paraphrase`, `twofacts`: reading questions over real text that do not copy the passage's
  words, with hard negatives from the same corpus (reading.py says which corpora and how).
- `retrieval` (generative-retrieval pre-training): State of the Union passages; the question quotes a span of
  one passage, the model names it and answers with its title (the first line of the document).
- `reading` (short extractive answers): State of the Union passages; one sentence of a passage becomes a question by
  putting a wh-phrase in place of a year ("what year"), an amount ("how many <unit>", "how much"), a number or a
  capitalised name ("what"); the model names the passage and answers with the replaced words, as SQuAD asks.
- `handbook`: `retrieval` over the Debian Administrator's Handbook's passages (Debian `debian-handbook`); the answer
  is the passage's section title.
- `definitions` (generative retrieval on headwords): dictionary pages (FOLDOC and WordNet entries packed in
  headword order, about `PAGE_WORDS` words each, one entry a line); the question asks what a headword means (the
  model names its page and answers with the definition's first sentence) or which headword a definition quotes
  (answer: the headword). Half the distractors are the neighbouring pages, whose headwords share words with it.
- `webster`: `definitions` over GCIDE (Webster's 1913 with additions, Debian `dict-gcide`) pages.
- `multihop`: two-hop chains in passages of training corpora (State of the Union, the Debian handbook; one
  sentence a line). `MULTIHOP_CHAINS` chains, a link sentence ("The {key} leads to the {link}.", needles.py
  `TRAIN_HOPS`) and a value sentence (a training needle template with the link as its key), are hidden in distinct
  passages; the question names one key, so only the passage holding its link sentence shares words with it: the
  passage with the value is found from the injected link sentence (a second Memory Interleave round). Keys and
  links are training adjective-noun pairs, values a training value format. `eval multihop` asks the same way in
  RULER's wording over the essays (`hidden_chains`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from .heldout import EVAL_ONLY_FAQ_LAST
from .reading import READING_TASKS

TASKS = ("niah", "faq", "retrieval", "handbook", "reading", "definitions", "webster", "multihop", *READING_TASKS)
FAQ_HELD_OUT = EVAL_ONLY_FAQ_LAST["python3.11-doc"]
MULTIHOP_CHAINS = 4
MULTIHOP_CORPORA = ("sotu", "debian_handbook")  # tasks/corpora.py sources of the multihop passages
PASSAGE_WORDS = 250  # passages of about 330 tokens, room left for a needle within doc_tokens=512
PAGE_WORDS = 200  # dictionary pages
NEIGHBOUR_PAGES = 8  # hard negatives on each side of the gold page
# the spans `reading` asks for: a year, a number with its unit, a money amount, or a capitalised name inside a sentence
_NUMBER = r"\d+(?:[,.]\d+)*(?![\w/]|\s\d+/)(?:\s(?:million|billion|thousand)\b)?"
_SPAN = re.compile(r"(?<![\w/$.,])(?:(?P<year>1[6-9]\d\d|20\d\d)(?![\w/,.]\w)"
                   rf"|(?P<count>{_NUMBER})(?P<unit>\s(?:[a-z]+s|people|men|women|children)\b)?)"
                   rf"|(?P<money>\$\s?{_NUMBER})"
                   r"|(?<=[a-z,] )(?P<name>[A-Z][a-z]+(?:\s(?:of\s(?:the\s)?)?[A-Z][a-z]+)*)")


@dataclass
class Question:
    documents: list[str]
    question: str
    hops: list[list[int]]  # document indices named in each retrieval round
    answer: str
    task: str


class Pool:
    """Documents with their token counts, to fill a memory of a given size with distractors."""

    def __init__(self, texts: list[str], count_tokens: Callable[[list[str]], list[int]]):
        self.texts = texts
        self.tokens = count_tokens(texts)

    def fill(self, rng: random.Random, memory_tokens: int, exclude: set[int]) -> list[int]:
        out, total = [], 0
        while total < memory_tokens and len(exclude) < len(self.texts):  # exclude grows with out
            i = rng.randrange(len(self.texts))
            if i not in exclude:
                exclude.add(i)
                out.append(i)
                total += self.tokens[i] + 8
        return out


def _place(rng: random.Random, gold: list[str], distractors: list[str]) -> tuple[list[str], list[int]]:
    docs = list(distractors)
    where = []
    for g in gold:
        k = rng.randint(0, len(docs))
        docs.insert(k, g)
        where = [w + (w >= k) for w in where] + [k]
    return docs, where


def first_sentence(text: str, max_words: int = 40) -> str:
    s = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]
    words = s.split()
    return " ".join(words[:max_words])


class Mixer:
    """Draws training questions from the enabled tasks with the given weights."""

    def __init__(self, weights: dict[str, float], count_tokens: Callable[[list[str]], list[int]],
                 doc_tokens: int = 512, seed: int = 0, niah_subtasks: dict[str, float] | None = None,
                 faq_packages: list[str] | None = None):
        from .needles import SUBTASKS

        self.weights = {k: v for k, v in weights.items() if v > 0}
        if set(self.weights) - set(TASKS):
            raise ValueError(f"unknown tasks {sorted(set(self.weights) - set(TASKS))}; known: {', '.join(TASKS)}")
        unknown = set(niah_subtasks or {}) - set(SUBTASKS)
        if unknown:
            raise ValueError(f"unknown NIAH subtasks {sorted(unknown)}; known: {', '.join(SUBTASKS)}")
        self.subtasks = {k: v for k, v in (niah_subtasks or dict.fromkeys(SUBTASKS, 1.0)).items() if v > 0}
        from ..model.tokenizer import TokenCounter

        self.count = TokenCounter(count_tokens)  # one object: it keys the haystack cache below
        self.doc_tokens = doc_tokens
        self.rng = random.Random(seed)
        self.pools: dict[str, Pool] = {}
        self._niah_cache: dict = {}  # haystack passages and their per-sentence token counts, kept across samples
        if "faq" in self.weights:
            from .faqs import faq_documents, training_faq_packages, training_faq_pairs

            self.faq_pairs = []  # (package, question, answer)
            for pkg in training_faq_packages(faq_packages):
                pairs = training_faq_pairs(pkg)
                self.faq_pairs += [(pkg, q, a) for q, a in pairs]
                self.pools[f"faq:{pkg}"] = Pool([p.text for p in faq_documents(pkg)] + [a for _, a in pairs],
                                                count_tokens)
        if set(READING_TASKS) & set(self.weights):
            from .reading import ReadingTasks

            self.reading_tasks = ReadingTasks(count_tokens, self.rng)
        if {"retrieval", "reading"} & set(self.weights):
            from .corpora import sotu

            self.pools["sotu"] = Pool([f"{p.title}\n{p.text}" for p in sotu()], count_tokens)
        if "multihop" in self.weights:
            from . import corpora

            texts = [p.text for name in MULTIHOP_CORPORA for p in getattr(corpora, name)()]
            self.pools["multihop"] = Pool(line_passages(texts), count_tokens)
        if "handbook" in self.weights:
            from .corpora import debian_handbook

            self.pools["handbook"] = Pool([f"{p.title}\n{p.text}" for p in debian_handbook()], count_tokens)
        self.page_entries: dict[str, list[list[tuple[str, str, bool]]]] = {}  # per dictionary task, as its pool
        from . import corpora

        for task in [t for t in ("definitions", "webster") if t in self.weights]:
            pages, self.page_entries[task] = _dictionary_pages(getattr(corpora, task)())
            self.pools[task] = Pool(pages, count_tokens)

    def pick_task(self) -> str:
        """One of the enabled tasks, drawn by the weights."""
        return self.rng.choices(list(self.weights), list(self.weights.values()))[0]

    def draw(self, memory_tokens: int, task: str | None = None) -> Question:
        """A question of `task` (default: one drawn by the weights) over about `memory_tokens` of documents."""
        if task is not None and task not in self.weights:
            raise ValueError(f"task {task!r} is not in the mix ({', '.join(self.weights)})")
        return getattr(self, task or self.pick_task())(memory_tokens)

    def niah(self, memory_tokens: int) -> Question:
        from .needles import TRAIN, make_sample

        sub = self.rng.choices(list(self.subtasks), list(self.subtasks.values()))[0]
        s = make_sample(sub, memory_tokens, self.count, self.rng, doc_tokens=self.doc_tokens,
                        haystack_cache=self._niah_cache, grammar=TRAIN)
        return Question(s.documents, s.question, [sorted(s.gold)], ", ".join(s.answers), f"niah:{sub}")

    def faq(self, memory_tokens: int) -> Question:
        pkg, q, a = self.rng.choice(self.faq_pairs)
        pool = self.pools[f"faq:{pkg}"]
        gold = pool.texts.index(a)
        others = pool.fill(self.rng, memory_tokens - pool.tokens[gold], {gold})
        docs, where = _place(self.rng, [a], [pool.texts[i] for i in others])
        return Question(docs, q, [where], first_sentence(a), "faq")

    def cloze(self, memory_tokens: int) -> Question:
        return self.reading_tasks.draw("cloze", memory_tokens)

    def rewrite(self, memory_tokens: int) -> Question:
        return self.reading_tasks.draw("rewrite", memory_tokens)

    def paraphrase(self, memory_tokens: int) -> Question:
        return self.reading_tasks.draw("paraphrase", memory_tokens)

    def twofacts(self, memory_tokens: int) -> Question:
        return self.reading_tasks.draw("twofacts", memory_tokens)

    def retrieval(self, memory_tokens: int) -> Question:
        return self._quoted("sotu", memory_tokens, "retrieval")

    def handbook(self, memory_tokens: int) -> Question:
        return self._quoted("handbook", memory_tokens, "handbook")

    def _quoted(self, source: str, memory_tokens: int, task: str) -> Question:
        """Which titled passage of `source` holds a quoted span of 8-20 words (answer: its title)."""
        pool = self.pools[source]
        gold = self.rng.randrange(len(pool.texts))
        title, body = pool.texts[gold].split("\n", 1)
        words = body.split()
        n = min(len(words), self.rng.randint(8, 20))
        start = self.rng.randint(0, len(words) - n)
        question = f"Which document contains the passage \"{' '.join(words[start:start + n])}\"?"
        others = pool.fill(self.rng, memory_tokens - pool.tokens[gold], {gold})
        docs, where = _place(self.rng, [pool.texts[gold]], [pool.texts[i] for i in others])
        return Question(docs, question, [where], title, task)

    def reading(self, memory_tokens: int) -> Question:
        pool = self.pools["sotu"]
        for _ in range(1000):  # about 9 passages in 10 have a sentence with a span
            gold = self.rng.randrange(len(pool.texts))
            asked = reading_question(pool.texts[gold].split("\n", 1)[1], self.rng)
            if asked:
                break
        else:
            raise ValueError("reading: no passage has a sentence with a year, amount, number or name to ask about")
        others = pool.fill(self.rng, memory_tokens - pool.tokens[gold], {gold})
        docs, where = _place(self.rng, [pool.texts[gold]], [pool.texts[i] for i in others])
        return Question(docs, asked[0], [where], asked[1], "reading")

    def definitions(self, memory_tokens: int) -> Question:
        return self._headword("definitions", memory_tokens)

    def webster(self, memory_tokens: int) -> Question:
        return self._headword("webster", memory_tokens)

    def _headword(self, task: str, memory_tokens: int) -> Question:
        """What a headword of the `task` dictionary pages means, or which headword a quoted definition defines."""
        pool = self.pools[task]
        gold = self.rng.randrange(len(pool.texts))
        head, text, unique = self.rng.choice(self.page_entries[task][gold])
        if unique and self.rng.random() < 0.5:
            words = text.split()
            n = min(len(words), self.rng.randint(6, 14))
            start = self.rng.randint(0, len(words) - n)
            question, answer = f"Which word is defined as \"{' '.join(words[start:start + n])}\"?", head
        else:  # a headword listed twice on the page (GCIDE's noun and verb): its first entry, as a dictionary reads
            first = next(t for h, t, _ in self.page_entries[task][gold] if h == head)
            question, answer = f"What does \"{head}\" mean?", gist(first)
        near = [i for d in range(1, NEIGHBOUR_PAGES + 1) for i in (gold - d, gold + d) if 0 <= i < len(pool.texts)]
        picked, total = [], pool.tokens[gold]
        for i in near:  # hard negatives first, up to half the memory
            if total + pool.tokens[i] > memory_tokens // 2:
                break
            picked.append(i)
            total += pool.tokens[i] + 8
        picked += pool.fill(self.rng, memory_tokens - total, {gold, *picked})
        line = f"\n{head}: "  # the same headword in another dictionary would make the question ambiguous
        picked = [i for i in picked if line not in "\n" + pool.texts[i]]
        docs, where = _place(self.rng, [pool.texts[gold]], [pool.texts[i] for i in picked])
        return Question(docs, question, [where], answer, task)

    def multihop(self, memory_tokens: int) -> Question:
        from .needles import train_hops

        links, values_said, question, keys, values = train_hops(self.rng, MULTIHOP_CHAINS)
        return hidden_chains(self.rng, self.pools["multihop"], self.count.many, memory_tokens, links, values_said,
                             question, keys, values)


def hidden_chains(rng: random.Random, pool: Pool, count_many: Callable[[list[str]], list[int]], memory_tokens: int,
                  links: list[str], values_said: list[str], question: str, keys: list[str],
                  values: list[str]) -> Question:
    """A two-hop question: the link and value sentences of each chain hidden in distinct passages of `pool` (one
    sentence a line) filling about `memory_tokens`; `question` ({key}) asks about a random chain's key."""
    needles = links + values_said
    room = memory_tokens - sum(count_many(needles))
    picked = pool.fill(rng, room, set())
    if len(picked) < len(needles):
        raise ValueError(f"memory_tokens={memory_tokens} is too small for {len(needles)} multihop passages")
    if len(picked) == len(pool.texts) and sum(pool.tokens) + 8 * len(picked) < room:
        raise ValueError(f"memory_tokens={memory_tokens} is more than the passages hold ({sum(pool.tokens)} tokens)")
    docs = [pool.texts[i] for i in picked]
    hosts = rng.sample(range(len(docs)), len(needles))  # one needle per passage
    for h, needle in zip(hosts, needles):
        sents = docs[h].split("\n")
        sents.insert(rng.randint(0, len(sents)), needle)
        docs[h] = "\n".join(sents)
    q, chains = rng.randrange(len(links)), len(links)
    return Question(docs, question.format(key=keys[q]), [[hosts[q]], [hosts[chains + q]]], values[q], "multihop")


_SENSE_MARK = re.compile(r"^(?:<[^>]*>\s*|(?:n|v|adj|adv)\s+1:\s*)")  # FOLDOC's <category>, WordNet's "n 1:"
_NEXT_SENSE = re.compile(r"\s\d+:\s|;\s")  # WordNet: the next sense, or the examples after the gloss


def gist(definition: str) -> str:
    """The first sentence of a dictionary definition's first sense, without its category or sense mark."""
    return first_sentence(_NEXT_SENSE.split(_SENSE_MARK.sub("", definition), maxsplit=1)[0])


def reading_question(text: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) from one sentence of `text` (10-45 words) with a year, amount, number or name in it
    replaced by a wh-phrase; None when no sentence has one."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if 10 <= len(s.split()) <= 45]
    rng.shuffle(sentences)
    for sent in sentences:
        spans = [m for m in _SPAN.finditer(sent) if m.start() > 0]
        if not spans:
            continue
        numbers = [m for m in spans if not m["name"]]
        m = rng.choice(numbers if numbers and rng.random() < 0.5 else spans)  # names alone would be most questions
        if m["year"]:
            wh, answer = "what year", m["year"]
        elif m["money"]:
            wh, answer = "how much", m["money"]
        elif m["count"]:
            wh, answer = (f"how many{m['unit']}", m["count"]) if m["unit"] else ("what number", m["count"])
        else:
            wh, answer = "what", m["name"]
        question = (sent[:m.start()] + wh + sent[m.end():]).rstrip(" .!?;:,")
        return question[0].upper() + question[1:] + "?", answer.rstrip(".,")
    return None


def line_passages(texts: list[str]) -> list[str]:
    """The texts' sentences packed in order into passages of about `PASSAGE_WORDS` words, one sentence a line."""
    from .haystacks import split_sentences

    out, cur, size = [], [], 0
    for s in (s for t in texts for s in split_sentences(" ".join(t.split()))):
        n = len(s.split())
        if cur and size + n > PASSAGE_WORDS:
            out.append("\n".join(cur))
            cur, size = [], 0
        cur.append(s)
        size += n
    return out + (["\n".join(cur)] if cur else [])


def _dictionary_pages(entries: list) -> tuple[list[str], list[list[tuple[str, str, bool]]]]:
    """Dictionary entries (`corpora.Passage`: headword, definition, dictionary) packed in order into pages of about
    `PAGE_WORDS` words, one `headword: definition` a line (a page never mixes dictionaries); per page its entries as
    (headword, definition, whether a quote of the definition can identify it: the definition is unique in the corpus
    and no headword repeats on the page)."""
    from collections import Counter

    from .corpora import n_words

    entries = [e for e in entries if gist(e.text)]  # an answer to "what does X mean" is needed
    seen = Counter(e.text for e in entries)
    pages, page_entries, cur, size, source = [], [], [], 0, None
    for e in entries + [None]:
        n = n_words(e.text) + n_words(e.title) if e else 0
        if cur and (e is None or e.source != source or size + n > PAGE_WORDS):
            heads = {h.lower() for h, _ in cur}
            pages.append("\n".join(f"{h}: {t}" for h, t in cur))
            page_entries.append([(h, t, seen[t] == 1 and len(heads) == len(cur)) for h, t in cur])
            cur, size = [], 0
        if e is not None:
            cur.append((e.title, e.text))
            size, source = size + n, e.source
    return pages, page_entries
