"""Routing-query moments for 8-bit routing keys: per router layer and key head, M = E[q q^T] of the routing
queries the keys will be scored by (memory/quant.py rounds the keys for them). q is what routing multiplies a
key with: the sum of the group's query heads, each normalized under cosine similarity.

The queries come from calibration questions run through the engine's own routing (same layout, same memory);
by default pseudo-queries, sentences drawn from the bank's own documents, so no question set is needed.
"""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F

from ..memory.bank import MemoryBank
from ..model import cached
from .prefill import BankMemory, batch_rows, query_offset, uses_cosine

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


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


@torch.no_grad()
def routing_query_moments(bank: MemoryBank, rows: list[list[int]], route_masks: list[list[bool]],
                          similarity: str = "train", batch_size: int = 16) -> dict[int, torch.Tensor]:
    """{router layer: (Hkv, D, D) float32} second moments of the routing queries of question rows (active tokens
    and routing masks, as the engine builds them), routed over `bank` as in a question."""
    model = bank.model
    cfg, cosine, k = model.config, uses_cosine(model, similarity), model.msa_config.engine_top_k
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    sums = {lay: torch.zeros(Hkv, D, D, dtype=torch.float64, device=model.device) for lay in model.router_layers}
    count = 0
    for a in range(0, len(rows), batch_size):
        ids, pos, valid, rmask = batch_rows(rows[a:a + batch_size], route_masks[a:a + batch_size],
                                            query_offset(bank, k), model.device)
        memory = BankMemory(bank, rmask, cosine, k)

        def capture(layer, attn, h, q, rmask=rmask, memory=memory):
            if layer in sums:
                r = attn.router_queries(h, q)[rmask].float()  # (N, H, D) routing tokens
                r = F.normalize(r, dim=-1) if cosine else r
                e = r.view(r.shape[0], Hkv, -1, D).sum(2).double()  # (N, Hkv, D): the group's heads summed
                sums[layer] += torch.einsum("nhd,nhe->hde", e, e)
            return memory(layer, attn, h, q)

        cached.prefill(model, ids, pos, valid, capture, logits="none", last_layer=max(model.router_layers))
        count += int(rmask.sum())
    if not count:
        raise ValueError("no routing tokens to calibrate on")
    return {lay: (s / count).float() for lay, s in sums.items()}
