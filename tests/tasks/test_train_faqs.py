"""FAQ pairs of several Debian documentation packages (tasks/faqs.py) and the `faq` task's held-out packages."""

import re

import pytest

from memsparse.resources import ResourceUnavailable
from memsparse.tasks import faqs, heldout
from memsparse.tasks.corpora import Passage
from memsparse.tasks.mix import FAQ_HELD_OUT, Mixer

GITFAQ = """Configuration
-------------

[[user-name]]
What should I put in `user.name`?::
\tYou should put your personal name.  It is stored in every
\tcommit you make.
+
This has no effect on authenticating; see `credential.username` in linkgit:git-config[1].

[[editor]]
How do I configure a different editor?::
\tSet the `EDITOR` variable.

Hooks
-----

[[hooks]]
How do I use hooks?::
\tOn the server, in the `pre-receive` hook.
"""

SQLITE = """<ol><li><a href="#q1">How do I create a field?</a></li></ol><a name="q1"></a>
<p><b>(1) How do I create an AUTOINCREMENT field?</b></p>
<blockquote><p>Short answer: A column declared <a href="x.html">INTEGER PRIMARY KEY</a> will
  autoincrement.</p>

  <p>Longer answer: it is one more than the largest &quot;rowid&quot;.</p></blockquote></li>
<a name="q2"></a>
<p><b>(2) What datatypes does SQLite support?</b></p>
<blockquote><p>SQLite uses dynamic typing.</p></blockquote>
"""


def test_git_faq_asciidoc() -> None:
    pairs = faqs.git_faq_pairs(GITFAQ)
    assert [q for q, _ in pairs] == ["What should I put in user.name?", "How do I configure a different editor?",
                                     "How do I use hooks?"]
    assert pairs[0][1] == ("You should put your personal name.  It is stored in every commit you make.\n\nThis has "
                           "no effect on authenticating; see credential.username in git-config(1).")
    assert pairs[1][1] == "Set the EDITOR variable." and "Hooks" not in pairs[1][1]


def test_sqlite_faq_html() -> None:
    pairs = faqs.sqlite_faq_pairs(SQLITE)
    assert pairs == [
        ("How do I create an AUTOINCREMENT field?", "Short answer: A column declared INTEGER PRIMARY KEY will "
         "autoincrement.\n\nLonger answer: it is one more than the largest \"rowid\"."),
        ("What datatypes does SQLite support?", "SQLite uses dynamic typing."),
    ]


PREFIXED = """
   Frequently Asked Questions

Q: Why does the daemon open UDP ports above 1024
   as well as port 53?

A: The high ports are for replies from the upstream
   nameservers.

   Queries are dropped on them.

Q: How do I easily write text that starts with a slash?
A: / /text
---------------------------------------------------------------
Q: My mouse doesn't sense the middle button.

A: Use the -R option.
"""

NUMBERED = """Chapter 1: Introducing zsh

1.1. Sources of information
1.2. What is it?

1.1: Sources of information

  Information from the web.

1.2: What is it?

Zsh is a UNIX command interpreter (shell) which of the standard
  shells most resembles the Korn shell.

  % zsh -f

1.3: Why does my bash script report an error
  when I run it under zsh?

Because zsh is not bash.
"""


def test_prefixed_faq_text() -> None:
    pairs = faqs.prefixed_faq_pairs(PREFIXED)
    assert pairs == [
        ("Why does the daemon open UDP ports above 1024 as well as port 53?",
         "The high ports are for replies from the upstream nameservers.\n\nQueries are dropped on them."),
        ("How do I easily write text that starts with a slash?", "/ /text"),  # the dashes end it
        ("My mouse doesn't sense the middle button.", "Use the -R option."),
    ]


def test_numbered_faq_text() -> None:
    """The table of contents ("1.2.") does not match the entries' heading ("1.2:"); a question wraps."""
    pairs = dict(faqs.numbered_faq_pairs(NUMBERED, r"(?P<n>\d+\.\d+): (?P<q>\S.*)$"))
    assert list(pairs) == ["Sources of information", "What is it?",
                           "Why does my bash script report an error when I run it under zsh?"]
    assert pairs["What is it?"] == ("Zsh is a UNIX command interpreter (shell) which of the standard shells most "
                                    "resembles the Korn shell.\n\n% zsh -f")
    assert pairs["Why does my bash script report an error when I run it under zsh?"] == "Because zsh is not bash."
    toc = "1. Is it fast?\n 2. Is it free?\n\n 1. Is it fast?\n\n    Yes, very.\n\n 2. Is it free?\n\n    Yes.\n"
    assert faqs.numbered_faq_pairs(toc, r" ?(?P<n>\d{1,2})\. (?P<q>\S.*)$") == [("Is it fast?", "Yes, very."),
                                                                                 ("Is it free?", "Yes.")]


