"""Where the decode step's time goes (Qwen3-4B geometry, random weights, 1M-token random bank, batch 1).

Steady-state ms/token of the CUDA-graph step (`GraphedDecode`, as `memsparse bench speed` measures it) against the
weight-read floor, and kernels per step (one eager step under the profiler), for these variants:
  eager      the layers' halves around attention run op by op inside the graph
  compiled   the halves compiled by torch.compile
  attention  compiled, and each layer's cache write + attention as one Triton kernel (the library's default)
  fused      attention, and q/k/v and gate/up each one matrix (`fuse_projections`: the weights concatenated, the
             original modules rebound to views of them, so no weight is stored twice)
`fused` is an experiment kept here, not in the library: it is checked against the unfused step before timing.

Usage (GPU): PYTHONPATH=src python benchmarks/decode_step.py [OUT.json]
"""

from __future__ import annotations

import json
import sys
import types

import torch
import torch.nn.functional as F
from common import RESULTS

from memsparse.engine.prefill import prefill_batch
from memsparse.eval.meta import run_meta
from memsparse.eval.speed import QWEN3_4B, Settings, decode_bytes, questions, random_bank, random_model, read_rate
from memsparse.model import cached
from memsparse.ops.rope import apply_rope


def _fused_project(self, h, cos, sin):
    D = self.cfg.head_dim
    q, k, v = F.linear(h, self.qkv_weight, self.qkv_bias).split(self.qkv_sizes, -1)
    q, k, v = (t.unflatten(-1, (-1, D)) for t in (q, k, v))  # (..., H|Hkv, D)
    if self.cfg.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _fused_mlp(self, x):
    gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, -1)
    return self.down_proj(F.silu(gate) * up)


def _concat(mods):
    """One (sum of outputs, in) weight (and bias) for several linears; each module's weight becomes a view."""
    w = torch.cat([m.weight.data for m in mods])
    b = torch.cat([m.bias.data for m in mods]) if mods[0].bias is not None else None
    at = 0
    for m in mods:
        n = m.out_features
        m.weight.data = w[at:at + n]
        if b is not None:
            m.bias.data = b[at:at + n]
        at += n
    return w, b


def fuse_projections(model) -> None:
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.qkv_weight, a.qkv_bias = _concat([a.q_proj, a.k_proj, a.v_proj])
        a.qkv_sizes = [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
        a.project = types.MethodType(_fused_project, a)
        m.gate_up_weight, m.gate_up_bias = _concat([m.gate_proj, m.up_proj])
        m.forward = types.MethodType(_fused_mlp, m)


def _prefill(bank, s: Settings):
    rows, masks = questions(1, s.q_len, bank.model.config.vocab_size, 0)
    res = prefill_batch(bank, rows, masks, extra=s.new_tokens + 8)
    return res.logits.argmax(-1), res.cache


def _step_ms(bank, s: Settings, compile: bool, fused: bool) -> float:
    """Median ms of graph replays of one step (after the capture)."""
    ids, cache = _prefill(bank, s)
    step = cached.GraphedDecode(bank.model, cache, compile=compile, fused=fused)
    ids = step(ids).argmax(-1)
    times = []
    for _ in range(s.new_tokens):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        ids = step(ids).argmax(-1)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return round(sorted(times)[len(times) // 2], 3)


def _kernels(bank, s: Settings, compile: bool, fused: bool) -> int:
    """CUDA kernels one eager decode step launches."""
    ids, cache = _prefill(bank, s)
    step = cached.compiled_step() if compile else cached.DecodeStep()
    step = cached.fused_attention(step, bank.model) if fused else step
    cached.decode(bank.model, ids, cache, step)  # warm-up (compiles)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cached.decode(bank.model, ids, cache, step)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(out) -> None:
    dev = torch.device("cuda")
    s = Settings()
    model = random_model(QWEN3_4B, dev, torch.bfloat16)
    bank = random_bank(model, 1 << 20, s, "model", "model", "device")
    rate = read_rate(dev)
    floor = decode_bytes(model, bank, s, 1) / rate * 1e3
    ids, cache = _prefill(bank, s)
    ref = cached.decode(model, ids, cache, cached.DecodeStep())
    rows = []
    for name in ("eager", "compiled", "attention", "fused"):
        if name == "fused":
            fuse_projections(model)
            torch._dynamo.reset()
            cached.compiled_step.cache_clear()
            ids, cache = _prefill(bank, s)
            got = cached.decode(model, ids, cache, cached.DecodeStep())
            err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
            assert err < 2e-2, f"fused projections change the logits (relative error {err})"
        compile, fused = name != "eager", name in ("attention", "fused")
        ms = _step_ms(bank, s, compile, fused)
        rows.append({"variant": name, "decode_ms_per_token": ms, "floor_ms": round(floor, 3),
                     "ratio": round(ms / floor, 2), "kernels_per_step": _kernels(bank, s, compile, fused)})
        print(json.dumps(rows[-1]), flush=True)
    res = {**run_meta(), "model": "qwen3-4b geometry (random weights)", "memory_tokens": 1 << 20,
           "read_gbps": round(rate / 1e9, 1), "points": rows}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{'variant':<9} {'ms/token':>8} {'floor':>6} {'ratio':>5} {'kernels':>7}")
    for r in rows:
        print(f"{r['variant']:<9} {r['decode_ms_per_token']:>8} {r['floor_ms']:>6} {r['ratio']:>5} "
              f"{r['kernels_per_step']:>7}")


if __name__ == "__main__":
    main(__import__("pathlib").Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "decode_step.json")
