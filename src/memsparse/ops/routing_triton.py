"""Fused routing kernel (Triton): document scores of a batch of routing queries over a tile of chunks per
program, in a single pass over the routing keys.

Each program owns BLOCK_C chunks and reads their keys once for the whole batch: per key head it multiplies
(query rows x D) by (D x chunks) (bf16 on a GPU, float32 accumulation), where a row is one token of one
sample whose G query heads were summed beforehand (head reduce "mean": one product per key head). Cosine
normalises the keys in registers; fp8 or int8 keys are scaled per chunk (the scale cancels under cosine). Per
sample the kernel takes the max over that sample's routing rows (query reduce "max") and folds the chunk
scores into per-document maxima (chunk reduce "max") with atomic max, so no (tokens x chunks) score matrix is
ever stored and extra memory is the (B, documents) output. Inference only. The reference is the PyTorch path
in routing.py (tests compare both, on a GPU and on the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = [triton.Config({"BLOCK_C": 16}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK_C": c}, num_warps=w, num_stages=s)
    for c, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (128, 8, 4)]
]


@triton.autotune(configs=_CONFIGS, key=["HKV", "D", "BLOCK_R", "R_TILES", "B", "HAS_SCALE", "COSINE"])
@triton.jit
def _route_kernel(q_ptr, row_ptr, k_ptr, ks_ptr, doc_ptr, out_ptr, R, C, N,
                  B: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
                  R_TILES: tl.constexpr, BLOCK_C: tl.constexpr, COSINE: tl.constexpr, HAS_SCALE: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, D)
    c_ok = offs_c < C
    doc = tl.load(doc_ptr + offs_c, mask=c_ok, other=0)
    for t in range(R_TILES):  # compile-time count of row tiles (rows / BLOCK_R)
        offs_r = t * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for h in range(HKV):
            q = tl.load(q_ptr + (offs_r[:, None] * HKV + h) * D + offs_d[None, :], mask=r_ok[:, None], other=0.0)
            k = tl.load(k_ptr + (offs_c[:, None] * HKV + h) * D + offs_d[None, :],
                        mask=c_ok[:, None], other=0.0).to(q.dtype)  # (BLOCK_C, D) in the rows' dtype
            part = tl.dot(q, tl.trans(k))  # (BLOCK_R, BLOCK_C), accumulated in float32
            if COSINE:
                kf = k.to(tl.float32)
                part = part / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=1)), 1e-12)[None, :]
            acc += part
        if HAS_SCALE:
            if not COSINE:
                acc = acc * tl.load(ks_ptr + offs_c, mask=c_ok, other=1.0)[None, :]
        sample = tl.load(row_ptr + offs_r, mask=r_ok, other=-1)  # (BLOCK_R,) sample of each routing row, else -1
        for b in range(B):
            mine = sample == b
            if tl.sum(mine.to(tl.int32)) > 0:
                best = tl.max(tl.where(mine[:, None], acc, float("-inf")), axis=0)  # (BLOCK_C,)
                tl.atomic_max(out_ptr + b * N + doc, best, mask=c_ok)


def fused_document_scores(q: torch.Tensor, q_mask: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor,
                          num_docs: int, *, cosine: bool, scale: float, key_scale: torch.Tensor | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Document scores (B, num_docs) (-inf for documents without chunks) with head mean, query max, chunk max.

    q: (B, S, H, D) router queries; q_mask: (B, S) routing tokens; keys: (C, Hkv, D) routing keys shared by the
    batch (bf16/fp16/fp32, or fp8/int8 with `key_scale` (C,) per chunk); chunk_doc: (C,) document column
    of each chunk. `out` (B, num_docs) accumulates several key tiles (e.g. segments of a bank) by max."""
    B, S, H, D = q.shape
    C, Hkv, _ = keys.shape
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim {D}: the kernel needs a power of two >= 16")
    qn = F.normalize(q.float(), dim=-1) if cosine else q.float()
    rows = (qn.view(B, S, Hkv, H // Hkv, D).sum(3) * (scale / H)).reshape(B * S, Hkv, D)  # (R, Hkv, D)
    if q.is_cuda:  # bf16 tensor-core products (float32 accumulation); the interpreter keeps float32
        rows = rows.to(torch.bfloat16)
    sample = torch.arange(B, device=q.device, dtype=torch.int32)[:, None].expand(B, S)  # (B, S)
    sample = torch.where(q_mask, sample, -1).reshape(B * S)  # (R,) -1: not a routing token
    if out is None:
        out = torch.full((B, num_docs), float("-inf"), dtype=torch.float32, device=q.device)
    if C == 0:
        return out
    block_r = max(16, min(64, triton.next_power_of_2(B * S)))
    grid = lambda meta: (triton.cdiv(C, meta["BLOCK_C"]),)  # noqa: E731
    ks = key_scale.contiguous() if key_scale is not None else out  # (C,) float32; unread without a scale
    _route_kernel[grid](rows.contiguous(), sample.contiguous(), keys.contiguous(), ks,
                        chunk_doc.to(torch.int32).contiguous(), out,
                        B * S, C, num_docs, B=B, HKV=Hkv, D=D, BLOCK_R=block_r,
                        R_TILES=triton.cdiv(B * S, block_r), COSINE=cosine, HAS_SCALE=key_scale is not None)
    return out
