"""Attention over packed documents and over [memory chunks; active tokens].

Documents attend causally within themselves only. On a GPU in half precision the packed documents go through
variable-length flash attention in one call (`varlen_attn`, no padding). Elsewhere (and as its reference) they are
right-padded per length bucket and run through SDPA with `is_causal=True`: with right padding, causality alone keeps
real queries off the padded keys, so no mask is materialised and the cost is linear in the number of documents
(sum of length^2, never (sum)^2).
"""

from __future__ import annotations

import inspect

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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buckets: list, cu_seqlens: torch.Tensor | None = None,
    max_len: int = 0,
) -> torch.Tensor:
    """Causal attention within each document. q (Nd, H, D), k/v (Nd, Hkv, D): document tokens packed back
    to back; buckets: `DocumentBucket`s covering every document; cu_seqlens (N + 1,) int32 document starts and
    max_len the longest document, for the variable-length kernel. Returns (Nd, H, D)."""
    if cu_seqlens is not None and varlen_usable(q):
        return varlen_causal_attention(q, k, v, cu_seqlens, max_len)
    return bucketed_document_attention(q, k, v, buckets)


def bucketed_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buckets: list) -> torch.Tensor:
    """The padded-bucket path of `packed_document_attention` (any device and dtype)."""
    out = q.new_zeros(q.shape)
    for b in buckets:
        o = sdpa(take(q, b.gather), take(k, b.gather), take(v, b.gather), causal=True)  # (n, L, H, D)
        out = out.index_copy(0, b.dest, take(o.flatten(0, 1), b.rows))
    return out


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, set()
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


_VARLEN, _VARLEN_ARGS = _varlen()


def varlen_usable(q: torch.Tensor) -> bool:
    """Whether the variable-length flash kernel takes q: CUDA, half precision, this torch has it."""
    return _VARLEN is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_len: int) -> torch.Tensor:
    """Causal attention within each packed sequence through `torch.nn.attention.varlen.varlen_attn` (flash):
    q (N, H, D), k/v (N, Hkv, D), cu_seqlens (S + 1,) int32. Returns (N, H, D)."""
    kwargs = {}
    if "enable_gqa" in _VARLEN_ARGS:
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    elif k.shape[1] != q.shape[1]:  # older torch: expand the grouped K/V heads
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (N, H, D)
    if "is_causal" in _VARLEN_ARGS:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    return _VARLEN(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)


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
