"""float16 inverse key norms (what the fused routing kernel reads for fp8 / int8 keys, `inverse_norms`) against
exact ones: top-k overlap per router layer, shipped MSA-SmolLM2, fp8 routing keys, a memory of Python FAQ answers
and documentation passages (the demo's), questions = the FAQ questions and a sentence of some passages.

Runs the PyTorch routing path with cosine scores written as dot products of normalised queries and keys scaled by
their inverse norms, exact or rounded to float16's 11-bit mantissa (the exponent kept, so every inverse is rounded
as a normal float16 is: the kernel's relative error). The Triton interpreter would run the kernel itself, but did
not finish one variant in 40 minutes on the CPU for this memory.

    python benchmarks/inverse_norm_fp16.py [--docs 300] [--questions 40]

Writes benchmarks/results/inverse_norm_fp16.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, run_header

import memsparse as ms
import memsparse.engine.prefill  # noqa: F401  (the module: `memsparse.engine.prefill` is also a function)
from memsparse.demo import default_memory, load_shipped

PREFILL = sys.modules["memsparse.engine.prefill"]
EXACT = PREFILL.chunk_scores


def cosine_with_inverse_norms(round_fp16: bool):
    """`chunk_scores` for cosine: normalised queries times keys scaled by 1/||k||, rounded to float16 or not."""
    def scores(q, q_mask, keys, key_mask, *, head_reduce, query_reduce, cosine, scale):
        if not cosine:
            raise ValueError("the shipped model routes by cosine")
        inv = 1 / keys.norm(dim=-1).clamp(min=1e-12)  # (C, Hkv)
        if round_fp16:
            e = torch.floor(torch.log2(inv))
            inv = (inv * 2.0 ** -e).half().float() * 2.0 ** e  # (C, Hkv) 11-bit mantissa, exponent kept
        return EXACT(F.normalize(q, dim=-1), q_mask, keys * inv[..., None], key_mask, head_reduce=head_reduce,
                     query_reduce=query_reduce, cosine=False, scale=scale)

    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--questions", type=int, default=40, help="FAQ questions; as many passage sentences again")
    ap.add_argument("--out", default=str(RESULTS / "inverse_norm_fp16.json"))
    args = ap.parse_args()
    model, tok = load_shipped("cpu", "float32")
    docs, _, questions, _ = default_memory(args.docs, args.questions)
    rng = random.Random(1)
    questions += [d.split(". ")[0].strip() + "?" for d in rng.sample(docs, args.questions)
                  if len(d.split(". ")[0].split()) > 5]
    bank = ms.MemoryBank.build(model, tok, docs, key_dtype="fp8")
    bank.fused_routing = False
    engine = ms.MSAEngine(model, tok, bank)
    rows = [engine.encode_question(q) for q in questions]
    routes = {}
    try:
        for name in ("exact", "fp16"):
            PREFILL.chunk_scores = cosine_with_inverse_norms(name == "fp16")
            bank._view = None
            routes[name] = []
            for a in range(0, len(rows), 8):
                part = rows[a:a + 8]
                routes[name] += PREFILL.prefill_batch(bank, [r[0] for r in part], [r[1] for r in part]).memory.routing
    finally:
        PREFILL.chunk_scores = EXACT
    hit = total = same = lists = 0
    for a, b in zip(routes["fp16"], routes["exact"], strict=True):
        for layer in b:
            got, want = [d for d, _ in a[layer]], [d for d, _ in b[layer]]
            hit += len(set(got) & set(want))
            total += len(want)
            same += got == want
            lists += 1
    result = {**run_header(torch.device("cpu")), "docs": len(docs), "chunks": bank.num_chunks,
              "questions": len(questions), "key_dtype": "fp8", "top_k": model.msa_config.top_k_docs,
              "overlap_pct": round(100 * hit / total, 3), "identical_lists_pct": round(100 * same / lists, 2),
              "layer_lists": lists}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
