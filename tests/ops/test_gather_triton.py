"""The zero-copy row gather (Triton) against PyTorch indexing and dequantization: on a GPU (reading pinned host
memory), and on the CPU under TRITON_INTERPRET=1."""

import pytest
import torch

pytest.importorskip("triton")  # on CPU, tests/conftest.py has set TRITON_INTERPRET=1

from memsparse.memory.quant import QTensor, dense, quantize  # noqa: E402
from memsparse.ops.gather_triton import gather_rows  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _host(t):
    return t.pin_memory() if DEVICE.type == "cuda" else t


@pytest.mark.parametrize("kind", ["model", "fp8", "int8"])
@pytest.mark.parametrize("Hkv,D", [(3, 16), (2, 32)], ids=["width48", "width64"])
def test_gather_rows_matches_indexing(kind, Hkv, D):
    g = torch.Generator().manual_seed(Hkv * D)
    src = torch.randn(40, Hkv, D, generator=g)
    t = quantize(src, kind, per_head=True)
    rows = torch.randint(0, 40, (2, 3, 5), generator=g)
    rows[0, 1, 2:] = -1  # padding: zero rows
    q = isinstance(t, QTensor)
    got = gather_rows(_host(t.data if q else t), _host(t.scale) if q else None, rows.to(DEVICE), torch.float32,
                      DEVICE)
    ref = dense(t, torch.float32)[rows.clamp(min=0)] * (rows >= 0)[..., None, None]  # (2, 3, 5, Hkv, D)
    assert got.shape == (2, 3, 5, Hkv, D) and got.device.type == DEVICE.type
    assert torch.equal(got.cpu(), ref)


def test_gather_rows_rejects_pageable_host_memory_on_gpu():
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA device")
    with pytest.raises(ValueError, match="pinned"):
        gather_rows(torch.zeros(4, 2, 16), None, torch.zeros(1, dtype=torch.long, device=DEVICE), torch.float32,
                    DEVICE)
