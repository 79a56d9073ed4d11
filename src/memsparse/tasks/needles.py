"""Needle-in-a-haystack samples composed from a grammar: training's (`TRAIN`) and the held-out one (`HELDOUT`).

The 8 subtask shapes are RULER's (niah.py `CONFIGS`, same names, so recipes' `niah_subtasks` weights still apply):
single needle over a filler (`noise`) or real text, multikey (4 needles, 1 asked; or every filler line a needle of
the same template), multivalue (4 values for one key) and multiquery (4 keys asked). What RULER fixes, a grammar
draws per sample:

- the needle sentence, the question, the answer prefix and the instruction, from template lists (one needle
  template per sample, shared by its distractor lines, as RULER's single template is);
- the key kind (adjective-noun pairs, person names, sites, projects, file paths; uuids for multikey_3's keys) and
  the value format (7-digit numbers, dates, short codes, words, phrases; uuids or hex digests for the long slot),
  each value format with its own names ("access code", "deadline", ...) that the sentences use;
- the haystack: a run of consecutive passages from a random start in one of the grammar's corpora, split into
  sentences (training: State of the Union, Python docs, Debian handbook, FOLDOC/WordNet, GCIDE; held out: Debian
  fortunes), or a few filler sentences repeated.

`HELDOUT` draws only from tasks/heldout.py (templates, key kinds, value formats, vocabularies, haystack), all
disjoint from `TRAIN`; evaluation (`eval niah --heldout`) uses it, training never does. Documents, lengths, depths
and gold follow niah.py (its module docstring); `answer_prefix` and `instruction` are composed but, as for RULER,
the engine is asked the question alone. Deterministic for a seed: all randomness comes from ``rng``.
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from . import heldout
from .niah import CONFIGS, DEPTHS, NiahSample, pack_documents, scatter_needles

# subtask: (haystack, key slot, value slot, num_needle_k, num_needle_v, num_needle_q): RULER's shapes (niah.CONFIGS)
# with its haystacks and key / value types mapped to this generator's kinds
_HAYSTACK = {"noise": "noise", "essay": "text", "needle": "needle"}
_SLOT = {"words": "name", "numbers": "short", "uuids": "long"}
SHAPES = {name: (_HAYSTACK[hay], _SLOT[key], _SLOT[value], nk, nv, nq)
          for name, (hay, key, value, nk, nv, nq) in CONFIGS.items()}
SUBTASKS = tuple(SHAPES)
NOISE_SENTENCES = 4  # filler sentences per noise line
LINE_BATCH = 256  # needle-haystack distractor lines drawn and counted at a time

# --- training grammar ---------------------------------------------------------------------------------------------

TRAIN_NEEDLES: tuple[str, ...] = (
    "The {noun} for {key} is {value}.",
    "{key}'s {noun}: {value}.",
    "Remember: the {noun} of {key} reads {value}.",
    "Note that {key} has the {noun} {value}.",
    "For {key}, the {noun} is {value}.",
    "Keep this in mind: {key} goes with the {noun} {value}.",
    "The {noun} that belongs to {key} is {value}.",
    "Important: use {value} as the {noun} for {key}.",
    "Write it down, the {noun} of {key} is {value}.",
    "In case you need it, {key} uses {value} as its {noun}.",
    "{key} -> {noun} {value}.",
    "Someone set the {noun} for {key} to {value}.",
)
TRAIN_QUESTIONS: tuple[str, ...] = (
    "What is the {noun} for {key}?",
    "Which {noun} belongs to {key}?",
    "What did the text give as the {noun} of {key}?",
    "What {noun} does {key} use?",
    "Find the {noun} of {key}.",
    "Which {noun} was mentioned for {key}?",
    "What is {key}'s {noun}?",
    "I need the {noun} for {key}. What is it?",
)
TRAIN_QUESTIONS_MANY: tuple[str, ...] = (
    "What are all the {nouns} for {query}?",
    "List every {noun} given for {query}.",
    "Which {nouns} belong to {query}?",
    "What {nouns} did the text give for {query}?",
    "Name all {nouns} of {query}.",
)
TRAIN_PREFIXES: tuple[str, ...] = ("The {noun} for {key} is", "Answer:", "{key}'s {noun} is", "It is")
TRAIN_PREFIXES_MANY: tuple[str, ...] = ("The {nouns} for {query} are", "Answer:", "They are")
TRAIN_INSTRUCTIONS: tuple[str, ...] = (
    "Some {nouns} are hidden in the text below. Remember them; questions about them follow.",
    "Read the following text carefully: it contains {nouns} you will be asked for.",
    "The passages below hide a few {nouns}.",
    "Memorize every {noun} in the text that follows.",
)
TRAIN_NOISE: tuple[str, ...] = (
    "The river runs east.", "Snow falls on the hills.", "The bakery opens early.", "A dog barks twice.",
    "The clock tower chimes.", "Leaves drift down the lane.", "The train is on time.", "Bread cools on the sill.",
    "The market is busy today.", "Rain taps on the roof.", "A cat sleeps by the stove.", "The road bends left.",
    "Bells ring in the valley.", "The lamp stays on all night.", "Children play in the park.", "Wind moves the reeds.",
)
# two-hop chains (Mixer.multihop): link sentence and question, paired; the value sentence is a needle template
TRAIN_HOPS: tuple[tuple[str, str], ...] = (
    ("The {key} leads to the {link}.", "What is the {noun} of the place that the {key} leads to?"),
    ("The {key} points to the {link}.", "Which {noun} belongs to what the {key} points to?"),
    ("From the {key}, continue to the {link}.", "Continue from the {key}: what is the {noun} there?"),
    ("The {key} opens onto the {link}.", "What {noun} does the place behind the {key} have?"),
)
TRAIN_KEY_KINDS: tuple[str, ...] = ("pair", "person", "site", "project", "path", "uuid")
TRAIN_VALUE_FORMATS: tuple[str, ...] = ("number", "date", "code", "word", "phrase", "uuid", "hex")
TRAIN_VALUE_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "number": (("access code", "access codes"), ("account number", "account numbers"),
               ("ticket number", "ticket numbers")),
    "date": (("deadline", "deadlines"), ("renewal date", "renewal dates"), ("launch date", "launch dates")),
    "code": (("voucher code", "voucher codes"), ("booking reference", "booking references")),
    "word": (("password", "passwords"), ("codeword", "codewords")),
    "phrase": (("passphrase", "passphrases"), ("motto", "mottos")),
    "uuid": (("identifier", "identifiers"), ("record ID", "record IDs"), ("token", "tokens")),
    "hex": (("checksum", "checksums"), ("fingerprint", "fingerprints")),
}
TRAIN_ADJECTIVES: tuple[str, ...] = tuple(
    "amber ancient bitter bold brave bright calm clever crimson curious dark eager early fancy fierce gentle golden "
    "grand green happy hidden humble icy jolly kind lazy little lively lucky misty modern noble odd pale polite proud "
    "quick quiet rapid rare rough royal rusty shiny silver simple sleepy smooth snowy solid spicy steady sunny swift "
    "tall tiny velvet warm wild windy wise young".split())
TRAIN_NOUNS: tuple[str, ...] = tuple(
    "apple arrow basket beacon bicycle blanket bottle bridge bucket button candle canyon carpet castle cliff cloud "
    "comet compass crown desert dragon drum engine feather forest fountain garden gate guitar hammer harbor helmet "
    "island jacket jungle kettle ladder lantern lemon meadow mirror monkey mountain needle ocean orchard painter "
    "palace pencil piano pillow planet pocket rabbit river rocket sail shadow shovel spider statue tiger tower "
    "trumpet tunnel umbrella valley violin wagon whistle window wizard".split())
TRAIN_FIRST_NAMES: tuple[str, ...] = tuple(
    "Maria James Aisha Kenji Olga Pedro Fatima Liam Chen Sofia Ravi Emma Tomas Yuki Amara Lucas Ingrid Omar Priya "
    "Daniel Mei Hugo Zara Felix Nadia Ivan Grace Mateo Leila Oscar Hana Samuel Elena Kwame Julia Arjun Clara Diego "
    "Freya Malik".split())
TRAIN_LAST_NAMES: tuple[str, ...] = tuple(
    "Okafor Lindqvist Tanaka Moreau Novak Haddad Kowalski Silva Brennan Park Schmidt Rossi Nguyen Petrov Mensah "
    "Fischer Alvarez Kim Dubois Larsen Costa Ibrahim Walsh Yamamoto Horvat Banerjee Olsen Keller Santos Murphy "
    "Jensen Romero Sato Weber Adeyemi Castillo Berg Ortiz Nakamura Hale".split())
TRAIN_CITIES: tuple[str, ...] = tuple(
    "Lisbon Oslo Nairobi Lima Osaka Dublin Krakow Austin Quito Hanoi Perth Porto Bergen Accra Cusco Leeds Turin "
    "Seville Tampere Gdansk Denver Adelaide Montreal Valencia Bilbao Madras Kyoto Zagreb Tallinn Riga Geneva "
    "Bristol Halifax Marseille Antwerp Lyon Dakar Manila Tucson Cork".split())
TRAIN_SITES: tuple[str, ...] = ("depot", "office", "warehouse", "lab", "branch", "station", "clinic", "studio")
TRAIN_CODEWORDS: tuple[str, ...] = tuple(
    "Bluebird Cobblestone Driftwood Evergreen Firefly Granite Hummingbird Ironwood Lighthouse Marigold Moonbeam "
    "Nightshade Pinecone Quicksilver Riverstone Sandcastle Snowdrop Starling Sunflower Thunderbolt Waterfall "
    "Whirlwind Wildflower Windmill Bramble Copperleaf Dewdrop Foxglove Hazelnut Kingfisher Larkspur Meadowlark "
    "Nutmeg Peppermint Saffron Tumbleweed".split())
TRAIN_PROJECT_FORMS: tuple[str, ...] = ("Project {name}", "the {name} initiative", "Operation {name}", "the {name} "
                                        "release")
TRAIN_PATH_PARTS: tuple[tuple[str, ...], ...] = (
    ("srv", "home", "opt", "var", "data", "etc"),
    ("reports", "backups", "config", "logs", "shared", "archive", "builds", "media"),
    ("summary", "notes", "index", "budget", "plan", "schedule", "inventory", "draft"),
    ("csv", "txt", "json", "yaml", "md", "xml"),
)
TRAIN_VALUE_WORDS: tuple[str, ...] = tuple(
    "apricot basil blueberry cashew cinnamon coconut cranberry emerald garnet ginger jasmine lavender lilac mango "
    "maple marble olive onyx opal orchid paprika peach pearl pepper plum quartz ruby sapphire sesame tangerine topaz "
    "tulip vanilla walnut almond clover daisy fig hazel iris".split())
MONTHS = ("January February March April May June July August September October November December").split()
_ALNUM = string.ascii_uppercase + string.digits


# --- key kinds and value formats ----------------------------------------------------------------------------------

def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _path(rng: random.Random) -> str:
    top, mid, name, ext = (rng.choice(p) for p in TRAIN_PATH_PARTS)
    return f"/{top}/{mid}/{name}_{rng.randint(1, 99)}.{ext}"


def _code(rng: random.Random, groups: int, size: int) -> str:
    return "-".join("".join(rng.choice(_ALNUM) for _ in range(size)) for _ in range(groups))


H = heldout
KEY_KINDS: dict[str, Callable[[random.Random], str]] = {
    "pair": lambda r: f"{r.choice(TRAIN_ADJECTIVES)}-{r.choice(TRAIN_NOUNS)}",
    "person": lambda r: f"{r.choice(TRAIN_FIRST_NAMES)} {r.choice(TRAIN_LAST_NAMES)}",
    "site": lambda r: f"the {r.choice(TRAIN_CITIES)} {r.choice(TRAIN_SITES)}",
    "project": lambda r: r.choice(TRAIN_PROJECT_FORMS).format(name=r.choice(TRAIN_CODEWORDS)),
    "path": _path,
    "uuid": _uuid,
    # held out (heldout.HELDOUT_KEY_KINDS)
    "heldout_pair": lambda r: f"{r.choice(H.HELDOUT_ADJECTIVES)}-{r.choice(H.HELDOUT_NOUNS)}",
    "host": lambda r: f"{r.choice(H.HELDOUT_NOUNS)}-{r.randint(1, 99):02d}.{r.choice(H.HELDOUT_REGIONS)}.internal",
    "vessel": lambda r: f"the {r.choice(H.HELDOUT_ADJECTIVES).capitalize()} {r.choice(H.HELDOUT_BIRDS).capitalize()}",
    "serial": lambda r: _code(r, 4, 4),
}
VALUE_FORMATS: dict[str, Callable[[random.Random], str]] = {
    "number": lambda r: str(r.randint(10**6, 10**7 - 1)),
    "date": lambda r: f"{r.randint(1, 28)} {r.choice(MONTHS)} {r.randint(1990, 2060)}",
    "code": lambda r: _code(r, 2, 3),
    "word": lambda r: r.choice(TRAIN_VALUE_WORDS),
    "phrase": lambda r: f"{r.choice(TRAIN_VALUE_WORDS)} {r.choice(TRAIN_VALUE_WORDS)} {r.randint(10, 99)}",
    "uuid": _uuid,
    "hex": lambda r: f"{r.getrandbits(128):032x}",
    # held out (heldout.HELDOUT_VALUE_FORMATS)
    "phone": lambda r: f"+{r.choice((1, 31, 44, 49, 61, 81))} {r.randint(200, 999)} {r.randint(100, 999)} "
                       f"{r.randint(0, 9999):04d}",
    "decimal": lambda r: f"{r.randint(10, 999)}.{r.randint(0, 9999):04d}",
    "serial": lambda r: _code(r, 4, 4),
}
# how each value format is spotted in text (tests/tasks/test_heldout.py looks for the held-out ones in training samples)
VALUE_PATTERNS: dict[str, str] = {
    "phone": r"\+\d{1,2} \d{3} \d{3} \d{4}\b",
    "decimal": r"(?<![\d.])\d{2,3}\.\d{4}(?![\d.])",
    "serial": r"\b[A-Z0-9]{4}(?:-[A-Z0-9]{4}){3}\b",
}


@dataclass(frozen=True)
class Grammar:
    """One side of the split: sentence templates, key kinds and value formats per slot, haystacks."""

    name: str
    needles: tuple[str, ...]
    questions: tuple[str, ...]
    questions_many: tuple[str, ...]
    prefixes: tuple[str, ...]
    prefixes_many: tuple[str, ...]
    instructions: tuple[str, ...]
    noise: tuple[str, ...]
    keys: dict[str, tuple[str, ...]]  # slot ("name", "long") -> key kinds
    values: dict[str, tuple[str, ...]]  # slot ("short", "long") -> value formats
    nouns: dict[str, tuple[tuple[str, str], ...]]  # value format -> its (singular, plural) names
    haystacks: tuple[str, ...]  # names in HAYSTACKS

    def templates(self) -> tuple[str, ...]:
        """Every sentence template of this grammar."""
        return (self.needles + self.questions + self.questions_many + self.prefixes + self.prefixes_many
                + self.instructions)


def _train_texts(name: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        from . import corpora

        dictionary = name in ("definitions", "webster")
        return [f"{p.title}: {p.text}" if dictionary else p.text for p in getattr(corpora, name)()]
    return load


def _heldout_texts(name: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        from . import haystacks

        return getattr(haystacks, name)()
    return load


# haystack name -> loader of its passages (each a string); looked up at call time, so tests can replace a corpus
HAYSTACKS: dict[str, Callable[[], list[str]]] = {
    **{n: _train_texts(n) for n in ("sotu", "python_docs", "debian_handbook", "definitions", "webster")},
    "fortunes": _heldout_texts("fortunes"),
}

TRAIN = Grammar(
    "train", TRAIN_NEEDLES, TRAIN_QUESTIONS, TRAIN_QUESTIONS_MANY, TRAIN_PREFIXES, TRAIN_PREFIXES_MANY,
    TRAIN_INSTRUCTIONS, TRAIN_NOISE,
    keys={"name": ("pair", "person", "site", "project", "path"), "long": ("uuid",)},
    values={"short": ("number", "date", "code", "word", "phrase"), "long": ("uuid", "hex")},
    nouns=TRAIN_VALUE_NOUNS, haystacks=("sotu", "python_docs", "debian_handbook", "definitions", "webster"))
HELDOUT = Grammar(
    "heldout", H.HELDOUT_NEEDLES, H.HELDOUT_QUESTIONS, H.HELDOUT_QUESTIONS_MANY, H.HELDOUT_PREFIXES,
    H.HELDOUT_PREFIXES_MANY, H.HELDOUT_INSTRUCTIONS, H.HELDOUT_NOISE,
    keys={"name": ("heldout_pair", "host", "vessel"), "long": ("serial",)},
    values={"short": ("phone", "decimal"), "long": ("serial",)},
    nouns=H.HELDOUT_VALUE_NOUNS, haystacks=("fortunes",))
GRAMMARS = {g.name: g for g in (TRAIN, HELDOUT)}


# --- samples ------------------------------------------------------------------------------------------------------

def sentence(template: str, **fields: str) -> str:
    """A template filled in, its first letter capitalised unless it starts with a field (a key stays as drawn)."""
    text = template.format(**fields)
    return text if template.startswith("{") else text[0].upper() + text[1:]


def join_keys(keys: list[str]) -> str:
    """"a", "a and b", "a, b, c, and d"."""
    if len(keys) < 3:
        return " and ".join(keys)
    return ", ".join(keys[:-1]) + ", and " + keys[-1]


def _passages(name: str, cache: dict) -> list[str]:
    key = ("passages", HAYSTACKS[name])
    if key not in cache:
        cache[key] = [p for p in HAYSTACKS[name]() if p.strip()]
        if not cache[key]:
            raise ValueError(f"haystack {name} has no text")
    return cache[key]


def _text_units(grammar: Grammar, rng: random.Random, budget: int, costs, cache: dict, count) -> list[tuple]:
    """Sentences of consecutive passages of one of the grammar's haystacks, from a random passage on (wrapping
    round), as (sentence, tokens, -1) while they fit ``budget``; per-passage counts are kept in ``cache``."""
    name = rng.choice(grammar.haystacks)
    passages = _passages(name, cache)
    i, units, used, empty = rng.randrange(len(passages)), [], 0, 0
    from .haystacks import split_sentences

    while True:
        key = ("sentences", HAYSTACKS[name], count, i)
        if key not in cache:
            sents = split_sentences(" ".join(passages[i].split()))
            cache[key] = list(zip(sents, costs(sents)))
        empty = empty + 1 if not cache[key] else 0
        if empty > len(passages):
            raise ValueError(f"haystack {name} has no sentences")
        for s, c in cache[key]:
            if used + c > budget:
                return units
            units.append((s, c, -1))
            used += c
        i = (i + 1) % len(passages)


def make_sample(subtask: str, memory_tokens: int, count_tokens: Callable[[str], int], rng: random.Random,
                doc_tokens: int = 512, haystack_cache: dict | None = None, *,
                grammar: Grammar = TRAIN) -> NiahSample:
    """One sample of ``subtask``'s shape whose memory holds about ``memory_tokens`` tokens, every sentence drawn from
    ``grammar`` (see the module docstring). ``haystack_cache``: a dict reused across calls (passages, token counts)."""
    if subtask not in SHAPES:
        raise ValueError(f"unknown subtask {subtask!r}; known: {', '.join(SUBTASKS)}")
    hay, key_slot, value_slot, num_k, num_v, num_q = SHAPES[subtask]
    num_k = max(num_k, num_q)
    cache = {} if haystack_cache is None else haystack_cache
    sep = " " if hay == "text" else "\n"
    base = count_tokens(sep)
    many = getattr(count_tokens, "many", None) or (lambda texts: [count_tokens(t) for t in texts])

    def costs(units: list[str]) -> list[int]:
        return [c - base for c in many([sep + s + sep for s in units])] if units else []

    draw_key = KEY_KINDS[rng.choice(grammar.keys[key_slot])]
    fmt = rng.choice(grammar.values[value_slot])
    draw_value = VALUE_FORMATS[fmt]
    noun, nouns = rng.choice(grammar.nouns[fmt])
    template = rng.choice(grammar.needles)

    def fresh(draw, taken) -> str:
        for _ in range(1000):
            x = draw(rng)
            if x not in taken:
                return x
        raise ValueError(f"{subtask}: cannot draw {len(taken) + 1} distinct keys or values")

    keys, values, said = [], [], []  # said: (needle sentence, index of its key)
    for k in range(num_k):
        keys.append(fresh(draw_key, keys))
        values.append([])
        for _ in range(num_v):
            values[-1].append(fresh(draw_value, [v for vs in values for v in vs]))
            said.append((sentence(template, key=keys[k], value=values[-1][-1], noun=noun), k))
    needles = [(t, c, k) for (t, k), c in zip(said, costs([t for t, _ in said]))]
    rng.shuffle(needles)
    if max(c for _, c, _ in needles) > doc_tokens:
        raise ValueError(f"doc_tokens={doc_tokens} is too small for a needle")
    budget = memory_tokens - sum(c for _, c, _ in needles)

    if hay == "text":
        units = _text_units(grammar, rng, budget, costs, cache, count_tokens)
        n = len(units)
        if n < 1:
            raise ValueError(f"memory_tokens={memory_tokens} is too small for {subtask}")
        depths = sorted(int(n * (d / 100)) for d in rng.sample(DEPTHS, len(needles)))
        for pos, needle in sorted(zip(depths, needles), key=lambda x: -x[0]):
            units.insert(pos, needle)
    else:
        if hay == "noise":
            line = " ".join(rng.sample(grammar.noise, NOISE_SENTENCES))
            c = costs([line])[0]
            units = [(line, c, -1)] * max(0, budget // c)
        else:
            answers = {v for vs in values for v in vs}
            units, used, full = [], 0, False
            while not full:
                lines = [sentence(template, key=fresh(draw_key, keys), value=fresh(draw_value, answers), noun=noun)
                         for _ in range(LINE_BATCH)]
                for text, c in zip(lines, costs(lines)):
                    if used + c > budget:
                        full = True
                        break
                    units.append((text, c, -1))
                    used += c
        scatter_needles(units, needles, rng, f"memory_tokens={memory_tokens} is too small for {subtask}")

    indices = rng.sample(range(num_k), num_q)
    query = join_keys([keys[i] for i in indices])
    answers = [a for i in indices for a in values[i]]
    many_answers = num_q * num_v > 1
    fields = {"key": query, "query": query, "noun": noun, "nouns": nouns}
    question = sentence(rng.choice(grammar.questions_many if many_answers else grammar.questions), **fields)
    prefix = " " + sentence(rng.choice(grammar.prefixes_many if many_answers else grammar.prefixes), **fields)
    instruction = sentence(rng.choice(grammar.instructions), **fields)
    docs, gold = pack_documents(units, sep, doc_tokens, lambda s: costs([s])[0], set(indices))
    return NiahSample(subtask, docs, question, instruction, answers, gold, prefix)


def train_hops(rng: random.Random, chains: int) -> tuple[list[str], list[str], str, list[str], list[str]]:
    """Two-hop chains in training wording (Mixer.multihop): (link sentences, value sentences, question template with
    {key} left to fill, keys, values); keys and links are distinct adjective-noun pairs, the value sentence a
    training needle template with the link as its key."""
    link_t, question_t = rng.choice(TRAIN_HOPS)
    fmt = rng.choice(TRAIN.values["short"])
    noun, _ = rng.choice(TRAIN.nouns[fmt])
    needle_t = rng.choice(TRAIN.needles)
    drawn: list[str] = []
    while len(drawn) < 2 * chains:
        w = KEY_KINDS["pair"](rng)
        drawn += [w] if w not in drawn else []
    keys, links = drawn[:chains], drawn[chains:]
    values: list[str] = []
    while len(values) < chains:
        v = VALUE_FORMATS[fmt](rng)
        values += [v] if v not in values else []
    link_sents = [sentence(link_t, key=k, link=lk) for k, lk in zip(keys, links)]
    value_sents = [sentence(needle_t, key=f"the {lk}", value=v, noun=noun) for lk, v in zip(links, values)]
    return link_sents, value_sents, question_t.replace("{noun}", noun), keys, values
