"""Calibration of a bank's routing from questions routed over it.

- Routing-query moments for 8-bit routing keys: per router layer and key head, M = E[q q^T] of the routing
  queries the keys will be scored by (memory/quant.py rounds the keys for them). q is what routing multiplies a
  key with: the sum of the group's query heads, each normalized under cosine similarity.
- Document priors: each document's mean routing score per router layer, subtracted before top-k, so that
  documents that score high for every question (hubs) no longer crowd the others out.

The queries come from calibration questions run through the engine's own routing (same layout, same memory);
by default pseudo-queries, sentences drawn from the bank's own documents, so no question set is needed.
"""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F

from ..memory.bank import MemoryBank
from ..memory.parallel import ShardedBank
from ..model import cached
from .bank_memory import memory_for
from .prefill import batch_rows, query_offset
from .routing import document_scores_for, uses_cosine

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
PRIOR_SENTENCES = 256  # pseudo-queries document priors are computed from, where priors are wanted (they are off by
# default: they help open questions over real text and hurt needle search; docs/msa-smollm2.md, "Document priors")


def pseudo_queries(bank: MemoryBank, n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    """Up to `n` distinct sentences drawn from the bank's documents that keep their text (a random document, then
    a random sentence of 5 words or more where it has one), each cut at `max_words` words."""
    rng = random.Random(seed)
    ids = bank.doc_ids()
    out: dict[str, None] = {}
    for _ in range(4 * n if ids else 0):
        if len(out) == n:
            break
        sents = [s for s in _SENTENCE.split((bank.text(rng.choice(ids)) or "").strip()) if s]
        if sents:
            long = [s for s in sents if len(s.split()) >= 5]
            out[" ".join(rng.choice(long or sents).split()[:max_words])] = None
    return list(out)


def route_rows(bank: MemoryBank, rows: list[list[int]], route_masks: list[list[bool]], similarity: str,
               batch_size: int, visit) -> None:
    """Route question rows (active tokens and routing masks, as the engine builds them) over `bank` as in a
    question, in batches; at each router layer call visit(layer, attention module, its normed input (B, S, hidden),
    its queries (B, S, H, D), routing mask (B, S), cosine): the routing queries are attn.router_queries(h, q)."""
    model = bank.model
    cosine, k = uses_cosine(model, similarity), model.msa_config.engine_top_k
    routers = set(model.router_layers)
    for a in range(0, len(rows), batch_size):
        ids, pos, valid, rmask = batch_rows(rows[a:a + batch_size], route_masks[a:a + batch_size],
                                            query_offset(bank, k), model.device)
        memory = memory_for(bank, rmask, cosine, k)

        def capture(layer, attn, h, q, rmask=rmask, memory=memory):
            if layer in routers:
                visit(layer, attn, h, q, rmask, cosine)
            return memory(layer, attn, h, q)

        cached.prefill(model, ids, pos, valid, capture, logits="none", last_layer=max(model.router_layers))


@torch.no_grad()
def routing_query_moments(bank: MemoryBank, rows: list[list[int]], route_masks: list[list[bool]],
                          similarity: str = "train", batch_size: int = 16) -> dict[int, torch.Tensor]:
    """{router layer: (Hkv, D, D) float32} second moments of the routing queries of question rows (active tokens
    and routing masks, as the engine builds them), routed over `bank` as in a question."""
    cfg = bank.model.config
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    sums = {lay: torch.zeros(Hkv, D, D, dtype=torch.float64, device=bank.model.device)
            for lay in bank.model.router_layers}

    def visit(layer, attn, h, q, rmask, cosine):
        r = attn.router_queries(h, q)[rmask].float()  # (N, H, D) routing tokens
        r = F.normalize(r, dim=-1) if cosine else r
        e = r.view(r.shape[0], Hkv, -1, D).sum(2).double()  # (N, Hkv, D): the group's heads summed
        sums[layer] += torch.einsum("nhd,nhe->hde", e, e)

    route_rows(bank, rows, route_masks, similarity, batch_size, visit)
    count = sum(sum(m) for m in route_masks)
    if not count:
        raise ValueError("no routing tokens to calibrate on")
    return {lay: (s / count).float() for lay, s in sums.items()}


@torch.no_grad()
def document_priors(bank: MemoryBank, rows: list[list[int]], route_masks: list[list[bool]],
                    similarity: str = "train", batch_size: int = 16) -> dict:
    """Each live document's mean routing score per router layer over question rows, routed over `bank` as in a
    question (without priors): {"ids": (M,) long, "scores": {layer: (M,) float32}} (see `MemoryBank.doc_priors`)."""
    if not rows:
        raise ValueError("no questions to compute document priors from")
    if isinstance(bank, ShardedBank):
        return _sharded_priors(bank, rows, route_masks, similarity, batch_size)
    saved = bank.doc_priors
    bank.set_doc_priors(None)  # the earlier layers route without priors, as the scores here are
    try:
        view = bank.routing_index()
        sums = {lay: torch.zeros(len(view.ids), dtype=torch.float64, device=bank.model.device)
                for lay in bank.model.router_layers}

        def visit(layer, attn, h, q, rmask, cosine):
            ds = document_scores_for(bank, layer, attn.router_queries(h, q), rmask, cosine)  # (B, N)
            sums[layer] += ds.double().nan_to_num(neginf=0.0).sum(0)

        route_rows(bank, rows, route_masks, similarity, batch_size, visit)
    finally:
        bank.set_doc_priors(saved)
    alive = view.alive.cpu()
    return {"ids": torch.tensor(view.ids, dtype=torch.long)[alive],
            "scores": {lay: (s / len(rows)).float().cpu()[alive] for lay, s in sums.items()}}


def _sharded_priors(bank, rows: list[list[int]], route_masks: list[list[bool]], similarity: str,
                    batch_size: int) -> dict:
    """`document_priors` over a bank sharded over ranks (memory/parallel.py; collective): each rank scores its shard
    with rank 0's routing queries; the sums, per global id, meet in one all-reduce (each is one rank's, plus zeros)."""
    import torch.distributed as dist

    shard, dev = bank.shard, bank.model.device
    saved = bank.doc_priors
    bank.set_doc_priors(None)  # the earlier layers route without priors, as the scores here are
    try:
        at = torch.tensor(shard.routing_index().ids if shard.segments else [], dtype=torch.long, device=dev)
        sums = {lay: torch.zeros(bank.next_id, dtype=torch.float64, device=dev) for lay in bank.model.router_layers}

        def visit(layer, attn, h, q, rmask, cosine):
            rq = attn.router_queries(h, q).contiguous()
            dist.broadcast(rq, src=bank.src, group=bank.group)
            if len(at):
                ds = document_scores_for(shard, layer, rq, rmask, cosine)  # (B, n), deleted documents -inf
                sums[layer].index_add_(0, at, ds.double().nan_to_num(neginf=0.0).sum(0))

        route_rows(bank, rows, route_masks, similarity, batch_size, visit)
    finally:
        bank.set_doc_priors(saved)
    for s in sums.values():
        dist.all_reduce(s, group=bank.group)
    live = torch.tensor(bank.doc_ids(), dtype=torch.long)
    return {"ids": live, "scores": {lay: (s / len(rows)).float().cpu()[live] for lay, s in sums.items()}}
