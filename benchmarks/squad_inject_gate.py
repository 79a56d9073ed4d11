"""How many documents to inject on SQuAD-open, chosen per question from its routing: one where the router layers
agree on a head (`engine.cut_drop` of the first place at or above a margin), `--fallback` otherwise. Replayed on
`eval qa --answers` lines of the same questions answered with 1 and with `--fallback` injected documents: a question's
injected set is its fused top k either way, so the gated engine answers it as the run with that k did. The routing
is recomputed here (the answer lines do not hold it); a question counts only where this routing's top 1 and top
`--fallback` equal the documents both runs injected. The margin is chosen on the first half of the questions and
reported on the second.

    python benchmarks/squad_inject_gate.py --answers results/answers/squad_memsparse_v8.jsonl.gz \\
        --device cpu --out results/squad_inject_gate.json
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from tqdm import tqdm

from memsparse.demo import load_shipped
from memsparse.engine import MSAEngine
from memsparse.engine.engine import cut_drop, fused_top
from memsparse.eval.faqs import load_qa
from memsparse.eval.meta import run_meta
from memsparse.memory import MemoryBank

SYSTEMS = {1: "memsparse-inject_k-1", 2: "memsparse-inject_k-2", 4: "memsparse"}  # injected documents -> eval qa name


def answer_lines(path: str, k: int) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [line for line in map(json.loads, f) if line["system"] == SYSTEMS[k]]


def scores(rows: list[dict], margin: float, fallback: int) -> dict:
    """EM / F1 (%) and the share injecting one document, over `rows` (per question: cut, and em / f1 per k)."""
    picks = [1 if r["cut"] >= margin else fallback for r in rows]
    n = len(rows)
    return {"em": round(100 * sum(r["em"][k] for r, k in zip(rows, picks)) / n, 2),
            "f1": round(100 * sum(r["f1"][k] for r, k in zip(rows, picks)) / n, 2),
            "one_document": round(100 * picks.count(1) / n, 1), "questions": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", required=True, help="eval qa answer lines with 1, 2 and 4 injected documents")
    ap.add_argument("--fallback", type=int, default=4, choices=[2, 4])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    squad = load_qa("dev")  # SQuAD dev until bigbench 1.0.0 was no longer served
    lines = {k: answer_lines(args.answers, k) for k in (1, args.fallback)}
    model, tok = load_shipped(args.device)
    bank = MemoryBank.build(model, tok, squad.paragraphs, progress=True)
    eng = MSAEngine(model, tok, bank, similarity="train")
    rows, differ = [], 0
    for i, (question, _, _) in enumerate(tqdm(squad.questions, desc="routing")):
        routing = eng.route(question)
        order = fused_top(routing, args.fallback + 1)
        same = all(sorted(order[:k]) == lines[k][i]["injected"] and lines[k][i]["question"] == question
                   for k in lines)
        differ += not same
        rows.append({"cut": cut_drop(routing, order, 1), "em": {k: lines[k][i]["em"] for k in lines},
                     "f1": {k: lines[k][i]["f1"] for k in lines}, "same": same})
    kept = [r for r in rows if r["same"]]
    half = len(kept) // 2
    margins = sorted({r["cut"] for r in kept} | {2.0})  # 2: never one document
    table = {str(m): {"first half": scores(kept[:half], m, args.fallback),
                      "second half": scores(kept[half:], m, args.fallback)} for m in margins}
    best = max(margins, key=lambda m: (table[str(m)]["first half"]["em"], m))
    result = {**run_meta(), "answers": args.answers, "fallback": args.fallback, "questions": len(rows),
              "routing_differs": differ, "chosen_margin": best, "chosen": table[str(best)],
              "without_gate": table["2.0"], "always_one": table[str(margins[0])], "margins": table}
    print(json.dumps({k: result[k] for k in ("routing_differs", "chosen_margin", "chosen", "without_gate",
                                             "always_one")}, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
