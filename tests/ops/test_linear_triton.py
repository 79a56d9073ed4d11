"""The decode-step linear kernels (Triton: norm + projections + gate / residual in one kernel) against the
op-by-op PyTorch reference, each mode and batch size, and whole decode steps of models against the eager step.
On a GPU, and on the CPU under TRITON_INTERPRET=1."""


import pytest
import torch

pytest.importorskip("triton")  # on CPU, tests/conftest.py has set TRITON_INTERPRET=1

from memsparse.model import cached  # noqa: E402
from memsparse.ops.linear_triton import CONCAT, GLU, RESIDUAL, fused_linear, reference  # noqa: E402

from ..conftest import greedy_decode, tiny_model  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weights(K, rows, dtype, g):
    return [(torch.randn(n, K, generator=g) / K ** 0.5).to(dtype).to(DEVICE) for n in rows]


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("mode,rows", [(CONCAT, (9, 5, 5)), (CONCAT, (7,)), (GLU, (6, 6)), (RESIDUAL, (9,))],
                         ids=["qkv", "one", "glu", "residual"])
@pytest.mark.parametrize("normed", [False, True], ids=["plain", "rmsnorm"])
def test_kernel_matches_the_reference(B, mode, rows, normed):
    g = torch.Generator().manual_seed(B * 10 + mode)
    K = 72  # not a multiple of the interpreter's 32-column tiles: masked tail
    x = torch.randn(B, K, generator=g).to(DEVICE) * 3
    ws = _weights(K, rows, torch.float32, g)
    norm = ((torch.rand(K, generator=g) + 0.5).to(DEVICE), 1e-6) if normed else None
    res = torch.randn(B, rows[0], generator=g).to(DEVICE) if mode == RESIDUAL else None
    got = fused_linear(x, ws, mode, norm, res)
    torch.testing.assert_close(got, reference(x, ws, mode, norm, res), atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    x = torch.randn(2, 16, device=DEVICE)
    w = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        fused_linear(torch.randn(9, 16, device=DEVICE), [w])
    with pytest.raises(ValueError, match="contiguous"):
        fused_linear(x, [torch.randn(4, 8, device=DEVICE)])
    with pytest.raises(ValueError, match="contiguous"):
        fused_linear(x, [w], GLU)
    with pytest.raises(ValueError, match="residual"):
        fused_linear(x, [w], RESIDUAL)
    with pytest.raises(ValueError, match="gate and up"):
        fused_linear(x, [w, torch.randn(5, 16, device=DEVICE)], GLU)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_decode_steps_with_fused_linears_match(family):
    """Prefill one row, then decode with the eager step and with the fused kernels: same logits every step.
    Batch 2, biased models and head sizes the attention kernel does not take keep the step given."""
    model = tiny_model(family, head_dim=16).to(DEVICE)
    ids = torch.tensor([[5, 6, 7, 8]], device=DEVICE)
    fused = cached.fused_linears(cached.DecodeStep(), model, 1)
    assert fused.attend is cached._attend_rotating and fused.head is cached._head_fused
    ref = greedy_decode(model, ids, cached.DecodeStep(), 5)
    torch.testing.assert_close(greedy_decode(model, ids, fused, 5), ref, atol=1e-4, rtol=1e-4)
    assert cached.fused_linears(cached.DecodeStep(), model, 2) == cached.DecodeStep()
    for other in (tiny_model("qwen2", head_dim=16), tiny_model(family, head_dim=8)):  # q/k/v biases; head size
        assert cached.fused_linears(cached.DecodeStep(), other, 1) == cached.DecodeStep()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("mode,rows", [(CONCAT, (4096, 1024, 1024)), (GLU, (9728, 9728)), (RESIDUAL, (2560,))],
                         ids=["qkv", "glu", "residual"])
def test_kernel_in_bfloat16_at_qwen3_4b_shapes(mode, rows):
    g = torch.Generator().manual_seed(0)
    K = 4096 if mode == RESIDUAL else 2560
    x = torch.randn(1, K, generator=g).to(DEVICE, torch.bfloat16)
    ws = _weights(K, rows, torch.bfloat16, g)
    norm = ((torch.rand(K, generator=g) + 0.5).to(DEVICE, torch.bfloat16), 1e-6) if mode != RESIDUAL else None
    res = torch.randn(1, rows[0], generator=g).to(DEVICE, torch.bfloat16) if mode == RESIDUAL else None
    got, ref = fused_linear(x, ws, mode, norm, res).float(), reference(x, ws, mode, norm, res).float()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()  # bf16 rounding of the reference's steps
