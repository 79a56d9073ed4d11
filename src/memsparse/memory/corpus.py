"""Reading a user's corpus for a memory bank: a directory of .txt/.md files, a JSON-lines file, or a plain text file
with one document per line, checked up front so that every problem is one clear CorpusError line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
DIR_SUFFIXES = {".txt", ".md"}
_BOM = b"\xef\xbb\xbf"
_ENDS = tuple('.!?:;"\')]}»”’…')  # how a line that is a whole document (a sentence or more) usually ends
log = logging.getLogger(__name__)


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file (and line or document) and what is wrong."""


@dataclass
class Document:
    """One document: its text, verbatim, and a human label (JSONL id, "FILE:LINE", or a relative path)."""

    text: str
    name: str


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


def _decode(raw: bytes, where: str, line: int = 1, offset: int = 0) -> str:
    """UTF-8 text of `raw`, which starts at `line` and byte `offset` of its file; names the bad byte otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = line + raw.count(b"\n", 0, e.start)
        raise CorpusError(
            f"{where}: line {bad_line} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {offset + e.start})"
        ) from None


def check_document(text: str, where: str, max_doc_bytes: int, size: int | None = None) -> None:
    """Reject an empty (whitespace-only) document or one over `max_doc_bytes` UTF-8 bytes."""
    if not text.strip():
        raise CorpusError(f"{where}: document is empty")
    if size is None:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise CorpusError(f"{where}: text contains an unpaired surrogate (a lone \\ud800-\\udfff escape)") from None
    if size > max_doc_bytes:
        raise CorpusError(
            f"{where}: document is {_mb(size)}, over the {_mb(max_doc_bytes)} limit; split it into smaller documents"
        )


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line without its \\n or \\r\\n) for each line, streamed; a leading BOM is dropped."""
    offset = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            start, size = offset, len(raw)
            offset += size
            if n == 1 and raw.startswith(_BOM):
                raw, start = raw[len(_BOM) :], start + len(_BOM)
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            yield n, start, raw


def _read_dir(root: Path, max_doc_bytes: int) -> list[Document]:
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*")
        if p.suffix.lower() in DIR_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise CorpusError(f"{root}: directory contains no .txt or .md files")
    docs = []
    for rel, p in files:
        raw = p.read_bytes()
        if raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        text = _decode(raw, str(p))
        text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
        check_document(text, str(p), max_doc_bytes, size=len(text.encode("utf-8")))
        docs.append(Document(text=text, name=rel))
    return docs


def _read_jsonl(path: Path, max_doc_bytes: int) -> list[Document]:
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for n, start, raw in _lines(path):
        where = f"{path} line {n}"
        line = _decode(raw, str(path), n, start)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        text = obj.get("text")
        if not isinstance(text, str):
            got = "missing" if "text" not in obj else f"a {type(text).__name__}"
            raise CorpusError(f'{where}: "text" must be a string, but it is {got}')
        doc_id = obj.get("id")
        if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, str | int)):
            raise CorpusError(f'{where}: "id" must be a string or an integer, got {type(doc_id).__name__}')
        name = f"{path.name}:{n}" if doc_id is None else str(doc_id)
        if doc_id is not None:
            if name in seen:
                raise CorpusError(f'{where}: duplicate "id" {name!r} (first used on line {seen[name]})')
            seen[name] = n
        check_document(text, where, max_doc_bytes)
        docs.append(Document(text=text, name=name))
    return docs


def _read_lines(path: Path, max_doc_bytes: int) -> list[Document]:
    docs = []
    cut = 0  # lines that stop mid-sentence with text on the next line: hard-wrapped prose, not one document a line
    last = None  # the previous line's text, when it was not blank
    for n, start, raw in _lines(path):
        text = _decode(raw, str(path), n, start)
        if text.strip():
            check_document(text, f"{path} line {n}", max_doc_bytes, size=len(raw))
            docs.append(Document(text=text, name=f"{path.name}:{n}"))
            cut += last is not None and not last.rstrip().endswith(_ENDS)
            last = text
        else:
            last = None
    if cut >= max(2, len(docs) // 5):
        log.warning(f"warning: {path}: a text file is one document per line, and {cut} of its {len(docs)} lines "
                    "stop mid-sentence (hard-wrapped text?); give a directory of .txt/.md files (one document "
                    "each) or JSONL instead")
    return docs


def read_corpus(path: str | Path, max_doc_bytes: int = 1 << 20) -> list[Document]:
    """The documents of the corpus at `path`: a directory (every non-hidden *.txt / *.md file, sorted by relative
    path), a .jsonl / .ndjson / .json JSON-lines file ({"text": str, "id"?: str | int} per line), or any other file
    (one document per non-blank line; a warning is logged, once, when many lines stop mid-sentence: hard-wrapped
    prose). Raises CorpusError naming the file, line or document on any problem."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"no such file or directory: {path}")
    try:
        if path.is_dir():
            docs = _read_dir(path, max_doc_bytes)
        elif path.suffix.lower() in JSONL_SUFFIXES:
            docs = _read_jsonl(path, max_doc_bytes)
        else:
            docs = _read_lines(path, max_doc_bytes)
    except OSError as e:
        raise CorpusError(f"cannot read {e.filename or path}: {e.strerror or e}") from None
    if not docs:
        raise CorpusError(f"{path}: contains no documents")
    return docs