HEADINGS_HTML = """<h1>XTerm &ndash; Frequently Asked Questions</h1>
<ul><li><a href="#what">What is XTerm?</a></li><li><a href="#who">Who wrote XTerm?</a></li></ul>
<h2 id="what-id"><a name="what">What
is XTerm?</a></h2>
<p>A terminal emulator for the
<em>X Window System</em>.</p>
<pre>xterm -e top</pre>
<h3>History</h3><p>Old.</p>
<h3 id="why">Why a VT220?</h3>
<ul><li>VT100s have no function keys.</li></ul>
"""

INFO = """This is efaq.info, produced by makeinfo.
\x1f
File: efaq.info,  Node: Basic keys,  Next: Extended commands,  Up: FAQ notation

1.1 What do these mean: ‘C-h’, ‘C-M-a’, <RET>, etc.?
====================================================

   • ‘C-x’: press the ‘x’ key while holding down the <Control> key (if
     there is none, *note No Meta key::)

   • <SPC>: Space bar

   Key sequences longer than one key are written in a
longer form.  *Note Keys: (emacs)Keys, for more.

     (setq x 1)
     (setq y 2)

\x1f
File: efaq.info,  Node: Common requests,  Next: Setting up,  Up: Top

5 Common requests
*****************

* Menu:

* Setting up a customization file::
\x1f
File: efaq.info,  Node: Setting up,  Up: Common requests

5.1 How do I set up a ‘.emacs’ file properly?
=============================================

See *note (emacs)Init File::.

* Menu:

* Sub::
"""


def test_heading_html_faq() -> None:
    """Unnumbered headings, the answer up to the next heading; the table of contents' in-page links go."""
    pairs = faqs.heading_html_faq_pairs(HEADINGS_HTML)
    assert pairs == [("What is XTerm?", "A terminal emulator for the X Window System.\n\nxterm -e top"),
                     ("History", "Old."), ("Why a VT220?", "VT100s have no function keys.")]


def test_info_faq() -> None:
    pairs = faqs.info_faq_pairs(INFO)
    assert [q for q, _ in pairs] == ["What do these mean: ‘C-h’, ‘C-M-a’, <RET>, etc.?",
                                     "How do I set up a ‘.emacs’ file properly?"]
    assert pairs[0][1] == ("* ‘C-x’: press the ‘x’ key while holding down the <Control> key (if there is none, see "
                           "No Meta key)\n\n* <SPC>: Space bar\n\nKey sequences longer than one key are written in a "
                           "longer form.  see Keys for more.\n\n(setq x 1)\n(setq y 2)")
    assert pairs[1][1] == "See (emacs)Init File."


NUT = """ifndef::external_title[]
NUT Frequently Asked Questions
==============================
endif::external_title[]

== My UPS driver says it's 'broken'.  What now?
Or a variation like...

== My favorite UPS driver disappeared after an upgrade.  What now?

Drivers are removed when nobody maintains them; see link:UPGRADING[the notes] and
linkman:upsd[8].

== Why doesn't upsd implement upsmon?  I run THREE programs!
*Answer 1*

We follow the "tool for the job" philosophy:

------
# upsmon -c fsd
------

////
TODO: a comment
////
*Answer 2*

See link:docs/config-notes.txt[].
"""

CVS = """   CVS is Copyright (C) 1989-2005 The Free Software Foundation, Inc.

  Category: /Advanced_Topics_/Branching_and_Mergin/

          " + Branching and Merging"

    1. What is a branch?

          Unfortunately, the word "branch" is an overloaded technical
          term.

     How Humans use the word "branch":

          Most development starts on one line.

   Last modified: _6/13/1997_

    2. How do I merge changes from the trunk into my branch or between
    branches?

   Like this:

            cvs update -j <tag>
            cvs commit

   Last modified: _6/13/1997_
     _________________________________________________________________

    3. I use A/UX. Is there anything I need to know?

   [[??]]

    4. How do I release a tree I removed?

   See 3G.4.

   [Add an answer to this category]

   _Search the FAQ-O-Matic:_ ____ Search
"""


