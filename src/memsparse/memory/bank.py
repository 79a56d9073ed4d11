"""The memory bank (stage 1): documents encoded once into per-chunk K̄, V̄ and routing keys K̄r per router layer,
plus the template prefix's keys/values for every layer.

Documents live in segments (one per `add`, or per saved shard); a document table maps each document id to its
segment and chunk range. Ids are never reused: deleted documents are tombstoned and dropped by `compact()`.
Tiers: routing keys sit on the model's device; K̄/V̄ on the device or in (pinned) host memory, from which only
the selected documents are copied. Saving and loading: store.py.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..model import cached
from ..model.decoder import MSAForCausalLM

TEMPLATE_PREFIX = "<|im_start|>user\n"
TIERS = ("auto", "device", "host")


def render_document(tok, doc_id: int, text: str) -> list[int]:
    """Token ids of `<|im_start|>[i]. {text}[i]<|im_end|>`; the text is always plain text: special-token
    strings inside it are split into ordinary tokens, never read as control tokens."""
    if not isinstance(text, str):
        raise TypeError(f"document {doc_id}: expected str, got {type(text).__name__}")
    body = tok(f"[{doc_id}]. {text}[{doc_id}]", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [tok.convert_tokens_to_ids("<|im_start|>"), *body, tok.convert_tokens_to_ids("<|im_end|>")]


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
        name, text = json.loads(zlib.decompress(self.data[a:b].numpy().tobytes()))
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


@dataclass
class _Row:
    segment: int
    local: int  # index in the segment's table
    chunk_start: int  # first chunk in the segment


@dataclass
class MemoryBank:
    """A memory of encoded documents for one model. Build with `MemoryBank.build` or `MemoryBank.load`."""

    model: MSAForCausalLM
    prefix_ids: list[int]
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (p, Hkv, D) keys, values
    tok: object = None  # renders text documents
    segments: list[Segment] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)
    next_id: int = 0
    tier: str = "device"  # where K̄/V̄ live: 'device' (the model's) or 'host'
    path: Path | None = None  # the directory this bank was loaded from / saved to
    meta: dict = field(default_factory=dict)  # user metadata kept in the manifest (e.g. the model's path)
    fused_routing: bool = False  # score with the fused Triton kernel (opt-in until validated on GPUs)
    _rows: dict[int, _Row] = field(default_factory=dict, repr=False)
    _view: dict | None = field(default=None, repr=False)  # routing tensors on the device, rebuilt on change

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, model: MSAForCausalLM, tok, docs: list[str], tier: str = "auto", **kw) -> MemoryBank:
        """Encode `docs` (ids 0..N-1) rendered in the official document format."""
        bank = cls.empty(model, tok(TEMPLATE_PREFIX, add_special_tokens=False)["input_ids"], tok=tok)
        bank.place(tier)
        bank.add(docs, **kw)
        return bank

    @classmethod
    def empty(cls, model: MSAForCausalLM, prefix_ids: list[int], tok=None) -> MemoryBank:
        return cls(model=model, prefix_ids=list(prefix_ids), prefix_kv=prefix_cache(model, prefix_ids), tok=tok)

    def save(self, path: str | Path | None = None, compact: bool | None = None) -> Path:
        """Commit to a directory atomically (see store.py); later saves to it write only new segments."""
        from .store import save

        return save(self, path, compact)

    @classmethod
    def load(cls, path: str | Path, model: MSAForCausalLM, tok=None, tier: str = "auto") -> MemoryBank:
        """Open a saved bank (memory-mapped) for `model`; `tok` is needed to add text documents."""
        from .store import load

        return load(path, model, tok, tier)

    def add(self, docs: list[str], names: list[str] | None = None, progress: bool = False, **kw) -> list[int]:
        """Encode new documents; returns their ids. `names`: optional labels kept in the table."""
        if self.tok is None:
            raise ValueError("this bank has no tokenizer (made from token ids): use add_tokens")
        bar = tqdm(docs, desc="tokenizing", unit="doc", disable=not progress)
        tokens = [render_document(self.tok, self.next_id + i, d) for i, d in enumerate(bar)]
        return self.add_tokens(tokens, texts=list(docs), names=names, progress=progress, **kw)

    @torch.no_grad()
    def add_tokens(self, tokens: list[list[int]], texts: list[str | None] | None = None,
                   names: list[str] | None = None, batch_tokens: int = 65536, progress: bool = False) -> list[int]:
        """Encode already-tokenized documents, packed many per forward, as one new segment; returns their ids."""
        if not tokens:
            return []
        if any(len(t) == 0 for t in tokens):
            raise ValueError("empty document: a document needs at least one token")
        texts = texts or [None] * len(tokens)
        names = names or [str(self.next_id + i) for i in range(len(tokens))]
        limit = self.model.config.max_position_embeddings
        for name, t in zip(names, tokens):
            if limit and len(t) > limit:
                raise ValueError(f"document {name} has {len(t)} tokens, over the model's {limit} positions; "
                                 "split it into smaller documents")
        P = self.model.msa_config.pooling_kernel_size
        dev = self.model.device
        bar = tqdm(total=sum(map(len, tokens)), unit="tok", unit_scale=True, disable=not progress, desc="encoding")
        parts: dict[int, list[tuple]] = {}  # router layer -> pooled (K̄, V̄, K̄r) per batch, concatenated once
        i = 0
        while i < len(tokens):
            j, n = i, 0
            while j < len(tokens) and (j == i or n + len(tokens[j]) <= batch_tokens):
                n += len(tokens[j])
                j += 1
            flat = torch.tensor([t for doc in tokens[i:j] for t in doc], device=dev)[None]  # (1, n)
            doc_ids = torch.cat([torch.full((len(d),), k + 1) for k, d in enumerate(tokens[i:j])]).to(dev)[None]
            for layer, pooled in self.model.encode_documents(flat, doc_ids).items():
                # host tier: batches leave the device as they come; pinned once, after concatenation
                parts.setdefault(layer, []).append(tuple(t.cpu() if self.tier == "host" else t for t in pooled))
            bar.update(n)
            i = j
        bar.close()
        cat = {layer: [self._to_tier(torch.cat([p[n] for p in ps])) for n in range(3)] for layer, ps in parts.items()}
        decoupled = self.model.msa_config.decouple_router
        ids = list(range(self.next_id, self.next_id + len(tokens)))
        self._append(Segment(
            keys={lay: c[0] for lay, c in cat.items()}, values={lay: c[1] for lay, c in cat.items()},
            route_keys={lay: c[2] if decoupled else c[0] for lay, c in cat.items()},
            doc_ids=ids, chunk_count=[(len(t) + P - 1) // P for t in tokens], token_count=list(map(len, tokens)),
            records=[(nm, tx) for nm, tx in zip(names, texts)],
        ))
        return ids

    def _append(self, seg: Segment) -> None:
        s = len(self.segments)
        start = 0
        for local, (d, c) in enumerate(zip(seg.doc_ids, seg.chunk_count)):
            if d in self._rows:
                raise ValueError(f"document id {d} appears twice in the bank")
            self._rows[d] = _Row(s, local, start)
            start += c
        self.segments.append(seg)
        self.next_id = max(self.next_id, max(seg.doc_ids, default=-1) + 1)
        self._view = None

    def delete(self, ids: list[int]) -> None:
        """Tombstone documents: they are never routed to again (`compact` drops their data)."""
        for i in ids:
            if i not in self._rows or i in self.deleted:
                raise KeyError(f"no document {i} in the bank")
        self.deleted.update(ids)
        self._view = None

    def compact(self) -> None:
        """Drop deleted documents' data: every segment with tombstones is rewritten without them (ids kept)."""
        if not self.deleted:
            return
        segments, self.segments, self._rows = self.segments, [], {}
        for seg in segments:
            keep = [n for n, d in enumerate(seg.doc_ids) if d not in self.deleted]
            if len(keep) == len(seg.doc_ids):
                self._append(seg)
                continue
            if not keep:
                continue
            starts = [sum(seg.chunk_count[:n]) for n in range(len(seg.doc_ids))]
            rows = _ranges([(starts[n], seg.chunk_count[n]) for n in keep], seg_device(seg))
            take = {lay: t.index_select(0, rows.to(t.device)) for lay, t in seg.keys.items()}
            vals = {lay: t.index_select(0, rows.to(t.device)) for lay, t in seg.values.items()}
            rk = {lay: (take[lay] if seg.route_keys[lay] is seg.keys[lay] else t.index_select(0, rows.to(t.device)))
                  for lay, t in seg.route_keys.items()}
            self._append(Segment(
                keys=take, values=vals, route_keys=rk, doc_ids=[seg.doc_ids[n] for n in keep],
                chunk_count=[seg.chunk_count[n] for n in keep], token_count=[seg.token_count[n] for n in keep],
                records=[seg.records[n] for n in keep],
            ))
        self.deleted = set()
        self.place(self.tier)  # rewritten segments come out of index_select unpinned / off the tier
        self._view = None

    # ----------------------------------------------------------------------------------------- tiers
    def place(self, tier: str = "auto") -> MemoryBank:
        """Put K̄/V̄ on the model's device ('device') or in host memory, pinned when a GPU is used ('host');
        'auto' picks the device when the bank's K̄/V̄ take under half of the free device memory."""
        if tier not in TIERS:
            raise ValueError(f"tier {tier!r}: expected one of {TIERS}")
        dev = self.model.device
        if tier == "auto":
            tier = "device"
            if dev.type == "cuda":
                free, _ = torch.cuda.mem_get_info(dev)
                tier = "device" if self.content_bytes() < free // 2 else "host"
        self.tier = tier
        for seg in self.segments:
            for store in (seg.keys, seg.values):
                for lay, t in store.items():
                    store[lay] = self._to_tier(t)
            if not self.model.msa_config.decouple_router:
                seg.route_keys = seg.keys
        self._view = None
        return self

    def _to_tier(self, t: torch.Tensor) -> torch.Tensor:
        dev = self.model.device
        if self.tier == "device" or dev.type == "cpu":
            return t.to(dev)
        t = t.cpu()
        return t if t.is_pinned() else t.pin_memory()

    def content_bytes(self) -> int:
        tensors = [t for s in self.segments for store in (s.keys, s.values) for t in store.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ----------------------------------------------------------------------------------------- queries
    @property
    def num_docs(self) -> int:
        """Live documents."""
        return len(self._rows) - len(self.deleted)

    @property
    def num_chunks(self) -> int:
        return sum(s.num_chunks for s in self.segments)

    def doc_ids(self) -> list[int]:
        """Live document ids in insertion order."""
        return [d for s in self.segments for d in s.doc_ids if d not in self.deleted]

    def __contains__(self, doc_id: int) -> bool:
        return doc_id in self._rows and doc_id not in self.deleted

    def _record(self, doc_id: int) -> tuple[str, str | None]:
        if doc_id not in self:
            raise KeyError(f"no document {doc_id} in the bank")
        r = self._rows[doc_id]
        return self.segments[r.segment].records[r.local]

    def text(self, doc_id: int) -> str | None:
        return self._record(doc_id)[1]

    def name(self, doc_id: int) -> str:
        return self._record(doc_id)[0]

    def token_count(self, doc_id: int) -> int:
        r = self._rows[doc_id]
        return self.segments[r.segment].token_count[r.local]

    def routing_view(self) -> dict:
        """Routing tensors on the model's device: per router layer the routing keys of every segment, the
        table position of every chunk's document (C,), the live mask (N,) and the table's ids (N,)."""
        if self._view is None:
            dev = self.model.device
            ids = [d for s in self.segments for d in s.doc_ids]
            counts = torch.tensor([c for s in self.segments for c in s.chunk_count], dtype=torch.long)
            chunk_doc = torch.repeat_interleave(torch.arange(len(ids)), counts)  # (C,) table position per chunk
            self._view = {
                "route_keys": {lay: [s.route_keys[lay].to(dev) for s in self.segments]
                               for lay in self.model.router_layers},
                "chunk_doc": chunk_doc.to(dev),
                "alive": torch.tensor([d not in self.deleted for d in ids], dtype=torch.bool, device=dev),
                "ids": ids,
            }
        return self._view

    def gather(self, layer: int, doc_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K̄, V̄ (chunks, Hkv, D) of the given documents, in the given order, on the model's device."""
        dev = self.model.device
        ks, vs = [], []
        for d in doc_ids:
            r = self._rows[d]
            seg = self.segments[r.segment]
            sl = slice(r.chunk_start, r.chunk_start + seg.chunk_count[r.local])
            ks.append(seg.keys[layer][sl])
            vs.append(seg.values[layer][sl])
        if not ks:
            ref = self.prefix_kv[layer][0]
            return ref[:0], ref[:0]
        return (torch.cat(ks).to(dev, non_blocking=True, dtype=self.model.dtype),
                torch.cat(vs).to(dev, non_blocking=True, dtype=self.model.dtype))


def seg_device(seg: Segment) -> torch.device:
    return next(iter(seg.keys.values())).device if seg.keys else torch.device("cpu")


def _ranges(spans: list[tuple[int, int]], device) -> torch.Tensor:
    """Concatenated aranges [start, start + n) for each (start, n)."""
    if not spans:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in spans])


@torch.no_grad()
def prefix_cache(model: MSAForCausalLM, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values (p, Hkv, D) of the template prefix at positions 0..p-1, for every layer."""
    dev = model.device
    p = len(prefix_ids)
    ids = torch.tensor([prefix_ids], device=dev)  # (1, p)
    positions = torch.arange(p, device=dev)[None]  # (1, p)
    _, kv = cached.prefill(model, ids, positions, torch.ones_like(ids, dtype=torch.bool), cached.no_memory,
                           logits="none")
    return [(lc.k[0, :p], lc.v[0, :p]) for lc in kv.layers]
