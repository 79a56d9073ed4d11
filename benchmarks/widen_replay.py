"""Widened injection (`MSAEngine(widen=N)`) replayed on two measured `eval niah --answers` runs of the same samples:
one injecting k documents, one injecting N. A sample whose first-round routing (recorded in the answers) shows no
clear cut (`engine.cut_drop` below the margin) takes the wide run's score, every other sample the narrow run's:
what the engine would have answered, as long as routing is the same in both runs (it is, up to GPU summation order).

    python benchmarks/widen_replay.py results/answers/niah_1m_v8_k4.jsonl.gz results/answers/niah_1m_v8_k8.jsonl.gz

Writes benchmarks/results/widen_replay.json: the GPU, date and commit of the measured answers (the replay's own
under "replayed"), and per margin the accuracy per subtask and the share of samples widened.
"""

from __future__ import annotations

import argparse
import gzip
import json
from fractions import Fraction
from pathlib import Path

from common import RESULTS

from memsparse.engine.engine import cut_drop, fused_top
from memsparse.eval.meta import run_meta


def load(path: str) -> dict[tuple[str, int], dict]:
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        rows = [json.loads(line) for line in f]
    return {(r["subtask"], r["sample"]): r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("narrow", help="answers of the run injecting --inject-k documents")
    ap.add_argument("wide", help="answers of the run injecting more")
    ap.add_argument("--inject-k", type=int, default=4)
    ap.add_argument("--margins", default="0,1/2,3/5,2/3,11/15,2", help="0: never widen, > 1: always")
    ap.add_argument("--gpu", default="2x NVIDIA H200", help="the GPU that measured the two answer files")
    ap.add_argument("--date", default="2026-11-28", help="when they were measured")
    ap.add_argument("--commit", default="e95795e", help="the commit they were measured at")
    ap.add_argument("--out", default=str(RESULTS / "widen_replay.json"))
    args = ap.parse_args()
    narrow, wide = load(args.narrow), load(args.wide)
    common = sorted(set(narrow) & set(wide))
    drops = {}
    for key in common:
        routing = {int(layer): [tuple(x) for x in picked] for layer, picked in narrow[key]["routing"].items()}
        drops[key] = cut_drop(routing, fused_top(routing, args.inject_k + 1), args.inject_k)
    subtasks = sorted({s for s, _ in common})
    result = {"gpu": args.gpu, "date": args.date, "commit": args.commit, "replayed": run_meta(),
              "narrow": args.narrow, "wide": args.wide, "inject_k": args.inject_k,
              "samples": {s: sum(k[0] == s for k in common) for s in subtasks}, "margins": []}
    print(f"{'margin':>6} " + " ".join(f"{s.removeprefix('niah_'):>10}" for s in subtasks) + "   average  widened")
    for margin in (float(Fraction(m)) for m in args.margins.split(",")):
        acc, widened = {}, {}
        for s in subtasks:
            keys = [k for k in common if k[0] == s]
            picks = [drops[k] < margin for k in keys]
            acc[s] = round(100 * sum((wide if w else narrow)[k]["score"] for k, w in zip(keys, picks)) / len(keys), 2)
            widened[s] = round(sum(picks) / len(keys), 3)
        avg = round(sum(acc.values()) / len(acc), 2)
        result["margins"].append({"margin": margin, "accuracy": acc, "average": avg, "widened": widened})
        print(f"{margin:>6.3f} " + " ".join(f"{acc[s]:>10.1f}" for s in subtasks)
              + f"   {avg:7.2f}  {sum(widened.values()) / len(widened):6.1%}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
