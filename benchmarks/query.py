"""Question answering over a memory bank (stages 2-3): routing, prefill (time to first token) and decode
times against the bank size, at batch 1 and a larger batch.

route_ms: scoring + top-k summed over the router layers (device-synchronized), gather_ms: assembling the
selected documents' K̄/V̄, prefill_ms: the whole stage-2 forward of the question (routing included), i.e. the
time to the first token's logits, decode_ms_per_token: one step of the preallocated-cache decode loop.
Random weights in the model's geometry and random token documents and questions (costs do not depend on values).

    python benchmarks/query.py                      # small config on CPU; SmolLM2 geometry on a GPU
    python benchmarks/query.py --tokens 1048576 --batch 1,8

Results are merged into benchmarks/results/query.json under the device kind (plus the tier when one is forced).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import RESULTS, peak_mb
from encode import bank_model, random_docs

from memsparse import MemoryBank
from memsparse.engine import prefill_batch
from memsparse.engine.generate import generate
from memsparse.eval.meta import run_header, save_run
from memsparse.eval.speed import questions


def measure(bank: MemoryBank, batch: int, args) -> dict:
    vocab = bank.model.config.vocab_size
    runs = []
    for r in range(args.repeats + 1):  # the first run warms up
        rows, masks = questions(batch, args.q_len, vocab, seed=r)
        res = prefill_batch(bank, rows, masks, route_only=True)
        g = generate(bank, rows, masks, args.new_tokens, lambda b, ids: None)
        runs.append((res.memory.route_seconds, g.timings))
    runs = runs[1:]
    med = lambda xs: round(statistics.median(xs) * 1e3, 3)  # noqa: E731  seconds -> median ms
    return {
        "batch": batch, "route_ms": med([r for r, _ in runs]), "gather_ms": med([t["gather"] for _, t in runs]),
        "prefill_ms": med([t["prefill"] for _, t in runs]),
        "decode_ms_per_token": med([t["decode"] / max(t["decode_tokens"], 1) for _, t in runs]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", help="comma list of bank sizes (default: 65536 on CPU; 1M and 8M on a GPU)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--doc-len", type=int, default=512)
    ap.add_argument("--q-len", type=int, default=48, help="routing tokens per question")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tier", choices=["auto", "device", "host"], default="auto")
    ap.add_argument("--out", default=str(RESULTS / "query.json"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    sizes = [int(s) for s in (args.tokens or ("1048576,8388608" if gpu else "65536")).split(",")]
    model = bank_model(gpu, device)
    points = []
    for n in sizes:
        bank = MemoryBank.empty(model, [1, 2, 3])
        bank.add_tokens(random_docs(n, args.doc_len, model.config.vocab_size), batch_tokens=262144)
        bank.place(args.tier)
        for b in (int(x) for x in args.batch.split(",")):
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            p = {"tokens": n, "tier": bank.tier, **measure(bank, b, args), "peak_mem_mb": round(peak_mb(device), 1)}
            points.append(p)
            print(json.dumps(p), flush=True)
        del bank
    run = {**run_header(device), "dtype": str(model.dtype), "config": "SmolLM2-135M geometry, random weights"
           if gpu else "small (4 layers, hidden 128), random weights", "top_k": model.msa_config.engine_top_k,
           "router_layers": len(model.router_layers), "doc_len": args.doc_len, "q_len": args.q_len,
           "new_tokens": args.new_tokens, "points": points}
    save_run(Path(args.out), device.type + ("" if args.tier == "auto" else f"-{args.tier}"), run)
    print(f"{'tokens':>9} {'batch':>5} {'tier':>6} {'route ms':>9} {'gather ms':>9} {'prefill ms':>10} "
          f"{'decode ms/tok':>13}")
    for p in points:
        print(f"{p['tokens']:>9} {p['batch']:>5} {p['tier']:>6} {p['route_ms']:>9} {p['gather_ms']:>9} "
              f"{p['prefill_ms']:>10} {p['decode_ms_per_token']:>13}")


if __name__ == "__main__":
    main()
