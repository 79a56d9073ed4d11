"""Routing: the router queries of a question score every chunk of a memory bank, each router layer keeps its top-k
documents, and the layers' lists are fused into one ranking.

Scoring runs segment by segment, by the fused Triton kernel (ops/routing_triton.py) on GPUs or the PyTorch
reference (ops/routing.py); on a GPU each layer's scoring and top-k replay as one CUDA graph per shape, kept with
the bank's routing index. `fused_top` (reciprocal-rank fusion), `cut_drop` and `joint_routing` are what router
injection and refinement (engine.py) rank with. The prefill (prefill.py) calls `top_documents` in every router layer.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from ..memory.bank import MemoryBank, RoutingIndex
from ..memory.quant import QTensor, dense
from ..ops import has_triton
from ..ops.routing import chunk_scores, document_scores, ranked_documents

if TYPE_CHECKING:
    from .bank_memory import BankMemory

SIMILARITIES = ("official", "train", "cosine", "dot")
Routing = dict[int, list[tuple[int, float]]]  # router layer -> [(doc id, score)], best first
GRAPH_LENGTH = 32  # routing graphs (and graphed prefills) pad the rows to a multiple of this many tokens


def uses_cosine(model, similarity: str) -> bool:
    """Cosine or scaled dot at inference: 'official' = the release's engine (cosine only for INFONCE),
    'train' = as the training forward (cosine for every InfoNCE-family loss)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity {similarity!r}: expected one of {SIMILARITIES}")
    msa = model.msa_config
    return {"official": msa.aux_loss_method == "INFONCE", "train": msa.uses_cosine,
            "cosine": True, "dot": False}[similarity]


def uses_fused(bank: MemoryBank, rq: torch.Tensor) -> bool:
    """Whether routing runs the fused Triton kernel: `bank.fused_routing`, or by default on GPUs when the model's
    reduce methods are the kernel's (head mean, query max, chunk max) and head_dim a power of two >= 16."""
    msa, D = bank.model.msa_config, bank.model.config.head_dim
    supported = ((msa.head_reduce_method, msa.query_reduce_method, msa.chunk_reduce_method) == ("mean", "max", "max")
                 and D >= 16 and D & (D - 1) == 0)
    if bank.fused_routing and not supported:
        raise ValueError("fused routing supports head mean, query max and chunk max, and head_dim a power of two "
                         ">= 16")
    if bank.fused_routing is None:
        return supported and rq.is_cuda and has_triton()
    return bank.fused_routing


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # routing index -> {name: what the engine derived}


def kept(index: RoutingIndex, name: str) -> dict:
    """The engine's store `name` of what it derives from a bank's routing index (inverse key norms, CUDA graphs of
    routing and of prefills): it lives as long as the index, so a change of the bank drops it."""
    return _KEPT.setdefault(index, {}).setdefault(name, {})


def document_scores_for(bank: MemoryBank, layer: int, rq: torch.Tensor, rmask: torch.Tensor,
                        cosine: bool) -> torch.Tensor:
    """(B, N) scores of every document in the bank's table for router queries rq (B, S, H, D) with routing
    mask (B, S); deleted documents are -inf."""
    return _table_scores(bank, layer, rq, rmask, cosine).masked_fill(~bank.routing_index().alive, float("-inf"))


def _table_scores(bank: MemoryBank, layer: int, rq: torch.Tensor, rmask: torch.Tensor, cosine: bool) -> torch.Tensor:
    """`document_scores_for` with deleted documents scored too. Scored one segment (tile) at a time, by the fused
    Triton kernel (ops/routing_triton.py; see `uses_fused`) or by the PyTorch path."""
    msa, view = bank.model.msa_config, bank.routing_index()
    scale = msa.score_scale(bank.model.config.head_dim)
    N = len(view.ids)
    if uses_fused(bank, rq):
        from ..ops.routing_triton import fused_document_scores, inverse_norms

        norms = kept(view, "inv_norms")
        if cosine and layer not in norms:  # per segment (C, Hkv), computed once
            norms[layer] = [inverse_norms(k.data if isinstance(k, QTensor) else k) for k in view.route_keys[layer]]
        ds, start = None, 0
        for n, keys in enumerate(view.route_keys[layer]):
            docs = view.chunk_doc32[start:start + keys.shape[0]]
            data, ks = (keys.data, keys.scale) if isinstance(keys, QTensor) else (keys, None)
            ds = fused_document_scores(rq, rmask, data, docs, N, cosine=cosine, scale=scale, key_scale=ks, out=ds,
                                       key_inv_norm=norms[layer][n] if cosine else None,
                                       split_fp8=data.dtype == torch.float8_e4m3fn and data.shape[-1] >= 32)
            start += keys.shape[0]
        return ds  # (B, N)
    parts = [
        chunk_scores(rq, rmask, dense(keys, rq.dtype),
                     torch.ones(keys.shape[0], dtype=torch.bool, device=rq.device),
                     head_reduce=msa.head_reduce_method, query_reduce=msa.query_reduce_method,
                     cosine=cosine, scale=scale)  # (B, C_segment)
        for keys in view.route_keys[layer]
    ]
    cs = torch.cat(parts, 1)  # (B, C)
    return document_scores(cs, view.chunk_doc.expand(cs.shape[0], -1), N, msa.chunk_reduce_method)  # (B, N)


