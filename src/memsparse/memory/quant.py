"""Quantized bank tensors: fp8 (e4m3) or int8 values with one float32 scale per chunk (routing keys) or per
(chunk, key head) (content K̄/V̄), symmetric (x ≈ data * scale). A `QTensor` keeps the chunk axis first in both
parts, so selecting, moving and pinning chunks is one function applied to both (`qmap`).
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


def quantize(x: torch.Tensor, kind: str, per_head: bool) -> Tensor:
    """`x` (C, Hkv, D) -> QTensor with one scale per chunk (or per chunk and head); 'model' returns x, and an
    already quantized x of this kind is returned as it is."""
    if kind not in DTYPES:
        raise ValueError(f"bank dtype {kind!r}: expected one of {DTYPES}")
    if isinstance(x, QTensor):
        if kind == "model" or x.data.dtype != STORAGE[kind]:
            raise ValueError(f"a {x.data.dtype} QTensor given for bank dtype {kind!r}")
        return x
    if kind == "model":
        return x
    dt = STORAGE[kind]
    dims = (-1,) if per_head else (-2, -1)
    data = torch.empty(x.shape, dtype=dt, device=x.device)
    scale = torch.empty(x.shape[: x.dim() - len(dims)], dtype=torch.float32, device=x.device)  # (C, Hkv) or (C,)
    for a in range(0, x.shape[0], _PIECE):  # in pieces: the float32 temporaries stay small
        xs = x[a:a + _PIECE].float()
        sc = (xs.abs().amax(dim=dims) / _LIMITS[dt]).clamp(min=1e-12)
        q = xs / sc.view(*sc.shape, *[1] * len(dims))
        data[a:a + _PIECE] = q.round().clamp(-127, 127).to(dt) if dt == torch.int8 else q.to(dt)
        scale[a:a + _PIECE] = sc
    return QTensor(data, scale)


def qmap(t: Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> Tensor:
    """Apply a chunk-wise function (select, move, pin) to a tensor, or to both parts of a QTensor."""
    return QTensor(fn(t.data), fn(t.scale)) if isinstance(t, QTensor) else fn(t)


def nbytes(t: Tensor) -> int:
    return t.nbytes() if isinstance(t, QTensor) else t.numel() * t.element_size()


def dense(t: Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values in `dtype` (dequantized when quantized)."""
    return t.dequantize(dtype) if isinstance(t, QTensor) else t.to(dtype)
