"""Where the decode step's time goes (Qwen3-4B or SmolLM2 geometry, random weights, 1M-token random bank, batch 1).

Steady-state ms/token of the CUDA-graph step (`GraphedDecode`) against the weight-read floor, and kernels per step
(one eager step under the profiler), for these variants:
  eager      the layers' halves around attention run op by op inside the graph
  compiled   the halves compiled by torch.compile
  attention  compiled, and each layer's cache write + attention as one Triton kernel (the default at batch > 1)
  triton     the whole layer as five Triton kernels (`cached.fused_linears`: norm + q/k/v; q/k norm + RoPE + cache
             write + attention; o_proj + residual; norm + gate/up + SiLU; down_proj + residual) and the LM head as
             one (the default at batch 1)
Each variant's logits over the measured steps are checked against the eager step's.

Usage (GPU): PYTHONPATH=src python benchmarks/decode_step.py [OUT.json] [qwen3-4b|smollm2]
"""

from __future__ import annotations

import json
import sys

import torch
from common import RESULTS, SMOLLM2

from memsparse.engine.prefill import prefill_batch
from memsparse.eval.meta import run_meta
from memsparse.eval.speed import QWEN3_4B, Settings, decode_bytes, questions, random_bank, random_model, read_rate
from memsparse.model import cached


def _variant(name: str, model) -> cached.DecodeStep:
    if name == "eager":
        return cached.DecodeStep()
    step = cached.compiled_step()
    if name == "compiled":
        return step
    step = cached.fused_attention(step, model)
    return step if name == "attention" else cached.fused_linears(step, model, batch=1)


def _prefill(bank, s: Settings):
    rows, masks = questions(1, s.q_len, bank.model.config.vocab_size, 0)
    res = prefill_batch(bank, rows, masks, extra=s.new_tokens + 8)
    return res.logits.argmax(-1), res.cache


def _step_ms(bank, s: Settings, step: cached.DecodeStep) -> tuple[float, torch.Tensor]:
    """Median ms of graph replays of one step (after the capture), and the logits of the first four steps (the
    same token fed at every step, so that variants compare without following their own argmax)."""
    ids, cache = _prefill(bank, s)
    graphed = cached.GraphedDecode(bank.model, cache)
    graphed.step = step
    logits = [graphed(ids).float()]
    times = []
    for _ in range(s.new_tokens):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = graphed(ids)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        if len(logits) < 4:
            logits.append(out.float())
    return round(sorted(times)[len(times) // 2], 3), torch.stack(logits)


def _kernels(bank, s: Settings, step: cached.DecodeStep) -> int:
    """CUDA kernels one eager decode step launches."""
    ids, cache = _prefill(bank, s)
    cached.decode(bank.model, ids, cache, step)  # warm-up (compiles, autotunes)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cached.decode(bank.model, ids, cache, step)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(out, name: str = "qwen3-4b") -> None:
    dev = torch.device("cuda")
    s = Settings()
    model = random_model({"qwen3-4b": QWEN3_4B, "smollm2": SMOLLM2}[name], dev, torch.bfloat16)
    bank = random_bank(model, 1 << 20, s, "model", "model", "device")
    rate = read_rate(dev)
    floor = decode_bytes(model, bank, s, 1) / rate * 1e3
    rows, ref = [], None
    for variant in ("eager", "compiled", "attention", "triton"):
        step = _variant(variant, model)
        ms, logits = _step_ms(bank, s, step)
        ref = logits if ref is None else ref
        err = float((logits - ref).abs().max() / ref.abs().max())
        assert err < 2e-2, f"{variant}: logits differ from the eager step's (relative error {err})"
        rows.append({"variant": variant, "decode_ms_per_token": ms, "floor_ms": round(floor, 3),
                     "ratio": round(ms / floor, 2), "kernels_per_step": _kernels(bank, s, step),
                     "logits_rel_err": round(err, 5)})
        print(json.dumps(rows[-1]), flush=True)
    res = {**run_meta(), "model": f"{name} geometry (random weights)", "memory_tokens": 1 << 20,
           "read_gbps": round(rate / 1e9, 1), "points": rows}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{'variant':<9} {'ms/token':>8} {'floor':>6} {'ratio':>5} {'kernels':>7}")
    for r in rows:
        print(f"{r['variant']:<9} {r['decode_ms_per_token']:>8} {r['floor_ms']:>6} {r['ratio']:>5} "
              f"{r['kernels_per_step']:>7}")


if __name__ == "__main__":
    main(__import__("pathlib").Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "decode_step.json",
         *sys.argv[2:3])