def top_documents(bank: MemoryBank, layer: int, rq: torch.Tensor, rmask: torch.Tensor, cosine: bool,
                  k: int) -> torch.Tensor:
    """(2, B, k') float64: scores and table positions of each row's top documents (k' = min(k, table size)).
    With fused routing on a GPU the whole step runs as one CUDA graph per (layer, batch, routing length rounded
    up to 32), captured on first use and kept with the bank's routing index (so dropped when the bank changes)."""
    if not (rq.is_cuda and uses_fused(bank, rq)) or capturing(rq.device):
        return top_documents_eager(bank, layer, rq, rmask, cosine, k)  # (inside a captured prefill: no nested graph)
    B, S = rmask.shape
    key = (layer, B, _round_up(S, GRAPH_LENGTH), cosine, k, rq.dtype)
    graphs = kept(bank.routing_index(), "graphs")
    g = graphs.get(key)
    if g is None:
        g = graphs[key] = _RoutingGraph(bank, layer, rq, rmask, cosine, k, key[2])
    g.rq[:, :S].copy_(rq)
    g.mask[:, :S].copy_(rmask)
    g.mask[:, S:].zero_()  # a longer question of the same bucket left routing tokens there
    g.graph.replay()
    return g.out


def routing_round_seconds(memory: BankMemory) -> float | None:
    """Device seconds of one routing round as a graphed prefill runs it: the per-layer routing graphs that the
    eager prefill behind `memory` captured (or reused), replayed back to back on their last inputs, free of the
    host's launch gaps of an eager prefill. None where routing runs without graphs."""
    B, S = memory.route_mask.shape
    bank = memory.bank
    if not (memory.route_mask.is_cuda and uses_fused(bank, memory.route_mask)):
        return None  # (graphs left from fused routing are not this path's)
    graphs = kept(bank.routing_index(), "graphs")
    mine = sorted((key[0], g) for key, g in graphs.items()
                  if key[1:5] == (B, _round_up(S, GRAPH_LENGTH), memory.cosine, memory.top_k))
    if len(mine) != len(bank.model.router_layers):
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _, g in mine:
        g.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def top_documents_eager(bank, layer, rq, rmask, cosine, k) -> torch.Tensor:
    """`top_documents` computed now, without a CUDA graph (inside a captured prefill, over a shard of ranks)."""
    ds = _table_scores(bank, layer, rq, rmask, cosine)  # (B, N), deleted documents too
    alive = bank.routing_index().alive
    prior = bank.prior_scores(layer)  # documents that score high for every question lose that lead
    k = min(k, ds.shape[1])
    if uses_fused(bank, rq):  # one launch for 100K documents, the deleted ones and the prior folded in
        from ..ops.topk_triton import topk

        return topk(ds, k, alive, prior)  # (2, B, k'): one copy to the host
    return ranked_documents(ds, k, alive, prior)


class _RoutingGraph:
    """One routing step captured as a CUDA graph, with static inputs padded to `S` routing positions (padding
    rows are not routing tokens, so they never win the max)."""

    def __init__(self, bank, layer, rq, rmask, cosine, k, S):
        B, n = rmask.shape
        self.rq = rq.new_zeros(B, S, *rq.shape[2:])  # (B, S, H, D)
        self.mask = rmask.new_zeros(B, S)
        self.rq[:, :n].copy_(rq)
        self.mask[:, :n].copy_(rmask)
        stream = torch.cuda.Stream(rq.device)
        stream.wait_stream(torch.cuda.current_stream(rq.device))
        with torch.cuda.stream(stream):  # warm-up (Triton compiles and autotunes here, outside the capture)
            top_documents_eager(bank, layer, self.rq, self.mask, cosine, k)
        torch.cuda.current_stream(rq.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = top_documents_eager(bank, layer, self.rq, self.mask, cosine, k)


def capturing(device: torch.device) -> bool:
    """Whether work on `device` is being captured into a CUDA graph now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


RRF_OFFSET = 60  # reciprocal-rank fusion: a document's fused score is the sum over layers of 1 / (60 + its rank)


def fusing(routing: Routing, layers: list[int]) -> Routing:
    """The lists of `layers` (the model's `fuse_layers`): what `fused_top` and `cut_drop` rank over."""
    keep = set(layers)
    return {lay: picked for lay, picked in routing.items() if lay in keep}


def fused_top(routing: Routing, k: int, exclude: set[int] = frozenset()) -> list[int]:
    """The k documents ranked highest over all router layers by reciprocal-rank fusion (sum of 1 / (60 + rank)),
    leaving out `exclude`."""
    fused: dict[int, float] = {}
    for picked in routing.values():
        for rank, (d, _) in enumerate(picked):
            if d not in exclude:
                fused[d] = fused.get(d, 0.0) + 1.0 / (RRF_OFFSET + rank)
    return sorted(fused, key=fused.get, reverse=True)[:k]


def cut_drop(routing: Routing, order: list[int], k: int) -> float:
    """How clearly the router layers cut `order` (documents in fused order) within its first k + 1: the largest
    drop, between neighbours, in the share of layers whose own top k holds the document. Near 1 when the layers
    agree on a head (one needle every layer ranks first, or four every layer holds); small when their votes are
    spread over look-alike documents."""
    if not routing or len(order) < 2:
        return 1.0
    tops = [{d for d, _ in picked[:k]} for picked in routing.values()]
    share = [sum(d in t for t in tops) / len(tops) for d in order[:k + 1]]
    return round(max(a - b for a, b in zip(share, share[1:])), 6)  # rounded: 10 of 15 layers is 2/3


def joint_routing(first: Routing, refined: Routing) -> Routing:
    """Both passes' layer lists as one routing, for fused_top to rank over all of them (`refine_fuse`): a document
    both passes rank high wins. Keys are only labels."""
    return dict(enumerate([*first.values(), *refined.values()]))
