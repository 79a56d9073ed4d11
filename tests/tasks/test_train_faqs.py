"""FAQ pairs of several Debian documentation packages (tasks/faqs.py) and the `faq` task's held-out packages."""

import random

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


@pytest.mark.slow
@pytest.mark.parametrize("pkg,least,docs_least", [
    ("python3.11-doc", 150, 5000), ("git-doc", 15, 1000), ("sqlite3-doc", 25, 1000), ("weechat-doc", 55, 0),
    ("nano", 25, 0), ("privoxy", 90, 0), ("chrony", 35, 0), ("zsh-common", 50, 0), ("zlib1g-dev", 35, 0),
    ("dnsmasq-base", 20, 0), ("irssi", 15, 0)])
def test_real_faq_packages(pkg, least, docs_least) -> None:
    try:
        pairs, docs = faqs.faq_pairs(pkg), faqs.faq_documents(pkg)
    except ResourceUnavailable as e:
        pytest.skip(f"source unavailable: {e}")
    assert len(pairs) >= least and len(docs) >= docs_least
    assert all(q.strip() == q and ("?" in q or len(q.split()) > 3) and a.strip() for q, a in pairs)
    assert len({q for q, _ in pairs}) >= 0.95 * len(pairs)
    rng = random.Random(0)
    assert all("<" not in q for q, _ in rng.sample(pairs, min(10, len(pairs))))



@pytest.mark.slow
def test_training_faqs_share_nothing_with_the_evaluation_faqs() -> None:
    """No training FAQ question is an `eval qa` question (case and punctuation aside), and no training answer shares a
    run of 12 words with an evaluation passage."""
    import re

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
