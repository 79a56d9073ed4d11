"""Human-written FAQ pairs from Debian documentation packages, and each package's own text as distractors.

Packages (fetched with `corpora.debian_package`, parsed once and cached as JSON under ``<cache>/data``):

* ``python3.11-doc``: the Python FAQ (reST, `corpora.python_faq`); distractors: the Python documentation.
* ``git-doc``: gitfaq (AsciiDoc, ``Question?::`` items); distractors: the other AsciiDoc manual pages.
* ``sqlite3-doc``: the SQLite FAQ (HTML, ``(N) Question`` items); distractors: the other HTML pages.
* FAQs alone (the distractors are the other answers of the same FAQ, as in `eval qa`): ``weechat-doc``,
  ``nano``, ``privoxy`` (HTML, numbered headings), ``chrony``, ``zsh-common``, ``zlib1g-dev`` (plain text, numbered
  headings), ``dnsmasq-base``, ``irssi`` (plain text, ``Q:`` / ``A:`` items). Only headings that are
  questions (with a "?") train; an answer is cut to `eval.faqs.MAX_WORDS` words, as `eval qa`'s passages.

The packages whose FAQs `eval qa` asks (`tasks.heldout.EVAL_ONLY_FAQ_PACKAGES`) are never read here, and the last
`tasks.heldout.EVAL_ONLY_FAQ_LAST` Python FAQ questions never train.
"""

from __future__ import annotations

import gzip
import html
import re
import textwrap
import zlib
from pathlib import Path

from memsparse.resources import ResourceUnavailable

from ..eval.faqs import parse_html_faq, parse_numbered_faq, passage  # format parsers shared with `eval qa`
from .corpora import Passage, _cached, _normalize, debian_package, pack_passages, python_docs, python_faq

FAQ_PACKAGES = ("python3.11-doc", "git-doc", "sqlite3-doc", "weechat-doc", "nano", "privoxy", "chrony", "zsh-common",
                "zlib1g-dev", "dnsmasq-base", "irssi")
_WITH_DOCUMENTS = ("python3.11-doc", "git-doc", "sqlite3-doc")  # the packages whose other text serves as distractors
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


# --- plain text and HTML FAQs whose answers alone form the memory --------------------------------------------------


