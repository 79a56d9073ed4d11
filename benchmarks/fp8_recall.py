"""fp8 routing keys against full-precision keys with the shipped MSA-SmolLM2 on real text:
- top-k routing recall: SQuAD questions routed over a bank of SQuAD dev paragraphs (evaluation only; the first
  `--paragraphs` of them, and questions about those),
  the overlap of each router layer's top-k documents with fp8 keys (per-chunk scales) and with the model's keys;
- NIAH accuracy: RULER samples answered (router interleave, as `memsparse eval niah`) with both key dtypes,
  over the same banks.

    python benchmarks/fp8_recall.py [--paragraphs 400] [--questions 200] [--niah-samples 10] [--haystack 8192]

Writes benchmarks/results/fp8_recall.json (runs on CPU or GPU; the model's own dtype is the reference).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from common import RESULTS, run_header
from tqdm.auto import tqdm

from memsparse import MemoryBank, MSAEngine
from memsparse.demo import load_shipped
from memsparse.eval.scale import recall
from memsparse.eval.squad import load_squad
from memsparse.train.tasks.niah import make_sample, string_match_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paragraphs", type=int, default=2067)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--niah-samples", type=int, default=10, help="per subtask")
    ap.add_argument("--haystack", type=int, default=8192)
    ap.add_argument("--out", default=str(RESULTS / "fp8_recall.json"))
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_shipped(str(dev))
    squad = load_squad(10**6)  # every question, in a seeded order
    paragraphs = squad.paragraphs[:args.paragraphs]
    questions = [q for q, _, p in squad.questions if p < len(paragraphs)][:args.questions]
    bank = MemoryBank.build(model, tok, paragraphs, progress=True)
    engine = MSAEngine(model, tok, bank, similarity="train")
    full = [engine.route(q) for q in tqdm(questions, desc="route (model dtype keys)")]
    bank.set_key_dtype("fp8")
    fp8 = [engine.route(q) for q in tqdm(questions, desc="route (fp8 keys)")]
    result = {**run_header(dev), "model": "MSA-SmolLM2 (shipped)", "reference_key_dtype": str(model.dtype),
              "squad_paragraphs": len(paragraphs), "squad_questions": len(questions),
              "top_k": model.msa_config.engine_top_k, "top_k_recall_fp8": recall(full, fp8)}
    print(json.dumps(result), flush=True)

    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    hits = {"model": [], "fp8": []}
    same = []
    for sub in ("niah_single_2", "niah_multikey_1", "niah_multivalue"):
        rng = random.Random(f"fp8-{sub}")
        for _ in tqdm(range(args.niah_samples), desc=sub):
            s = make_sample(sub, args.haystack, count, rng, doc_tokens=512)
            b = MemoryBank.build(model, tok, s.documents)
            texts = []
            for kd in ("model", "fp8"):
                b.set_key_dtype(kd)
                ans = MSAEngine(model, tok, b, similarity="train").ask(s.question, max_new_tokens=64,
                                                                      interleave="router", inject_k=4)
                hits[kd].append(string_match_all(ans.text, s.answers))
                texts.append(ans.text)
            same.append(texts[0] == texts[1])
    result.update({"niah_haystack_tokens": args.haystack, "niah_samples": len(same),
                   "niah_accuracy": {kd: round(100 * sum(h) / len(h), 2) for kd, h in hits.items()},
                   "niah_identical_answers": round(sum(same) / len(same), 4)})
    print(json.dumps(result), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
