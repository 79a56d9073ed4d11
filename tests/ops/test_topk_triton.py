"""The Triton top-k of routing against its PyTorch reference (torch.topk): on a GPU, and on the CPU under
TRITON_INTERPRET=1."""

import pytest
import torch

pytest.importorskip("triton")  # on CPU, tests/conftest.py has set TRITON_INTERPRET=1

from memsparse.ops.routing import ranked_documents  # noqa: E402
from memsparse.ops.topk_triton import MAX_CANDIDATES, MAX_K, block_size, topk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(x, k, alive=None, prior=None):
    out = topk(x, k, alive, prior)
    ref = ranked_documents(x, k, alive, prior)
    assert out.shape == (2, x.shape[0], k) and out.dtype == torch.float64
    assert torch.equal(out[0], ref[0])
    scores = ranked_documents(x, x.shape[1], alive, prior)  # (2, B, N): every score, and its position
    at = scores[1].argsort(1)  # position -> its place in the ranking
    assert torch.equal(scores[0].gather(1, at.gather(1, out[1].long())), out[0])  # ties may pick other positions
    assert all(len(set(r)) == k for r in out[1].tolist())
    return out


@pytest.mark.parametrize("B,N,k", [(1, 3 * 1024 + 5, 16), (3, 100, 7), (2, 40 * 1024, 16), (1, 16, 16),
                                   (2, 1024 + 1, 1), (1, 70_000, 16)])
def test_topk_matches_torch(B, N, k):
    g = torch.Generator().manual_seed(N + k)
    x = torch.randn(B, N, generator=g)
    x[:, ::3] = float("-inf")  # documents without chunks
    _check(x.to(DEVICE), k)


def test_deleted_documents_and_prior():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5000, generator=g).to(DEVICE)
    alive = (torch.rand(5000, generator=g) > 0.5).to(DEVICE)
    prior = torch.randn(5000, generator=g).to(DEVICE)
    out = _check(x, 16, alive, prior)
    assert alive[out[1].long()].all()
    _check(x, 16, alive)
    _check(x, 16, prior=prior)
    dead = torch.zeros_like(alive)
    dead[4990:] = True  # ten alive: the other six places go to deleted documents, at -inf
    out = topk(x, 16, dead)
    assert set(out[1, :, :10].flatten().long().tolist()) == set(range(4990, 5000))
    assert torch.isinf(out[0, :, 10:]).all()


def test_repeated_calls_reset_the_count():
    x = torch.randn(2, 3000, device=DEVICE)
    for _ in range(3):
        _check(x, 8)
        x = x.roll(7, 1)


def test_all_scores_minus_infinity_and_ties():
    x = torch.full((2, 50), float("-inf"), device=DEVICE)
    x[1, 10:20] = 0.5  # ten equal scores: the lower indices win
    out = topk(x, 12)
    assert torch.isinf(out[0, 0]).all() and len(set(out[1, 0].tolist())) == 12
    assert out[1, 1, :10].tolist() == list(range(10, 20)) and torch.isinf(out[0, 1, 10:]).all()
    y = torch.zeros(1, 3000, device=DEVICE)  # equal scores over three blocks
    assert topk(y, 5)[1, 0].tolist() == [0, 1, 2, 3, 4]


def test_fallbacks_and_errors():
    x = torch.randn(1, 3000, device=DEVICE)
    _check(x, MAX_K + 1)  # torch.topk's
    n = MAX_CANDIDATES // MAX_K * block_size(1 << 30) + 1  # too many candidates for one program: torch.topk's
    _check(torch.randn(1, n, device=DEVICE), MAX_K)
    for k in (0, 3001):
        with pytest.raises(ValueError, match="top-"):
            topk(x, k)
