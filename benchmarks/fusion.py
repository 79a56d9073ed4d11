"""How the router injection ranks documents over the layers (`MSAEngine(fusion=...)`): for RULER NIAH samples
with the shipped model, the share of the needle documents among the `--inject-k` injected under each fusion
(`engine.fused_top`: "rrf" reciprocal rank, "score" summed routing scores), and per router layer how often its
first pick is a needle document. Routing only (no answers), so it runs on CPUs.

    python benchmarks/fusion.py --tokens 8192 --samples 12 --subtasks niah_multikey_2,niah_multikey_3

Writes benchmarks/results/fusion.json under "<device>-<tokens>".
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import torch
from common import RESULTS, run_header, save_run

from memsparse.demo import load_shipped
from memsparse.engine import MSAEngine
from memsparse.engine.engine import FUSIONS, fused_top
from memsparse.memory import MemoryBank
from memsparse.model.tokenizer import TokenCounter
from memsparse.train.tasks.niah import make_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--samples", default="12", help="per subtask: one count, or one per subtask")
    ap.add_argument("--subtasks", default="niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery")
    ap.add_argument("--inject-k", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(RESULTS / "fusion.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    model, tok = load_shipped(args.device)
    count = TokenCounter.of(tok)
    subtasks = args.subtasks.split(",")
    counts = [int(n) for n in args.samples.split(",")]
    counts = counts * len(subtasks) if len(counts) == 1 else counts
    points = []
    for sub, n in zip(subtasks, counts):
        rng = random.Random(f"fusion-{sub}-{args.tokens}")
        found = {f: [] for f in FUSIONS}
        first: dict[int, int] = {}
        for _ in range(n):
            s = make_sample(sub, args.tokens, count, rng)
            bank = MemoryBank.build(model, tok, s.documents)
            routing = MSAEngine(model, tok, bank, similarity="train").route(s.question)
            gold = set(s.gold)
            for f in FUSIONS:
                found[f].append(len(gold & set(fused_top(routing, args.inject_k, fusion=f))) / len(gold))
            for layer, picked in routing.items():
                first[layer] = first.get(layer, 0) + int(picked[0][0] in gold)
        points.append({"tokens": args.tokens, "subtask": sub, "samples": n, "inject_k": args.inject_k,
                       "gold_injected": {f: round(100 * statistics.mean(v), 1) for f, v in found.items()},
                       "layer_first": {str(layer): c for layer, c in sorted(first.items())}})
        print(points[-1], flush=True)
    run = {**run_header(device), "model": "MSA-SmolLM2 (shipped)", "dtype": str(model.dtype), "points": points}
    save_run(Path(args.out), f"{device.type}-{args.tokens}", run)


if __name__ == "__main__":
    main()
