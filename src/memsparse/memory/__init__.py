"""The memory bank: offline encoding of documents into per-chunk compressed keys/values and routing keys,
tiers, and the on-disk store."""

from .bank import MemoryBank
from .corpus import CorpusError, Document, read_corpus
from .encode import render_document
from .store import BankBusy
from .table import BankError

__all__ = ["BankBusy", "BankError", "CorpusError", "Document", "MemoryBank", "read_corpus", "render_document"]
