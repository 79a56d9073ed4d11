"""Stage 2: route a batch of active token rows (question, answer) over a memory bank and prefill them.

In each router layer the routing tokens of each row score every chunk of the bank (segment by segment), the
row selects its top-k live documents, and its active tokens attend to [template prefix; the selected chunks'
K̄/V̄; earlier active tokens]. Non-router layers see only the template prefix. The scoring and top-k are
routing.py's; here they are called per layer and their documents' K̄/V̄ gathered.

On a GPU the whole step can stay there (`BankMemory`: routing, top-k and the gather of the selected chunks with
no host round trip), and then short rows replay it as one CUDA graph per shape (`graphed_prefill`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..memory.bank import MemoryBank
from ..model import cached
from ..ops import has_triton
from .routing import GRAPH_LENGTH, Routing, _round_up, capturing, top_documents, uses_cosine

DEVICE_GATHER_SEGMENTS = 8  # the device-side gather costs one indexing per segment and layer


def gathers_on_device(bank: MemoryBank) -> bool:
    """Whether routing and the gather of the selected chunks stay on the model's device (`BankMemory`): at most
    `DEVICE_GATHER_SEGMENTS` segments, and K̄/V̄ on the device or, with Triton, read zero-copy from pinned memory."""
    host = bank.model.device.type == "cuda" and bank.tier == "host"
    zero_copy = has_triton()
    return len(bank.segments) <= DEVICE_GATHER_SEGMENTS and (zero_copy or not host)


@dataclass
class BankMemory:
    """The `cached.Memory` of a batch over a bank: the template prefix in every layer, plus in router layers
    each row's top-k documents. Records the routing of each row and the time spent routing and gathering.

    On a GPU with Triton (K̄/V̄ on the device, or in pinned host memory read zero-copy by the GPU) and on the CPU,
    for a bank of at most `DEVICE_GATHER_SEGMENTS` segments, routing, top-k and the gather of the selected chunks
    stay on the device: no host round trip per layer; the routing is read back once, when asked for, and the
    times come from CUDA events. Otherwise (many segments, host tier without Triton) each layer's ids go to the
    host, which gathers the selected chunks (copied from pinned memory on a side stream)."""

    bank: MemoryBank
    route_mask: torch.Tensor  # (B, S)
    cosine: bool
    top_k: int
    depth: int = 0  # routing records each layer's top max(top_k, depth) documents; attention reads the top_k
    _routing: list[Routing] = field(default_factory=list)
    _pending: list = field(default_factory=list)  # (layer, (2, B, k') scores and table positions, table ids)
    _spans: list = field(default_factory=list)  # (start, routed, gathered) clocks per router layer
    _seconds: list = field(default_factory=lambda: [0.0, 0.0])  # host-tier route, gather seconds

    def __post_init__(self):
        self._routing = [{} for _ in range(self.route_mask.shape[0])]
        dev = self.route_mask.device
        self.via_host = not gathers_on_device(self.bank)
        # host tier: the selected chunks are copied on a side stream, asynchronously to the queued GPU work
        self.copy_stream = torch.cuda.Stream(dev) if self.via_host and self.bank.tier == "host" else None

    @property
    def routing(self) -> list[Routing]:
        """Per row: router layer -> [(doc id, score)], best first (read back from the device once)."""
        for layer, top, ids in self._pending:
            vals, pos = top.tolist()  # (B, k) each
            for b, (vb, pb) in enumerate(zip(vals, pos)):
                self._routing[b][layer] = [(ids[int(t)], v) for v, t in zip(vb, pb) if v != float("-inf")]
        self._pending = []
        return self._routing

    @property
    def route_seconds(self) -> float:
        """Scoring and top-k: device time (events) on the device path, synchronized wall time through the host."""
        return self._seconds[0] + sum(_elapsed(a, b) for a, b, _ in self._spans)

    @property
    def gather_seconds(self) -> float:
        """Assembling the selected chunks' K̄/V̄."""
        return self._seconds[1] + sum(_elapsed(b, c) for _, b, c in self._spans)

    def __call__(self, i, attn, h, q):
        bank = self.bank
        B = q.shape[0]
        pk, pv = bank.prefix_kv[i]  # (p, Hkv, D)
        if not (attn.is_router and bank.num_docs):
            return pk.expand(B, *pk.shape), pv.expand(B, *pv.shape), torch.ones(B, pk.shape[0], dtype=torch.bool,
                                                                                 device=pk.device)
        if self.via_host:
            return self._via_host(i, attn, h, q)
        timed = not capturing(q.device)  # no timing events inside a captured prefill
        t0 = _clock(q.device) if timed else None
        top = top_documents(bank, i, attn.router_queries(h, q), self.route_mask, self.cosine,
                            max(self.top_k, self.depth))  # (2, B, k'), best first
        self._pending.append((i, top.clone() if top.is_cuda else top, bank.routing_view()["ids"]))
        t1 = _clock(q.device) if timed else None
        top = top[:, :, :self.top_k]
        k, v, valid = bank.gather_top(i, top[1].long(), torch.isfinite(top[0]))  # (B, k * m, ...)
        if timed:
            self._spans.append((t0, t1, _clock(q.device)))
        ones = torch.ones(B, pk.shape[0], dtype=torch.bool, device=pk.device)
        return (torch.cat([pk.expand(B, *pk.shape), k], 1), torch.cat([pv.expand(B, *pv.shape), v], 1),
                torch.cat([ones, valid], 1))

    def _via_host(self, i, attn, h, q):
        """Ids to the host (one sync per layer), which gathers the selected chunks (from the host tier: copies)."""
        bank = self.bank
        B = q.shape[0]
        pk, pv = bank.prefix_kv[i]  # (p, Hkv, D)
        rows_k, rows_v = [[pk] for _ in range(B)], [[pv] for _ in range(B)]
        sync(q.device)
        t0 = time.perf_counter()
        vals, top = top_documents(bank, i, attn.router_queries(h, q), self.route_mask, self.cosine,
                                  max(self.top_k, self.depth)).tolist()  # (B, k') each; waits for the device
        t1 = time.perf_counter()
        ids = bank.routing_view()["ids"]
        for b, (vb, tb) in enumerate(zip(vals, top)):
            picked = [(ids[int(t)], v) for v, t in zip(vb, tb) if v != float("-inf")]
            self._routing[b][i] = picked
            k, v = bank.gather(i, sorted(d for d, _ in picked[:self.top_k]), self.copy_stream)  # in document order
            rows_k[b].append(k)
            rows_v[b].append(v)
        sync(q.device)
        self._seconds[0] += t1 - t0
        self._seconds[1] += time.perf_counter() - t1
        lens = [sum(t.shape[0] for t in r) for r in rows_k]
        M = max(lens)
        mk = pk.new_zeros(B, M, *pk.shape[1:])  # (B, M, Hkv, D)
        mv = pv.new_zeros(B, M, *pv.shape[1:])
        valid = torch.zeros(B, M, dtype=torch.bool, device=pk.device)
        for b in range(B):
            mk[b, :lens[b]] = torch.cat(rows_k[b])
            mv[b, :lens[b]] = torch.cat(rows_v[b])
            valid[b, :lens[b]] = True
        return mk, mv, valid


