"""The fused routing kernel alone: achieved GB/s of one router layer's pass over its routing keys, for every tile
configuration, key dtype (bf16, fp8 with per-chunk scales) and dtype of the query rows, against the device's
read rate. Default size: one router layer of the Qwen3-4B geometry at 100M tokens (1,562,500 chunks x 8 x 128).

    python benchmarks/routing_kernel.py [--chunks 1562500] [--rows 51]

Results are merged into benchmarks/results/routing_kernel.json under the device kind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from common import RESULTS, run_header, save_run, timed

from memsparse.eval.speed import read_rate
from memsparse.memory.quant import quantize
from memsparse.ops.routing_triton import _CONFIGS, _route_kernel, fused_document_scores

CONFIGS = _CONFIGS + [triton.Config({"BLOCK_C": c}, num_warps=w, num_stages=s)
                      for c, w, s in [(64, 4, 4), (64, 2, 3), (128, 8, 2), (256, 8, 2)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=1_562_500)
    ap.add_argument("--rows", type=int, default=51, help="routing tokens (batch 1)")
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--out", default=str(RESULTS / "routing_kernel.json"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    rate = read_rate(dev)
    C, R, Hkv, D = args.chunks, args.rows, args.hkv, args.d
    keys = torch.randn(C, Hkv, D, device=dev, dtype=torch.bfloat16)
    q8 = quantize(keys, "fp8", per_head=False)
    doc = (torch.arange(C, device=dev) * args.docs // C).to(torch.int32)
    sample = torch.zeros(R, dtype=torch.int32, device=dev)
    out = torch.full((1, args.docs), float("-inf"), device=dev)
    block_r = max(16, triton.next_power_of_2(R))
    points = []
    for kname, k, ks in [("bf16", keys, None), ("fp8", q8.data, q8.scale)]:
        nbytes = k.numel() * k.element_size() + (ks.numel() * 4 if ks is not None else 0)
        for rdt in (torch.bfloat16, torch.float16):
            rows = torch.randn(R, Hkv, D, device=dev).to(rdt)
            for cfg in CONFIGS:
                bc = cfg.kwargs["BLOCK_C"]

                def run(bc=bc, cfg=cfg, rows=rows, k=k, ks=ks):
                    _route_kernel.fn[(triton.cdiv(C, bc),)](
                        rows, sample, k, ks if ks is not None else out, doc, out, R, C, args.docs, B=1, HKV=Hkv, D=D,
                        BLOCK_R=block_r, R_TILES=triton.cdiv(R, block_r), BLOCK_C=bc, COSINE=True,
                        HAS_SCALE=ks is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

                try:
                    ms = timed(run, 10, dev)
                except triton.runtime.errors.OutOfResources:
                    continue  # too much shared memory for this device
                p = {"keys": kname, "rows": str(rdt).removeprefix("torch."), "block_c": bc, "warps": cfg.num_warps,
                     "stages": cfg.num_stages, "ms": round(ms, 3), "gbps": round(nbytes / ms * 1e-6, 1),
                     "floor_ms": round(nbytes / rate * 1e3, 3)}
                points.append(p)
                print(json.dumps(p), flush=True)
        q = torch.randn(1, R, 4 * Hkv, D, device=dev, dtype=torch.bfloat16)
        mask = torch.ones(1, R, dtype=torch.bool, device=dev)
        ms = timed(lambda k=k, ks=ks, q=q, mask=mask: fused_document_scores(
            q, mask, k, doc, args.docs, cosine=True, scale=1.0, key_scale=ks), 10, dev)
        points.append({"keys": kname, "entry": "fused_document_scores (autotuned)", "ms": round(ms, 3),
                       "gbps": round(nbytes / ms * 1e-6, 1), "floor_ms": round(nbytes / rate * 1e3, 3)})
        print(json.dumps(points[-1]), flush=True)
    run_ = {**run_header(dev), "read_gbps": round(rate / 1e9, 1), "chunks": C, "rows": R, "hkv": Hkv, "d": D,
            "points": points}
    save_run(Path(args.out), dev.type, run_)


if __name__ == "__main__":
    main()
