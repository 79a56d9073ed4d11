"""Decode-step linear layers (Triton): a few rows of activations times weight matrices read once, with the layer's
RMSNorm, concatenation, SiLU gate or residual add inside the same kernel.

At batch <= 8 a decode step only reads weights; cuBLAS reads the small projections of a layer (k/v: 5 MB in the
Qwen3-4B geometry) at well under the card's read rate and every norm, gate and residual add is one more launch.
Here one kernel does q/k/v (three matrices, one output), one the gated MLP input (gate and up rows read side by
side, silu(gate) * up stored), one each the output projections with the residual added. The RMSNorm of the input
is folded in: the weights meet x * norm_weight and each output is scaled by 1 / rms(x), with the sum of squares
gathered from the same x tiles the product reads (no extra pass). Weight tiles are streamed (evict-first) one
tile ahead, the first before the kernel waits for the one that writes its input (programmatic dependent launch
on Hopper), so weight reads run on across kernel boundaries. Built for one row (the decode step uses it at batch
1; up to MAX_BATCH rows work, but there cuBLAS is faster). The reference is the op-by-op PyTorch (`reference`);
results differ by bf16 rounding only (float32 accumulation and epilogue here). Inference only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import pdl

CONCAT, GLU, RESIDUAL = 0, 1, 2  # modes: outputs side by side; silu(W0 x) * (W1 x); r + W0 x
MAX_BATCH = 8

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = [triton.Config({"BLOCK_N": 4, "BLOCK_K": 32}, num_warps=1)] if _INTERPRET else [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w in [(4, 1024, 4), (8, 512, 4), (16, 256, 4), (2, 1024, 2), (4, 512, 2), (8, 1024, 8), (16, 512, 8),
                    (2, 256, 4), (4, 128, 4), (2, 128, 2), (2, 2048, 4), (1, 2048, 2), (4, 2048, 8), (1, 1024, 1)]
    for s in (1, 3)
]


def _prune(configs, named_args, **kwargs):
    """Keep tiles whose accumulators (batch x rows x columns) take at most 32 registers a thread."""
    bp = kwargs.get("BP", named_args.get("BP", 1))
    kept = [c for c in configs if bp * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 1024 * c.num_warps]
    return kept or configs[-1:]


@triton.autotune(configs=_CONFIGS, key=["B", "K", "N0", "N1", "N2", "MODE", "NORM"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _linear_kernel(x, nw, w0, w1, w2, r, out, B, N0, N1, N2, eps, K: tl.constexpr, NORM: tl.constexpr,
                   MODE: tl.constexpr, BP: tl.constexpr, GDC: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    nb0 = tl.cdiv(N0, BLOCK_N)
    nb1 = tl.cdiv(N1, BLOCK_N)
    w = w0
    first = pid * BLOCK_N
    n = N0
    col = 0
    if MODE == 0:  # CONCAT: the program's matrix and where its outputs go
        if pid >= nb0 + nb1:
            w = w2
            first = (pid - nb0 - nb1) * BLOCK_N
            n = N2
            col = N0 + N1
        elif pid >= nb0:
            w = w1
            first = (pid - nb0) * BLOCK_N
            n = N1
            col = N0
    n_out = N0 + N1 + N2
    rows = first + tl.arange(0, BLOCK_N)
    rmask = rows < n
    bs = tl.arange(0, BP)
    bmask = bs < B
    ks = tl.arange(0, BLOCK_K)
    w_rows = rows.to(tl.int64)[:, None] * K  # (BLOCK_N, 1)
    # products and squares summed per column in registers, across columns once at the end (no per-tile shuffles)
    acc = tl.zeros((BP, BLOCK_N, BLOCK_K), tl.float32)
    acc1 = tl.zeros((BP, BLOCK_N, BLOCK_K), tl.float32)
    ss = tl.zeros((BP, BLOCK_K), tl.float32)
    # weight tiles are loaded one step ahead; the first before waiting on the kernel that writes x (PDL)
    wmask = rmask[:, None] & (ks < K)[None, :]
    wt = tl.load(w + w_rows + ks[None, :], mask=wmask, other=0.0, eviction_policy="evict_first")  # (BLOCK_N, BLOCK_K)
    wt1 = wt
    if MODE == 1:  # GLU: the up rows beside the gate rows
        wt1 = tl.load(w1 + w_rows + ks[None, :], mask=wmask, other=0.0, eviction_policy="evict_first")
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        xt = tl.load(x + bs[:, None] * K + kk[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0)
        xt = xt.to(tl.float32)  # (BP, BLOCK_K)
        if NORM:
            ss += xt * xt
            xt = xt * tl.load(nw + kk, mask=kmask, other=0.0).to(tl.float32)[None, :]
        nmask = rmask[:, None] & (kk + BLOCK_K < K)[None, :]
        wn = tl.load(w + w_rows + (kk + BLOCK_K)[None, :], mask=nmask, other=0.0, eviction_policy="evict_first")
        acc += xt[:, None, :] * wt.to(tl.float32)[None, :, :]
        wt = wn
        if MODE == 1:
            wn1 = tl.load(w1 + w_rows + (kk + BLOCK_K)[None, :], mask=nmask, other=0.0, eviction_policy="evict_first")
            acc1 += xt[:, None, :] * wt1.to(tl.float32)[None, :, :]
            wt1 = wn1
    y = tl.sum(acc, 2)  # (BP, BLOCK_N)
    y1 = tl.sum(acc1, 2)
    if NORM:
        inv_rms = tl.rsqrt(tl.sum(ss, 1) / K + eps)[:, None]  # (BP, 1)
        y = y * inv_rms
        y1 = y1 * inv_rms
    omask = bmask[:, None] & rmask[None, :]
    if MODE == 1:
        y = y / (1.0 + tl.exp(-y)) * y1
    if MODE == 2:
        y += tl.load(r + bs[:, None] * N0 + rows[None, :], mask=omask, other=0.0).to(tl.float32)
    tl.store(out + bs[:, None] * n_out + col + rows[None, :], y.to(out.dtype.element_ty), mask=omask)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run on `device`: a CUDA device, or any under the Triton interpreter (tests)."""
    return device.type == "cuda" or _INTERPRET


