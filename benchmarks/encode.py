"""Memory encoding (stage 1): tokens/s of `MemoryBank.add_tokens`, bank bytes per token in memory and on
disk, and the time to save and to open (memory-map) the bank.

Random weights in the model's geometry and random token documents: encoding cost does not depend on the values.

    python benchmarks/encode.py                      # small config on CPU; SmolLM2 geometry on a GPU
    python benchmarks/encode.py --tokens 1048576,8388608

Results are merged into benchmarks/results/encode.json under the device kind.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, SMALL, SMOLLM2, peak_mb, sync

from memsparse import DecoderConfig, MemoryBank, MSAForCausalLM
from memsparse.eval.meta import run_header, save_run


def random_docs(tokens: int, doc_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (max(tokens // doc_len, 1), doc_len), generator=g).tolist()


def bank_model(gpu: bool, device) -> MSAForCausalLM:
    torch.manual_seed(0)
    cfg = DecoderConfig(**(SMOLLM2 if gpu else SMALL))
    dtype = torch.bfloat16 if gpu else torch.float32
    return MSAForCausalLM(cfg, {"pooling_kernel_size": 64, "top_k_docs": 16}).to(device, dtype).eval()


def measure(model, tokens: int, args, device) -> dict:
    docs = random_docs(tokens, args.doc_len, model.config.vocab_size)
    MemoryBank.empty(model, [1, 2, 3]).add_tokens(docs[:8])  # warm-up
    bank = MemoryBank.empty(model, [1, 2, 3])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    bank.add_tokens(docs, batch_tokens=args.batch_tokens)
    sync(device)
    enc = time.perf_counter() - t0
    n = sum(map(len, docs))
    seg = bank.segments[0]
    mem = sum(t.numel() * t.element_size() for st in (seg.keys, seg.values, seg.route_keys) for t in st.values())
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        t0 = time.perf_counter()
        bank.save(d)
        save_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in Path(d).iterdir())
        t0 = time.perf_counter()
        MemoryBank.load(d, model, tier="host" if device.type == "cuda" else "auto")
        load_s = time.perf_counter() - t0
    return {"tokens": n, "documents": len(docs), "encode_s": round(enc, 3), "encode_tokens_per_s": round(n / enc),
            "bank_bytes_per_token": round(mem / n, 1), "disk_bytes_per_token": round(disk / n, 1),
            "save_s": round(save_s, 3), "load_s": round(load_s, 3), "peak_mem_mb": round(peak_mb(device), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", help="comma list (default: 65536 on CPU; 1M and 8M on a GPU)")
    ap.add_argument("--doc-len", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=None, help="tokens per forward (default 64K CPU, 256K GPU)")
    ap.add_argument("--tmp", default=None, help="directory for the saved bank (default: system temp)")
    ap.add_argument("--out", default=str(RESULTS / "encode.json"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.batch_tokens = args.batch_tokens or (262144 if gpu else 65536)
    sizes = [int(s) for s in (args.tokens or ("1048576,8388608" if gpu else "65536")).split(",")]
    model = bank_model(gpu, device)
    points = []
    for n in sizes:
        points.append(measure(model, n, args, device))
        print(json.dumps(points[-1]), flush=True)
    run = {**run_header(device), "dtype": str(model.dtype), "config": "SmolLM2-135M geometry, random weights"
           if gpu else "small (4 layers, hidden 128), random weights", "router_layers": model.router_layers,
           "doc_len": args.doc_len, "batch_tokens": args.batch_tokens, "points": points}
    save_run(Path(args.out), device.type, run)
    print(f"{'tokens':>9} {'tok/s':>10} {'B/token mem':>12} {'B/token disk':>13} {'save s':>7} {'open s':>7}")
    for p in points:
        print(f"{p['tokens']:>9} {p['encode_tokens_per_s']:>10} {p['bank_bytes_per_token']:>12} "
              f"{p['disk_bytes_per_token']:>13} {p['save_s']:>7} {p['load_s']:>7}")


if __name__ == "__main__":
    main()
