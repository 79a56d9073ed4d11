"""Fused routing kernel (Triton): document scores of a batch of routing queries over one tile of chunks per
program, in a single pass over the routing keys.

For each (sample, tile of BLOCK_C chunks) the kernel computes, per key head, (routing tokens x D) @ (D x chunks)
on queries whose G query heads were summed beforehand (head reduce "mean": one product per key head), applies
cosine normalisation of the keys in-register, takes the max over routing tokens (query reduce "max"), and folds
the chunk scores into per-document maxima (chunk reduce "max") with atomic max, so no (tokens x chunks) score
matrix is ever stored. Inference only (no gradient). Other reduce options use the PyTorch path in routing.py,
which is also the reference the tests compare against (GPU, and CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _route_kernel(q_ptr, m_ptr, k_ptr, doc_ptr, out_ptr, S, C, N,
                  HKV: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, S_TILES: tl.constexpr,
                  BLOCK_C: tl.constexpr, COSINE: tl.constexpr):
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, D)
    c_ok = offs_c < C
    best = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    for t in range(S_TILES):  # a compile-time count: few variants (routing tokens / BLOCK_S)
        offs_s = t * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = offs_s < S
        acc = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
        for h in range(HKV):
            q = tl.load(q_ptr + ((b * S + offs_s[:, None]) * HKV + h) * D + offs_d[None, :],
                        mask=s_ok[:, None], other=0.0)  # (BLOCK_S, D)
            k = tl.load(k_ptr + (offs_c[:, None] * HKV + h) * D + offs_d[None, :],
                        mask=c_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_C, D)
            part = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_S, BLOCK_C)
            if COSINE:
                norm = tl.sqrt(tl.sum(k * k, axis=1))
                part = part / tl.maximum(norm, 1e-12)[None, :]
            acc += part
        routing = tl.load(m_ptr + b * S + offs_s, mask=s_ok, other=0) != 0
        acc = tl.where(routing[:, None], acc, float("-inf"))
        best = tl.maximum(best, tl.max(acc, axis=0))
    doc = tl.load(doc_ptr + offs_c, mask=c_ok, other=0)
    tl.atomic_max(out_ptr + b * N + doc, best, mask=c_ok)


def fused_document_scores(q: torch.Tensor, q_mask: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor,
                          num_docs: int, *, cosine: bool, scale: float, out: torch.Tensor | None = None,
                          block_c: int = 64) -> torch.Tensor:
    """Document scores (B, num_docs) (-inf for documents without chunks) with head mean, query max, chunk max.

    q: (B, S, H, D) router queries; q_mask: (B, S) routing tokens; keys: (C, Hkv, D) routing keys shared by the
    batch; chunk_doc: (C,) document column of each chunk. `out` (B, num_docs) accumulates several key tiles
    (e.g. segments of a bank) by max."""
    B, S, H, D = q.shape
    C, Hkv, _ = keys.shape
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim {D}: the kernel needs a power of two >= 16")
    qn = F.normalize(q.float(), dim=-1) if cosine else q.float()
    qs = (qn.view(B, S, Hkv, H // Hkv, D).sum(3) * (scale / H)).contiguous()  # (B, S, Hkv, D)
    if out is None:
        out = torch.full((B, num_docs), float("-inf"), dtype=torch.float32, device=q.device)
    if C == 0:
        return out
    block_s = max(16, min(64, triton.next_power_of_2(S)))
    grid = (B, triton.cdiv(C, block_c))
    _route_kernel[grid](qs, q_mask.to(torch.int8).contiguous(), keys.contiguous(),
                        chunk_doc.to(torch.int32).contiguous(), out, S, C, num_docs,
                        HKV=Hkv, D=D, BLOCK_S=block_s, S_TILES=triton.cdiv(S, block_s), BLOCK_C=block_c,
                        COSINE=cosine)
    return out
