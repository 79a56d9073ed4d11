"""One decode step's attention in one kernel (Triton): write the new token's key and value into the layer's cache
column, mark it valid, and attend over the valid columns, for every query head of a key head (grouped query).

The reference is the op-by-op path in model/cached.py (`index_copy_` of k and v, `index_fill_` of the validity,
PyTorch SDPA under the validity mask): five or more kernels per layer, which at batch 1 cost more than their
work. Each program takes one (row, key head): its G query heads (padded to 16 rows for the tensor-core product)
run an online softmax over blocks of cache columns; the new token's own column comes from registers (never read
back from the cache it is written to), then k and v are stored. The column is `step + offset`, read from the
device (`offset` per layer), so a CUDA graph replays the kernel for every step. Inference only (no backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_L = 128  # cache columns per iteration (H100, 400 columns: 14 us a call, 16 with 64)


@triton.jit
def _decode_attention(q, kn, vn, K, V, valid, step, out, offset, L, scale,
                      H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                      BLOCK: tl.constexpr, NB: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    G: tl.constexpr = H // HKV
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    real = g < G
    col = tl.load(step) + offset
    qs = tl.load(q + (b * H + h * G + g)[:, None] * D + d[None, :], mask=real[:, None], other=0.0)  # (GP, D)
    k_new = tl.load(kn + (b * HKV + h) * D + d).to(tl.float32)  # (D,)
    v_new = tl.load(vn + (b * HKV + h) * D + d).to(tl.float32)
    m = tl.full((GP,), float("-inf"), tl.float32)
    den = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for blk in range(NB):  # NB: blocks covering L, rounded up to a power of two (few compiled variants)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        ok = (cols < L) & (cols != col)
        ok = ok & (tl.load(valid + b * L + cols, mask=ok, other=0) != 0)
        rows = (b * L + cols)[:, None] * (HKV * D) + h * D + d[None, :]  # (BLOCK, D) offsets of this head
        k = tl.load(K + rows, mask=ok[:, None], other=0.0)
        s = tl.dot(qs, tl.trans(k), input_precision=PREC) * scale  # (GP, BLOCK)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])  # masked columns: exp(-inf) = 0 (m_new is finite once any column counts)
        p = tl.where(ok[None, :], p, 0.0)
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        v = tl.load(V + rows, mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        den = den * alpha + tl.sum(p, 1)
        m = m_new
    s_new = tl.sum(qs.to(tl.float32) * k_new[None, :], 1) * scale  # (GP,) the new token's own column
    m_new = tl.maximum(m, s_new)
    alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
    p_new = tl.exp(s_new - m_new)
    acc = acc * alpha[:, None] + p_new[:, None] * v_new[None, :]
    den = den * alpha + p_new
    o = acc / den[:, None]
    tl.store(out + (b * H + h * G + g)[:, None] * D + d[None, :], o.to(out.dtype.element_ty), mask=real[:, None])
    at = (b * L + col) * (HKV * D) + h * D + d
    tl.store(K + at, k_new.to(K.dtype.element_ty))
    tl.store(V + at, v_new.to(V.dtype.element_ty))
    if h == 0:
        tl.store(valid + b * L + col, 1)


def supported(head_dim: int, heads: int, kv_heads: int) -> bool:
    """Shapes the kernel takes: a power-of-two head size of at least 16 and whole query groups."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and heads % kv_heads == 0


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                     valid: torch.Tensor, step: torch.Tensor, offset: int) -> torch.Tensor:
    """q (B, H, D), k, v (B, Hkv, D) of the new token; K, V (B, L, Hkv, D) and valid (B, L) bool the layer's cache,
    written in place at column `step + offset` (step (1,) long on the device). Returns the attention output
    (B, H, D) over the valid columns and the new one."""
    B, H, D = q.shape
    L, Hkv = K.shape[1], K.shape[2]
    if not supported(D, H, Hkv):
        raise ValueError(f"decode_attention: head_dim {D} with {H} / {Hkv} heads is not supported")
    if not (K.is_contiguous() and V.is_contiguous() and valid.is_contiguous()):
        raise ValueError("decode_attention needs contiguous caches")
    out = torch.empty_like(q)
    _decode_attention[(B, Hkv)](
        q.contiguous(), k.contiguous(), v.contiguous(), K, V, valid.view(torch.uint8), step, out, offset, L,
        D ** -0.5, H=H, HKV=Hkv, D=D, GP=max(16, triton.next_power_of_2(H // Hkv)), BLOCK=BLOCK_L,
        NB=triton.next_power_of_2(triton.cdiv(L, BLOCK_L)),
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # float32 caches: no TF32 rounding
    )
    return out