def fused_linear(x: torch.Tensor, weights: list[torch.Tensor], mode: int = CONCAT,
                 norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """x (B, K) with B <= MAX_BATCH; weights (N_i, K) without bias. With `norm` = (weight (K,), eps), x is first
    RMS-normalised. CONCAT: [W_0 x | W_1 x | W_2 x] (B, sum N_i) for one to three matrices; GLU: silu(W_0 x) * (W_1 x)
    (B, N); RESIDUAL: residual (B, N) + W_0 x."""
    B, K = x.shape
    if not 1 <= B <= MAX_BATCH:
        raise ValueError(f"fused_linear takes 1 to {MAX_BATCH} rows, got {B}")
    counts = {CONCAT: (1, 2, 3), GLU: (2,), RESIDUAL: (1,)}[mode]
    if len(weights) not in counts or any(w.shape[1] != K or not w.is_contiguous() for w in weights):
        raise ValueError(f"fused_linear: mode {mode} needs {counts} contiguous (N, {K}) weights")
    if mode == GLU and weights[0].shape != weights[1].shape:
        raise ValueError("fused_linear: gate and up weights differ in shape")
    n = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
    if mode != CONCAT:  # one block of outputs (the up rows of GLU pair with the gate rows)
        n = [n[0], 0, 0]
    n_out = sum(n)
    if mode == RESIDUAL and (residual is None or residual.shape != (B, n_out)):
        raise ValueError(f"fused_linear: RESIDUAL needs a ({B}, {n_out}) residual")
    x = x.contiguous()
    out = x.new_empty(B, n_out)
    w = weights + [weights[0]] * (3 - len(weights))
    nw, eps = norm if norm is not None else (x, 0.0)
    r = residual.contiguous() if residual is not None else x
    use_pdl = pdl(x.device)

    def grid(meta):
        bn = meta["BLOCK_N"]
        return (sum(triton.cdiv(m, bn) for m in n),)

    _linear_kernel[grid](x, nw, w[0], w[1], w[2], r, out, B, n[0], n[1], n[2], float(eps), K=K,
                         NORM=norm is not None, MODE=mode, BP=triton.next_power_of_2(B), GDC=use_pdl,
                         launch_pdl=use_pdl)
    return out


def reference(x: torch.Tensor, weights: list[torch.Tensor], mode: int = CONCAT,
              norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None
              ) -> torch.Tensor:
    """`fused_linear` op by op in PyTorch (float32 statistics for the norm, as the decoder's RMSNorm)."""
    if norm is not None:
        xf = x.float()
        x = norm[0] * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm[1])).to(x.dtype)
    ys = [x @ w.T for w in weights]
    if mode == GLU:
        return torch.nn.functional.silu(ys[0]) * ys[1]
    if mode == RESIDUAL:
        return residual + ys[0]
    return torch.cat(ys, -1)
