"""One decode step's attention in one kernel (Triton): write the new token's key and value into the layer's cache
column, mark it valid, and attend over the valid columns, for every query head of a key head (grouped query).

The reference is the op-by-op path in model/cached.py (`index_copy_` of k and v, `index_fill_` of the validity,
PyTorch SDPA under the validity mask): five or more kernels per layer, which at batch 1 cost more than their
work. Each program takes one (row, key head) and a split of the cache columns (up to MAX_SPLITS: at batch 1
there would be only Hkv programs): its G query heads (padded to 16 rows for the tensor-core product) run an
online softmax over blocks of columns; split 0 takes the new token's own column from registers (never read back
from the cache it is written to), then stores k and v. Splits leave their partial softmax in a scratch buffer and
the last to finish (an atomic count) merges them. The column is `step + offset`, read from the device (`offset`
per layer), so a CUDA graph replays the kernel for every step. Optionally the kernel first norms q and k per head
and rotates them (RoPE), taking them straight from the q/k/v projection. Inference only (no backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import counters, pdl

BLOCK_L = 128  # cache columns per iteration (H100, 400 columns: 14 us a call, 16 with 64)
MAX_SPLITS = 8  # programs a (row, key head) spreads its cache columns over (at batch 1 only 8 programs otherwise)


@triton.jit
def _rotated(ptr, row, d, nw, cs, sn, eps, mask, NORM: tl.constexpr, D: tl.constexpr):
    """Head vectors starting at element offsets `row` (rows,) from ptr, RMS-normed over D (weight nw) when NORM, then
    rotated by RoPE (cos cs, sin sn, (D,)): x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]. float32
    (rows, D)."""
    half: tl.constexpr = D // 2
    dp = (d + half) % D  # the partner column rotate_half takes
    x = tl.load(ptr + row[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(ptr + row[:, None] + dp[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        inv = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        x = x * inv * tl.load(nw + d).to(tl.float32)[None, :]
        xp = xp * inv * tl.load(nw + dp).to(tl.float32)[None, :]
    sign = tl.where(d < half, -1.0, 1.0)
    return x * cs[None, :] + sign[None, :] * xp * sn[None, :]


@triton.jit
def _decode_attention(q, kn, vn, K, V, valid, step, out, offset, L, scale, sq, sk, sv, qw, kw, cos, sin, eps,
                      part_m, part_den, part_acc, counter,
                      H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                      BLOCK: tl.constexpr, S: tl.constexpr, NBS: tl.constexpr, PREC: tl.constexpr,
                      ROPE: tl.constexpr, QK_NORM: tl.constexpr, GDC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    G: tl.constexpr = H // HKV
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    real = g < G
    if GDC:  # q, k, v come from the kernel before (PDL); the next one may start loading its weights now
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    col = tl.load(step) + offset
    if ROPE:
        cs = tl.load(cos + b * D + d).to(tl.float32)
        sn = tl.load(sin + b * D + d).to(tl.float32)
        qs = _rotated(q, b * sq + (h * G + g) * D, d, qw, cs, sn, eps, real[:, None], QK_NORM, D)
        qs = qs.to(q.dtype.element_ty)  # (GP, D)
        k_new = tl.sum(_rotated(kn, b * sk + h * D + tl.zeros((1,), tl.int64), d, kw, cs, sn, eps, d[None, :] < D,
                                QK_NORM, D), 0)  # (D,)
    else:
        qs = tl.load(q + (b * sq + (h * G + g) * D)[:, None] + d[None, :], mask=real[:, None], other=0.0)  # (GP, D)
        k_new = tl.load(kn + b * sk + h * D + d).to(tl.float32)  # (D,)
    k_new = k_new.to(K.dtype.element_ty).to(tl.float32)  # as stored in the cache
    v_new = tl.load(vn + b * sv + h * D + d).to(tl.float32)
    m = tl.full((GP,), float("-inf"), tl.float32)
    den = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for i in range(NBS):  # this split's blocks of columns
        cols = (sp * NBS + i) * BLOCK + tl.arange(0, BLOCK)
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
    if sp == 0:  # the new token's own column, from registers; then it is written to the cache
        s_new = tl.sum(qs.to(tl.float32) * k_new[None, :], 1) * scale  # (GP,)
        m_new = tl.maximum(m, s_new)
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        p_new = tl.exp(s_new - m_new)
        acc = acc * alpha[:, None] + p_new[:, None] * v_new[None, :]
        den = den * alpha + p_new
        m = m_new
        at = (b * L + col) * (HKV * D) + h * D + d
        tl.store(K + at, k_new.to(K.dtype.element_ty))
        tl.store(V + at, v_new.to(V.dtype.element_ty))
        if h == 0:
            tl.store(valid + b * L + col, 1)
    out_rows = (b * H + h * G + g)[:, None] * D + d[None, :]
    if S == 1:
        tl.store(out + out_rows, (acc / den[:, None]).to(out.dtype.element_ty), mask=real[:, None])
    else:  # splits leave (max, denominator, sum) behind; the last one of a (row, key head) to finish merges them
        pair = b * HKV + h
        part = (pair * S + sp) * GP + g  # (GP,)
        tl.store(part_m + part, m)
        tl.store(part_den + part, den)
        tl.store(part_acc + part[:, None] * D + d[None, :], acc)
        tl.debug_barrier()  # every thread's partials written before the count says so
        if tl.atomic_add(counter + pair, 1, sem="acq_rel") == S - 1:
            parts = (pair * S + tl.arange(0, S))[:, None] * GP + g[None, :]  # (S, GP)
            ms = tl.load(part_m + parts, cache_modifier=".cg")
            top = tl.max(ms, 0)  # (GP,) finite: split 0 holds the new column
            wgt = tl.exp(ms - top[None, :])  # (S, GP)
            total = tl.sum(wgt * tl.load(part_den + parts, cache_modifier=".cg"), 0)
            o = tl.zeros((GP, D), tl.float32)
            for j in range(S):
                wj = tl.sum(tl.where(tl.arange(0, S)[:, None] == j, wgt, 0.0), 0)  # (GP,) weight of split j
                aj = tl.load(part_acc + ((pair * S + j) * GP + g)[:, None] * D + d[None, :], cache_modifier=".cg")
                o += wj[:, None] * aj
            tl.store(out + out_rows, (o / total[:, None]).to(out.dtype.element_ty), mask=real[:, None])
            tl.atomic_xchg(counter + pair, 0)  # ready for the next call (graph replays included)


def supported(head_dim: int, heads: int, kv_heads: int) -> bool:
    """Shapes the kernel takes: a power-of-two head size of at least 16 and whole query groups."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and heads % kv_heads == 0


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                     valid: torch.Tensor, step: torch.Tensor, offset: int,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                     qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """q (B, H, D), k, v (B, Hkv, D) of the new token (each row contiguous, rows may be strided: views of one
    q/k/v projection); K, V (B, L, Hkv, D) and valid (B, L) bool the layer's cache, written in place at column
    `step + offset` (step (1,) long on the device). With `rope` = (cos, sin) (B, D), q and k are first rotated, and
    with `qk_norm` = (q weight, k weight, eps) (D,) RMS-normed per head before that. Returns the attention output
    (B, H, D) over the valid columns and the new one."""
    B, H, D = q.shape
    L, Hkv = K.shape[1], K.shape[2]
    if not supported(D, H, Hkv):
        raise ValueError(f"decode_attention: head_dim {D} with {H} / {Hkv} heads is not supported")
    if not (K.is_contiguous() and V.is_contiguous() and valid.is_contiguous()):
        raise ValueError("decode_attention needs contiguous caches")
    if any(t.stride(2) != 1 or (t.stride(1) != D and t.shape[1] > 1) for t in (q, k, v)):
        raise ValueError("decode_attention needs q, k, v with contiguous heads")
    if qk_norm is not None and rope is None:
        raise ValueError("decode_attention: qk_norm is applied with rope only")
    out = q.new_empty(B, H, D)
    cos, sin = (t.reshape(B, D).contiguous() for t in rope) if rope is not None else (q, q)
    qw, kw, eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    use_pdl = pdl(q.device)
    GP = max(16, triton.next_power_of_2(H // Hkv))
    blocks = triton.cdiv(L, BLOCK_L)
    S = min(MAX_SPLITS, triton.next_power_of_2(blocks))
    part_m = part_den = part_acc = counter = out  # unused with one split
    if S > 1:
        part_m, part_den = (q.new_empty(B * Hkv * S * GP, dtype=torch.float32) for _ in range(2))
        part_acc = q.new_empty(B * Hkv * S * GP * D, dtype=torch.float32)
        counter = counters("decode_attention", q.device, B * Hkv)
    _decode_attention[(B, Hkv, S)](
        q, k, v, K, V, valid.view(torch.uint8), step, out, offset, L, D ** -0.5, q.stride(0), k.stride(0),
        v.stride(0), qw, kw, cos, sin, float(eps), part_m, part_den, part_acc, counter, H=H, HKV=Hkv, D=D, GP=GP,
        BLOCK=BLOCK_L, S=S, NBS=triton.cdiv(blocks, S),
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # float32 caches: no TF32 rounding
        ROPE=rope is not None, QK_NORM=qk_norm is not None, GDC=use_pdl, launch_pdl=use_pdl,
    )
    return out
