"""A bank's document table: documents encoded together (`Segment`), each document's place in a bank
(`DocumentRow`), the (name, text) records as a shard stores them (`PackedTexts`), and the error of a bank that
cannot be used (`BankError`). Shared by the bank (bank.py) and the store (store.py).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import torch


class BankError(ValueError):
    """A bank directory that cannot be used: missing, damaged, from another model or a newer format."""


class PackedTexts:
    """Per-document (name, text) records, each zlib-compressed JSON, packed into one byte tensor + offsets
    (the form they take in a shard; decoded lazily, so a memory-mapped shard is read only where asked)."""

    def __init__(self, data: torch.Tensor, offsets: torch.Tensor):
        self.data, self.offsets = data, offsets  # (bytes,) uint8, (n + 1,) int64

    @classmethod
    def pack(cls, records: list[tuple[str, str | None]]) -> PackedTexts:
        blobs = [zlib.compress(json.dumps(r, ensure_ascii=False).encode()) for r in records]
        offsets = torch.tensor([0] + [len(b) for b in blobs], dtype=torch.int64).cumsum(0)
        data = torch.from_numpy(np.frombuffer(b"".join(blobs), dtype=np.uint8).copy())  # (bytes,)
        return cls(data, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[str, str | None]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        try:
            name, text = json.loads(zlib.decompress(self.data[a:b].numpy().tobytes()))
            if not isinstance(name, str) or not isinstance(text, str | None):
                raise TypeError("not a (name, text) pair")
        except (zlib.error, ValueError, TypeError) as e:  # ValueError: bad JSON / UTF-8, or not a pair
            raise BankError(f"the stored text of table row {i} is damaged ({e})") from None
        return name, text


@dataclass
class Segment:
    """Documents encoded together: per router layer K̄, V̄, K̄r (chunks, Hkv, D) and their table."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    route_keys: dict[int, torch.Tensor]  # the same tensors as `keys` when the router is not decoupled
    doc_ids: list[int]
    chunk_count: list[int]
    token_count: list[int]
    records: list | PackedTexts  # (name, text) per document
    file: str | None = None  # shard file name in the bank directory, once saved

    @property
    def num_chunks(self) -> int:
        return sum(self.chunk_count)


@dataclass(frozen=True)
class DocumentRow:
    """Where a document's data lies in a bank (`MemoryBank.locate`)."""

    segment: int
    local: int  # index in the segment's table
    chunk_start: int  # first chunk in the segment