def _clock(device: torch.device):
    """A point in time: a recorded CUDA event on GPUs (read later, no sync now), else perf_counter."""
    if device.type != "cuda":
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def _elapsed(a, b) -> float:
    if isinstance(a, float):
        return b - a
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def query_offset(bank: MemoryBank, top_k: int) -> int:
    """Position of the first active token: p + k (the official layout) or k; with global document positions
    p + every memory token encoded so far."""
    p = len(bank.prefix_ids)
    if bank.model.msa_config.doc_positions == "global":
        return p + bank.next_position
    return p + top_k if bank.model.msa_config.query_position_offset == "template+k" else top_k


def batch_rows(rows: list[list[int]], masks: list[list[bool]], offset: int, device, length: int = 0):
    """Left-pad token rows (to the longest, or to `length` if longer): ids, positions, valid and route mask,
    each (B, S)."""
    S = max(length, *map(len, rows))
    B = len(rows)
    ids = torch.zeros(B, S, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)
    rmask = torch.zeros(B, S, dtype=torch.bool)
    for b, (r, m) in enumerate(zip(rows, masks)):
        n = len(r)
        ids[b, S - n:] = torch.tensor(r)
        pos[b, S - n:] = torch.arange(offset, offset + n)
        valid[b, S - n:] = True
        rmask[b, S - n:] = torch.tensor(m, dtype=torch.bool)
    return ids.to(device), pos.to(device), valid.to(device), rmask.to(device)


def _check_route_masks(route_masks: list[list[bool]]) -> None:
    for m in route_masks:
        if not any(m):
            raise ValueError("the question needs at least one routing token")


@dataclass
class PrefillResult:
    logits: torch.Tensor | None  # (B, V) last token, (B, S, V) all, or None
    cache: cached.KVCache
    memory: BankMemory


@torch.no_grad()
def prefill_batch(bank: MemoryBank, rows: list[list[int]], route_masks: list[list[bool]], similarity: str = "train",
                  top_k: int | None = None, extra: int = 0, logits: str = "last",
                  route_only: bool = False, depth: int = 0) -> PrefillResult:
    """Route and prefill active token rows (after the template prefix); `route_masks` mark each row's routing
    tokens. `route_only` stops after the last router layer (no logits, no usable cache). `depth`: the routing
    records each layer's top max(k, depth) documents (attention still reads the top k)."""
    model = bank.model
    _check_route_masks(route_masks)
    k = top_k or model.msa_config.engine_top_k
    ids, pos, valid, rmask = batch_rows(rows, route_masks, query_offset(bank, k), model.device)
    memory_class = getattr(bank, "memory_class", BankMemory)  # a memory sharded over ranks: memory/parallel.py
    memory = memory_class(bank, rmask, uses_cosine(model, similarity), k, depth)
    out, cache = cached.prefill(model, ids, pos, valid, memory, extra=extra, logits=logits,
                                last_layer=max(model.router_layers) if route_only else None)
    return PrefillResult(logits=out, cache=cache, memory=memory)


