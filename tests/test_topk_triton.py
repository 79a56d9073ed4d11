"""The Triton top-k of routing against torch.topk: on a GPU, and on the CPU under TRITON_INTERPRET=1."""

import pytest
import torch

pytest.importorskip("triton")  # on CPU, tests/conftest.py has set TRITON_INTERPRET=1

from memsparse.ops.topk_triton import BLOCK, topk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B,N,k", [(1, 3 * BLOCK + 5, 16), (3, 100, 7), (2, 40 * BLOCK, 16), (1, 16, 16),
                                   (2, BLOCK + 1, 1)])
def test_topk_matches_torch(B, N, k):
    g = torch.Generator().manual_seed(N + k)
    x = torch.randn(B, N, generator=g)
    x[:, ::3] = float("-inf")  # deleted documents
    x = x.to(DEVICE)
    vals, idx = topk(x, k)
    ref_vals, ref_idx = x.topk(k, dim=1)
    assert torch.equal(vals, ref_vals)
    assert torch.equal(idx, ref_idx) or torch.equal(x.gather(1, idx), ref_vals)  # ties (-inf) may differ
    assert all(len(set(r)) == k for r in idx.tolist()) and int(idx.max()) < N


def test_all_scores_minus_infinity_and_ties():
    x = torch.full((2, 50), float("-inf"), device=DEVICE)
    x[1, 10:20] = 0.5  # ten equal scores: the lower indices win
    vals, idx = topk(x, 12)
    assert torch.isinf(vals[0]).all() and len(set(idx[0].tolist())) == 12
    assert idx[1, :10].tolist() == list(range(10, 20)) and torch.isinf(vals[1, 10:]).all()


def test_large_k_and_errors():
    x = torch.randn(1, 3000, device=DEVICE)
    vals, idx = topk(x, BLOCK // 2 + 1)  # torch.topk's
    assert torch.equal(vals, x.topk(BLOCK // 2 + 1).values)
    for k in (0, 3001):
        with pytest.raises(ValueError, match="top-"):
            topk(x, k)
