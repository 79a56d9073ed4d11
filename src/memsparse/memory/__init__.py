"""The memory bank: offline encoding of documents into per-chunk compressed keys/values and routing keys,
tiers, and the on-disk store."""

from .bank import MemoryBank, render_document
from .corpus import CorpusError, Document, read_corpus
from .store import BankBusy
from .table import BankError

__all__ = ["BankBusy", "BankError", "CorpusError", "Document", "MemoryBank", "read_corpus", "render_document"]
