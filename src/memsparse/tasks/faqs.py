"""Human-written FAQ pairs from Debian documentation packages, and each package's own text as distractors.

Packages (fetched with `corpora.debian_package`, parsed once and cached as JSON under ``<cache>/data``):

* ``python3.11-doc``: the Python FAQ (reST, `corpora.python_faq`); distractors: the Python documentation.
* ``git-doc``: gitfaq (AsciiDoc, ``Question?::`` items); distractors: the other AsciiDoc manual pages.
* ``sqlite3-doc``: the SQLite FAQ (HTML, ``(N) Question`` items); distractors: the other HTML pages.
* FAQs alone (the distractors are the other answers of the same FAQ, as in `eval qa`): ``weechat-doc``,
  ``nano``, ``privoxy`` (HTML, numbered headings), ``chrony``, ``zsh-common``, ``zlib1g-dev`` (plain text, numbered
  headings), ``dnsmasq-base``, ``irssi`` (plain text, ``Q:`` / ``A:`` items), ``vim-doc`` (the Vim FAQ, plain text,
  ``N.M.`` headings), ``cvs`` (the CVS FAQ-O-Matic dump, plain text, ``N.`` headings per category), ``emacs-common``
  (the GNU Emacs FAQ in Info format, `info_faq_pairs`), ``xterm`` (the XTerm FAQ, HTML with unnumbered headings,
  `heading_html_faq_pairs`), ``nut`` (the Network UPS Tools FAQ, AsciiDoc ``==`` sections), ``procmail`` (plain text,
  ``N.`` headings). Only headings that are questions (with a "?") train; an answer is cut to `eval.faqs.MAX_WORDS`
  words, as `eval qa`'s passages.

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
                "zlib1g-dev", "dnsmasq-base", "irssi", "vim-doc", "cvs", "emacs-common", "xterm", "nut", "procmail")
_WITH_DOCUMENTS = ("python3.11-doc", "git-doc", "sqlite3-doc")  # the packages whose other text serves as distractors
_FORMAT = 6  # bump to invalidate this module's caches


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


def numbered_faq_pairs(text: str, heading: str, wrap: int = 2) -> list[tuple[str, str]]:
    """(question, answer) of a plain-text FAQ whose entries start at a line matching `heading` (a regex whose
    group ``q`` is the question; a question that does not end in "?" may wrap onto the next `wrap` lines). A
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
        for _ in range(wrap):
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


def _without(text: str, *patterns: str) -> str:
    """`text` less the lines that match one of the regexes `patterns` whole (navigation, dates, underlines)."""
    drop = re.compile("|".join(f"(?:{p})" for p in patterns))
    return "\n".join(x for x in _normalize(text).split("\n") if not drop.fullmatch(x))


def heading_html_faq_pairs(page: str) -> list[tuple[str, str]]:
    """(heading, answer) of an HTML FAQ whose questions are ``h1``-``h4`` headings without numbers (xterm): the
    answer is the text up to the next heading; lists of in-page links (a table of contents) are left out."""
    page = re.sub(r"<li\b[^>]*>\s*<a href=\"#[^\"]*\"[^>]*>.*?</a>\s*(?:</li>)?", "", page, flags=re.S | re.I)
    parts = re.split(r"<h[1-4]\b[^>]*>(.*?)</h[1-4]>", page, flags=re.S | re.I)
    out = []
    for head, body in zip(parts[1::2], parts[2::2]):
        question, answer = " ".join(html_text(head).split()), html_text(body)
        if question and answer:
            out.append((question, passage(answer.split("\n\n"))))
    return out


