"""Routing: chunk scores from router queries and pooled router keys, chunk -> document reduce, top-k.

Reduction order (official): per (query token, head) similarity -> head reduce (mean | max over the H query
heads; query head h uses key head h // G) -> query reduce (max | mean | last over routing tokens) ->
chunk -> document reduce (max | mean). With head mean the G query heads that share a key head are summed
first, so a layer's scores are a single (tokens x Hkv*D) by (Hkv*D x chunks) product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def chunk_scores(
    q: torch.Tensor,
    q_mask: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    head_reduce: str = "mean",
    query_reduce: str = "max",
    cosine: bool = True,
    scale: float = 1.0,
) -> torch.Tensor:
    """Scores (B, C) of every chunk for its sample; invalid chunks are -inf.

    q: (B, S, H, D) router queries, q_mask: (B, S) routing tokens; keys: (B, C, Hkv, D) pooled router keys, or
    (C, Hkv, D) shared by every sample; key_mask: (B, C) or (C,) real chunks. Every sample needs at least one
    routing token.
    """
    B, S, H, D = q.shape
    Hkv = keys.shape[-2]
    kb = "b" if keys.dim() == 4 else ""  # einsum batch letter of the keys
    if cosine:
        q, keys = F.normalize(q, dim=-1), F.normalize(keys, dim=-1)
    qg = q.view(B, S, Hkv, H // Hkv, D)  # (B, S, Hkv, G, D)
    if head_reduce == "mean":
        s = torch.einsum(f"bskd,{kb}ckd->bsc", qg.sum(3), keys) / H  # (B, S, C)
    elif head_reduce == "max":
        s = torch.einsum(f"bskgd,{kb}ckd->bskgc", qg, keys).flatten(2, 3).amax(2)  # (B, S, C)
    else:
        raise ValueError(f"head_reduce {head_reduce!r}")
    s = s * scale
    qm = q_mask.unsqueeze(-1)  # (B, S, 1)
    if query_reduce == "max":
        out = s.masked_fill(~qm, NEG_INF).amax(1)
    elif query_reduce == "mean":
        out = s.masked_fill(~qm, 0).sum(1) / q_mask.sum(1, keepdim=True).clamp(min=1)
    elif query_reduce == "last":
        last = S - 1 - q_mask.flip(1).int().argmax(1)  # (B,)
        out = s[torch.arange(B, device=s.device), last]
    else:
        raise ValueError(f"query_reduce {query_reduce!r}")
    return out.masked_fill(~key_mask, NEG_INF)


def document_scores(
    scores: torch.Tensor, chunk_doc: torch.Tensor, num_docs: int, reduce: str = "max"
) -> torch.Tensor:
    """Reduce chunk scores (B, C) to document scores (B, num_docs); chunk_doc (B, C) is the document column
    of each chunk (-1 for padding). Documents without chunks score -inf."""
    valid = chunk_doc >= 0
    idx = chunk_doc.clamp(min=0)
    base = scores.new_full((scores.shape[0], num_docs), NEG_INF)
    if reduce == "max":
        return base.scatter_reduce(1, idx, scores.masked_fill(~valid, NEG_INF), "amax", include_self=True)
    if reduce == "mean":
        total = scores.new_zeros(base.shape).scatter_add(1, idx, scores.masked_fill(~valid, 0))
        count = scores.new_zeros(base.shape).scatter_add(1, idx, valid.to(scores.dtype))
        return torch.where(count > 0, total / count.clamp(min=1), base)
    raise ValueError(f"chunk reduce {reduce!r}")


def select_top_k(doc_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Hard top-k per sample over present documents (finite scores): a (B, num_docs) boolean mask."""
    kk = min(k, doc_scores.shape[1])
    vals, idx = doc_scores.detach().topk(kk, dim=1)
    return torch.zeros_like(doc_scores, dtype=torch.bool).scatter(1, idx, torch.isfinite(vals))


def ranked_documents(doc_scores: torch.Tensor, k: int, alive: torch.Tensor | None = None,
                     prior: torch.Tensor | None = None) -> torch.Tensor:
    """(2, B, k) float64: the k best of each row of doc_scores (B, N) less `prior` (N,), with the documents where
    `alive` (N,) is False at -inf, best first, and their positions (one tensor: one copy to the host). Among equal
    scores the lower position wins, as in the kernel (`torch.topk` leaves the order of ties unspecified, and on the
    CPU it varies): the memory sharded over ranks merges its shards' candidates by the same rule. The reference
    of `ops/topk_triton.py: topk`."""
    if prior is not None:
        doc_scores = doc_scores - prior
    if alive is not None:
        doc_scores = doc_scores.masked_fill(~alive, NEG_INF)
    vals = doc_scores.float()
    idx = tie_ordered_keys(vals).topk(k, dim=1).indices  # keys are distinct: the order is total
    return torch.stack([vals.gather(1, idx).double(), idx.double()])


def tie_ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys (B, N) of float32 scores (B, N) ordered as (score, then lower position first): the float's bits
    made monotone in the high 32 bits (-0.0 taken as 0.0), the position reversed in the low 32."""
    bits = (scores + 0.0).view(torch.int32).long()  # (+ 0.0: -0.0 -> 0.0)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, lower key
    pos = torch.arange(scores.shape[-1], device=scores.device)
    return ordered * 2**32 + (2**32 - 1 - pos)


def one_question_at_a_time(scores, q: torch.Tensor, q_mask: torch.Tensor, *args, **kw) -> torch.Tensor:
    """Reference of batched routing: `scores(q, q_mask, *args, **kw)` (a batched scorer such as `chunk_scores` or
    the fused kernel) called for each sample alone, on its routing tokens only, stacked: (B, ...)."""
    return torch.cat([scores(q[b:b + 1, q_mask[b]], q_mask[b:b + 1, q_mask[b]], *args, **kw)
                      for b in range(q.shape[0])])


def routing_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    chunk_doc: list[int],
    num_docs: int,
    *,
    head_reduce: str,
    query_reduce: str,
    chunk_reduce: str,
    cosine: bool,
    scale: float,
) -> torch.Tensor:
    """Loop reference for one sample: q (S, H, D) routing tokens, keys (C, Hkv, D) -> (num_docs,) float64."""
    S, H, _ = q.shape
    G = H // keys.shape[1]
    per_chunk = []
    for c in range(keys.shape[0]):
        per_token = []
        for t in range(S):
            heads = []
            for h in range(H):
                a, b = q[t, h].double(), keys[c, h // G].double()
                sim = (a @ b) / (a.norm() * b.norm()) if cosine else a @ b
                heads.append(sim * scale)
            heads = torch.stack(heads)
            per_token.append(heads.mean() if head_reduce == "mean" else heads.max())
        per_token = torch.stack(per_token)
        red = {"max": per_token.max(), "mean": per_token.mean(), "last": per_token[-1]}[query_reduce]
        per_chunk.append(red)
    out = torch.full((num_docs,), NEG_INF, dtype=torch.float64)
    for d in range(num_docs):
        vals = [per_chunk[c] for c in range(len(per_chunk)) if chunk_doc[c] == d]
        if vals:
            vals = torch.stack(vals)
            out[d] = vals.max() if chunk_reduce == "max" else vals.mean()
    return out
