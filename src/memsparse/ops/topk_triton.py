"""Top-k of long score rows (Triton), for routing: the k best documents of each row among up to millions, in one
launch.

`torch.topk` on one row of 100K scores runs as a few radix-select passes costing ~50 us on an H100 whatever k,
once per router layer and round. Here each program takes a block of a row (deleted documents dropped and a prior
subtracted on the way in) and extracts its k largest by k rounds of (max, argmax, remove), leaving them as
candidates; the last program of the row to finish (an atomic count) reduces the row's (blocks x k) candidates the
same way and writes scores and positions as one float64 tensor, the layout routing copies to the host (100K
documents: 15 us in a CUDA graph on an H100, against 34 us for four launches with the mask and stack). Exact (the
values of `torch.topk`, best first); among equal scores the lower index wins. Inference only. The reference is
`routing.ranked_documents` (torch.topk; tests compare both, on a GPU and under TRITON_INTERPRET=1 on the CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import counters
from .routing import ranked_documents

MAX_K = 64  # more rounds than this per block: torch.topk
MAX_CANDIDATES = 16384  # blocks x k a row's last program reduces at most
_LOWEST = -3.4028234663852886e38  # a real -inf score, kept apart from padding and taken entries (-inf)


@triton.jit
def _topk_kernel(x_ptr, alive_ptr, prior_ptr, cand_v, cand_i, count, out_ptr, N, B, NB, K: tl.constexpr,
                 BLOCK: tl.constexpr, MERGE: tl.constexpr, HAS_ALIVE: tl.constexpr, HAS_PRIOR: tl.constexpr,
                 LOWEST: tl.constexpr):
    """x (B, N) float32 scores, alive (N,) uint8, prior (N,) float32 -> out (2, B, K) float64: the K best of
    x - prior among alive entries per row and their positions. cand_v, cand_i (B, NB, K): each block's K best."""
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pos = tl.arange(0, BLOCK)
    offs = blk * BLOCK + pos
    ok = offs < N
    x = tl.load(x_ptr + b * N + offs, mask=ok, other=float("-inf"))
    if HAS_PRIOR:
        x = x - tl.load(prior_ptr + offs, mask=ok, other=0.0)
    if HAS_ALIVE:
        x = tl.where(tl.load(alive_ptr + offs, mask=ok, other=0) != 0, x, float("-inf"))
    x = tl.where(ok & (x == float("-inf")), LOWEST, x)  # real -inf scores stay selectable
    base = (b * NB + blk) * K
    for j in tl.static_range(K):
        best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(cand_v + base + j, best)
        tl.store(cand_i + base + j, blk * BLOCK + at)
        x = tl.where(pos == at, float("-inf"), x)
    tl.debug_barrier()  # every candidate written before the count says so
    if tl.atomic_add(count + b, 1, sem="acq_rel") == NB - 1:
        c = tl.arange(0, MERGE)
        v = tl.load(cand_v + b * NB * K + c, mask=c < NB * K, other=float("-inf"), cache_modifier=".cg")
        ci = tl.load(cand_i + b * NB * K + c, mask=c < NB * K, other=0, cache_modifier=".cg")
        for j in tl.static_range(K):  # candidates lie in block order, so ties still go to the lower index
            best, at = tl.max(v, 0, return_indices=True, return_indices_tie_break_left=True)
            tl.store(out_ptr + b * K + j, tl.where(best == LOWEST, float("-inf"), best).to(tl.float64))
            tl.store(out_ptr + (B + b) * K + j, tl.max(tl.where(c == at, ci, -1), 0).to(tl.float64))
            v = tl.where(c == at, float("-inf"), v)
        tl.atomic_xchg(count + b, 0)  # ready for the next call (graph replays included)


def block_size(n: int) -> int:
    """Scores per program for rows of n: ~64 programs a row, 1024 to 16384 scores each."""
    return min(16384, max(1024, triton.next_power_of_2(triton.cdiv(n, 64))))


def topk(x: torch.Tensor, k: int, alive: torch.Tensor | None = None, prior: torch.Tensor | None = None) -> torch.Tensor:
    """(2, B, k) float64: the k largest of each row of x (B, N) float32 (less `prior` (N,), with the entries where
    `alive` (N,) bool is False at -inf), best first, and their positions. 1 <= k <= N. k above MAX_K, or more
    candidates than one program reduces, go to `ranked_documents`."""
    B, N = x.shape
    if not 1 <= k <= N:
        raise ValueError(f"top-{k} of {N} scores")
    BLOCK = block_size(N)
    NB = triton.cdiv(N, BLOCK)
    if k > MAX_K or NB * k > MAX_CANDIDATES:
        return ranked_documents(x, k, alive, prior)
    x = x.float().contiguous()
    cand_v = torch.empty(B * NB * k, dtype=torch.float32, device=x.device)
    cand_i = torch.empty(B * NB * k, dtype=torch.int32, device=x.device)
    out = torch.empty(2, B, k, dtype=torch.float64, device=x.device)
    _topk_kernel[(NB, B)](
        x, x if alive is None else alive.contiguous().view(torch.uint8), x if prior is None else prior.float(),
        cand_v, cand_i, counters("topk", x.device, B), out, N, B, NB, K=k, BLOCK=BLOCK,
        MERGE=triton.next_power_of_2(NB * k), HAS_ALIVE=alive is not None, HAS_PRIOR=prior is not None,
        LOWEST=_LOWEST, num_warps=4 if BLOCK <= 2048 else 8,  # H100: 1 or 2 warps were slower
    )
    return out
