"""The memory bank: offline encoding of documents into per-chunk compressed keys/values and routing keys."""

from .bank import MemoryBank, render_document

__all__ = ["MemoryBank", "render_document"]
