"""corpora: reST cleaning and passage splitting on inline samples; the real sources (skipped when unreachable)."""

from __future__ import annotations

import re

import pytest

from memsparse.resources import ResourceUnavailable
from memsparse.tasks import corpora as c

RST = """\
:tocdepth: 2

.. _top:

=========
Sample FAQ
=========

.. only:: html

   .. contents::

General
=======

Why use :func:`~os.path.join`?
------------------------------

Use :func:`os.path.join` (see :pep:`8` and `the docs <https://docs.python.org>`_) because it is
**portable** and *simple*; ``a + b`` is not [#]_.

.. versionchanged:: 3.6
   Accepts a :term:`path-like object <path-like object>`.

Example::

   >>> join("a", "b")
   'a/b'

Another question?
-----------------

* first item that is
  wrapped over two lines
* second item

.. function:: join(a, *p)
   :noindex:

   Join paths.

.. index:: single: hidden

+------+-----------+
| name | meaning   |
+======+===========+
| a    | :class:`x`|
|      | continued |
+------+-----------+
"""


def test_rst_sections_and_paragraphs() -> None:
    sections = c.rst_sections(RST)
    heads = [(level, title) for level, title, _ in sections]
    assert heads == [(-1, ""), (0, "Sample FAQ"), (1, "General"), (2, "Why use join?"), (2, "Another question?")]
    assert c.rst_paragraphs(sections[0][2]) == [] and c.rst_paragraphs(sections[1][2]) == []
    assert c.rst_paragraphs(sections[3][2]) == [
        "Use os.path.join (see PEP 8 and the docs) because it is portable and simple; a + b is not.",
        "Changed in version 3.6: Accepts a path-like object.",
        "Example:",
        '>>> join("a", "b")\n\'a/b\'',
    ]
    assert c.rst_paragraphs(sections[4][2]) == [
        "* first item that is wrapped over two lines\n* second item",
        "join(a, *p)",
        "Join paths.",
        "name | meaning\na | x continued",
    ]


@pytest.mark.parametrize(
    ("src", "out"),
    [
        (":meth:`!str.split`", "str.split"),
        (":ref:`tutorial-index`", "tutorial-index"),
        (":c:func:`PyList_New`", "PyList_New"),
        ("`Python <https://python.org>`__ and `label`_", "Python and label"),
        ("*args and **kwargs stay, *emphasis* goes", "*args and **kwargs stay, emphasis goes"),
        ("``*args`` and ``\\n``", "*args and \\n"),
        ("version |version|\\ s", "version 3.11s"),
    ],
)
def test_clean_inline(src: str, out: str) -> None:
    assert c.clean_inline(src) == out


def test_literal_block_ends_at_dedent() -> None:
    lines = "* Use getattr::\n\n     getattr(foo, 'bar')()\n\n  Note that it works.\n\nDone ::\n\n  x = 1".split("\n")
    expected = ["* Use getattr:", "getattr(foo, 'bar')()", "Note that it works.", "Done", "x = 1"]
    assert c.rst_paragraphs(lines) == expected


def test_split_paragraph_at_sentences() -> None:
    par = "Mr. Smith came. It rained all day long. Then it stopped! Why? Because."
    assert c.split_paragraph(par, 100) == [par]
    pieces = c.split_paragraph(par, 6)
    assert pieces == ["Mr. Smith came.", "It rained all day long.", "Then it stopped! Why? Because."]
    assert c.split_paragraph("one two three four five", 2) == ["one two", "three four", "five"]
    assert c.split_paragraph("def f():\n    a = 1\n    b = 2", 5) == ["def f():\n    a = 1", "    b = 2"]


def test_pack_passages() -> None:
    pars = ["a b c", "d e", "f g h i", "j " * 7]
    assert c.pack_passages(pars, 5) == ["a b c\n\nd e", "f g h i", "j j j j j", "j j"]
    for passage in c.pack_passages(pars * 10, 6):
        assert c.n_words(passage) <= 6


def test_sotu_paragraphs() -> None:
    text = "[As delivered in person]\r\n\r\nThank you. [Applause]  Good\nnight.\n\n\n[Laughter]\n\nEnd\xa0here."
    assert c.sotu_paragraphs(text) == ["Thank you. Good night.", "End here."]


