"""Fused routing kernel (Triton): document scores of a batch of routing queries over a tile of chunks per
program, in a single pass over the routing keys.

Each program owns BLOCK_C chunks and scores them against every query row of the batch: per key head it multiplies
(query rows x D) by (D x chunks) (bf16 on a GPU, float32 accumulation), where a row is one token of one
sample whose G query heads were summed beforehand (head reduce "mean": one product per key head). The rows of the
whole batch can form one row tile of up to MAX_BLOCK_R rows (the chunk tile shrinking as the row tile grows, so the
accumulator stays within ACC_BUDGET floats): a batch of questions then reads each routing key once, as one
question does. The autotuner chooses between that and smaller row tiles, which re-read the program's keys (from
L2) once per tile but read fewer query rows per key (every program reads all the rows: BLOCK_R / BLOCK_C query
bytes per key byte). Cosine
normalises the keys in registers; fp8 or int8 keys are scaled per chunk (the scale cancels under cosine). Per
sample the kernel takes the max over that sample's routing rows (query reduce "max") and folds the chunk
scores into per-document maxima (chunk reduce "max") with atomic max, so no (tokens x chunks) score matrix is
ever stored and extra memory is the (B, documents) output. Inference only. The reference is the PyTorch path
in routing.py (tests compare both, on a GPU and on the CPU under TRITON_INTERPRET=1).

Two opt-in variants trim the arithmetic per key byte (the fp8 path is compute-bound otherwise):
`key_inv_norm` (precomputed 1/||k|| per chunk and head, see `inverse_norms`) replaces the norms computed in
registers under cosine, and `split_fp8` (fp8 e4m3 keys only) multiplies the keys as stored by the rows split
into two fp8 terms (rows ≈ (hi + lo) * row scale: |error| <= 2^-8 |x|, as precise as bf16 rows or more).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK_R = 256  # the largest row tile: a batch of 8 questions of 32 routing rows each
ACC_BUDGET = 16384  # float32 accumulator entries per program (BLOCK_R x BLOCK_C)
_CONFIGS = [triton.Config({"BLOCK_R": 64, "BLOCK_C": 16}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w, num_stages=s)
    for r in (16, 32, 64, 128, MAX_BLOCK_R)
    for c, w, s in [(32, 4, 2), (32, 8, 2), (64, 2, 3), (64, 4, 3), (64, 8, 2), (128, 4, 3), (128, 8, 3), (256, 8, 3)]
]  # (a row tile of 256 needs fewer stages: its query tile alone is 64 KB of shared memory per stage at D=128)


def _fitting(configs, nargs, **kw):
    """The tiles worth trying for R_BUCKET rows: a row tile of all the rows (up to 64), or of 64, 128 or 256 of them
    when there are more, with a chunk tile whose accumulator (BLOCK_R x BLOCK_C) fits ACC_BUDGET (else the
    smallest tiles)."""
    rows = kw["R_BUCKET"]
    fit = [c for c in configs if c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_C"] <= ACC_BUDGET
           and (c.kwargs["BLOCK_R"] == min(rows, 64) or 64 < c.kwargs["BLOCK_R"] <= rows)]
    return fit or [min(configs, key=lambda c: (c.kwargs["BLOCK_R"], c.kwargs["BLOCK_C"]))]


@triton.autotune(configs=_CONFIGS, prune_configs_by={"early_config_prune": _fitting},
                  key=["HKV", "D", "R_BUCKET", "B", "HAS_SCALE", "COSINE", "INV_NORM", "SPLIT", "C_BUCKET"])
@triton.jit
def _route_kernel(q_ptr, qlo_ptr, qs_ptr, row_ptr, k_ptr, ks_ptr, kn_ptr, doc_ptr, out_ptr, R, C, N, C_BUCKET,
                  B: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R_BUCKET: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COSINE: tl.constexpr, HAS_SCALE: tl.constexpr,
                  INV_NORM: tl.constexpr, SPLIT: tl.constexpr):
    """q (R, HKV, D) rows (SPLIT: fp8 hi, with qlo fp8 lo and qs (R,) float32 row scale); k (C, HKV, D);
    ks (C,) per-chunk key scale (HAS_SCALE); kn (C, HKV) float16/32 inverse key norms (INV_NORM, cosine only);
    row (R,) sample of each row or -1; doc (C,) document of each chunk; out (B, N) maxima. R_BUCKET: R rounded up
    to a power of two (>= 16). The autotuner picks the row tile BLOCK_R: with one tile of all the rows, the program
    reads its keys once for the whole batch. C_BUCKET (the bit length of C) is only a tuning key: the best tile
    differs between 16K and 1.6M chunks."""
    R_TILES: tl.constexpr = (R_BUCKET + BLOCK_R - 1) // BLOCK_R
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, D)
    c_ok = offs_c < C
    doc = tl.load(doc_ptr + offs_c, mask=c_ok, other=0)
    for t in range(R_TILES):  # compile-time count of row tiles (R_BUCKET / BLOCK_R); those past R do nothing
        if t * BLOCK_R < R:
            offs_r = t * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
            for h in range(HKV):
                q_offs = (offs_r[:, None] * HKV + h) * D + offs_d[None, :]  # (BLOCK_R, D)
                if SPLIT:  # fp8 x fp8 products of both row terms with k as stored (float32 accumulator; sm90
                    # adds fp8 products with ~14 bits by default, far below the split's 2^-8)
                    k = tl.load(k_ptr + (offs_c[:, None] * HKV + h) * D + offs_d[None, :], mask=c_ok[:, None],
                                other=0.0)  # (BLOCK_C, D) fp8
                    kt = tl.trans(k)
                    lo = tl.load(qlo_ptr + q_offs, mask=r_ok[:, None], other=0.0)
                    hi = tl.load(q_ptr + q_offs, mask=r_ok[:, None], other=0.0)
                    part = tl.dot(hi, kt, tl.dot(lo, kt))  # (BLOCK_R, BLOCK_C), in units of the row scale
                else:
                    q = tl.load(q_ptr + q_offs, mask=r_ok[:, None], other=0.0)
                    k = tl.load(k_ptr + (offs_c[:, None] * HKV + h) * D + offs_d[None, :],
                                mask=c_ok[:, None], other=0.0).to(q.dtype)  # (BLOCK_C, D) in the rows' dtype
                    part = tl.dot(q, tl.trans(k))  # (BLOCK_R, BLOCK_C), accumulated in float32
                if COSINE:
                    if INV_NORM:
                        part = part * tl.load(kn_ptr + offs_c * HKV + h, mask=c_ok, other=0.0)[None, :]
                    else:
                        kf = k.to(tl.float32)
                        part = part / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=1)), 1e-12)[None, :]
                acc += part
            if SPLIT:
                acc = acc * tl.load(qs_ptr + offs_r, mask=r_ok, other=1.0)[:, None]
            if HAS_SCALE:
                if not COSINE:
                    acc = acc * tl.load(ks_ptr + offs_c, mask=c_ok, other=1.0)[None, :]
            sample = tl.load(row_ptr + offs_r, mask=r_ok, other=-1)  # (BLOCK_R,) each routing row's sample, else -1
            for b in range(B):
                mine = sample == b
                if tl.sum(mine.to(tl.int32)) > 0:
                    best = tl.max(tl.where(mine[:, None], acc, float("-inf")), axis=0)  # (BLOCK_C,)
                    tl.atomic_max(out_ptr + b * N + doc, best, mask=c_ok)


def inverse_norms(keys: torch.Tensor, piece: int = 1 << 18) -> torch.Tensor:
    """(C, Hkv) 1 / ||k|| of routing keys (C, Hkv, D) as stored (fp8/int8: before the per-chunk scale, which
    cancels under cosine), `piece` chunks at a time (no float32 copy of all keys). float16 for one-byte keys
    (half the bytes: a nonzero fp8 e4m3 / int8 key's norm lies in [2^-9, 448 * sqrt(D)], so its inverse is well
    inside float16's normal range, 2^-11 relative error), float32 otherwise. A zero key gets the largest
    inverse the type holds (65504 or 1e12: it only ever multiplies a zero product)."""
    small = keys.element_size() == 1
    floor = 1 / 65504 if small else 1e-12
    inv = torch.empty(keys.shape[:2], dtype=torch.float16 if small else torch.float32, device=keys.device)
    for a in range(0, keys.shape[0], piece):
        inv[a:a + piece] = torch.linalg.vector_norm(keys[a:a + piece].float(), dim=-1).clamp(min=floor).reciprocal()
    return inv


def _split_fp8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows (R, Hkv, D) float32 -> hi, lo (R, Hkv, D) fp8 e4m3 and scale (R,) float32 with
    rows ≈ (hi + lo) * scale: hi rounds rows / scale (amax 448), lo rounds the residual in the same units (the
    format's exponent range keeps it relative: |error| <= 2^-8 |x| down to 2^-10 * scale)."""
    scale = (rows.abs().amax(dim=(1, 2)) / 448.0).clamp(min=1e-12)  # (R,)
    x = rows / scale[:, None, None]
    hi = x.to(torch.float8_e4m3fn)
    return hi, (x - hi.float()).to(torch.float8_e4m3fn), scale


FILL = 1024  # -inf entries of the output each rows-kernel program writes


@triton.jit
def _rows_kernel(q_ptr, mask_ptr, rows_ptr, lo_ptr, rs_ptr, sample_ptr, fill_ptr, R, S, F, scale, H: tl.constexpr,
                 HKV: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, GP: tl.constexpr, COSINE: tl.constexpr,
                 SPLIT: tl.constexpr, FILL: tl.constexpr):
    """Program r < R makes routing row r = b * S + s: q (R, H, D) -> rows (R, HKV, D) = scale / H * the sum of
    each key head's G query heads (each normalised under cosine); SPLIT: rows / row scale as fp8 hi (rows) + lo,
    rs (R,) the row scale (`_split_fp8_rows`); sample (R,) b, or -1 if the token does not route. Every program
    also sets its FILL entries of fill (F,) float32 to -inf (the output's start, in the same launch)."""
    r = tl.program_id(0)
    f = r * FILL + tl.arange(0, FILL)
    tl.store(fill_ptr + f, tl.full((FILL,), float("-inf"), tl.float32), mask=f < F)
    if r < R:
        G: tl.constexpr = H // HKV
        kv = tl.arange(0, HP)[:, None, None]
        g = tl.arange(0, GP)[None, :, None]
        d = tl.arange(0, D)[None, None, :]
        real = (kv < HKV) & (g < G)  # (HP, GP, 1)
        x = tl.load(q_ptr + (r * H + kv * G + g) * D + d, mask=real, other=0.0).to(tl.float32)  # (HP, GP, D)
        if COSINE:
            x = x / tl.maximum(tl.sqrt(tl.sum(x * x, 2)), 1e-12)[:, :, None]
        rows = tl.sum(x, 1) * (scale / H)  # (HP, D)
        at = (r * HKV + tl.arange(0, HP)[:, None]) * D + tl.arange(0, D)[None, :]
        keep = (tl.arange(0, HP) < HKV)[:, None]
        if SPLIT:
            rs = tl.maximum(tl.max(tl.max(tl.abs(rows), 1), 0) / 448.0, 1e-12)
            y = rows / rs
            hi = y.to(tl.float8e4nv)
            tl.store(rows_ptr + at, hi, mask=keep)
            tl.store(lo_ptr + at, (y - hi.to(tl.float32)).to(tl.float8e4nv), mask=keep)
            tl.store(rs_ptr + r, rs)
        else:
            tl.store(rows_ptr + at, rows.to(rows_ptr.dtype.element_ty), mask=keep)
        routes = tl.load(mask_ptr + r) != 0
        tl.store(sample_ptr + r, tl.where(routes, r // S, -1))


def routing_rows(q: torch.Tensor, q_mask: torch.Tensor, hkv: int, *, cosine: bool, scale: float, split_fp8: bool,
                 fill: torch.Tensor | None = None):
    """The kernel's query rows from router queries q (B, S, H, D) and routing mask (B, S), for keys of `hkv` heads:
    rows (R, hkv, D) (bf16 on a GPU, float32 under the interpreter; fp8 hi with `split_fp8`), the fp8 lo rows and
    (R,) float32 row scales (None without split_fp8), and (R,) int32 sample of each row or -1. One launch, which
    also sets the contiguous float32 tensor `fill` to -inf."""
    B, S, H, D = q.shape
    R = B * S
    dt = torch.float8_e4m3fn if split_fp8 else torch.bfloat16 if q.is_cuda else torch.float32
    rows = torch.empty(R, hkv, D, dtype=dt, device=q.device)
    lo = torch.empty_like(rows) if split_fp8 else None
    rs = torch.empty(R, dtype=torch.float32, device=q.device) if split_fp8 else None
    sample = torch.empty(R, dtype=torch.int32, device=q.device)
    F = fill.numel() if fill is not None else 0
    _rows_kernel[(max(R, triton.cdiv(F, FILL)),)](
        q.contiguous(), q_mask.contiguous().view(torch.uint8), rows, rows if lo is None else lo,
        sample if rs is None else rs, sample, sample if fill is None else fill, R, S, F, scale, H=H, HKV=hkv, D=D,
        HP=triton.next_power_of_2(hkv), GP=triton.next_power_of_2(H // hkv), COSINE=cosine, SPLIT=split_fp8,
        FILL=FILL)
    return rows, lo, rs, sample


def fused_document_scores(q: torch.Tensor, q_mask: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor,
                          num_docs: int, *, cosine: bool, scale: float, key_scale: torch.Tensor | None = None,
                          out: torch.Tensor | None = None, key_inv_norm: torch.Tensor | None = None,
                          split_fp8: bool = False) -> torch.Tensor:
    """Document scores (B, num_docs) (-inf for documents without chunks) with head mean, query max, chunk max.

    q: (B, S, H, D) router queries; q_mask: (B, S) routing tokens; keys: (C, Hkv, D) routing keys shared by the
    batch (bf16/fp16/fp32, or fp8/int8 with `key_scale` (C,) per chunk); chunk_doc: (C,) document column
    of each chunk. `out` (B, num_docs) accumulates several key tiles (e.g. segments of a bank) by max.
    key_inv_norm: (C, Hkv) float16/32 `inverse_norms(keys)`, used instead of norms computed in the kernel under
    cosine (unused for dot products). split_fp8: fp8 e4m3 keys only (head_dim >= 32): fp8 x fp8 products of
    the keys as stored with the rows split into two fp8 terms (`_split_fp8_rows`)."""
    B, S, H, D = q.shape
    C, Hkv, _ = keys.shape
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim {D}: the kernel needs a power of two >= 16")
    if split_fp8 and keys.dtype != torch.float8_e4m3fn:
        raise ValueError(f"split_fp8 needs float8_e4m3fn keys, got {keys.dtype}")
    if split_fp8 and D < 32:
        raise ValueError(f"head_dim {D}: fp8 products (split_fp8) need head_dim >= 32")
    if key_inv_norm is not None and (tuple(key_inv_norm.shape) != (C, Hkv)
                                     or key_inv_norm.dtype not in (torch.float16, torch.float32)):
        raise ValueError(f"key_inv_norm {tuple(key_inv_norm.shape)} {key_inv_norm.dtype}: expected {(C, Hkv)} "
                         "float16 or float32")
    fill = None
    if out is None:
        out = fill = torch.empty(B, num_docs, dtype=torch.float32, device=q.device)  # -inf from the rows kernel
    rows, row_lo, row_scale, sample = routing_rows(q, q_mask, Hkv, cosine=cosine, scale=scale, split_fp8=split_fp8,
                                                   fill=fill)
    if C == 0:
        return out
    route_rows_kernel(rows, row_lo, row_scale, sample, keys, chunk_doc, out, cosine=cosine, key_scale=key_scale,
                      key_inv_norm=key_inv_norm if cosine else None)
    return out


def route_rows_kernel(rows: torch.Tensor, row_lo: torch.Tensor | None, row_scale: torch.Tensor | None,
                      sample: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, out: torch.Tensor, *,
                      cosine: bool, key_scale: torch.Tensor | None = None, key_inv_norm: torch.Tensor | None = None,
                      config: triton.Config | None = None) -> None:
    """The kernel's pass over the keys for prepared rows (`routing_rows`; split fp8 when `row_lo` is given),
    folding maxima into `out` (B, N). The autotuner picks the tile unless `config` (BLOCK_R, BLOCK_C, warps,
    stages) fixes it, as benchmarks/routing_kernel.py does to time each tile."""
    (B, N), (R, C) = out.shape, (rows.shape[0], keys.shape[0])
    split = row_lo is not None
    args = (rows, row_lo if split else rows, row_scale if split else out, sample, keys.contiguous(),
            key_scale.contiguous() if key_scale is not None else out,  # (C,) float32; unread without a scale
            key_inv_norm.contiguous() if key_inv_norm is not None else out,  # (C, Hkv); unread without
            chunk_doc.to(torch.int32).contiguous(), out, R, C, N, C.bit_length())
    kw = dict(B=B, HKV=keys.shape[1], D=keys.shape[2], R_BUCKET=max(16, triton.next_power_of_2(R)), COSINE=cosine,
              HAS_SCALE=key_scale is not None, INV_NORM=key_inv_norm is not None, SPLIT=split)
    if config is None:
        _route_kernel[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]),)](*args, **kw)
    else:
        _route_kernel.fn[(triton.cdiv(C, config.kwargs["BLOCK_C"]),)](
            *args, **kw, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