def prefixed_faq_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) of a plain-text FAQ of ``Q:`` / ``A:`` items (dnsmasq, irssi); a line of dashes or equals
    signs, or the next ``Q:``, ends an answer."""
    out, question, answer, state = [], [], [], None

    def close():
        body = _reflow(textwrap.dedent("\n".join(answer)))
        if question and body:
            out.append((" ".join(" ".join(question).split()), passage(body.split("\n\n"))))

    for line in _normalize(text).expandtabs(8).split("\n"):
        q, a = re.match(r"Q:\s*(.*)", line), re.match(r"A:\s?(.*)", line)
        if q:
            close()
            question, answer, state = [q[1]], [], "q"
        elif a and state == "q":
            answer, state = ["   " + a[1]], "a"
        elif re.fullmatch(r"\s*(?:-{5,}|={5,})\s*", line):
            close()
            question, answer, state = [], [], None
        elif state == "q":
            question.append(line)
        elif state == "a":
            answer.append(line)
    close()
    return out


def numbered_faq_pairs(text: str, heading: str) -> list[tuple[str, str]]:
    """(question, answer) of a plain-text FAQ whose entries start at a line matching `heading` (a regex whose
    group ``q`` is the question; a question that does not end in "?" may wrap onto the next two lines). A
    table of contents repeats the questions without answers: the entry with the longest answer is kept."""
    head = re.compile(heading)
    lines = _normalize(text).expandtabs(8).split("\n")
    entries: dict[str, str] = {}
    i = 0
    while i < len(lines):
        m = head.match(lines[i])
        if not m:
            i += 1
            continue
        title, i = m["q"].strip(), i + 1
        for _ in range(2):
            if title.endswith("?") or i >= len(lines) or not lines[i].strip() or head.match(lines[i]):
                break
            title, i = f"{title} {lines[i].strip()}", i + 1
        j = i
        while j < len(lines) and not head.match(lines[j]):
            j += 1
        body = _reflow(textwrap.dedent("\n".join(lines[i:j])))
        title = " ".join(title.split())
        if body and len(body) > len(entries.get(title, "")):
            entries[title] = passage(body.split("\n\n"))
        i = j
    return list(entries.items())


def _html_pairs(root: Path, pattern: str, pkg: str) -> list[tuple[str, str]]:
    paths = sorted(root.glob(pattern))
    if not paths:
        raise ResourceUnavailable(f"no {pattern} in Debian package {pkg}")
    return [(q, passage(a)) for path in paths
            for _, q, a in parse_html_faq(path.read_text(encoding="utf-8", errors="replace"))]


def _text(root: Path, pattern: str, pkg: str) -> str:
    path = _one(root, pattern, pkg)
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8", errors="replace")


# Package -> its FAQ's (question, answer) pairs, from the extracted package's root.
_FAQ_ONLY = {
    "weechat-doc": lambda r: _html_pairs(r, "usr/share/doc/weechat-doc/html/weechat_faq.en.html", "weechat-doc"),
    "nano": lambda r: _html_pairs(r, "usr/share/doc/nano/faq.html", "nano"),
    "privoxy": lambda r: _html_pairs(r, "usr/share/doc/privoxy/faq/[cgimt]*.html", "privoxy"),
    "chrony": lambda r: [(q, passage(a)) for _, q, a in parse_numbered_faq(_text(r, "usr/share/doc/chrony/FAQ.gz",
                                                                                  "chrony"), 0)],
    "zsh-common": lambda r: numbered_faq_pairs(_text(r, "usr/share/doc/zsh-common/FAQ.gz", "zsh-common"),
                                               r"(?P<n>\d+\.\d+): (?P<q>\S.*)$"),
    "zlib1g-dev": lambda r: numbered_faq_pairs(_text(r, "usr/share/doc/zlib1g-dev/FAQ.gz", "zlib1g-dev"),
                                               r" ?(?P<n>\d{1,2})\. (?P<q>\S.*)$"),
    "dnsmasq-base": lambda r: prefixed_faq_pairs(_text(r, "usr/share/doc/dnsmasq-base/FAQ.gz", "dnsmasq-base")),
    "irssi": lambda r: prefixed_faq_pairs(_text(r, "usr/share/doc/irssi/faq.txt.gz", "irssi")),
}


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
    if pkg in _FAQ_ONLY:
        try:
            pairs = [[q, a] for q, a in _FAQ_ONLY[pkg](root) if "?" in q and a.strip()]
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ResourceUnavailable(f"cannot read the FAQ in Debian package {pkg}: {e} (remove {root} to fetch it "
                                      "again)") from None
        if not pairs:
            raise ResourceUnavailable(f"no FAQ questions found in Debian package {pkg} (remove {root} to fetch it "
                                      "again)")
        return pairs
    raise ValueError(f"unknown FAQ package {pkg!r}; known: {', '.join(FAQ_PACKAGES)}")


def faq_pairs(pkg: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of one package's FAQ, in document order."""
    if pkg not in FAQ_PACKAGES:
        raise ValueError(f"unknown FAQ package {pkg!r}; known: {', '.join(FAQ_PACKAGES)}")
    return [tuple(p) for p in _cached(f"faq-{pkg}-v{_FORMAT}", lambda: _build_pairs(pkg))]


def _build_documents(pkg: str, max_words: int) -> list:
    if pkg not in _WITH_DOCUMENTS:
        return []
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
    """Passages of the package's documentation other than its FAQ (the FAQ task's distractors besides the FAQ's
    other answers; none for a package outside `_WITH_DOCUMENTS`)."""
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
