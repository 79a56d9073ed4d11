"""Stage 2: route a batch of active token rows (question, answer) over a memory bank and prefill them.

In each router layer the routing tokens of each row score every chunk of the bank (segment by segment), the
row selects its top-k live documents, and its active tokens attend to [template prefix; the selected chunks'
K̄/V̄; earlier active tokens]. Non-router layers see only the template prefix. The scoring and top-k are
routing.py's; bank_memory.py calls them per layer and gathers their documents' K̄/V̄.

On a GPU the whole step can stay there (`BankMemory`: routing, top-k and the gather of the selected chunks with
no host round trip), and then short rows replay it as one CUDA graph per shape (`graphed_prefill`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..memory.bank import MemoryBank
from ..memory.parallel import ShardedBank
from ..model import cached
from .bank_memory import BankMemory, gathers_on_device, memory_for
from .routing import GRAPH_LENGTH, _round_up, kept, uses_cosine


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
    memory = memory_for(bank, rmask, uses_cosine(model, similarity), k, depth)
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
    return (bank.model.device.type == "cuda" and not isinstance(bank, ShardedBank) and gathers_on_device(bank)
            and len(rows) * _graph_length(rows) <= GRAPH_MAX_TOKENS)


class _PrefillGraph:
    """A whole prefill (every layer, routing and gather included) captured as one CUDA graph for one batch size,
    padded length and room for generated tokens, over one routing index of a bank. Inputs and outputs are static
    tensors: each replay overwrites the KV cache and the routing of the previous one. The decode step of that
    cache is captured once too (`GraphedDecode`) and reused across replays."""

    def __init__(self, bank, inputs, cosine: bool, k: int, extra: int):
        self.inputs = [t.clone() for t in inputs]  # ids, pos, valid, rmask (B, S)
        ids, pos, valid, rmask = self.inputs
        model = bank.model
        stream = torch.cuda.Stream(ids.device)
        stream.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(stream):  # warm-up: Triton autotunes, torch.compile and the routing index built
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
    the graph is captured on the first call of each shape and kept with the bank's routing index. Needs
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
    graphs = kept(bank.routing_index(), "prefill_graphs")
    key = (len(rows), S, extra, cosine, k)
    g = graphs.pop(key, None)
    if g is None:
        if len(graphs) >= MAX_PREFILL_GRAPHS:
            graphs.pop(next(iter(graphs)))
        g = _PrefillGraph(bank, inputs, cosine, k, extra)
    graphs[key] = g  # most recently used last
    return g(inputs), g.decode