def test_cached_json(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MEMSPARSE_CACHE", str(tmp_path))
    calls = []
    build = lambda: calls.append(1) or [["t", "x", "s"]]  # noqa: E731
    assert c._cached("probe", build) == [["t", "x", "s"]] == c._cached("probe", build)
    assert calls == [1] and list((tmp_path / "data").glob("probe.*.json"))


def test_missing_tool_is_unavailable() -> None:
    with pytest.raises(ResourceUnavailable, match="not found"):
        c._run(["memsparse-no-such-tool"], "probe")


def _dictd(entries: list[tuple[str, str]], extra: list[str] = ()) -> tuple[str, bytes]:
    """A dictd (index, data) pair for the given (headword, entry) list; `extra` index lines are appended."""

    def num(n: int) -> str:
        digits = ""
        while True:
            digits = c._DICTD_DIGITS[n % 64] + digits
            n //= 64
            if not n:
                return digits

    data, lines = b"", []
    for head, raw in entries:
        body = raw.encode()
        lines.append(f"{head}\t{num(len(data))}\t{num(len(body))}")
        data += body
    return "\n".join(lines + list(extra)) + "\n", data


FOLDOC = "C/SCSC\nCost/Schedule Control System\n\n   <project> (C/SCSC) A set of {criteria}.\n\n   (1996-05-29)\n\n"
WORDNET = 'air bag\n    n 1: a safety restraint; "the {air bag} inflated" [syn: {airbag}]\n'


def test_dictd_entries_and_definitions() -> None:
    index, data = _dictd([("00-database-info", "about"), ("C/SCSC", FOLDOC), ("air bag", WORDNET)])
    first = index.splitlines()[1].split("\t")
    index += f"alias\t{first[1]}\t{first[2]}\n"  # an alias of C/SCSC: the same bytes, listed once
    entries = c.dictd_entries(index, data)
    assert [h for h, _ in entries] == ["C/SCSC", "air bag"] and entries[1][1] == WORDNET
    assert c.definition_text(FOLDOC, 120) == ("C/SCSC", "<project> (C/SCSC) A set of criteria.")
    assert c.definition_text(WORDNET, 120) == ("air bag", 'n 1: a safety restraint; "the air bag inflated"')
    assert c.definition_text("lonely headword\n", 120) is None
    long = "word\n   " + " ".join(["Some words here."] * 20 + ["tail"] * 30)
    head, text = c.definition_text(long, 70)
    assert text.endswith("here.") and c.n_words(text) <= 70  # cut at a sentence end
    with pytest.raises(ValueError, match="past the data"):
        c.dictd_entries(index, data[:-5])  # a truncated file
    with pytest.raises(ValueError, match="3 tab-separated fields"):
        c.dictd_entries("broken line\n", data)


GCIDE_ENTRY = """Lantern \\Lan"tern\\ (l[a^]n"t[~e]rn), n. [F. lanterne, fr. L. lanterna, [ae]ther.]
   1. Something inclosing a light, and protecting it from wind
      and rain; -- called also {lanthorn}. [Obs.]
      [1913 Webster]

         A lantern in the hall was lit.   --Sir A. Writer.
      [1913 Webster]

   2. (Arch.) An open structure on a roof.
      [1913 Webster]

   Syn: lamp; light.
"""


def test_gcide_text() -> None:
    """GCIDE entries (written here in GCIDE's layout): the headword, then the definition without pronunciation,
    part of speech, etymology (brackets nested in it too), sense number, quotation, source tags and synonyms."""
    assert c.gcide_text(GCIDE_ENTRY, 120) == (
        "Lantern", "Something inclosing a light, and protecting it from wind and rain; -- called also lanthorn. "
                   "[Obs.] 2. (Arch.) An open structure on a roof.")
    assert c.gcide_text('Fro \\Fro\\, adv.\n   From; away; back. [Obs.] --Chaucer.\n   [1913 Webster]\n', 120) == (
        "Fro", "From; away; back. [Obs.]")
    assert c.gcide_text("Lantern \\Lan\"tern\\, n.\n   [1913 Webster]\n", 120) is None  # no definition
    assert c.gcide_text("no backslash form\n   text\n", 120) is None
    head, text = c.gcide_text("Word \\Word\\, n.\n   " + " ".join(["Some words here."] * 20 + ["tail"] * 30), 70)
    assert text.endswith("here.") and c.n_words(text) <= 70


HANDBOOK_PAGE = """<?xml version="1.0" encoding="UTF-8"?><html><head><title>6.3.&#160;The apt-cache Command</title>
</head><body><div class="navheader">Prev Next</div><div class="section"><div class="para">
   The <code class="command">apt-cache</code> command &amp; its
   cache.</div><div class="sidebar"><div class="para">A cache is <em>temporary</em>
   <div class="note">storage</div> for speed.</div></div><div class="para">   </div></div></body></html>"""


def test_handbook_page() -> None:
    """A handbook XHTML page: its title without the section number, and the text of each para div, nested markup
    flattened, entities decoded, empty paragraphs and navigation left out."""
    assert c.handbook_page(HANDBOOK_PAGE) == (
        "The apt-cache Command", ["The apt-cache command & its cache.", "A cache is temporary storage for speed."])
    assert c.handbook_page("<html><title>Chapter 12. Advanced Administration</title></html>") == (
        "Advanced Administration", [])


# --- the real sources: downloaded and parsed once, then served from the cache ----------------------------------------


def _load(fn, monkeypatch):
    """fn() twice: the first call may download and parse; the second must come from the cache alone."""
    try:
        first = fn()
    except ResourceUnavailable as e:
        pytest.skip(f"source unavailable: {e}")

    def offline(*a, **k):
        raise AssertionError("a cached source was fetched or parsed again")

    for name in ("fetch_pypi_wheel", "debian_package", "_build_sotu", "_build_faq", "_build_docs",
                 "_build_definitions", "_build_webster", "_build_handbook"):
        monkeypatch.setattr(c, name, offline)
    out = fn()
    assert out == first
    return out


def _check(passages: list[c.Passage], source: str, max_words: int = 250) -> None:
    assert all(p.source == source and p.title and p.text.strip() for p in passages)
    assert all(c.n_words(p.text) <= max_words for p in passages)
    text = "".join(p.text for p in passages[::50])
    assert text.isprintable() or all(ch.isprintable() or ch in "\n\t" for ch in text)


def test_sotu_real(monkeypatch) -> None:
    passages = _load(c.sotu, monkeypatch)
    titles = list(dict.fromkeys(p.title for p in passages))
    assert len(titles) == 249 and len(passages) > 5000
    assert all(re.search(r"\b(17|18|19|20)\d\d\b", t) for t in titles)
    assert "State of the Union, 1962 (Kennedy)" in titles
    _check(passages, "sotu")


def test_python_faq_real(monkeypatch) -> None:
    faq = _load(c.python_faq, monkeypatch)
    assert len(faq) >= 150
    qa = dict(faq)
    assert "Python is a programming language" in qa["What is Python?"]
    assert not any(re.search(r":\w+:`|^\.\. ", a, re.M) for a in qa.values())


def test_python_docs_real(monkeypatch) -> None:
    passages = _load(c.python_docs, monkeypatch)
    assert len(passages) > 5000
    assert any(p.title == "Python FAQ: Why is Python installed on my machine?" for p in passages)
    assert sum(bool(re.search(r":[\w:-]+:`", p.text)) for p in passages) == 0
    _check(passages, "python-doc")


def test_definitions_real(monkeypatch) -> None:
    passages = _load(c.definitions, monkeypatch)
    assert len(passages) > 150_000 and {p.source for p in passages} == {"foldoc", "wn"}
    by_head = {(p.source, p.title): p.text for p in passages}
    assert "safety restraint" in by_head["wn", "air bag"]
    assert not any("{" in p.text or "[syn:" in p.text for p in passages[::97])
    assert all(c.n_words(p.text) <= 120 and p.title.strip() for p in passages)


def test_webster_real(monkeypatch) -> None:
    passages = _load(c.webster, monkeypatch)
    assert len(passages) > 100_000 and {p.source for p in passages} == {"gcide"}
    apple = [p.text for p in passages if p.title == "Apple"]  # the noun, the verb, ...
    assert any(t.startswith("The fleshy pome or fruit of a rosaceous tree") for t in apple)
    assert not any(re.search(r"[{}]|\[1913 Webster\]|\\\\", p.text) for p in passages[::97])
    assert all(c.n_words(p.text) <= 120 and p.title.strip() for p in passages)


def test_debian_handbook_real(monkeypatch) -> None:
    passages = _load(c.debian_handbook, monkeypatch)
    assert len(passages) > 500 and sum(map(c.n_words, (p.text for p in passages))) > 100_000
    assert "Debian Administrator's Handbook: The apt-cache Command" in {p.title for p in passages}
    assert not any(re.search(r"</?(?:div|span|code|em|a|p)\b[^>]*>", p.text) for p in passages)  # no markup left
    _check(passages, "debian-handbook")
