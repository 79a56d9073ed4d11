"""The QA evaluation set: the FAQ parsers on small inline samples in each package's format, the reference answer,
the fixed dev/test split, and one clear error line for a missing or damaged source; the real packages (slow)."""

import gzip
import json

import pytest

from memsparse.eval import faqs
from memsparse.resources import ResourceUnavailable

POD = """=head1 NAME

perlfaq4 - Data Manipulation

=head1 Data: Numbers

=head2 Why is int() broken?
X<int> X<broken>

(contributed by brian d foy)

Your C<int()> is most probably working just fine. It's the E<lt>numbersE<gt> that aren't
quite what you think. See L<perlop/"Floating-point Arithmetic">.

    print int(0.6/0.2-2), "\\n";

=head2 Data: Dates

=head1 Data: Strings

=head2 How do I reverse a string?

Use C<< reverse() >> in scalar context.
"""

NUMBERED = """FAQ

 1. Philosophy
  1.1 What is cURL?
  1.2 How do I tell curl to resume
      a transfer?

 1. Philosophy

  1.1 What is cURL?

  cURL is the name of the project. The name is a play on 'Client for URLs'.

  The project produces two products:

     curl -O https://example.com

  1.2 How do I tell curl to resume
      a transfer?

  curl supports resumed transfers both ways on both FTP and HTTP. Try the -C option.

 2. Install

  2.1 configure fails when using static libraries

  You need to tell configure about the libraries.
"""

HTML = """<html><body><h2 class="chapter">7 R Miscellanea</h2>
<h3 class="section">7.1 How can I set components of a list to NULL?<a href="#x"> #</a> TOC</h3>
<p>You can use</p><pre class="example">x[i] &lt;- list(NULL)</pre>
<p>to set component <code>i</code> of the list <var>x</var> to <code>NULL</code>.</p>
<h2><a id="G1">G1. What is fetchmail and why should I
bother?</a></h2><p>Fetchmail is a one-stop solution. It retrieves mail.</p>
<h3>Legalese</h3><p>Not an entry: no number.</p></body></html>"""


def test_pod_faq_entries_markup_and_chapters():
    entries = faqs.parse_pod_faq(POD)
    assert [(c, q) for c, q, _ in entries] == [("Data: Numbers", "Why is int() broken?"),
                                               ("Data: Numbers", "Data: Dates"),
                                               ("Data: Strings", "How do I reverse a string?")]
    answer = entries[0][2]
    assert answer[1] == ("Your int() is most probably working just fine. It's the <numbers> that aren't quite what "
                         "you think. See perlop.")
    assert answer[2].startswith("    print int(")  # code kept as code
    assert faqs.reference_answer(answer) == "Your int() is most probably working just fine."  # credit line skipped
    assert entries[2][2] == ["Use reverse() in scalar context."]


def test_numbered_faq_skips_the_table_of_contents_and_joins_wrapped_headings():
    entries = faqs.parse_numbered_faq(NUMBERED, 2)
    assert [(c, q) for c, q, _ in entries] == [("1", "What is cURL?"),
                                               ("1", "How do I tell curl to resume a transfer?"),
                                               ("2", "configure fails when using static libraries")]
    assert entries[0][2][1] == "The project produces two products:"
    assert entries[0][2][2] == "     curl -O https://example.com"  # code: kept with its indentation
    assert faqs.reference_answer(entries[1][2]) == "curl supports resumed transfers both ways on both FTP and HTTP."


def test_html_faq_numbered_and_lettered_headings():
    entries = faqs.parse_html_faq(HTML)
    assert [(c, q) for c, q, _ in entries] == [("7", "How can I set components of a list to NULL?"),
                                               ("G", "What is fetchmail and why should I bother?")]
    assert entries[0][2] == ["You can use", "    x[i] <- list(NULL)",
                             "to set component i of the list x to NULL."]


def test_reference_answer_and_passage_rules():
    assert faqs.reference_answer(["    code();", "(contributed by someone)", "Yes. Use the -L option. More."]) == \
        "Yes. Use the -L option."
    assert faqs.reference_answer(["One two three. Four."], max_words=2) == "One two"
    assert faqs.reference_answer(["    only code"]) == ""
    assert faqs.passage(["a " * 10, "b " * 10, "c " * 10], max_words=25) == "\n\n".join(["a " * 10, "b " * 10])
    assert faqs.passage(["w " * 50], max_words=20) == " ".join(["w"] * 20)
    assert faqs.passage(["(contributed by brian d foy)", "Use it."]) == "Use it."


