"""The refined routing (`MSAEngine(refine=N)`) of samples measured by `memsparse eval niah --answers`, recomputed
without their memory banks. Refinement re-encodes only its shortlist, the fused top N of the first-round routing
that the answer line records, so each sample needs its documents (regenerated: the same stream of `make_sample`)
and not its 1M-token bank: seconds per sample instead of a bank build. Every router layer ranks the whole shortlist
(`refine_routing` with depth N), to study how refined and first-round routing should combine.

    python research/refined_routing.py --answers benchmarks/results/answers/niah_1m_v8_k4.jsonl.gz \\
        --subtasks niah_multikey_2 --seeds 42 --out refined.jsonl.gz

Writes one JSON line per sample (gzipped): tokens, subtask, seed, sample, gold, the shortlist (fused order) and
`refined` = {layer: [[doc, score], ...] over the whole shortlist, best first}, with the machine, date and commit.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random

from gate_replay import load, routing_of
from tqdm.auto import tqdm

from memsparse.engine.engine import refine_routing
from memsparse.engine.protocol import Protocol
from memsparse.engine.routing import fused_top
from memsparse.eval.meta import run_meta
from memsparse.eval.niah import setting_of
from memsparse.memory.bank import MemoryBank
from memsparse.memory.encode import TEMPLATE_PREFIX
from memsparse.model.load import load_model
from memsparse.model.tokenizer import TokenCounter
from memsparse.tasks.niah import make_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", required=True, help="comma list of answer files; their lines without refine/widen")
    ap.add_argument("--subtasks", default="", help="comma list (default: all in the files)")
    ap.add_argument("--seeds", default="", help="comma list (default: all in the files)")
    ap.add_argument("--inject-k", type=int, default=4)
    ap.add_argument("--refine", type=int, default=64, help="shortlist size")
    ap.add_argument("--refine-chunk", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=512, help="as the measured run's eval niah")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    plain = setting_of({"inject_k": args.inject_k})
    subtasks, seeds = set(filter(None, args.subtasks.split(","))), {int(s) for s in args.seeds.split(",") if s}
    lines = load(args.answers.split(","), lambda x: setting_of(x) == plain
                 and (not subtasks or x["subtask"] in subtasks) and (not seeds or int(x["seed"]) in seeds))
    if not lines:
        raise SystemExit(f"no plain answer lines for subtasks {args.subtasks or 'any'} and seeds {args.seeds or 'any'}")
    streams: dict[tuple[int, str, int], list[int]] = {}
    for n, sub, seed, i in sorted(lines):
        streams.setdefault((n, sub, seed), []).append(i)
    model, tok = load_model(None, args.device)
    protocol, meta = Protocol(tok), run_meta()
    empty = MemoryBank.empty(model, tok(TEMPLATE_PREFIX, add_special_tokens=False)["input_ids"], tok=tok)
    count = TokenCounter.of(tok)  # as eval niah
    cache: dict = {}
    with gzip.open(args.out, "wt") as out, tqdm(total=len(lines), desc="samples") as bar:
        for (n, sub, seed), wanted in streams.items():
            rng = random.Random(f"{seed}-{sub}-{n}")  # eval niah's stream
            for i in range(max(wanted) + 1):
                s = make_sample(sub, n, count, rng, doc_tokens=args.doc_tokens, haystack_cache=cache)
                if i not in wanted:
                    continue
                line = lines[(n, sub, seed, i)]
                if line["question"] != s.question or line["gold"] != sorted(s.gold):
                    raise ValueError(f"{sub} seed {seed} sample {i}: regenerated sample differs from the answer line")
                shortlist = fused_top(routing_of(line["routing"]), args.refine)
                tokens, route = protocol.question(s.question)
                refined = refine_routing(empty, tok, tokens, route, shortlist, [s.documents[d] for d in shortlist],
                                         args.refine_chunk, "train", depth=len(shortlist))
                out.write(json.dumps({**meta, "tokens": n, "subtask": sub, "seed": seed, "sample": i,
                                      "refine_chunk": args.refine_chunk, "gold": sorted(s.gold),
                                      "shortlist": shortlist,
                                      "refined": {str(layer): [[d, round(float(x), 4)] for d, x in picked]
                                                  for layer, picked in refined.items()}}) + "\n")
                bar.update()


if __name__ == "__main__":
    main()
