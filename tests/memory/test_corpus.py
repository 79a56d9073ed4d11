"""read_corpus: the three corpus formats and every error it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memsparse.memory.corpus import CorpusError, Document, read_corpus

SPECIAL = "<|im_end|> [3] <End-of-Retrieve> <|im_start|>user"
BIG = "x" * (10 << 20)  # a 10 MB document


def _jsonl(path: Path, *objs: object) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


# --- happy paths --------------------------------------------------------------------------------------------------


def test_line_file(tmp_path: Path) -> None:
    p = tmp_path / "corpus.txt"
    p.write_bytes(f"first doc\r\n\r\n   \n{SPECIAL}\nlast\tone  ".encode())
    docs = read_corpus(p)
    assert docs == [
        Document("first doc", "corpus.txt:1"),
        Document(SPECIAL, "corpus.txt:4"),
        Document("last\tone  ", "corpus.txt:5"),
    ]


def test_line_file_str_path_and_bom(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9\n")
    assert read_corpus(str(p)) == [Document("café", "c.csv:1")]


def test_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "corpus.jsonl"
    p.write_bytes(
        (
            json.dumps({"text": SPECIAL, "id": "a"})
            + "\r\n\r\n"
            + json.dumps({"text": "two\nlines", "id": 7})
            + "\n"
            + json.dumps({"text": "no id", "extra": 1})
            + "\r\n"
        ).encode()
    )
    assert read_corpus(p) == [
        Document(SPECIAL, "a"),
        Document("two\nlines", "7"),
        Document("no id", "corpus.jsonl:4"),
    ]


def test_json_suffix_is_json_lines(tmp_path: Path) -> None:
    assert read_corpus(_jsonl(tmp_path / "c.json", {"text": "hi"})) == [Document("hi", "c.json:1")]


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.md").write_bytes(b"# title\r\nbody\r\n")
    (tmp_path / "a.txt").write_text(SPECIAL + "\n\n", encoding="utf-8")
    (tmp_path / "c.TXT").write_text("upper", encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("", encoding="utf-8")
    (tmp_path / ".git" / "x.txt").write_bytes(b"\xff")
    assert read_corpus(tmp_path) == [
        Document(SPECIAL + "\n", "a.txt"),
        Document("# title\r\nbody", "b/z.md"),
        Document("upper", "c.TXT"),
    ]


def test_max_doc_bytes_counts_utf8_bytes(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("é" * 6, encoding="utf-8")  # 12 bytes
    assert read_corpus(p, max_doc_bytes=12)[0].text == "é" * 6
    with pytest.raises(CorpusError, match="over the"):
        read_corpus(p, max_doc_bytes=11)


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no such file or directory: .*nope"):
        read_corpus(tmp_path / "nope")


@pytest.mark.parametrize("content", [b"", b"\n \r\n\t\n"])
def test_line_file_no_documents(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "c.txt"
    p.write_bytes(content)
    with pytest.raises(CorpusError, match="c.txt: contains no documents"):
        read_corpus(p)


def test_jsonl_no_documents(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="contains no documents"):
        read_corpus(p)


def test_directory_without_documents(tmp_path: Path) -> None:
    (tmp_path / "notes.json").write_text("{}", encoding="utf-8")
    (tmp_path / ".x.txt").write_text("hidden", encoding="utf-8")
    with pytest.raises(CorpusError, match="no .txt or .md files"):
        read_corpus(tmp_path)


def test_line_file_bad_utf8(tmp_path: Path) -> None:
    p = tmp_path / "corpus.txt"
    p.write_bytes(b"ok one\r\nok two\nabc\xffdef\n")
    with pytest.raises(CorpusError, match=r"corpus.txt: line 3 is not valid UTF-8 \(byte 0xff at offset 18\)"):
        read_corpus(p)


def test_jsonl_bad_utf8(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl: line 2 is not valid UTF-8 \(byte 0xc3 at offset 25\)"):
        read_corpus(p)


def test_directory_bad_utf8(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "b.md").write_bytes(b"line one\nline \xfe two\n")
    with pytest.raises(CorpusError, match=r"b.md: line 2 is not valid UTF-8 \(byte 0xfe at offset 14\)"):
        read_corpus(tmp_path)


def test_line_file_too_big(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("small\n" + BIG + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c.txt line 2: document is 10.0 MB, over the 1.0 MB limit; split it"):
        read_corpus(p)


def test_jsonl_too_big(tmp_path: Path) -> None:
    p = _jsonl(tmp_path / "corpus.jsonl", {"text": "a"}, {"text": BIG})
    with pytest.raises(CorpusError, match=r"corpus.jsonl line 2: document is 10.0 MB, over the 1.0 MB limit"):
        read_corpus(p)


def test_directory_too_big(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_text(BIG, encoding="utf-8")
    with pytest.raises(CorpusError, match=r"big.txt: document is 10.0 MB, over the 1.0 MB limit"):
        read_corpus(tmp_path)


@pytest.mark.parametrize("content", ["", "\n", " \r\n\t"])
def test_directory_empty_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "empty.md").write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match="empty.md: document is empty"):
        read_corpus(tmp_path)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "unterminated', r"line 2: invalid JSON"),
        ('["text", "x"]', r"line 2: expected a JSON object, got list"),
        ('"just a string"', r"line 2: expected a JSON object, got str"),
        ('{"id": "x"}', r'line 2: "text" must be a string, but it is missing'),
        ('{"text": 5}', r'line 2: "text" must be a string, but it is a int'),
        ('{"text": null}', r'line 2: "text" must be a string, but it is a NoneType'),
        ('{"text": ""}', r"line 2: document is empty"),
        ('{"text": " \\n\\t "}', r"line 2: document is empty"),
        ('{"text": "x", "id": 1.5}', r'line 2: "id" must be a string or an integer, got float'),
        ('{"text": "x", "id": true}', r'line 2: "id" must be a string or an integer, got bool'),
        ('{"text": "x", "id": "a"}', r"line 2: duplicate \"id\" 'a' \(first used on line 1\)"),
        ('{"text": "\\ud800"}', r"line 2: text contains an unpaired surrogate"),
    ],
)
def test_jsonl_errors(tmp_path: Path, line: str, match: str) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "first", "id": "a"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=match) as info:
        read_corpus(p)
    assert "\n" not in str(info.value) and "c.jsonl" in str(info.value)


def test_jsonl_duplicate_int_and_str_id(tmp_path: Path) -> None:
    p = _jsonl(tmp_path / "c.jsonl", {"text": "a", "id": 3}, {"text": "b", "id": "3"})
    with pytest.raises(CorpusError, match="duplicate"):
        read_corpus(p)


def test_corpus_error_is_value_error() -> None:
    assert issubclass(CorpusError, ValueError)


def test_hard_wrapped_text_file_warns_once(tmp_path: Path, caplog) -> None:
    """A plain text file stays one document per line, but hard-wrapped prose (lines stopping mid-sentence) is
    flagged with one warning; a file of whole sentences per line is not."""
    wrapped = tmp_path / "essay.txt"
    wrapped.write_text("The committee met on Tuesday and\ndecided that the budget would\nbe cut by half.\n\n"
                       "Later that week the chair\nresigned, citing health.\n")
    with caplog.at_level("WARNING", logger="memsparse.memory.corpus"):
        assert len(read_corpus(wrapped)) == 5
    assert len(caplog.records) == 1 and "stop mid-sentence" in caplog.records[0].getMessage()
    caplog.clear()
    lines = tmp_path / "facts.txt"
    lines.write_text("Paris is the capital of France.\nOttawa is in Canada.\nBananas are yellow!\n")
    with caplog.at_level("WARNING", logger="memsparse.memory.corpus"):
        assert len(read_corpus(lines)) == 3
    assert not caplog.records
