"""Human-written FAQ pairs from Debian documentation packages, and each package's own text as distractors.

Packages (fetched with `corpora.debian_package`, parsed once and cached as JSON under ``<cache>/data``):

* ``python3.11-doc``: the Python FAQ (reST, `corpora.python_faq`); distractors: the Python documentation.
* ``git-doc``: gitfaq (AsciiDoc, ``Question?::`` items); distractors: the other AsciiDoc manual pages.
* ``sqlite3-doc``: the SQLite FAQ (HTML, ``(N) Question`` items); distractors: the other HTML pages.

The packages whose FAQs `eval qa` asks (`tasks.heldout.EVAL_ONLY_FAQ_PACKAGES`) are never read here, and the last
`tasks.heldout.EVAL_ONLY_FAQ_LAST` Python FAQ questions never train.
"""

from __future__ import annotations

import html
import re
import textwrap
from pathlib import Path

from memsparse.resources import ResourceUnavailable

from .corpora import Passage, _cached, _normalize, debian_package, pack_passages, python_docs, python_faq

FAQ_PACKAGES = ("python3.11-doc", "git-doc", "sqlite3-doc")
_FORMAT = 5  # bump to invalidate this module's caches


def _one(root: Path, pattern: str, pkg: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise ResourceUnavailable(f"no {pattern} in Debian package {pkg}")
    return found[0]


def _reflow(block: str) -> str:
    """Paragraphs of `block` (blank-line separated) with wrapped lines joined; indented (code) paragraphs and list
    items keep their lines."""
    out = []
    for par in re.split(r"\n\s*\n", block.strip("\n")):
        lines = [x for x in par.split("\n") if x.strip()]
        if not lines:
            continue
        if all(x.startswith((" ", "\t")) for x in lines) and len(lines) > 1 and not lines[0].lstrip()[:2] == "* ":
            code = textwrap.dedent("\n".join(lines))
            if re.search(r"[;{}=$<>()]|^\s*[%$#] ", code, re.M):  # code stays as it is
                out.append(code)
                continue
        items: list[str] = []
        for x in lines:
            s = x.strip()
            if not items or re.match(r"^(?:[*+-]|\d+\.)\s", s):
                items.append(s)
            else:
                items[-1] += " " + s
        out.append("\n".join(items))
    return "\n\n".join(out)


# --- AsciiDoc (git-doc) -------------------------------------------------------------------------------------------


def asciidoc_text(text: str) -> str:
    """AsciiDoc of the git manual pages as plain paragraphs: ``linkgit:git-config[1]`` -> git-config(1), anchors,
    list continuations (``+``), delimiters and heading underlines go, backquotes are dropped."""
    text = re.sub(r"linkgit:([\w.-]+)\[(\d)\]", r"\1(\2)", _normalize(text))
    text = re.sub(r"^\[\[[^\]]*\]\]\s*$|^\[[\w ,=\"-]*\]\s*$", "", text, flags=re.M)
    text = re.sub(r"^(?:-{3,}|={3,}|~{3,}|\.{4,}|\+)\s*$", "", text, flags=re.M)
    text = re.sub(r"^\t", "    ", text, flags=re.M)  # a definition's body: indented, but prose
    text = re.sub(r"`([^`]{0,300})`", r"\1", text)
    return _reflow(textwrap.dedent(text))


def git_faq_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) of the gitfaq AsciiDoc items ``Question?::`` (answer: the lines up to the next item or
    section)."""
    lines = _normalize(text).split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.fullmatch(r"(\S.*\?)::\s*", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not re.fullmatch(r"\S.*\?::\s*|\[\[.*\]\]\s*", lines[j]) and not (
                j + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[j + 1]) and lines[j].strip()):
            j += 1
        answer = asciidoc_text("\n".join(lines[i + 1:j]))
        if answer:
            out.append((re.sub(r"`([^`]*)`", r"\1", m[1]), answer))
        i = j
    return out


# --- HTML (sqlite3-doc) -------------------------------------------------------------------------------------------


def html_text(fragment: str) -> str:
    """Plain paragraphs of an HTML fragment: block ends break paragraphs, tags go, entities are decoded."""
    fragment = re.sub(r"<(script|style)\b.*?</\1>", "", fragment, flags=re.S | re.I)
    fragment = re.sub(r"</?(?:p|div|blockquote|h\d|li|ul|ol|pre|table|tr|br)\b[^>]*>", "\n\n", fragment, flags=re.I)
    text = html.unescape(re.sub(r"<[^>]+>", "", fragment))
    pars = [" ".join(p.split()) for p in re.split(r"\n\s*\n", _normalize(text))]
    return "\n\n".join(p for p in pars if p)


def sqlite_faq_pairs(page: str) -> list[tuple[str, str]]:
    """(question, answer) of the SQLite FAQ page: ``<p><b>(N) question</b></p><blockquote>answer</blockquote>``."""
    pattern = re.compile(r"<a name=\"q\d+\"></a>\s*<p><b>\(\d+\)\s*(.*?)</b></p>\s*<blockquote>(.*?)</blockquote>",
                         re.S)
    return [(html_text(q), html_text(a)) for q, a in pattern.findall(page) if html_text(a)]


# --- per package --------------------------------------------------------------------------------------------------


def _build_pairs(pkg: str) -> list:
    if pkg == "python3.11-doc":
        return [list(p) for p in python_faq()]
    root = debian_package(pkg)
    if pkg == "git-doc":
        text = _one(root, "usr/share/doc/git-doc/gitfaq.txt", pkg).read_text(encoding="utf-8", errors="replace")
        return [list(p) for p in git_faq_pairs(text)]
    if pkg == "sqlite3-doc":
        page = _one(root, "usr/share/doc/sqlite3/faq.html", pkg).read_text(encoding="utf-8", errors="replace")
        return [list(p) for p in sqlite_faq_pairs(page)]
    raise ValueError(f"unknown FAQ package {pkg!r}; known: {', '.join(FAQ_PACKAGES)}")


def faq_pairs(pkg: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of one package's FAQ, in document order."""
    if pkg not in FAQ_PACKAGES:
        raise ValueError(f"unknown FAQ package {pkg!r}; known: {', '.join(FAQ_PACKAGES)}")
    return [tuple(p) for p in _cached(f"faq-{pkg}-v{_FORMAT}", lambda: _build_pairs(pkg))]


