"""The QA evaluation set: human-written FAQs of Debian documentation packages (evaluation only, never trained on).

Each FAQ entry is a question heading written by the document's authors and the answer below it. The memory is every
answer passage of every FAQ (`EVAL_ONLY_FAQ_PACKAGES`), so the other answers of the same FAQ (same software, same
vocabulary) are the hard negatives; a question's gold passage is its own answer. Only headings that are questions
(ending in "?") are asked. The reference answer is the first sentence of the answer's first prose paragraph (code,
"(contributed by ...)" credits and "Yes."/"No." alone skipped), at most 40 words, as the demo's FAQ memory scores.

Sources (`SOURCES`; fetched with `apt-get download` + `dpkg-deb -x` into the cache, never committed; the Debian 12
versions of 2026-12-06 give 795 passages, about 103K words, and 624 questions, 242 dev / 382 test):

- `perl-doc` (5.36.0): the Perl FAQ, `perlfaq1.pod` ... `perlfaq9.pod` (Artistic / GPL, as Perl);
- `libcurl4-doc` (7.88.1): the curl FAQ, `usr/share/doc/libcurl4/FAQ.gz` (curl licence, MIT-like);
- `r-doc-html` (4.2.2): the R FAQ, `R-FAQ.html` (GPL-2+);
- `debian-faq` (11.1): the Debian FAQ, `debian-faq.en.txt.gz` (GPL-2+);
- `ffmpeg-doc` (5.1): the FFmpeg FAQ, `manual/faq.html` (LGPL-2.1+);
- `fetchmail` (6.4.37): the fetchmail FAQ, `fetchmail-FAQ.html` (GPL-2).

Split: a question's chapter (package and the FAQ's first-level section) is hashed (sha256 of "package/chapter");
the first byte below `DEV_SHARE` * 256 makes the chapter a development chapter, every other chapter is a test chapter.
Defaults are chosen on `dev` and figures reported on `test`; both are asked over the same memory (all answers).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..resources import ResourceUnavailable, cache_dir, write_json_atomic

FORMAT = 2  # bump to invalidate the parsed cache
DEV_SHARE = 0.4  # share of chapters (hashed) in the development split
MAX_WORDS = 300  # an answer passage is cut to its first paragraphs within this many words
SPLITS = ("dev", "test")
ROW_KEYS = {"package", "chapter", "question", "passage", "reference", "asked"}  # one parsed entry


@dataclass
class QASet:
    """Questions over a memory of passages."""

    paragraphs: list[str]  # the memory
    article: list[int]  # the document (FAQ chapter) of each passage
    questions: list[tuple[str, list[str], int]]  # (question, reference answers, gold passage index)
    name: str = "qa"  # the source, recorded in results
    split: str = ""  # "dev" | "test" | "" (an inline set)
    skip: int = 0  # questions of the split's seeded order passed over before these


# ------------------------------------------------------------------------------------------------ text helpers
def _words(text: str) -> int:
    return len(text.split())


_CREDIT = re.compile(r"\(?(?:contributed|written) by[^)]*\)?\.?", re.I)  # "(contributed by brian d foy)"


def _credit(par: str) -> bool:
    return bool(_CREDIT.fullmatch(" ".join(par.split())))


def reference_answer(paragraphs: list[str], max_words: int = 40) -> str:
    """The first sentence of the first prose paragraph (not code, not a credit line), at most `max_words` words; a
    bare "Yes."/"No." takes the sentence after it with it."""
    for par in paragraphs:
        text = " ".join(par.split())
        if not text or par.startswith((" ", "\t")) or _credit(par):
            continue
        sentences = re.split(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])", text)
        first = sentences[0]
        if re.fullmatch(r"(yes|no)[.!,]?", first, re.I) and len(sentences) > 1:
            first = f"{first} {sentences[1]}"
        return " ".join(first.split()[:max_words])
    return ""


def passage(paragraphs: list[str], max_words: int = MAX_WORDS) -> str:
    """Paragraphs joined by blank lines, as many as fit `max_words` (the first one cut to it if needed); credit lines
    ("(contributed by ...)") left out."""
    out, n = [], 0
    for par in (p for p in paragraphs if not _credit(p)):
        w = _words(par)
        if out and n + w > max_words:
            break
        out.append(par if w <= max_words else " ".join(par.split()[:max_words]))
        n += w
    return "\n\n".join(out)


def _blocks(lines: list[str]) -> list[str]:
    """Blank-line separated blocks; prose blocks are reflowed to one line, indented (code) blocks kept as they are."""
    out, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            indent = min(len(x) - len(x.lstrip()) for x in cur)
            base = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
            out.append("\n".join(cur) if indent > base else " ".join(" ".join(cur).split()))
            cur = []
    return out


# ------------------------------------------------------------------------------------------------ parsers
_POD_CODE = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+|[A-Z]<([^<>]*)>")


def _pod_inline(text: str) -> str:
    """POD formatting codes dropped, their text kept (`L<name/"section">` as `name`, `E<gt>` as `>`)."""
    escapes = {"gt": ">", "lt": "<", "verbar": "|", "sol": "/"}
    text = re.sub(r"[XZ]<[^<>]*>", "", text)  # index entries and zero-width codes
    for _ in range(4):  # nested codes, innermost first
        text = re.sub(r"E<(\w+)>", lambda m: escapes.get(m[1], ""), text)
        text = _POD_CODE.sub(lambda m: (m[1] or m[2] or "").split("|")[-1].split('"')[0].strip("/") or
                             (m[1] or m[2] or ""), text)
    return text


def parse_pod_faq(text: str) -> list[tuple[str, str, list[str]]]:
    """(chapter, question, answer paragraphs) of every `=head2` of a perlfaq POD file; the chapter is the `=head1`."""
    out, chapter, entry = [], "", None
    for block in re.split(r"\n\s*\n", text):
        if block.startswith("=head1"):
            chapter, entry = _pod_inline(block[6:].strip()), None
        elif block.startswith("=head2"):
            entry = (chapter, " ".join(_pod_inline(block[6:]).split()), [])
            out.append(entry)
        elif block.startswith("="):
            item = re.match(r"=item\s+(.*)", block, re.S)
            if entry is not None and item and item[1].strip() not in ("*", ""):
                entry[2].append(" ".join(_pod_inline(item[1]).split()))
        elif entry is not None:
            lines = block.split("\n")
            code = lines[0].startswith((" ", "\t"))
            entry[2].append(block.rstrip() if code else " ".join(_pod_inline(block).split()))
    return out


def parse_numbered_faq(text: str, indent: int) -> list[tuple[str, str, list[str]]]:
    """(chapter, question, answer paragraphs) of a plain-text FAQ whose entries start with a heading `N.M title` at
    `indent` spaces (the title may wrap onto the next lines, up to a blank line or a "?"); a chapter heading
    `N. title` ends the entry before it. A table of contents repeats the
    headings without answers: of entries with the same number the one with the longest answer is kept."""
    head = re.compile(rf"^ {{{indent}}}(\d+(?:\.\d+)+)\.?\s+(\S.*)$")
    chapter = re.compile(rf"^ {{0,{indent}}}\d+\.\s+\S")  # "N. Title" ends the entry before it
    entries: dict[str, tuple[str, str, list[str]]] = {}
    lines = text.replace("\xa0", " ").split("\n")
    i, number, title, body = 0, None, "", []

    def close():
        if number is not None:
            new = (number.split(".")[0], " ".join(title.split()), _blocks(body))
            old = entries.get(number)
            if old is None or sum(map(_words, new[2])) > sum(map(_words, old[2])):
                entries[number] = new

    while i < len(lines):
        m = head.match(lines[i])
        if m:
            close()
            number, title, body = m[1], m[2], []
            i += 1
            while i < len(lines) and lines[i].strip() and not head.match(lines[i]) and not title.rstrip().endswith("?"):
                title += " " + lines[i].strip()
                i += 1
            continue
        if chapter.match(lines[i]):
            close()
            number = None
        elif number is not None:
            body.append(lines[i])
        i += 1
    close()
    return [e for e in entries.values() if e[2]]


class _HtmlFaq(HTMLParser):
    """(chapter, question, answer paragraphs) of a texinfo-made HTML FAQ: `h3`/`h4` headings, `p`/`pre`/`li` text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.entries: list[tuple[str, str, list[str]]] = []
        self._tag, self._text, self._skip = None, [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("h2", "h3", "h4", "p", "pre", "li", "dt") and self._tag is None:
            self._tag, self._text = tag, []

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag == self._tag:
            raw = "".join(self._text)
            text = raw.strip("\n") if tag == "pre" else " ".join(raw.split())
            self._tag = None
            if tag in ("h2", "h3", "h4"):  # "7.31 Why ...?" (chapter 7) or "G1. What ...?" (chapter G)
                m = re.match(r"(?:([A-Z]{1,2})\d+|(\d+)(?:\.\d+)+)\.?\s+(.*?)(?:\s*#\s*TOC)?$", text)
                if m:
                    self.entries.append((m[1] or m[2], m[3], []))
            elif text and self.entries:
                self.entries[-1][2].append(text if tag != "pre" else "    " + text.replace("\n", "\n    "))

    def handle_data(self, data):
        if self._tag is not None and not self._skip:
            self._text.append(data)


def parse_html_faq(html: str) -> list[tuple[str, str, list[str]]]:
    parser = _HtmlFaq()
    parser.feed(html)
    parser.close()
    return [e for e in parser.entries if e[2]]


# ------------------------------------------------------------------------------------------------ sources
def _perl(root: Path) -> list[tuple[str, str, list[str]]]:
    files = sorted(root.glob("usr/share/perl/*/pod/perlfaq[1-9].pod"))
    return [(f"{f.stem}: {ch}", q, a) for f in files for ch, q, a in parse_pod_faq(f.read_text(encoding="utf-8"))]


def _curl(root: Path) -> list[tuple[str, str, list[str]]]:
    return parse_numbered_faq(gzip.decompress((root / "usr/share/doc/libcurl4/FAQ.gz").read_bytes()).decode(), 2)


def _r(root: Path) -> list[tuple[str, str, list[str]]]:
    return parse_html_faq((root / "usr/share/doc/r-doc-html/manual/R-FAQ.html").read_text(encoding="utf-8"))


def _ffmpeg(root: Path) -> list[tuple[str, str, list[str]]]:
    return parse_html_faq((root / "usr/share/doc/ffmpeg/manual/faq.html").read_text(encoding="utf-8"))


def _fetchmail(root: Path) -> list[tuple[str, str, list[str]]]:
    return parse_html_faq((root / "usr/share/doc/fetchmail/fetchmail-FAQ.html").read_text(encoding="utf-8"))


def _debian(root: Path) -> list[tuple[str, str, list[str]]]:
    path = root / "usr/share/doc/debian/FAQ/debian-faq.en.txt.gz"
    return parse_numbered_faq(gzip.decompress(path.read_bytes()).decode("utf-8"), 0)


# Debian package -> (FAQ name, parser of the extracted package). Evaluation only: tasks/heldout.py names them.
SOURCES = {"perl-doc": ("Perl FAQ", _perl), "libcurl4-doc": ("curl FAQ", _curl),
           "r-doc-html": ("R FAQ", _r), "debian-faq": ("Debian FAQ", _debian), "ffmpeg-doc": ("FFmpeg FAQ", _ffmpeg),
           "fetchmail": ("fetchmail FAQ", _fetchmail)}


def split_of(package: str, chapter: str) -> str:
    """"dev" or "test": the fixed, hashed split of a FAQ chapter."""
    return "dev" if hashlib.sha256(f"{package}/{chapter}".encode()).digest()[0] < DEV_SHARE * 256 else "test"


def build_entries(extracted: dict[str, Path]) -> list[dict]:
    """Every FAQ entry with an answer, as {package, chapter, question, passage, reference, asked}: `asked` when the
    heading is a question and the reference answer has at least 3 words. Raises `ResourceUnavailable` where a
    package holds no FAQ entries (a damaged or changed package)."""
    rows = []
    for pkg, root in extracted.items():
        name, parse = SOURCES[pkg]
        try:
            entries = parse(root)
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
            raise ResourceUnavailable(f"cannot read the {name} in Debian package {pkg}: {e} (remove {root} to "
                                      "fetch it again)") from None
        if not entries:
            raise ResourceUnavailable(f"no {name} entries found in Debian package {pkg} (remove {root} to fetch it "
                                      "again)")
        for chapter, question, paragraphs in entries:
            text, ref = passage(paragraphs), reference_answer(paragraphs)
            if _words(text) < 5:
                continue
            rows.append({"package": pkg, "chapter": f"{name} {chapter}", "question": question, "passage": text,
                         "reference": ref, "asked": question.endswith("?") and _words(ref) >= 3})
    return rows


def _fetch_entries() -> list[dict]:
    """The parsed entries, cached as JSON under <cache>/data."""
    path = cache_dir() / "data" / f"faq-qa.v{FORMAT}.json"
    if path.is_file():
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not all(isinstance(r, dict) and ROW_KEYS <= r.keys() for r in rows):
                raise ValueError("not FAQ entries")
            return rows
        except (OSError, ValueError, TypeError):
            raise ResourceUnavailable(f"damaged cache file {path}: remove it to fetch the FAQs again") from None
    from ..tasks.corpora import debian_package

    rows = build_entries({pkg: debian_package(pkg) for pkg in SOURCES})
    write_json_atomic(path, rows)
    return rows


def qa_set(rows: list[dict], split: str, n_questions: int | None = None, seed: int = 0, skip: int = 0) -> QASet:
    """The memory (every entry's passage) and `split`'s asked questions, `n_questions` drawn with a fixed seed (all
    by default; the draw of n is the first n of the seeded order, so a smaller run is a prefix of a larger one),
    after the first `skip` of that order (a split run in parts)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    chapters: dict[str, int] = {}
    article = [chapters.setdefault(r["chapter"], len(chapters)) for r in rows]
    questions = [(r["question"], [r["reference"]], i) for i, r in enumerate(rows)
                 if r["asked"] and split_of(r["package"], r["chapter"]) == split]
    random.Random(seed).shuffle(questions)
    if skip < 0 or (skip and skip >= len(questions)):
        raise ValueError(f"skip {skip}: the {split} split has {len(questions)} questions")
    return QASet([r["passage"] for r in rows], article, questions[skip:][:n_questions], name="debian-faqs",
                 split=split, skip=skip)


def load_qa(split: str = "test", n_questions: int | None = None, seed: int = 0, skip: int = 0) -> QASet:
    """The Debian FAQ QA set (see the module docstring). Raises `ResourceUnavailable` if a package cannot be had."""
    return qa_set(_fetch_entries(), split, n_questions, seed, skip)
