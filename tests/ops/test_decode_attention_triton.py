"""The fused decode attention (Triton: cache write + attention in one kernel) against the op-by-op step
(`index_copy_` + SDPA under the validity mask): outputs and the cache after the write, for several cache
layouts, and whole decode steps of a model. On a GPU, and on the CPU under TRITON_INTERPRET=1."""

import pytest
import torch

pytest.importorskip("triton")  # on CPU, tests/conftest.py has set TRITON_INTERPRET=1

from memsparse.model import cached  # noqa: E402
from memsparse.model.decoder import RMSNorm  # noqa: E402
from memsparse.ops.decode_attention_triton import decode_attention, supported  # noqa: E402
from memsparse.ops.rope import apply_rope  # noqa: E402

from ..conftest import greedy_decode, tiny_model  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(B, H, Hkv, D, L, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    K, V = (torch.randn(B, L, Hkv, D, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(B, L, generator=g) < 0.7
    valid[0, : L // 3] = False  # a row whose first columns (and so whole blocks) are masked
    q = torch.randn(B, 1, H, D, generator=g).to(dtype)
    k, v = (torch.randn(B, 1, Hkv, D, generator=g).to(dtype) for _ in range(2))
    return [t.to(DEVICE) for t in (q, k, v, K, V, valid)]


@pytest.mark.parametrize("B,H,Hkv,D,L", [(2, 6, 2, 16, 150), (1, 9, 3, 32, 64), (3, 4, 4, 16, 20), (1, 4, 2, 16, 700)],
                         ids=["gqa3-two-splits", "gqa3-oneblock", "mha-short", "eight-splits-two-empty"])
def test_kernel_matches_the_op_by_op_step(B, H, Hkv, D, L):
    dtype = torch.float32
    q, k, v, K, V, valid = _case(B, H, Hkv, D, L, dtype, seed=L)
    step = torch.tensor([3], device=DEVICE)
    offset = L - 10  # column L - 7: later columns are stale (marked invalid), as in a cache being filled
    valid[:, offset + 3:] = False
    ref_cache = cached.LayerCache(K.clone(), V.clone(), valid.clone(), start=0)
    ref = cached._attend(None, ref_cache, q, k, v, None, step, offset)
    got_cache = cached.LayerCache(K.clone(), V.clone(), valid.clone(), start=0)
    got = decode_attention(q[:, 0], k[:, 0], v[:, 0], got_cache.k, got_cache.v, got_cache.valid, step, offset)
    torch.testing.assert_close(got[:, None], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_cache.k, ref_cache.k) and torch.equal(got_cache.v, ref_cache.v)
    assert torch.equal(got_cache.valid, ref_cache.valid)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm-rope"])
def test_kernel_rotates_strided_projections(qk_norm):
    """q, k, v as views of one projection output, normed per head and rotated inside the kernel: the same as
    normed and rotated by the decoder's modules first, then the op-by-op step."""
    B, H, Hkv, D, L = 2, 6, 2, 16, 40
    q, k, v, K, V, valid = _case(B, H, Hkv, D, L, torch.float32, seed=5)
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], 1) * 3  # (B, (H + 2 Hkv) * D)
    qr, kr, vr = (t.unflatten(-1, (-1, D)) for t in qkv.split([H * D, Hkv * D, Hkv * D], 1))  # strided views
    pos = torch.tensor([[7.0], [30.0]], device=DEVICE)
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=DEVICE) / D)
    ang = torch.cat([pos * inv, pos * inv], -1)  # (B, D)
    cos, sin = ang.cos(), ang.sin()
    qn, kn = RMSNorm(D, 1e-6).to(DEVICE), RMSNorm(D, 1e-6).to(DEVICE)
    with torch.no_grad():
        qn.weight.uniform_(0.5, 1.5)
        kn.weight.uniform_(0.5, 1.5)
    q_ref, k_ref = (qn(qr), kn(kr)) if qk_norm else (qr, kr)
    q_ref, k_ref = apply_rope(q_ref, cos, sin), apply_rope(k_ref, cos, sin)  # (B, heads, D)
    step = torch.tensor([2], device=DEVICE)
    ref_cache = cached.LayerCache(K.clone(), V.clone(), valid.clone(), start=0)
    ref = cached._attend(None, ref_cache, q_ref[:, None], k_ref[:, None], vr[:, None], None, step, 20)
    norm = (qn.weight, kn.weight, 1e-6) if qk_norm else None
    got = decode_attention(qr, kr, vr, K, V, valid, step, 20, rope=(cos, sin), qk_norm=norm)
    torch.testing.assert_close(got[:, None], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(K, ref_cache.k, atol=1e-5, rtol=1e-5)
    assert torch.equal(valid, ref_cache.valid)


def test_only_the_new_column_counts_on_an_empty_cache():
    q, k, v, K, V, valid = _case(1, 4, 2, 16, 32, torch.float32, seed=1)
    valid[:] = False
    out = decode_attention(q[:, 0], k[:, 0], v[:, 0], K, V, valid, torch.tensor([0], device=DEVICE), 5)
    torch.testing.assert_close(out, v[:, 0].repeat_interleave(2, dim=1))  # softmax over one column: its value
    assert valid[0].nonzero().flatten().tolist() == [5]


def test_unsupported_shapes():
    assert supported(64, 9, 3) and supported(128, 32, 8) and not supported(48, 4, 2) and not supported(8, 4, 2)
    q, k, v, K, V, valid = _case(1, 4, 2, 8, 16, torch.float32, seed=2)
    with pytest.raises(ValueError, match="head_dim 8"):
        decode_attention(q[:, 0], k[:, 0], v[:, 0], K, V, valid, torch.tensor([0], device=DEVICE), 0)


def test_decode_steps_with_the_fused_attention_match():
    """Prefill a padded batch, then decode with the op-by-op and the fused attention: same logits every step."""
    model = tiny_model("qwen3", head_dim=16).to(DEVICE)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], device=DEVICE)
    ref = greedy_decode(model, ids, cached.DecodeStep(), 6)
    got = greedy_decode(model, ids, cached.fused_attention(cached.DecodeStep(), model), 6)
    assert got.shape == (6, 2, 97)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert cached.fused_attention(cached.DecodeStep(), tiny_model("qwen3")).attend is cached._attend  # head_dim 8


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
def test_kernel_in_bfloat16_at_qwen3_4b_shapes():
    q, k, v, K, V, valid = _case(2, 32, 8, 128, 300, torch.bfloat16, seed=3)
    step, offset = torch.tensor([7], device=DEVICE), 200
    ref_cache = cached.LayerCache(K.clone(), V.clone(), valid.clone(), start=0)
    ref = cached._attend(None, ref_cache, q, k, v, None, step, offset)
    got = decode_attention(q[:, 0], k[:, 0], v[:, 0], K, V, valid, step, offset)
    torch.testing.assert_close(got[:, None].float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(K, ref_cache.k) and torch.equal(valid, ref_cache.valid)