def _build_documents(pkg: str, max_words: int) -> list:
    if pkg == "python3.11-doc":
        return [[p.title, p.text, p.source] for p in python_docs(max_words) if not p.title.startswith("Python FAQ")]
    root = debian_package(pkg)
    out = []
    if pkg == "git-doc":
        for path in sorted(root.glob("usr/share/doc/git-doc/*.txt")):
            if path.name != "gitfaq.txt":
                text = asciidoc_text(path.read_text(encoding="utf-8", errors="replace"))
                out += [[path.stem, p, pkg] for p in pack_passages(text.split("\n\n"), max_words)]
    elif pkg == "sqlite3-doc":
        for path in sorted(root.glob("usr/share/doc/sqlite3/*.html")):
            if path.name != "faq.html":
                text = html_text(path.read_text(encoding="utf-8", errors="replace"))
                out += [[path.stem, p, pkg] for p in pack_passages(text.split("\n\n"), max_words)]
    else:
        raise ValueError(f"unknown FAQ package {pkg!r}; known: {', '.join(FAQ_PACKAGES)}")
    return out


def faq_documents(pkg: str, max_words: int = 250) -> list[Passage]:
    """Passages of the package's documentation other than its FAQ (the FAQ task's distractors)."""
    if pkg not in FAQ_PACKAGES:
        raise ValueError(f"unknown FAQ package {pkg!r}; known: {', '.join(FAQ_PACKAGES)}")
    return [Passage(*r) for r in _cached(f"faqdocs-{pkg}-w{max_words}-v{_FORMAT}",
                                         lambda: _build_documents(pkg, max_words))]


def training_faq_pairs(pkg: str) -> list[tuple[str, str]]:
    """The pairs of `pkg` that training may use: none of an evaluation package (an error), and not the last
    `heldout.EVAL_ONLY_FAQ_LAST[pkg]` questions."""
    from .heldout import EVAL_ONLY_FAQ_LAST, EVAL_ONLY_FAQ_PACKAGES

    if pkg in EVAL_ONLY_FAQ_PACKAGES:
        raise ValueError(f"FAQ package {pkg} is evaluation only ({EVAL_ONLY_FAQ_PACKAGES[pkg]})")
    pairs = faq_pairs(pkg)
    return pairs[:len(pairs) - EVAL_ONLY_FAQ_LAST.get(pkg, 0)]


def training_faq_packages() -> list[str]:
    """`FAQ_PACKAGES` less any evaluation package."""
    from .heldout import EVAL_ONLY_FAQ_PACKAGES

    return [p for p in FAQ_PACKAGES if p not in EVAL_ONLY_FAQ_PACKAGES]