def _fake_packages(tmp_path):
    """Extracted-package folders holding the sample FAQs at the real packages' paths."""
    roots = {pkg: tmp_path / pkg for pkg in faqs.SOURCES}
    pod = roots["perl-doc"] / "usr/share/perl/5.36.0/pod"
    pod.mkdir(parents=True)
    (pod / "perlfaq4.pod").write_text(POD)
    curl = roots["libcurl4-doc"] / "usr/share/doc/libcurl4"
    curl.mkdir(parents=True)
    (curl / "FAQ.gz").write_bytes(gzip.compress(NUMBERED.encode()))
    for pkg, rel in (("r-doc-html", "usr/share/doc/r-doc-html/manual/R-FAQ.html"),
                     ("ffmpeg-doc", "usr/share/doc/ffmpeg/manual/faq.html"),
                     ("fetchmail", "usr/share/doc/fetchmail/fetchmail-FAQ.html")):
        (roots[pkg] / rel).parent.mkdir(parents=True)
        (roots[pkg] / rel).write_text(HTML)
    deb = roots["debian-faq"] / "usr/share/doc/debian/FAQ"
    deb.mkdir(parents=True)
    text = ("1.1.\xa0What is this FAQ?\n\n    This document gives frequently asked questions about Debian.\n\n"
            "1.2.\xa0What is Debian GNU/Linux and how is it\ndifferent?\n\n    Debian GNU/Linux is a particular "
            "distribution of the Linux operating system.\n")
    (deb / "debian-faq.en.txt.gz").write_bytes(gzip.compress(text.encode()))
    return roots


def test_entries_split_and_qa_set(tmp_path):
    rows = faqs.build_entries(_fake_packages(tmp_path))
    deb = [r for r in rows if r["package"] == "debian-faq"]
    assert [r["question"] for r in deb] == ["What is this FAQ?", "What is Debian GNU/Linux and how is it different?"]
    asked = {(r["package"], r["question"]) for r in rows if r["asked"]}
    assert ("perl-doc", "Data: Dates") not in asked and ("perl-doc", "Why is int() broken?") in asked
    assert ("libcurl4-doc", "configure fails when using static libraries") not in asked  # not a question
    sets = {s: faqs.qa_set(rows, s) for s in faqs.SPLITS}
    assert sets["dev"].paragraphs == sets["test"].paragraphs == [r["passage"] for r in rows]  # one memory
    assert len(sets["dev"].questions) + len(sets["test"].questions) == len(asked)
    for s, data in sets.items():  # each question's gold passage is its own answer, in a chapter of its split
        assert data.split == s and data.name == "debian-faqs"
        for q, ref, gold in data.questions:
            row = rows[gold]
            assert row["question"] == q and ref == [row["reference"]]
            assert faqs.split_of(row["package"], row["chapter"]) == s
    chapters = {s: {data.article[g] for _, _, g in data.questions} for s, data in sets.items()}
    assert chapters["dev"] and chapters["test"] and not chapters["dev"] & chapters["test"]  # by chapter
    assert faqs.qa_set(rows, "test", 2).questions == sets["test"].questions[:2]  # a smaller run is a prefix
    n = len(sets["test"].questions)
    part = faqs.qa_set(rows, "test", 1, skip=n - 1)  # a split answered in parts: the last question alone
    assert part.questions == sets["test"].questions[-1:] and part.skip == n - 1
    with pytest.raises(ValueError, match=f"skip {n}: the test split has {n} questions"):
        faqs.qa_set(rows, "test", skip=n)
    assert faqs.qa_set([{**r, "asked": False} for r in rows], "test").questions == []  # no questions: no error
    with pytest.raises(ValueError, match="unknown split 'train'"):
        faqs.qa_set(rows, "train")


