"""Rotary position embeddings (HF half-rotation layout) with default, linear, llama3 and yarn frequencies."""

from __future__ import annotations

import math

import torch


def rope_inv_freq(rope: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in float64 and the attention scaling applied to cos/sin."""
    base = float(rope["rope_theta"])
    kind = rope.get("rope_type", "default")
    dim = int(rope.get("partial_rotary_factor", 1.0) * head_dim)
    if dim != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
    scaling = 1.0
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / rope["factor"]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, rope)
    elif kind == "yarn":
        inv_freq, scaling = _yarn(inv_freq, rope, dim, base)
    else:
        raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3, yarn)")
    return inv_freq, scaling


def _llama3(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(inv_freq: torch.Tensor, rope: dict, dim: int, base: float) -> tuple[torch.Tensor, float]:
    factor = rope["factor"]
    old_len = rope["original_max_position_embeddings"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.get("attention_factor")
    if attn is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attn = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attn = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    interpolated = inv_freq / factor
    return interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight, attn


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (head_dim,), computed in float32 (float64 for float64 models)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = positions.to(work).unsqueeze(-1) * inv_freq.to(positions.device, work)  # (..., D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., D)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., heads, D) with cos/sin (..., D) broadcast over the heads axis."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
