"""fp8 and int8 routing keys (scale per chunk) against bf16 keys and the model's own keys, with the shipped
MSA-SmolLM2 on real text (on the CPU the model runs in float32: `bf16` is its routing keys rounded to bfloat16,
and fp8 / int8 are quantized from those, as from a bf16 model on a GPU; every kind starts from the same keys):
- top-k routing recall: SQuAD questions (evaluation only) routed over a bank of the first `--paragraphs` dev
  paragraphs (questions about those): the overlap of each router layer's top-k documents with quantized keys and
  with the model's keys, and how often the gold paragraph is among them;
- NIAH accuracy: RULER samples answered (router interleave, as `memsparse eval niah`) with every key dtype over
  the same banks.
fp8 keys come rounded plainly and rounded for the routing queries (memory/quant.py): `fp8-questions` with the
query moments of `--calibration` held-out SQuAD questions (about paragraphs outside the bank), `fp8-pseudo` with
those of pseudo-queries, sentences of the bank's own documents (`MSAEngine.calibrate_keys`' default).

    python research/key_quant_recall.py [--paragraphs 400] [--questions 200] [--niah-samples 10] [--calibration 300]

Writes research/results/key_quant_recall.json (runs on CPU or GPU; the model's own dtype is the reference).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memsparse import MemoryBank, MSAEngine
from memsparse.engine.calibrate import pseudo_queries
from memsparse.eval.faqs import load_qa
from memsparse.eval.meta import run_header
from memsparse.eval.scale import recall
from memsparse.model.load import load_model
from memsparse.model.tokenizer import TokenCounter
from memsparse.tasks.niah import make_sample, string_match_all

RESULTS = Path(__file__).parent / "results"

KINDS = ("model", "bf16", "fp8", "int8", "fp8-questions", "fp8-pseudo")  # the model's own keys, rounded to bf16,
# 8-bit from bf16 (fp8 also rounded for calibration questions or for pseudo-queries)
PSEUDO = 1024  # pseudo-queries (MSAEngine.calibrate_keys' default)


def use_keys(bank: MemoryBank, kind: str, original: list[dict], moments: dict | None = None) -> None:
    """Set the bank's routing keys to `kind`, starting from the `original` keys (never from another kind's);
    `moments` for the calibrated kinds."""
    for seg, keys in zip(bank.segments, original):
        seg.route_keys = {lay: t if kind == "model" else t.to(torch.bfloat16).to(t.dtype) for lay, t in keys.items()}
    bank.key_dtype = "model"
    base = kind.split("-")[0]  # fp8-questions, fp8-pseudo: fp8 rounded for their moments
    bank.set_key_dtype(base if base in ("fp8", "int8") else "model", moments)


def kind_moments(engine: MSAEngine, kind: str, from_questions: dict) -> dict | None:
    if kind == "fp8-questions":
        return from_questions
    return engine.query_moments(pseudo_queries(engine.bank, PSEUDO)) if kind == "fp8-pseudo" else None


def original_keys(bank: MemoryBank) -> list[dict]:
    return [{lay: t.clone() for lay, t in seg.route_keys.items()} for seg in bank.segments]


def found(routes: list[dict], gold: list[int]) -> float:
    """Share of questions whose gold document is in the top-k of at least one router layer."""
    return round(sum(any(g in {d for d, _ in v} for v in r.values()) for r, g in zip(routes, gold)) / len(gold), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paragraphs", type=int, default=2067)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--niah-samples", type=int, default=10, help="per subtask")
    ap.add_argument("--haystack", type=int, default=8192)
    ap.add_argument("--calibration", type=int, default=300, help="held-out SQuAD questions for fp8-questions")
    ap.add_argument("--out", default=str(RESULTS / "key_quant_recall.json"))
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(None, str(dev), "bfloat16" if dev.type == "cuda" else "float32")  # as measured
    squad = load_qa("dev")  # every dev question, in a seeded order (SQuAD dev before bigbench 1.0.0 went)
    paragraphs = squad.paragraphs[:args.paragraphs]
    asked = [(q, p) for q, _, p in squad.questions if p < len(paragraphs)][:args.questions]
    questions, gold = [q for q, _ in asked], [p for _, p in asked]  # document id = paragraph index
    calibration = [q for q, _, p in squad.questions if p >= len(paragraphs)][:args.calibration]
    bank = MemoryBank.build(model, tok, paragraphs, progress=True)
    engine = MSAEngine(model, tok, bank)
    routes, original = {}, original_keys(bank)
    use_keys(bank, "bf16", original)
    from_questions = engine.query_moments(calibration)  # bf16-keyed memory, as the others start from
    for kd in KINDS:
        use_keys(bank, "bf16", original)
        use_keys(bank, kd, original, kind_moments(engine, kd, from_questions))
        routes[kd] = [engine.route(q) for q in tqdm(questions, desc=f"route ({kd} keys)")]
    result = {**run_header(dev), "model": "MSA-SmolLM2 (shipped)", "reference_key_dtype": str(model.dtype),
              "squad_paragraphs": len(paragraphs), "squad_questions": len(questions),
              "calibration_questions": len(calibration), "pseudo_queries": PSEUDO,
              "top_k": model.msa_config.engine_top_k,
              "top_k_recall": {kd: recall(routes["model"], routes[kd]) for kd in KINDS[1:]},
              "top_k_recall_vs_bf16": {kd: recall(routes["bf16"], routes[kd]) for kd in KINDS[2:]},
              "gold_in_top_k": {kd: found(routes[kd], gold) for kd in KINDS}}
    print(json.dumps(result), flush=True)

    count = TokenCounter.of(tok)
    hits = {kd: [] for kd in KINDS}
    same = {kd: [] for kd in KINDS[1:]}
    for sub in ("niah_single_2", "niah_multikey_1", "niah_multivalue"):
        rng = random.Random(f"fp8-{sub}")
        for _ in tqdm(range(args.niah_samples), desc=sub):
            s = make_sample(sub, args.haystack, count, rng, doc_tokens=512)
            b = MemoryBank.build(model, tok, s.documents)
            texts, original = {}, original_keys(b)
            for kd in KINDS:
                e = MSAEngine(model, tok, b)
                use_keys(b, "bf16", original)
                use_keys(b, kd, original, kind_moments(e, kd, from_questions))
                ans = e.ask(s.question, max_new_tokens=64)
                hits[kd].append(string_match_all(ans.text, s.answers))
                texts[kd] = ans.text
            for kd in KINDS[1:]:
                same[kd].append(texts[kd] == texts["model"])
    result.update({"niah_haystack_tokens": args.haystack, "niah_samples": len(hits["model"]),
                   "niah_accuracy": {kd: round(100 * sum(h) / len(h), 2) for kd, h in hits.items()},
                   "niah_answers_identical_to_model_dtype": {kd: round(sum(v) / len(v), 4) for kd, v in same.items()}})
    print(json.dumps(result), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
