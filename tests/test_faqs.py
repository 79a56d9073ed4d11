"""FAQ pairs of several Debian documentation packages (train/faqs.py) and the `faq` task's held-out packages."""

import random

import pytest

from memsparse.resources import ResourceUnavailable
from memsparse.train import faqs
from memsparse.train.corpora import Passage
from memsparse.train.tasks import heldout
from memsparse.train.tasks.mix import FAQ_HELD_OUT, Mixer

POD = """=head1 NAME

perlfaqX - Files and Formats

=head2 How do I count the lines of a file?
X<lines> X<count>

Read it line by line and add one for each, or use C<$.> after the loop.
See L<perlvar/"$."> and L<the open manual|perlfunc/open>.

    my $n = 0;
    $n++ while <$fh>;

=head2 Perl Books

=over 4

=item * A book

=back

=head2 Why does C<< $x <=> $y >> return E<lt>0?

(contributed by A. Writer)

Because the left operand is smaller.
"""

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

DEBIAN_FAQ = """Table of Contents

1. Definitions and overview
    1.1. What is this FAQ?

Chapter 1. Definitions and overview

1.1. What is this FAQ?

    This document answers questions about the Debian
    distribution.^[1]

      * first point of a list
        that wraps

1.2. What is the difference between Debian GNU/Linux and other Linux
distributions?

    Its package system.

1.3. Authors

    Many people.
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


def test_perl_faq_pod() -> None:
    pairs = faqs.perl_faq_pairs(POD)
    assert [q for q, _ in pairs] == ["How do I count the lines of a file?", "Why does $x <=> $y return <0?"]
    answer = pairs[0][1]
    assert answer.startswith("Read it line by line and add one for each, or use $. after the loop.")
    assert '"$." in perlvar' in answer and "the open manual" in answer and "X<" not in answer
    assert "    my $n = 0;\n    $n++ while <$fh>;" not in answer and "my $n = 0;\n$n++ while <$fh>;" in answer
    assert pairs[1][1] == "Because the left operand is smaller."


def test_git_faq_asciidoc() -> None:
    pairs = faqs.git_faq_pairs(GITFAQ)
    assert [q for q, _ in pairs] == ["What should I put in user.name?", "How do I configure a different editor?",
                                     "How do I use hooks?"]
    assert pairs[0][1] == ("You should put your personal name.  It is stored in every commit you make.\n\nThis has "
                           "no effect on authenticating; see credential.username in git-config(1).")
    assert pairs[1][1] == "Set the EDITOR variable." and "Hooks" not in pairs[1][1]


def test_debian_faq_text() -> None:
    pairs = faqs.debian_faq_pairs(DEBIAN_FAQ)
    assert [q for q, _ in pairs] == ["What is this FAQ?",
                                     "What is the difference between Debian GNU/Linux and other Linux distributions?"]
    assert pairs[0][1] == ("This document answers questions about the Debian distribution.\n\n"
                           "* first point of a list that wraps")
    assert pairs[1][1] == "Its package system."
    assert [h for h, _ in faqs.debian_faq_sections(DEBIAN_FAQ)][-1] == "Authors"  # not a question: no pair


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
    assert heldout.HELDOUT_FAQ_PACKAGES and set(heldout.HELDOUT_FAQ_PACKAGES) <= set(faqs.FAQ_PACKAGES)
    assert FAQ_HELD_OUT == heldout.HELDOUT_FAQ_LAST["python3.11-doc"] == 24
    for pkg in heldout.HELDOUT_FAQ_PACKAGES:
        with pytest.raises(ValueError, match="held out"):
            faqs.training_faq_pairs(pkg)
    held = {q for pkg in heldout.HELDOUT_FAQ_PACKAGES for q, _ in FAKE[pkg]}
    held |= {q for pkg, n in heldout.HELDOUT_FAQ_LAST.items() for q, _ in FAKE[pkg][-n:]}
    held_text = {a for pkg in heldout.HELDOUT_FAQ_PACKAGES for _, a in FAKE[pkg]}
    held_text |= {f"Documentation page {i} of {pkg}." for pkg in heldout.HELDOUT_FAQ_PACKAGES for i in range(30)}
    mixer = Mixer({"faq": 1.0}, lambda texts: [len(t.split()) for t in texts], seed=0)
    seen = set()
    for _ in range(600):
        q = mixer.draw(200)
        assert q.question not in held and not held_text & set(q.documents)
        pkg = q.question.split(" question ")[0]
        assert q.documents[q.hops[0][0]].startswith("Answer") and q.answer.endswith(f"of {pkg}.")
        assert all(pkg in d for d in q.documents)  # distractors from the same package
        seen.add(pkg)
    assert seen == set(faqs.FAQ_PACKAGES) - set(heldout.HELDOUT_FAQ_PACKAGES)


@pytest.mark.slow
@pytest.mark.parametrize("pkg,least,docs_least", [("python3.11-doc", 150, 5000), ("perl-doc", 280, 5000),
                                                  ("git-doc", 15, 1000), ("debian-faq", 120, 10),
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
    assert all("<" not in q or pkg == "perl-doc" for q, _ in rng.sample(pairs, 10))

