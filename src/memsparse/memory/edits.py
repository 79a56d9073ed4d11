"""A bank directory changed in place as its one writer (store.py `writer`): a block of changes on its latest commit
(`update`), documents added with their encoding outside the lock (`add_documents`), deleted documents' data dropped
(`compact`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..model.decoder import MSAForCausalLM
from . import store
from .bank import MemoryBank


@contextlib.contextmanager
def update(path: str | Path, model: MSAForCausalLM, tok=None, tier: str = "auto", timeout: float | None = None):
    """Change a bank as its one writer: lock it (`store.writer`), open its latest commit, yield it, and commit it
    when the block ends without an exception (nothing is committed otherwise)."""
    with store.writer(path, timeout):
        bank = MemoryBank.load(path, model, tok, tier)
        yield bank
        bank.save()


def add_documents(path: str | Path, model: MSAForCausalLM, tok, texts: list[str], names: list[str] | None = None,
                  timeout: float | None = None, **kw) -> tuple[MemoryBank, list[int]]:
    """Add documents to a bank's latest commit, encoding them before taking the write lock, which is then held for
    the commit only; if another commit came meanwhile they are encoded again under the lock (a document's id is
    part of its encoding). `kw`: MemoryBank.add's. Returns the committed bank and the new ids."""
    bank = MemoryBank.load(path, model, tok)
    ids = bank.add(texts, names=names, **kw)
    with store.writer(path, timeout):
        if store.read_manifest(path).get("commit", 0) != bank.commit:
            bank = MemoryBank.load(path, model, tok)
            ids = bank.add(texts, names=names, **kw)
        bank.save()
    return bank, ids


def compact(path: str | Path, model: MSAForCausalLM, tok=None, timeout: float | None = None) -> tuple[MemoryBank, int]:
    """Drop the data of a bank's deleted documents now (a commit does so by itself once over a quarter of the chunks
    are deleted), as its one writer on its latest commit. Returns the committed bank and the chunks dropped."""
    with store.writer(path, timeout):
        bank = MemoryBank.load(path, model, tok)
        before = bank.num_chunks
        bank.save(compact=True)
    return bank, before - bank.num_chunks
