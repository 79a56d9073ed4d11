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
@pytest.mark.parametrize("pkg,least,docs_least", [("python3.11-doc", 150, 5000), ("git-doc", 15, 1000),
                                                  ("sqlite3-doc", 25, 1000)])
def test_real_faq_packages(pkg, least, docs_least) -> None:
    try:
        pairs, docs = faqs.faq_pairs(pkg), faqs.faq_documents(pkg)
    except ResourceUnavailable as e:
        pytest.skip(f"source unavailable: {e}")
    assert len(pairs) >= least and len(docs) >= docs_least
    assert all(q.strip() == q and ("?" in q or len(q.split()) > 3) and a.strip() for q, a in pairs)
    assert len({q for q, _ in pairs}) >= 0.95 * len(pairs)
    rng = random.Random(0)
    assert all("<" not in q for q, _ in rng.sample(pairs, 10))

