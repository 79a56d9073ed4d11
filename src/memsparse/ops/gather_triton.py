"""Zero-copy row gather (Triton): selected chunks of K̄ or V̄ read straight from pinned host memory (or device
memory) by the GPU, dequantized, into a device tensor in the model's dtype.

A pinned host tensor is mapped into the GPU's address space (unified addressing), so a kernel can read it over
PCIe with no staging copy and no host round trip: the rows to read are device indices produced by routing, and
the whole gather is an ordinary kernel launch (graph-capturable). Each program copies one output row: the source
row (C, Hkv * D) at its index, times its per-(chunk, head) scale when quantized, or zeros for index -1. The
reference is PyTorch indexing plus `QTensor.dequantize` (tests compare both, on a GPU and on the CPU under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows(src, scale, rows, out, W: tl.constexpr, HEAD: tl.constexpr, HEADS: tl.constexpr,
                 BLOCK: tl.constexpr, QUANT: tl.constexpr):
    n = tl.program_id(0)
    r = tl.load(rows + n)
    cols = tl.arange(0, BLOCK)
    inside = cols < W
    ok = r >= 0
    r = tl.maximum(r, 0).to(tl.int64)
    x = tl.load(src + r * W + cols, mask=inside & ok, other=0.0).to(tl.float32)
    if QUANT:
        s = tl.load(scale + r * HEADS + cols // HEAD, mask=inside & ok, other=0.0)
        x = x * s
    tl.store(out + n.to(tl.int64) * W + cols, x.to(out.dtype.element_ty), mask=inside)


def gather_rows(src: torch.Tensor, scale: torch.Tensor | None, rows: torch.Tensor, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """src (C, Hkv, D) (pinned host or device; any float, fp8 or int8), scale (C, Hkv) float32 or None, rows (...)
    int64 on `device` (-1: a zero row) -> (..., Hkv, D) in `dtype` on `device`."""
    C, Hkv, D = src.shape
    if not src.is_contiguous() or (scale is not None and not scale.is_contiguous()):
        raise ValueError("gather_rows needs contiguous source rows and scales")
    if src.device.type == "cpu" and device.type == "cuda" and not src.is_pinned():
        raise ValueError("a host source must be in pinned memory to be read by the GPU")
    out = torch.empty(*rows.shape, Hkv, D, dtype=dtype, device=device)
    n = rows.numel()
    if n:
        _gather_rows[(n,)](src.view(C, Hkv * D), scale if scale is not None else src, rows.reshape(-1).contiguous(),
                           out.view(n, Hkv * D), W=Hkv * D, HEAD=D, HEADS=Hkv,
                           BLOCK=triton.next_power_of_2(Hkv * D), QUANT=scale is not None)
    return out
