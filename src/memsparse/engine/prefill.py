"""Stage 2: run the active tokens (question, answer) over a memory bank. In each router layer the routing
tokens score every chunk of the bank, the layer selects its top-k documents, and the active tokens attend to
[template prefix; selected chunks' K̄/V̄; earlier active tokens]. Non-router layers see no memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..memory.bank import MemoryBank
from ..ops.attention import sdpa
from ..ops.routing import chunk_scores, document_scores

SIMILARITIES = ("official", "train", "cosine", "dot")


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (S, V)
    routing: dict[int, list[tuple[int, float]]]  # router layer -> [(doc id, score)], best first


def _uses_cosine(model, similarity: str) -> bool:
    """Cosine or scaled dot at inference: 'official' = the release's engine (cosine only for INFONCE),
    'train' = as the training forward (cosine for every InfoNCE-family loss)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity {similarity!r}: expected one of {SIMILARITIES}")
    msa = model.msa_config
    return {"official": msa.aux_loss_method == "INFONCE", "train": msa.uses_cosine,
            "cosine": True, "dot": False}[similarity]


@torch.no_grad()
def prefill(bank: MemoryBank, input_ids: list[int], route_mask: list[bool], similarity: str = "train",
            top_k: int | None = None) -> PrefillResult:
    """Active tokens `input_ids` (after the template prefix); `route_mask` marks the routing (question) tokens.
    Positions start at p + k (the official engine's layout, as the training forward's default)."""
    model = bank.model
    msa, cfg = model.msa_config, model.config
    if not any(route_mask):
        raise ValueError("the question needs at least one routing token")
    k = top_k or msa.engine_top_k
    dev = model.device
    p = len(bank.prefix_ids)
    S = len(input_ids)
    ids = torch.tensor([input_ids], device=dev)
    rmask = torch.tensor([route_mask], device=dev)
    offset = p + k if msa.query_position_offset == "template+k" else k
    x = model.model.embed_tokens(ids)
    cos, sin = model.rope(torch.arange(offset, offset + S, device=dev)[None], x.dtype)
    cosine = _uses_cosine(model, similarity)
    chunk_doc = bank.chunk_doc()
    alive = torch.tensor(bank.alive, device=dev)
    routing: dict[int, list[tuple[int, float]]] = {}
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, kk, v = attn.project(h, cos, sin)  # (1, S, H|Hkv, D)
        keys, values = [bank.prefix_kv[i][0]], [bank.prefix_kv[i][1]]
        if attn.is_router and bank.num_docs:
            rq = attn.router_queries(h, q)  # (1, S, H, D)
            cs = chunk_scores(
                rq, rmask, bank.route_keys[i][None], torch.ones_like(chunk_doc, dtype=torch.bool)[None],
                head_reduce=msa.head_reduce_method, query_reduce=msa.query_reduce_method,
                cosine=cosine, scale=msa.score_scale(cfg.head_dim),
            )  # (1, C)
            ds = document_scores(cs, chunk_doc[None], bank.num_docs, msa.chunk_reduce_method)[0]  # (N,)
            ds = ds.masked_fill(~alive, float("-inf"))
            vals, top = ds.topk(min(k, bank.num_docs))
            keep = torch.isfinite(vals)
            vals, top = vals[keep], top[keep]
            routing[i] = list(zip(top.tolist(), vals.float().tolist()))
            rows = _chunk_rows(bank, sorted(top.tolist()), dev)
            keys.append(bank.keys[i][rows])
            values.append(bank.values[i][rows])
        keys.append(kk[0])
        values.append(v[0])
        K, V = torch.cat(keys)[None], torch.cat(values)[None]  # (1, prefix + chunks + S, Hkv, D)
        mask = torch.cat([causal.new_ones(S, K.shape[1] - S), causal], 1)[None]  # (1, S, prefix + chunks + S)
        o = sdpa(q, K, V, mask=mask)  # (1, S, H, D)
        x = x + attn.o_proj(o.flatten(2))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = model.lm_head(model.model.norm(x))[0]
    return PrefillResult(logits=logits, routing=routing)


def _chunk_rows(bank: MemoryBank, doc_ids: list[int], device) -> torch.Tensor:
    """Chunk indices of the given documents, in document order."""
    if not doc_ids:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(bank.chunk_start[d], bank.chunk_start[d] + bank.chunk_count[d], device=device)
                      for d in doc_ids])
