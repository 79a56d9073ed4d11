"""Quantized bank tensors: fp8 (e4m3) or int8 values with one float32 scale per chunk (routing keys) or per
(chunk, key head) (content K̄/V̄), symmetric (x ≈ data * scale). A `QTensor` keeps the chunk axis first in both
parts, so selecting, moving and pinning chunks is one function applied to both (`qmap`).

Routing keys can be rounded for the queries that will score them (`moments`): with M = E[q q^T] of the routing
queries of a key head, the rounding error e of a key costs e^T M e in squared score error, so the elements are
rounded one after another and each one's error is pushed onto the elements not yet rounded, along M^-1 (the
error-feedback rounding of GPTQ, with keys as the weights and routing queries as the inputs). Same format and
bytes as plain rounding; only which neighbouring grid value each element takes changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES = ("model", "fp8", "int8")
_LIMITS = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
_PIECE = 1 << 18  # chunks quantized at a time


@dataclass
class QTensor:
    """data (C, ...) fp8 or int8, scale (C,) or (C, Hkv) float32."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        s = self.scale.view(*self.scale.shape, *[1] * (self.data.dim() - self.scale.dim()))  # broadcast over D
        return (self.data.float() * s).to(dtype)


Tensor = torch.Tensor | QTensor


def quantize(x: torch.Tensor, kind: str, per_head: bool, moments: torch.Tensor | None = None) -> Tensor:
    """`x` (C, Hkv, D) -> QTensor with one scale per chunk (or per chunk and head); 'model' returns x, and an
    already quantized x of this kind is returned as it is. `moments` (Hkv, D, D): second moments of the queries
    that will score x, for error-feedback rounding (see the module docstring)."""
    if kind not in DTYPES:
        raise ValueError(f"bank dtype {kind!r}: expected one of {DTYPES}")
    if isinstance(x, QTensor):
        if kind == "model" or x.data.dtype != STORAGE[kind]:
            raise ValueError(f"a {x.data.dtype} QTensor given for bank dtype {kind!r}")
        return x
    if kind == "model":
        return x
    dt = STORAGE[kind]
    feedback = None if moments is None else feedback_factor(moments.to(x.device))
    dims = (-1,) if per_head else (-2, -1)
    data = torch.empty(x.shape, dtype=dt, device=x.device)
    scale = torch.empty(x.shape[: x.dim() - len(dims)], dtype=torch.float32, device=x.device)  # (C, Hkv) or (C,)
    for a in range(0, x.shape[0], _PIECE):  # in pieces: the float32 temporaries stay small
        xs = x[a:a + _PIECE].float()
        sc = (xs.abs().amax(dim=dims) / _LIMITS[dt]).clamp(min=1e-12)
        q = xs / sc.view(*sc.shape, *[1] * len(dims))
        data[a:a + _PIECE] = _round(q, dt) if feedback is None else _feedback_round(q, dt, feedback)
        scale[a:a + _PIECE] = sc
    return QTensor(data, scale)


def _round(q: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    q = q.round() if dt == torch.int8 else q
    return q.clamp(-_LIMITS[dt], _LIMITS[dt]).to(dt)


def feedback_factor(moments: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """(Hkv, D, D) upper Cholesky factors U of (M + damp * mean diag(M) * I)^-1 = U^T U, in float64."""
    m = moments.double()
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    m = m + damp * m.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(m)), upper=True)


def _feedback_round(q: torch.Tensor, dt: torch.dtype, U: torch.Tensor, piece: int = 1 << 15,
                    block: int = 32) -> torch.Tensor:
    """Round q (C, Hkv, D) float32 in grid units element by element along D, each error pushed onto the later
    elements through U (Hkv, D, D); `piece` chunks at a time. Within a block of `block` elements the errors are
    pushed one by one; onto the elements after the block, all at once by one product (GPTQ's lazy batch)."""
    U = U.float()
    D = q.shape[-1]
    out = torch.empty(q.shape, dtype=dt, device=q.device)
    for a in range(0, q.shape[0], piece):
        w = q[a:a + piece].clone()  # (c, Hkv, D), updated in place as errors are pushed forward
        o = out[a:a + piece]
        for b0 in range(0, D, block):
            b1 = min(b0 + block, D)
            err = torch.empty(*w.shape[:2], b1 - b0, dtype=w.dtype, device=w.device)  # (c, Hkv, block)
            for d in range(b0, b1):
                o[..., d] = _round(w[..., d], dt)
                err[..., d - b0] = (w[..., d] - o[..., d].float()) / U[:, d, d]
                w[..., d + 1:b1] -= err[..., d - b0, None] * U[:, d, d + 1:b1]
            w[..., b1:] -= torch.einsum("chk,hkd->chd", err, U[:, b0:b1, b1:])
    return out


def qmap(t: Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> Tensor:
    """Apply a chunk-wise function (select, move, pin) to a tensor, or to both parts of a QTensor."""
    return QTensor(fn(t.data), fn(t.scale)) if isinstance(t, QTensor) else fn(t)


def nbytes(t: Tensor) -> int:
    return t.nbytes() if isinstance(t, QTensor) else t.numel() * t.element_size()


def dense(t: Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values in `dtype` (dequantized when quantized)."""
    return t.dequantize(dtype) if isinstance(t, QTensor) else t.to(dtype)