def test_the_faq_packages_are_eval_only():
    """The packages read here are exactly the ones training must never read."""
    from memsparse.tasks.heldout import EVAL_ONLY_CORPORA, EVAL_ONLY_FAQ_PACKAGES

    assert set(faqs.SOURCES) == set(EVAL_ONLY_FAQ_PACKAGES) and "debian_faqs" in EVAL_ONLY_CORPORA
    import ast
    from pathlib import Path

    import memsparse.tasks
    import memsparse.train

    training = [p for m in (memsparse.train, memsparse.tasks) for p in Path(m.__file__).parent.rglob("*.py")]
    for path in training:  # no string in training code or its tasks names one of them (heldout.py only lists them)
        if path.name != "heldout.py":
            named = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
            assert not named & set(EVAL_ONLY_FAQ_PACKAGES), path


def test_split_is_fixed_and_by_chapter():
    """The hash is fixed: these chapters' splits never change (a change would mix test questions into dev)."""
    got = {c: faqs.split_of(p, c) for p, c in [("perl-doc", "Perl FAQ perlfaq8: DESCRIPTION"),
                                               ("r-doc-html", "R FAQ 7"), ("debian-faq", "Debian FAQ 3"),
                                               ("libcurl4-doc", "curl FAQ 3")]}
    assert got == {"Perl FAQ perlfaq8: DESCRIPTION": "test", "R FAQ 7": "dev", "Debian FAQ 3": "dev",
                   "curl FAQ 3": "test"}
    chapters = [("pkg", f"chapter {i}") for i in range(400)]
    share = sum(faqs.split_of(p, c) == "dev" for p, c in chapters) / len(chapters)
    assert abs(share - faqs.DEV_SHARE) < 0.08


def test_missing_or_damaged_source_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from memsparse import cli
    from memsparse.tasks import corpora

    roots = _fake_packages(tmp_path)
    (roots["r-doc-html"] / "usr/share/doc/r-doc-html/manual/R-FAQ.html").unlink()
    with pytest.raises(ResourceUnavailable, match="cannot read the R FAQ in Debian package r-doc-html"):
        faqs.build_entries(roots)
    (roots["libcurl4-doc"] / "usr/share/doc/libcurl4/FAQ.gz").write_bytes(b"not gzip")
    with pytest.raises(ResourceUnavailable, match="curl FAQ"):
        faqs.build_entries({"libcurl4-doc": roots["libcurl4-doc"]})
    (roots["perl-doc"] / "usr/share/perl/5.36.0/pod/perlfaq4.pod").unlink()
    with pytest.raises(ResourceUnavailable, match="no Perl FAQ entries found in Debian package perl-doc"):
        faqs.build_entries({"perl-doc": roots["perl-doc"]})

    monkeypatch.setenv("MEMSPARSE_CACHE", str(tmp_path / "cache"))

    def unreachable(pkg):
        raise ResourceUnavailable(f"cannot download Debian package {pkg}: E: Unable to locate package {pkg}")

    monkeypatch.setattr(corpora, "debian_package", unreachable)
    assert cli.main(["eval", "qa", "--systems", "rag1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["memsparse eval: error: cannot download Debian package perl-doc: E: Unable to locate package "
                   "perl-doc"]
    damaged = tmp_path / "cache" / "data" / f"faq-qa.v{faqs.FORMAT}.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('[{"package": ')
    assert cli.main(["eval", "qa", "--systems", "rag1", "--split", "dev"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged cache file" in err[0] and str(damaged) in err[0]
    damaged.write_text(json.dumps([{"package": "perl-doc"}]))  # parses, but is not the set's rows
    assert cli.main(["eval", "qa", "--systems", "rag1"]) == 2
    assert "damaged cache file" in capsys.readouterr().err


@pytest.mark.slow
def test_real_faqs():
    """The six Debian packages download and parse: hundreds of passages, both splits well filled and disjoint."""
    try:
        rows = faqs._fetch_entries()
    except ResourceUnavailable as e:
        pytest.skip(f"the Debian FAQ packages are not reachable: {e}")
    assert {r["package"] for r in rows} == set(faqs.SOURCES) and len(rows) > 700
    dev, test = faqs.load_qa("dev"), faqs.load_qa("test")
    assert len(dev.questions) > 200 and len(test.questions) > 300 and dev.paragraphs == test.paragraphs
    assert not {q for q, _, _ in dev.questions} & {q for q, _, _ in test.questions}
    assert not {dev.article[g] for _, _, g in dev.questions} & {test.article[g] for _, _, g in test.questions}
    assert all(q.endswith("?") and len(r[0].split()) >= 3 for q, r, _ in dev.questions + test.questions)
