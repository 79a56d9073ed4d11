"""The refinement rules of `refine_rules.py` on SQuAD-open: for each rule, the share of questions whose gold paragraph
it injects (routing only, nothing generated). The memory is all 2,067 dev paragraphs, the
questions the first N of `eval qa`'s 1,000; each question is routed once and its shortlist refined once, and every
rule's injected set is derived from those two routings exactly as the engine derives it.

    python benchmarks/squad_refine_rules.py --questions 300 --device cpu --out results/squad_refine_rules.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from refine_rules import rule_picks
from tqdm import tqdm

from memsparse.demo import load_shipped
from memsparse.engine import MSAEngine
from memsparse.engine.engine import fused_top
from memsparse.eval.faqs import load_qa
from memsparse.eval.meta import run_meta
from memsparse.memory import MemoryBank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=300, help="the first N of eval qa's 1,000 questions")
    ap.add_argument("--refine", type=int, default=64, help="shortlist size")
    ap.add_argument("--inject-k", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    squad = load_qa("dev")  # SQuAD dev until bigbench 1.0.0 was no longer served
    model, tok = load_shipped(args.device)
    t0 = time.perf_counter()
    bank = MemoryBank.build(model, tok, squad.paragraphs, progress=True)
    build = time.perf_counter() - t0
    eng = MSAEngine(model, tok, bank, similarity="train", refine=args.refine)
    hits: dict[str, int] = {}
    t0 = time.perf_counter()
    questions = squad.questions[:args.questions]
    for question, _, gold in tqdm(questions, desc="questions"):
        first = eng.route(question)
        fine = eng.refined(*eng.encode_question(question), fused_top(first, args.refine))
        for rule, top in rule_picks(first, fine, args.inject_k).items():
            hits[rule] = hits.get(rule, 0) + (gold in top)
    n = len(questions)
    table = {rule: round(100 * h / n, 1) for rule, h in hits.items()}
    for rule, share in table.items():
        print(f"{rule:<20} gold injected {share:5.1f}%")
    Path(args.out).write_text(json.dumps({
        **run_meta(), "questions": n, "paragraphs": len(squad.paragraphs), "refine": args.refine,
        "inject_k": args.inject_k, "gold_injected": table, "bank_seconds": round(build, 1),
        "seconds_per_question": round((time.perf_counter() - t0) / n, 2)}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