def info_faq_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) of a Texinfo FAQ in Info format (the Emacs FAQ): in each node, a numbered ``N.M title``
    heading underlined with ``=``, and the node's text after it less its menu; bullets become ``*`` items, and a
    cross-reference ``*Note X::`` reads "see X"."""
    out = []
    for node in text.split("\x1f"):
        node = _normalize(node)
        m = re.search(r"^\d+(?:\.\d+)+ (\S.*)\n=+\n", node, re.M)
        if not m:
            continue
        body = re.split(r"^\* Menu:", node[m.end():], maxsplit=1, flags=re.M)[0]
        body = re.sub(r"(\b[Ss]ee\s+)?\*[Nn]ote\s+([^:]*?)::", lambda x: (x[1] or "see ") + x[2], body)
        body = re.sub(r"(\b[Ss]ee\s+)?\*[Nn]ote\s+([^:]*?):[^.,]*[.,]", lambda x: (x[1] or "see ") + x[2], body)
        body = re.sub(r"^ {0,3}• ", "* ", body, flags=re.M)
        answer = _reflow(body)
        if answer:
            out.append((" ".join(m[1].split()), passage(answer.split("\n\n"))))
    return out


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


def _vim_pairs(root: Path) -> list[tuple[str, str]]:
    """The Vim FAQ: ``N.M. question`` at the margin (its index indents them); section banners and the trailer
    go."""
    text = _without(_text(root, "usr/share/doc/vim/FAQ.gz", "vim-doc"), r"=+\s*", r"SECTION \d+ - .*",
                    r"Current Maintainer: .*", r"Last updated on: .*")
    return numbered_faq_pairs(text, r"(?P<n>\d+\.\d+)\. (?P<q>\S.*)$")


def _cvs_pairs(root: Path) -> list[tuple[str, str]]:
    """The CVS FAQ (a FAQ-O-Matic dump): ``    N. question`` per category; the dump's category lines, dates, rules and
    navigation go, prose indents (3, 5, 10 spaces) are dropped so that only examples stay indented, and answers
    that only point elsewhere ("See 3G.4.", "[[??]]") are left out, as is the one question `eval qa` also asks."""
    text = _without(_text(root, "usr/share/doc/cvs/FAQ.gz", "cvs"), r"\s*Last modified: .*", r"\s*Category: .*",
                    r'\s*" .*"\s*', r"\s*_{5,}\s*", r"\s*\[(?:Add an answer|Category) .*")
    text = re.sub(r"^(?: {10}| {5}| {3})(?=\S)", "", text.split("_Search the FAQ-O-Matic:_")[0], flags=re.M)
    return [(q, a) for q, a in numbered_faq_pairs(text, r"    (?P<n>\d+)\. (?P<q>\S.*)$")
            if not re.fullmatch(r"\[\[\?\?\]\]|See (?:Section )?\d\w*\.\d+\.?", a) and "new category" not in q
            and q != "Where do I send bug reports?"]  # word for word an `eval qa` question


def _nut_pairs(root: Path) -> list[tuple[str, str]]:
    """The NUT FAQ (AsciiDoc ``== question`` sections, which do not wrap): ``------`` listings become indented code,
    ``////`` comments and ``*Answer N*`` labels go, ``link:x[text]`` reads text (or x), ``linkman:x[8]`` x(8), and an
    entry that only leads into the next ("Or a variation like...") is left out."""
    text = _without(_text(root, "usr/share/doc/nut/FAQ.txt.gz", "nut"), r"\*Answer \d+\*\s*", r"(?:ifn?def|endif)::.*")
    text = re.sub(r"^/{4,}\n.*?^/{4,}$", "", text, flags=re.M | re.S)  # AsciiDoc comment blocks
    text = re.sub(r"^-{4,}\n(.*?)^-{4,}$", lambda m: textwrap.indent(m[1], "    "), text, flags=re.M | re.S)
    text = re.sub(r"\blinkman:([^\s\[]+)\[(\d)\]", r"\1(\2)", text)
    text = re.sub(r"\blink:([^\s\[]+)\[([^\]]*)\]", lambda m: m[2] or m[1], text)
    pairs = numbered_faq_pairs(text, r"== (?P<q>\S.*)$", wrap=0)
    return [(q, a) for q, a in pairs if not a.startswith("Or a variation")]


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
    "vim-doc": _vim_pairs,
    "cvs": _cvs_pairs,
    "emacs-common": lambda r: info_faq_pairs(_text(r, "usr/share/info/emacs/efaq.info.gz", "emacs-common")),
    "xterm": lambda r: heading_html_faq_pairs(_one(r, "usr/share/doc/xterm/xterm.faq.html", "xterm").read_text(
        encoding="utf-8", errors="replace")),
    "nut": _nut_pairs,
    "procmail": lambda r: numbered_faq_pairs(_without(_text(r, "usr/share/doc/procmail/FAQ", "procmail"),
                                                      r"\s*\*{10,}\s*"), r"(?P<n>\d{1,2})\. (?P<q>\S.*)$"),
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


def training_faq_packages(only: list[str] | None = None) -> list[str]:
    """`FAQ_PACKAGES` (or those of them named in `only`, as a recipe pins its FAQ set) less any evaluation package."""
    from .heldout import EVAL_ONLY_FAQ_PACKAGES

    unknown = sorted(set(only or ()) - set(FAQ_PACKAGES))
    if unknown:
        raise ValueError(f"unknown FAQ packages {unknown}; known: {', '.join(FAQ_PACKAGES)}")
    return [p for p in FAQ_PACKAGES if p not in EVAL_ONLY_FAQ_PACKAGES and (only is None or p in only)]
