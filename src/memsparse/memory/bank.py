"""The memory bank (stage 1): documents encoded once into per-chunk K̄, V̄ and routing keys K̄r per router layer,
plus the template prefix's keys/values for every layer.

Documents live in segments (one per `add`, or per saved shard); a document table maps each document id to its
segment and chunk range. Ids are never reused: deleted documents are tombstoned and dropped by `compact()`.
Tiers: routing keys sit on the model's device; K̄/V̄ on the device or in (pinned) host memory, from which only
the selected documents are copied. Encoding: encode.py; saving and loading: store.py.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.decoder import MSAForCausalLM
from . import store as _store
from .encode import TEMPLATE_PREFIX, encode_documents, prefix_cache, render_documents
from .quant import DTYPES, STORAGE, QTensor, Tensor, dense, nbytes, qmap, quantize
from .table import DocumentRow, Segment

TIERS = ("auto", "device", "host")


@dataclass(frozen=True, eq=False)
class RoutingIndex:
    """A bank's routing tensors on the model's device, as one state of the bank has them (a change of the bank
    builds a new index; the engine keeps what it derives, such as CUDA graphs, with the index it was built for)."""

    route_keys: dict[int, list[Tensor]]  # per router layer: each segment's routing keys (C_segment, Hkv, D)
    chunk_doc: torch.Tensor  # (C,) the table position of every chunk's document
    chunk_doc32: torch.Tensor  # the same, int32 (the fused kernel's)
    alive: torch.Tensor  # (N,) bool: not deleted
    ids: list[int]  # (N,) the table's document ids
    doc_seg: torch.Tensor  # (N,) each table position's segment,
    doc_start: torch.Tensor  # (N,) its first chunk in that segment
    doc_chunks: torch.Tensor  # (N,) and its chunk count (the gather on the device)
    max_chunks: int  # the longest document in chunks


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
    fused_routing: bool | None = None  # the fused Triton routing kernel: None = on GPUs, True/False = always/never
    key_dtype: str = "model"  # routing keys of new segments: 'model' (its dtype), 'fp8' or 'int8' (per-chunk scale)
    next_position: int = 0  # doc_positions="global": memory tokens encoded so far (the next document's offset)
    content_dtype: str = "model"  # K̄/V̄ of new segments: 'model', 'fp8' or 'int8' (scale per chunk and head)
    key_moments: dict | None = None  # per router layer (Hkv, D, D) routing-query moments: 8-bit keys are rounded
    # for those queries (memory/quant.py; engine `calibrate_keys`), saved with the bank
    doc_priors: dict | None = None  # {"ids": (M,) long, "scores": {router layer: (M,) float32}}: each document's
    # mean routing score over calibration questions, subtracted before top-k (engine `calibrate_priors`), saved
    chunk_size: int | None = None  # tokens per pooled chunk; None = the model's P (finer: a refinement bank, the
    # engine's `refine`; never saved)
    commit: int | None = None  # the store's commit this bank was loaded from / saved as (store.py)
    _rows: dict[int, DocumentRow] = field(default_factory=dict, repr=False)
    _index: RoutingIndex | None = field(default=None, repr=False)  # built on first use after a change
    _priors: tuple | None = field(default=None, repr=False)  # (the index they were laid out for, per-layer priors)

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, model: MSAForCausalLM, tok, docs: list[str], tier: str = "auto", key_dtype: str = "model",
              content_dtype: str = "model", **kw) -> MemoryBank:
        """Encode `docs` (ids 0..N-1) rendered in the official document format; routing keys in `key_dtype`
        ('model', 'fp8' or 'int8', scale per chunk), K̄/V̄ in `content_dtype` (the same, scale per chunk and head)."""
        bank = cls.empty(model, tok(TEMPLATE_PREFIX, add_special_tokens=False)["input_ids"], tok=tok,
                         key_dtype=key_dtype, content_dtype=content_dtype)
        bank.place(tier)
        bank.add(docs, **kw)
        return bank

    @classmethod
    def empty(cls, model: MSAForCausalLM, prefix_ids: list[int], tok=None, key_dtype: str = "model",
              content_dtype: str = "model") -> MemoryBank:
        _check_dtypes(key_dtype, content_dtype)
        return cls(model=model, prefix_ids=list(prefix_ids), prefix_kv=prefix_cache(model, prefix_ids), tok=tok,
                   key_dtype=key_dtype, content_dtype=content_dtype)

    def like(self, **overrides) -> MemoryBank:
        """An empty bank for the same model, prefix (its cached K/V, not recomputed) and tokenizer, in this bank's
        dtypes, tier and chunk size unless overridden (key_dtype, content_dtype, tier, chunk_size)."""
        kw = {"key_dtype": self.key_dtype, "content_dtype": self.content_dtype, "tier": self.tier,
              "chunk_size": self.chunk_size} | overrides
        _check_dtypes(kw["key_dtype"], kw["content_dtype"])
        bank = MemoryBank(model=self.model, prefix_ids=self.prefix_ids, prefix_kv=self.prefix_kv, tok=self.tok,
                          key_dtype=kw["key_dtype"], content_dtype=kw["content_dtype"], chunk_size=kw["chunk_size"])
        return bank.place(kw["tier"])

    def save(self, path: str | Path | None = None, compact: bool | None = None) -> Path:
        """Commit to a directory atomically as its one writer (see store.py); later saves to it write only new
        segments, and only if no other process committed since this bank was loaded."""
        return _store.save(self, path, compact)

    @classmethod
    def load(cls, path: str | Path, model: MSAForCausalLM, tok=None, tier: str = "auto",
             manifest: str = "manifest.json") -> MemoryBank:
        """Open a saved bank (memory-mapped) for `model`; `tok` is needed to add text documents; `manifest`: the
        commit to open (a file of the directory; a bank over ranks names its ranks' commits: memory/parallel.py)."""
        s = _store.read(path, model, manifest)
        m = s.manifest
        bank = cls(model=model, prefix_ids=m["prefix_ids"], prefix_kv=s.prefix_kv, tok=tok, path=s.path,
                   tier="device", key_dtype=m.get("key_dtype", "model"), content_dtype=m.get("content_dtype", "model"))
        for seg in s.segments:
            bank.append_segment(seg)
        bank.deleted, bank.next_id = set(m["deleted"]), m["next_id"]
        bank.next_position, bank.meta, bank.commit = m.get("next_position", 0), m.get("meta", {}), m.get("commit", 0)
        bank.key_moments, bank.doc_priors = s.key_moments, s.doc_priors
        return bank.place(tier)

    def add(self, docs: list[str], names: list[str] | None = None, progress: bool = False,
            ids: list[int] | None = None, **kw) -> list[int]:
        """Encode new documents; returns their ids. `names`: optional labels kept in the table. `ids`: explicit
        ids (increasing, from `next_id` on; a shard of a memory over ranks keeps the global ids: memory/parallel.py)."""
        if self.tok is None:
            raise ValueError("this bank has no tokenizer (made from token ids): use add_tokens")
        ids = self._new_ids(len(docs), ids)
        tokens = render_documents(self.tok, ids, list(docs))
        return self.add_tokens(tokens, texts=list(docs), names=names, progress=progress, ids=ids, **kw)

    def _new_ids(self, n: int, ids: list[int] | None) -> list[int]:
        """The ids of `n` new documents: `ids` checked (increasing, none below `next_id`), or the next n."""
        if ids is None:
            return list(range(self.next_id, self.next_id + n))
        ids = [int(d) for d in ids]
        if len(ids) != n or any(b <= a for a, b in zip(ids, ids[1:])) or (ids and ids[0] < self.next_id):
            raise ValueError(f"ids: expected {n} increasing ids from {self.next_id} on")
        return ids

    @torch.no_grad()
    def add_tokens(self, tokens: list[list[int]], texts: list[str | None] | None = None,
                   names: list[str] | None = None, batch_tokens: int | None = None,
                   progress: bool = False, ids: list[int] | None = None) -> list[int]:
        """Encode already-tokenized documents, packed many per forward, as one new segment; returns their ids
        (`ids`: explicit ones, as in `add`)."""
        if not tokens:
            return []
        if any(len(t) == 0 for t in tokens):
            raise ValueError("empty document: a document needs at least one token")
        limit = self.model.config.max_position_embeddings
        for n, t in enumerate(tokens):
            if limit and len(t) > limit:
                name = names[n] if names else self.next_id + n
                raise ValueError(f"document {name} has {len(t)} tokens, over the model's {limit} positions; "
                                 "split it into smaller documents")
        global_positions = self.model.msa_config.doc_positions == "global"
        start = len(self.prefix_ids) + self.next_position if global_positions else None
        cat = encode_documents(self.model, tokens, self.pool_size, batch_tokens, host=self.tier == "host",
                               start=start, progress=progress)
        decoupled = self.model.msa_config.decouple_router
        ids = self.add_encoded({lay: c[0] for lay, c in cat.items()}, {lay: c[1] for lay, c in cat.items()},
                                {lay: c[2] for lay, c in cat.items()} if decoupled else None,
                                list(map(len, tokens)), texts, names, ids=ids)
        if global_positions:
            self.next_position += sum(map(len, tokens))
        return ids

    def add_encoded(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor],
                    route_keys: dict[int, torch.Tensor] | None, token_count: list[int],
                    texts: list[str | None] | None = None, names: list[str] | None = None,
                    ids: list[int] | None = None) -> list[int]:
        """Append already-encoded documents as one segment: per router layer K̄, V̄ (chunks, Hkv, D) and, for a
        decoupled router, K̄r; `token_count` per document (its chunks follow in order). Stored in the bank's
        key and content dtypes, on its tier. Returns the new ids (`ids`: explicit ones, as in `add`)."""
        P = self.pool_size
        chunks = [(n + P - 1) // P for n in token_count]
        for lay, k in keys.items():
            if k.shape[0] != sum(chunks) or values[lay].shape != k.shape:
                raise ValueError(f"layer {lay}: {tuple(k.shape)} keys for {sum(chunks)} chunks")
        dev = self.model.device
        ids = self._new_ids(len(token_count), ids)
        shared = route_keys is None and self.key_dtype == "model" and self.content_dtype == "model"
        ck = {lay: self._to_tier(quantize(k, self.content_dtype, per_head=True)) for lay, k in keys.items()}
        rk = ck if shared else {lay: quantize(k, self.key_dtype, per_head=False, moments=self._moments(lay))
                                for lay, k in (route_keys or keys).items()}
        self.append_segment(Segment(
            keys=ck, values={lay: self._to_tier(quantize(v, self.content_dtype, per_head=True))
                             for lay, v in values.items()},
            route_keys={lay: qmap(k, lambda t: t.to(dev)) for lay, k in rk.items()} if not shared else ck,
            doc_ids=ids, chunk_count=chunks, token_count=list(token_count),
            records=[(nm, tx) for nm, tx in zip(names or [str(i) for i in ids], texts or [None] * len(ids))],
        ))
        return ids

    def append_segment(self, seg: Segment) -> None:
        """Append a built segment, its documents keeping their ids (how `add` and the store's load fill a bank)."""
        s = len(self.segments)
        start = 0
        for local, (d, c) in enumerate(zip(seg.doc_ids, seg.chunk_count)):
            if d in self._rows:
                raise ValueError(f"document id {d} appears twice in the bank")
            self._rows[d] = DocumentRow(s, local, start)
            start += c
        self.segments.append(seg)
        self.next_id = max(self.next_id, max(seg.doc_ids, default=-1) + 1)
        self._index = None

    def delete(self, ids: list[int]) -> None:
        """Tombstone documents: they are never routed to again (`compact` drops their data)."""
        for i in ids:
            if i not in self._rows or i in self.deleted:
                raise KeyError(f"no document {i} in the bank")
        self.deleted.update(ids)
        self._index = None

    def compact(self) -> None:
        """Drop deleted documents' data: every segment with tombstones is rewritten without them (ids kept)."""
        if not self.deleted:
            return
        dirty = [not self.deleted.isdisjoint(seg.doc_ids) for seg in self.segments]
        first = dirty.index(True) if any(dirty) else len(self.segments)  # segments before it stay as they are
        segments, self.segments = self.segments, self.segments[:first]
        for seg in segments[first:]:
            for d in seg.doc_ids:
                del self._rows[d]
        for seg in segments[first:]:
            keep = [n for n, d in enumerate(seg.doc_ids) if d not in self.deleted]
            if len(keep) == len(seg.doc_ids):
                self.append_segment(seg)
                continue
            if not keep:
                continue
            starts = [0, *itertools.accumulate(seg.chunk_count)]
            rows = _ranges([(starts[n], seg.chunk_count[n]) for n in keep], seg_device(seg))
            pick = lambda t, rows=rows: t.index_select(0, rows.to(t.device))  # noqa: E731
            take = {lay: qmap(t, pick) for lay, t in seg.keys.items()}
            vals = {lay: qmap(t, pick) for lay, t in seg.values.items()}
            rk = take if seg.route_keys is seg.keys else {lay: qmap(t, pick) for lay, t in seg.route_keys.items()}
            self.append_segment(Segment(
                keys=take, values=vals, route_keys=rk, doc_ids=[seg.doc_ids[n] for n in keep],
                chunk_count=[seg.chunk_count[n] for n in keep], token_count=[seg.token_count[n] for n in keep],
                records=[seg.records[n] for n in keep],
            ))
        self.deleted = set()
        self.place(self.tier)  # rewritten segments come out of index_select unpinned / off the tier
        self._index = None

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
            shared = seg.route_keys is seg.keys
            for store in (seg.keys, seg.values):
                for lay, t in store.items():
                    store[lay] = self._to_tier(t)
            seg.route_keys = seg.keys if shared else {lay: qmap(t, lambda x: x.to(dev))
                                                      for lay, t in seg.route_keys.items()}
        self._index = None
        return self

    def _to_tier(self, t: Tensor) -> Tensor:
        dev = self.model.device
        if self.tier == "device" or dev.type == "cpu":
            return qmap(t, lambda x: x.to(dev))
        return qmap(t, lambda x: x if x.is_pinned() else x.cpu().pin_memory())

    def set_doc_priors(self, priors: dict | None) -> None:
        """Set (or with None drop) the documents' routing-score priors (see `doc_priors`)."""
        if priors is not None and set(priors["scores"]) != set(self.model.router_layers):
            raise ValueError("document priors are needed for every router layer")
        self.doc_priors = priors
        self._index = None

    def prior_scores(self, layer: int) -> torch.Tensor | None:
        """(N,) the prior of every table position at `layer` (a document added after calibration gets the mean
        prior), on the model's device and kept with the routing index; None without priors."""
        if self.doc_priors is None:
            return None
        index = self.routing_index()
        if self._priors is None or self._priors[0] is not index:
            at = {d: i for i, d in enumerate(self.doc_priors["ids"].tolist())}
            self._priors = index, {"index": torch.tensor([at.get(d, -1) for d in index.ids], dtype=torch.long,
                                                         device=self.model.device)}  # (N,) row in the priors, -1 none
        cache = self._priors[1]
        if layer not in cache:
            scores = self.doc_priors["scores"][layer].to(self.model.device, torch.float32)  # (M,)
            fill = scores.mean() if len(scores) else scores.new_zeros(())
            cache[layer] = torch.cat([scores, fill.view(1)])[cache["index"]]  # index -1: the appended mean
        return cache[layer]

    def _moments(self, layer: int) -> torch.Tensor | None:
        return None if self.key_moments is None else self.key_moments[layer]

    def set_key_dtype(self, kind: str, moments: dict | None = None) -> MemoryBank:
        """Convert the routing keys of every segment to `kind` ('model', 'fp8' or 'int8'), one layer at a time;
        with `moments` (per router layer, (Hkv, D, D)) 8-bit keys are rounded for those queries, here and in
        segments added later."""
        if kind not in DTYPES:
            raise ValueError(f"key_dtype {kind!r}: expected one of {DTYPES}")
        if moments is not None and set(moments) != set(self.model.router_layers):
            raise ValueError("key moments are needed for every router layer")
        self.key_moments = moments
        dev, dtype = self.model.device, self.model.dtype
        self._index = None  # it holds the old routing keys
        for seg in self.segments:
            if seg.route_keys is seg.keys:
                seg.route_keys = dict(seg.keys)  # K̄ stays; the routing copy converts
            for lay in list(seg.route_keys):
                t = qmap(seg.route_keys[lay], lambda x: x.to(dev))
                if isinstance(t, QTensor) and (kind == "model" or t.data.dtype != STORAGE[kind]):
                    t = dense(t, dtype)  # from another quantized kind: through the model's dtype
                seg.route_keys[lay] = t if kind == "model" else quantize(t, kind, False, self._moments(lay))
        self.key_dtype = kind
        self._index = None
        return self

    def content_bytes(self) -> int:
        """Bytes of K̄/V̄ (with their scales)."""
        return sum(nbytes(t) for s in self.segments for store in (s.keys, s.values) for t in store.values())

    def routing_bytes(self) -> int:
        """Bytes of the routing keys one routing round reads (with their scales)."""
        return sum(nbytes(t) for s in self.segments for t in s.route_keys.values())

    # ----------------------------------------------------------------------------------------- queries
    @property
    def pool_size(self) -> int:
        """Tokens per pooled chunk: `chunk_size`, or the model's P."""
        return self.chunk_size or self.model.msa_config.pooling_kernel_size

    @property
    def num_docs(self) -> int:
        """Live documents."""
        return len(self._rows) - len(self.deleted)

    @property
    def num_chunks(self) -> int:
        return sum(s.num_chunks for s in self.segments)

    @property
    def num_tokens(self) -> int:
        """Tokens of the live documents (deleted ones excluded, compacted or not)."""
        return sum(n for s in self.segments for d, n in zip(s.doc_ids, s.token_count) if d not in self.deleted)

    def doc_ids(self) -> list[int]:
        """Live document ids in insertion order."""
        return [d for s in self.segments for d in s.doc_ids if d not in self.deleted]

    @property
    def dead_chunks(self) -> int:
        """Chunks of deleted documents still held (until `compact`)."""
        return sum(self.segments[r.segment].chunk_count[r.local] for d, r in self._rows.items() if d in self.deleted)

    def locate(self, doc_id: int) -> DocumentRow:
        """Where a document's data lies: its segment, its index in that segment's table and its first chunk there
        (deleted documents too, until `compact`)."""
        if doc_id not in self._rows:
            raise KeyError(f"no document {doc_id} in the bank")
        return self._rows[doc_id]

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

    def changed(self) -> None:
        """Note a change made to the bank's fields by hand (`deleted`, `fused_routing`): the routing index, and what
        the engine keeps with it, is rebuilt on next use. The bank's own methods do this themselves."""
        self._index = None

    def routing_index(self) -> RoutingIndex:
        """The bank's routing tensors on the model's device (built on first use after a change, never changed)."""
        if self._index is None:
            dev = self.model.device
            ids = [d for s in self.segments for d in s.doc_ids]
            counts = torch.tensor([c for s in self.segments for c in s.chunk_count], dtype=torch.long)
            chunk_doc = torch.repeat_interleave(torch.arange(len(ids)), counts)  # (C,) table position per chunk
            local = torch.cat([torch.tensor([0, *itertools.accumulate(s.chunk_count)][:-1], dtype=torch.long)
                               for s in self.segments]) if ids else counts  # (N,) first chunk in its segment
            seg = torch.repeat_interleave(torch.arange(len(self.segments)),
                                          torch.tensor([len(s.doc_ids) for s in self.segments], dtype=torch.long))
            self._index = RoutingIndex(
                route_keys={lay: [qmap(s.route_keys[lay], lambda t: t.to(dev)) for s in self.segments]
                            for lay in self.model.router_layers},
                chunk_doc=chunk_doc.to(dev), chunk_doc32=chunk_doc.to(dev, torch.int32),
                alive=torch.tensor([d not in self.deleted for d in ids], dtype=torch.bool, device=dev), ids=ids,
                doc_seg=seg.to(dev), doc_start=local.to(dev), doc_chunks=counts.to(dev),
                max_chunks=int(counts.max()) if len(counts) else 0)
        return self._index

    def gather_top(self, layer: int, pos: torch.Tensor, ok: torch.Tensor):
        """K̄, V̄ (B, k * m, Hkv, D) in the model's dtype and their validity (B, k * m) for table positions `pos`
        (B, k) (`ok` (B, k) marks real picks), all on the device with no host round trip: each row's documents
        in table (bank) order, each padded to m = the bank's longest document in chunks. From the host tier on a
        GPU, the GPU reads the selected rows from pinned memory itself (`ops.gather_triton`, zero-copy)."""
        view, dtype, dev = self.routing_index(), self.model.dtype, self.model.device
        zero_copy = self.tier == "host" and dev.type == "cuda"
        if zero_copy:
            from ..ops.gather_triton import gather_rows  # Triton: imported only where used
        N, m = len(view.ids), view.max_chunks
        B, k = pos.shape
        order = torch.where(ok, pos, N).sort(1).values  # (B, k) table order, missing picks last
        ok = order < N
        doc = order.clamp(max=N - 1)
        span = torch.arange(m, device=pos.device)  # (m,)
        rows = view.doc_start[doc][..., None] + span  # (B, k, m) chunk index inside the document's segment
        valid = ok[..., None] & (span < view.doc_chunks[doc][..., None])  # (B, k, m)
        seg = view.doc_seg[doc][..., None]  # (B, k, 1)
        out = []
        for store in ("keys", "values"):
            acc = None
            for n, segment in enumerate(self.segments):
                t = getattr(segment, store)[layer]
                if t.shape[0] == 0:
                    continue
                sel = valid & (seg == n)  # (B, k, m)
                if zero_copy:
                    q = isinstance(t, QTensor)
                    got = gather_rows(t.data if q else t, t.scale if q else None, torch.where(sel, rows, -1), dtype,
                                      dev)  # (B, k, m, Hkv, D)
                else:
                    here = torch.where(sel, rows, 0)
                    got = dense(qmap(t, lambda x, r=here: x[r]), dtype)  # (B, k, m, Hkv, D)
                acc = got if acc is None else torch.where(sel[..., None, None], got, acc)
            out.append(acc.flatten(1, 2))  # (B, k * m, Hkv, D)
        return out[0], out[1], valid.flatten(1)

    def gather(self, layer: int, doc_ids: list[int], stream: torch.cuda.Stream | None = None):
        """K̄, V̄ (chunks, Hkv, D) of the given documents, in the given order, on the model's device in its dtype.
        From the host tier the chunks are collected into pinned memory and copied asynchronously (on `stream`
        when given: the caller waits for it before use)."""
        dev, dtype = self.model.device, self.model.dtype
        if not doc_ids:
            ref = self.prefix_kv[layer][0]
            return ref[:0], ref[:0]
        runs: list[tuple[int, list[tuple[int, int]]]] = []  # (segment, [(first chunk, chunks)]) in the given order
        for d in doc_ids:
            r = self._rows[d]
            if not runs or runs[-1][0] != r.segment:
                runs.append((r.segment, []))
            runs[-1][1].append((r.chunk_start, self.segments[r.segment].chunk_count[r.local]))
        out = []
        for store in ("keys", "values"):
            parts = []
            for s, spans in runs:
                rows = _ranges(spans, torch.device("cpu"))
                parts.append(qmap(getattr(self.segments[s], store)[layer],
                                  lambda x, rows=rows: _take(x, rows, dev, stream)))
            out.append(parts)
        if stream is not None:
            torch.cuda.current_stream(dev).wait_stream(stream)
        return tuple(torch.cat([dense(p, dtype) for p in parts]) for parts in out)


def _take(x: torch.Tensor, rows: torch.Tensor, dev: torch.device, stream) -> torch.Tensor:
    """Rows of x on `dev`; from host memory to a GPU through pinned staging and an asynchronous copy."""
    if x.device.type == "cpu" and dev.type == "cuda":
        staged = torch.index_select(x, 0, rows, out=torch.empty((len(rows), *x.shape[1:]), dtype=x.dtype,
                                                                 pin_memory=True))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            return staged.to(dev, non_blocking=True)
    return x.index_select(0, rows.to(x.device))


def _check_dtypes(key_dtype: str, content_dtype: str) -> None:
    if key_dtype not in DTYPES or content_dtype not in DTYPES:
        raise ValueError(f"key_dtype {key_dtype!r} / content_dtype {content_dtype!r}: expected one of {DTYPES}")


def seg_device(seg: Segment) -> torch.device:
    return next(iter(seg.keys.values())).device if seg.keys else torch.device("cpu")



def _ranges(spans: list[tuple[int, int]], device) -> torch.Tensor:
    """Concatenated aranges [start, start + n) for each (start, n)."""
    if not spans:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in spans])
