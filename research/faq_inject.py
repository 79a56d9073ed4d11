"""How many documents to inject for open questions: the demo's FAQ memory (the 24 held-out Python FAQ answers
among documentation passages, `memsparse.demo.default_memory`) asked all 24 questions with the shipped model,
router injection of 1 / 2 / 4 documents, without and with document priors. Per setting: the share of questions
whose FAQ answer was injected (`gold_injected`) and the answer's token F1 against the answer's first sentence
(what the demo shows as expected).

    python research/faq_inject.py [--docs 300] [--inject 1,2,4] [--priors 256]

Writes research/results/faq_inject.json under "<device>-docs<N>" (CPU or GPU), with the engine's setting (its
defaults; earlier runs' "<device>-score-docs<N>" measured score fusion, since removed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from memsparse.demo import FAQ_DOCS, default_memory
from memsparse.engine import MSAEngine, RetrievalConfig
from memsparse.eval.meta import run_header, save_run
from memsparse.eval.qa import f1
from memsparse.memory import MemoryBank
from memsparse.model.load import load_model
from memsparse.tasks.mix import FAQ_HELD_OUT

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=FAQ_DOCS)
    ap.add_argument("--inject", default="1,2,4")
    ap.add_argument("--priors", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(RESULTS / "faq_inject.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    model, tok = load_model(None, args.device)
    docs, _, questions, refs = default_memory(args.docs, FAQ_HELD_OUT)
    norm = lambda text: " ".join(text.split())  # noqa: E731
    gold = [next(i for i, d in enumerate(docs) if norm(d).startswith(norm(r)[:60])) for r in refs]
    bank = MemoryBank.build(model, tok, docs)
    points = []
    for priors in (0, args.priors):
        engine = MSAEngine(model, tok, bank)
        if priors:
            engine.calibrate_priors(n=priors)
        for k in (int(x) for x in args.inject.split(",")):
            t0 = time.perf_counter()
            answers = engine.ask_batch(questions, max_new_tokens=48, inject_k=k)
            injected = [g in {d for r in a.rounds for d in r} for a, g in zip(answers, gold)]
            points.append({"priors": priors, "inject_k": k, "questions": len(questions),
                           "gold_injected": round(100 * sum(injected) / len(questions), 1),
                           "f1": round(100 * sum(f1(a.text, [r]) for a, r in zip(answers, refs)) / len(questions), 1),
                           "seconds": round(time.perf_counter() - t0, 1)})
            print(points[-1], flush=True)
    run = {**run_header(device), "model": "MSA-SmolLM2 (shipped)", "dtype": str(model.dtype), "docs": args.docs,
           "engine": RetrievalConfig().flat(), "points": points}
    key = f"{device.type}-docs{args.docs}"
    save_run(Path(args.out), key, run)


if __name__ == "__main__":
    main()