def test_package_faqs_nut_and_cvs(tmp_path) -> None:
    """NUT: AsciiDoc sections that do not wrap, listings as code, links as text; CVS: the FAQ-O-Matic's categories,
    dates and navigation go, wrapped questions join, answers that only point elsewhere are left out."""
    import gzip

    for path, text in (("usr/share/doc/nut/FAQ.txt.gz", NUT), ("usr/share/doc/cvs/FAQ.gz", CVS)):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(gzip.compress(text.encode()))
    assert faqs._nut_pairs(tmp_path) == [
        ("My favorite UPS driver disappeared after an upgrade. What now?",
         "Drivers are removed when nobody maintains them; see the notes and upsd(8)."),
        ("Why doesn't upsd implement upsmon? I run THREE programs!",
         "We follow the \"tool for the job\" philosophy:\n\n# upsmon -c fsd\n\nSee docs/config-notes.txt."),
    ]
    assert faqs._cvs_pairs(tmp_path) == [
        ("What is a branch?", "Unfortunately, the word \"branch\" is an overloaded technical term.\n\nHow Humans use "
         "the word \"branch\":\n\nMost development starts on one line."),
        ("How do I merge changes from the trunk into my branch or between branches?",
         "Like this:\n\ncvs update -j <tag>\ncvs commit"),
    ]


def test_without_drops_whole_lines_only() -> None:
    assert faqs._without("=====\nSECTION 2 - HELP\nKeep = this\n  Last updated on: 2005", r"=+", r"SECTION \d+ - .*",
                         r"\s*Last updated on: .*") == "Keep = this"


def test_a_damaged_faq_file_is_a_clear_error(tmp_path, monkeypatch) -> None:
    faq = tmp_path / "usr/share/doc/dnsmasq-base/FAQ.gz"
    faq.parent.mkdir(parents=True)
    faq.write_bytes(b"\x1f\x8b not really gzip")
    monkeypatch.setattr(faqs, "debian_package", lambda pkg: tmp_path)
    with pytest.raises(ResourceUnavailable, match="cannot read the FAQ in Debian package dnsmasq-base"):
        faqs._build_pairs("dnsmasq-base")
    faq.unlink()
    with pytest.raises(ResourceUnavailable, match="no usr/share/doc/dnsmasq-base/FAQ.gz in Debian package"):
        faqs._build_pairs("dnsmasq-base")


def test_unknown_package_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown FAQ package 'emacs'"):
        faqs.faq_pairs("emacs")


FAKE = {pkg: [(f"{pkg} question {i}?", f"Answer {i} of {pkg}. More text.") for i in range(40)]
        for pkg in faqs.FAQ_PACKAGES}


@pytest.fixture
def fake_faqs(monkeypatch):
    monkeypatch.setattr(faqs, "faq_pairs", lambda pkg: FAKE[pkg])
    monkeypatch.setattr(faqs, "faq_documents", lambda pkg, max_words=250: [
        Passage(f"{pkg} doc {i}", f"Documentation page {i} of {pkg}.", pkg) for i in range(30)])


def test_held_out_faq_never_drawn(fake_faqs) -> None:
    """No evaluation package among the training FAQs; the last 24 Python FAQ questions never drawn."""
    assert not set(heldout.EVAL_ONLY_FAQ_PACKAGES) & set(faqs.FAQ_PACKAGES)
    for pkg in heldout.EVAL_ONLY_FAQ_PACKAGES:
        with pytest.raises(ValueError, match="evaluation only"):
            faqs.training_faq_pairs(pkg)
    assert FAQ_HELD_OUT == heldout.EVAL_ONLY_FAQ_LAST["python3.11-doc"] == 24
    held = {q for pkg, n in heldout.EVAL_ONLY_FAQ_LAST.items() for q, _ in FAKE[pkg][-n:]}
    mixer = Mixer({"faq": 1.0}, lambda texts: [len(t.split()) for t in texts], seed=0)
    seen, asked = set(), set()
    for _ in range(600):
        q = mixer.draw(200)
        asked.add(q.question)
        pkg = q.question.split(" question ")[0]
        assert q.documents[q.hops[0][0]].startswith("Answer") and q.answer.endswith(f"of {pkg}.")
        assert all(pkg in d for d in q.documents)  # distractors from the same package
        seen.add(pkg)
    assert not asked & held and seen == set(faqs.FAQ_PACKAGES)


