"""The fused routing kernel alone: achieved GB/s of one router layer's pass over its routing keys, for every tile
configuration, key dtype (bf16, fp8 with per-chunk scales), dtype of the query rows and kernel variant, against the
device's read rate. Variants ("variant"): "base" (key norms computed in the kernel), "inv_norm" (precomputed
inverse key norms, `key_inv_norm`), "split_fp8+inv_norm" (fp8 keys times rows split into two fp8 terms,
`split_fp8`). Default size: one router layer of the Qwen3-4B geometry at 100M tokens (1,562,500 chunks x 8 x 128).

    python benchmarks/routing_kernel.py [--chunks 1562500] [--rows 51]

Results are merged into benchmarks/results/routing_kernel.json under the device kind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from common import RESULTS, timed

from memsparse.eval.meta import run_header, save_run
from memsparse.eval.speed import read_rate
from memsparse.memory.quant import quantize
from memsparse.ops.routing_triton import (
    _CONFIGS,
    ACC_BUDGET,
    _fitting,
    _split_fp8_rows,
    fused_document_scores,
    inverse_norms,
    route_rows_kernel,
)

EXTRA = [(64, 4, 4), (128, 8, 2), (256, 8, 2)]  # (BLOCK_C, warps, stages) timed beside the autotuner's own tiles


def tiles(rows: int) -> list[triton.Config]:
    """The tiles the autotuner tries for `rows` query rows, and EXTRA with its row tile."""
    fit = _fitting(_CONFIGS, {}, R_BUCKET=max(16, triton.next_power_of_2(rows)))
    block_r = fit[0].kwargs["BLOCK_R"]
    return fit + [triton.Config({"BLOCK_R": block_r, "BLOCK_C": c}, num_warps=w, num_stages=s) for c, w, s in EXTRA
                  if block_r * c <= ACC_BUDGET]


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
    points = []
    rows32 = torch.randn(R, Hkv, D, device=dev)  # (R, Hkv, D)
    hi, lo, row_scale = _split_fp8_rows(rows32)
    # (keys, keys tensor, per-chunk scale, variant, rows name, rows, fp8 lo rows, row scale, inverse key norms)
    cases = []
    for kname, k, ks in [("bf16", keys, None), ("fp8", q8.data, q8.scale)]:
        inv = inverse_norms(k)  # (C, Hkv) float16 for fp8 keys
        for rdt in (torch.bfloat16, torch.float16):
            cases.append((kname, k, ks, "base", rdt, rows32.to(rdt), None, None, None))
        rdt = torch.float16 if kname == "fp8" else torch.bfloat16
        cases.append((kname, k, ks, "inv_norm", rdt, rows32.to(rdt), None, None, inv))
        if kname == "fp8":
            cases.append((kname, k, ks, "split_fp8+inv_norm", "fp8x2", hi, lo, row_scale, inv))
    for kname, k, ks, variant, rdt, rows, rows_lo, rs, inv in cases:
        nbytes = (k.numel() * k.element_size() + (ks.numel() * 4 if ks is not None else 0)
                  + (inv.numel() * 4 if inv is not None else 0))
        for cfg in tiles(R):
            def run(cfg=cfg, rows=rows, rows_lo=rows_lo, rs=rs, k=k, ks=ks, inv=inv):
                route_rows_kernel(rows, rows_lo, rs, sample, k, doc, out, cosine=True, key_scale=ks,
                                  key_inv_norm=inv, config=cfg)

            try:
                ms = timed(run, 10, dev)
            except triton.runtime.errors.OutOfResources:
                continue  # too much shared memory for this device
            p = {"keys": kname, "variant": variant, "rows": str(rdt).removeprefix("torch."),
                 "block_r": cfg.kwargs["BLOCK_R"], "block_c": cfg.kwargs["BLOCK_C"],
                 "warps": cfg.num_warps, "stages": cfg.num_stages, "ms": round(ms, 3),
                 "gbps": round(nbytes / ms * 1e-6, 1), "floor_ms": round(nbytes / rate * 1e3, 3)}
            points.append(p)
            print(json.dumps(p), flush=True)
        if variant == "base" and rdt == torch.float16:
            continue  # the entry point multiplies bf16 rows (or split fp8 rows): once per keys and variant
        q = torch.randn(1, R, 4 * Hkv, D, device=dev, dtype=torch.bfloat16)
        mask = torch.ones(1, R, dtype=torch.bool, device=dev)
        ms = timed(lambda k=k, ks=ks, q=q, mask=mask, inv=inv, split=rows_lo is not None: fused_document_scores(
            q, mask, k, doc, args.docs, cosine=True, scale=1.0, key_scale=ks, key_inv_norm=inv, split_fp8=split),
            10, dev)
        points.append({"keys": kname, "variant": variant, "rows": "fp8x2" if rows_lo is not None else "bfloat16",
                       "entry": "fused_document_scores (autotuned)", "ms": round(ms, 3),
                       "gbps": round(nbytes / ms * 1e-6, 1), "floor_ms": round(nbytes / rate * 1e3, 3)})
        print(json.dumps(points[-1]), flush=True)
    run_ = {**run_header(dev), "read_gbps": round(rate / 1e9, 1), "chunks": C, "rows": R, "hkv": Hkv, "d": D,
            "points": points}
    save_run(Path(args.out), dev.type, run_)


if __name__ == "__main__":
    main()