def prefill(bank: MemoryBank, input_ids: list[int], route_mask: list[bool], similarity: str = "train",
            top_k: int | None = None):
    """One row: logits (S, V) of every active token and its routing. Positions start at p + k (or k)."""
    res = prefill_batch(bank, [input_ids], [route_mask], similarity, top_k, logits="all")
    return res.logits[0], res.memory.routing[0]


GRAPH_EXTRA = 64  # ... and room for generated tokens to a multiple of this
GRAPH_MAX_TOKENS = 1024  # graphed only up to this many padded active tokens (batch x length): short questions,
# where launches dominate; the graph's memory pool (KV cache, attention work space) is kept while it is
MAX_PREFILL_GRAPHS = 8  # kept per bank view (the oldest is dropped first)


def _graph_length(rows: list[list[int]]) -> int:
    return _round_up(max(map(len, rows)), GRAPH_LENGTH)


def graphable(bank: MemoryBank, rows: list[list[int]]) -> bool:
    """Whether `graphed_prefill` serves these rows: a GPU, a bank gathered on the device, and at most
    `GRAPH_MAX_TOKENS` padded active tokens; not a memory over ranks (its routing is collective)."""
    return (bank.model.device.type == "cuda" and not hasattr(bank, "memory_class") and gathers_on_device(bank)
            and len(rows) * _graph_length(rows) <= GRAPH_MAX_TOKENS)


class _PrefillGraph:
    """A whole prefill (every layer, routing and gather included) captured as one CUDA graph for one batch size,
    padded length and room for generated tokens, over one routing view of a bank. Inputs and outputs are static
    tensors: each replay overwrites the KV cache and the routing of the previous one. The decode step of that
    cache is captured once too (`GraphedDecode`) and reused across replays."""

    def __init__(self, bank, inputs, cosine: bool, k: int, extra: int):
        self.inputs = [t.clone() for t in inputs]  # ids, pos, valid, rmask (B, S)
        ids, pos, valid, rmask = self.inputs
        model = bank.model
        stream = torch.cuda.Stream(ids.device)
        stream.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(stream):  # warm-up: Triton autotunes, torch.compile and the routing views set up
            cached.prefill(model, ids, pos, valid, BankMemory(bank, rmask, cosine, k), extra=extra)
        torch.cuda.current_stream(ids.device).wait_stream(stream)
        self.memory = BankMemory(bank, rmask, cosine, k)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.cache = cached.prefill(model, ids, pos, valid, self.memory, extra=extra)
        self.pending = list(self.memory._pending)
        self.memory.bank = None  # now it only serves the routing: no cycle bank -> view -> graph -> bank
        self.decode = cached.GraphedDecode(model, self.cache)

    def __call__(self, inputs) -> PrefillResult:
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src)
        self.graph.replay()
        self.cache.length = self.cache.active  # the replay reset the cache's device state (step, positions, valid)
        self.memory._routing = [{} for _ in self.memory._routing]
        self.memory._pending = list(self.pending)
        return PrefillResult(logits=self.logits, cache=self.cache, memory=self.memory)


def graphed_prefill(bank: MemoryBank, rows: list[list[int]], route_masks: list[list[bool]], similarity: str = "train",
                    top_k: int | None = None, extra: int = 0) -> tuple[PrefillResult, cached.GraphedDecode]:
    """`prefill_batch` (last-token logits) replayed from a CUDA graph, and the graphed decode step of its cache.
    Rows are padded to a multiple of `GRAPH_LENGTH` tokens and `extra` rounded up to a multiple of `GRAPH_EXTRA`;
    the graph is captured on the first call of each shape and kept with the bank's routing view. Needs
    `graphable` rows. The result lives in the graph's static memory: it is valid until the next call of the same
    shape. Routing and gather times are not measured (0)."""
    model = bank.model
    if not graphable(bank, rows):
        raise ValueError("graphed_prefill needs a GPU, a bank gathered on the device (gathers_on_device) and at most "
                         f"{GRAPH_MAX_TOKENS} padded active tokens")
    _check_route_masks(route_masks)
    k = top_k or model.msa_config.engine_top_k
    S = _graph_length(rows)
    extra = max(_round_up(extra, GRAPH_EXTRA), GRAPH_EXTRA)
    inputs = batch_rows(rows, route_masks, query_offset(bank, k), model.device, length=S)
    cosine = uses_cosine(model, similarity)
    graphs = bank.routing_view().setdefault("prefill_graphs", {})
    key = (len(rows), S, extra, cosine, k)
    g = graphs.pop(key, None)
    if g is None:
        if len(graphs) >= MAX_PREFILL_GRAPHS:
            graphs.pop(next(iter(graphs)))
        g = _PrefillGraph(bank, inputs, cosine, k, extra)
    graphs[key] = g  # most recently used last
    return g(inputs), g.decode
