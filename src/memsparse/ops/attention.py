"""Attention over packed documents and over [memory chunks; active tokens].

Documents attend causally within themselves only. They are right-padded per length bucket and run through
SDPA with `is_causal=True`: with right padding, causality alone keeps real queries off the padded keys, so no
mask is materialised and the cost is linear in the number of documents (sum of length^2, never (sum)^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .indexing import take

_CUDNN_LAST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
               SDPBackend.CUDNN_ATTENTION]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         causal: bool = False) -> torch.Tensor:
    """SDPA on (B, L, H, D) queries and (B, S, Hkv, D) keys/values; returns (B, L, H, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, L, D), (B, Hkv, S, D)
        attn_mask=None if mask is None else mask.unsqueeze(1),  # (B, 1, L, S)
        is_causal=causal, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)  # (B, L, H, D)


def shape_varying_attention():
    """Context for code whose attention shapes change from call to call (training batches, document encoding):
    every SDPA backend stays available, cuDNN last. cuDNN attention, PyTorch's first choice on Hopper, builds an
    execution plan for every new shape (tens to hundreds of ms each), and here nearly every batch is a new shape."""
    return sdpa_kernel(_CUDNN_LAST, set_priority=True)


def packed_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buckets: list
) -> torch.Tensor:
    """Causal attention within each document. q (Nd, H, D), k/v (Nd, Hkv, D): document tokens packed back
    to back; buckets: `DocumentBucket`s covering every document. Returns (Nd, H, D)."""
    out = q.new_zeros(q.shape)
    for b in buckets:
        o = sdpa(take(q, b.gather), take(k, b.gather), take(v, b.gather), causal=True)  # (n, L, H, D)
        out = out.index_copy(0, b.dest, take(o.flatten(0, 1), b.rows))
    return out


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Loop reference in float64: q (L, H, D), k/v (S, Hkv, D), visible (L, S) bool -> (L, H, D)."""
    L, H, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(L, H, D, dtype=torch.float64)
    for i in range(L):
        for h in range(H):
            keys = [j for j in range(k.shape[0]) if visible[i, j]]
            logits = torch.stack([q[i, h].double() @ k[j, h // G].double() for j in keys]) / D**0.5
            w = torch.softmax(logits, 0)
            out[i, h] = sum(w[n] * v[j, h // G].double() for n, j in enumerate(keys))
    return out