def test_a_recipe_pins_its_faq_packages(fake_faqs, tmp_path) -> None:
    """`faq_packages` keeps a recipe drawing the FAQs it was run with when more are added; a name not among
    `FAQ_PACKAGES` (or an evaluation package) is one clear error when the recipe loads."""
    from memsparse.train.trainer import Recipe

    pinned = ["git-doc", "nano"]
    mixer = Mixer({"faq": 1.0}, lambda texts: [len(t.split()) for t in texts], seed=0, faq_packages=pinned)
    assert {mixer.draw(200).question.split(" question ")[0] for _ in range(200)} == set(pinned)
    base = 'base = "smollm2"\n[tasks]\nfaq = 1.0\n[router_fit]\ngroups = 4\nval_groups = 1\n'
    good = tmp_path / "good.toml"
    good.write_text('faq_packages = ["git-doc", "nano"]\n' + base)
    assert Recipe.load(good).faq_packages == pinned
    for value, message in [('["git-doc", "perl-doc"]', "unknown FAQ packages ['perl-doc']"),
                           ('"git-doc"', "must be a non-empty list"), ("[]", "must be a non-empty list")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(f"faq_packages = {value}\n" + base)
        with pytest.raises(ValueError, match=re.escape(message)):
            Recipe.load(bad)


@pytest.mark.slow
@pytest.mark.parametrize("pkg,least,docs_least", [
    ("python3.11-doc", 150, 5000), ("git-doc", 15, 1000), ("sqlite3-doc", 25, 1000), ("weechat-doc", 55, 0),
    ("nano", 25, 0), ("privoxy", 90, 0), ("chrony", 35, 0), ("zsh-common", 50, 0), ("zlib1g-dev", 35, 0),
    ("dnsmasq-base", 20, 0), ("irssi", 15, 0), ("vim-doc", 350, 0), ("cvs", 260, 0), ("emacs-common", 115, 0),
    ("xterm", 45, 0), ("nut", 40, 0), ("procmail", 15, 0)])
def test_real_faq_packages(pkg, least, docs_least) -> None:
    try:
        pairs, docs = faqs.faq_pairs(pkg), faqs.faq_documents(pkg)
    except ResourceUnavailable as e:
        pytest.skip(f"source unavailable: {e}")
    assert len(pairs) >= least and len(docs) >= docs_least
    assert all(q.strip() == q and ("?" in q or len(q.split()) > 3) and a.strip() for q, a in pairs)
    assert len({q for q, _ in pairs}) >= 0.95 * len(pairs)
    # no HTML tag left in a question (key and placeholder names such as <RET>, <tag> or <x> are the FAQs' own)
    assert not [q for q, _ in pairs if re.search(r"</?(?:a|b|i|p|em|tt|code|pre|br|span|div|li|ul|ol|h\d)\b[^>]*>", q)]



@pytest.mark.slow
def test_training_faqs_share_nothing_with_the_evaluation_faqs() -> None:
    """No training FAQ question is an `eval qa` question (case and punctuation aside), and no training answer shares a
    run of 12 words with an evaluation passage."""
    from memsparse.eval.faqs import _fetch_entries

    try:
        rows = _fetch_entries()
        train = [p for pkg in faqs.training_faq_packages() for p in faqs.training_faq_pairs(pkg)]
    except ResourceUnavailable as e:
        pytest.skip(f"source unavailable: {e}")

    def norm(q: str) -> str:
        return re.sub(r"\W+", " ", q.lower()).strip()

    def runs(text: str, n: int = 12) -> set[str]:
        w = text.split()
        return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}

    assert len(train) >= 500
    asked = {norm(r["question"]) for r in rows}
    assert not [q for q, _ in train if norm(q) in asked]
    held = set().union(*(runs(r["passage"]) for r in rows))
    assert not [q for q, a in train if runs(a) & held]
