"""Do the lower layers' plain similarities add to the trained routers? For the FAQ QA questions, the model's first
routing pass (its fused router layers) is fused by reciprocal rank with one more ranking, counted `copies` times:
the cosine of the question's mean input at `--layer` with each memory chunk's mean input there, centred on the
memory's mean and with its top `--null` principal directions removed (`layer_probe_faq.py`'s best plain layer),
a document scoring its best chunk. Both splits are asked over one encoding of the memory (the same for both);
gold top-1 per copy count, paired against the routers alone. No answers: a CPU run.

    python research/lexical_fusion.py --model runs/v16/delta --out research/results/x.json
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shipped")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--null", type=int, default=128)
    ap.add_argument("--copies", default="0,1,2,4,7", help="how many times the plain ranking counts in the fusion")
    ap.add_argument("--chosen", type=int, default=2, help="the copy count chosen on dev (paired on test)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)

    from layer_probe_faq import layer_means, nulled, question_means, ranks

    from memsparse.engine import MSAEngine
    from memsparse.engine.routing import fused_top, fusing
    from memsparse.eval.faqs import load_qa
    from memsparse.eval.meta import run_meta
    from memsparse.eval.qa import mean_se
    from memsparse.model.load import load_model

    t0 = time.perf_counter()
    model, tok = load_model(a.model, device="cpu")
    sets = {s: load_qa(s) for s in ("dev", "test")}
    paragraphs = sets["dev"].paragraphs
    mem, chunk_doc, bank = layer_means(model, tok, paragraphs)  # the engine routes over the same encoding
    c = mem[a.layer]
    plain = nulled(c, a.null)
    eng = MSAEngine(model, tok, bank)
    copies = [int(x) for x in a.copies.split(",")]
    result = {**run_meta(), "model": a.model, "layer": a.layer, "null": a.null, "chosen_copies": a.chosen,
              "fuse_layers": model.fuse_layers,
              "memory_passages": len(paragraphs), "splits": {}}
    for split, data in sets.items():
        qs = [q for q, _, _ in data.questions]
        gold = [g for _, _, g in data.questions]
        qf = question_means(model, tok, qs)
        top = ranks(plain(qf[a.layer]), plain(c), chunk_doc, len(paragraphs), k=model.msa_config.engine_top_k)
        routings = [r for i in range(0, len(qs), 16) for r in eng.route_batch(qs[i:i + 16])]
        hits = {}
        for m in copies:
            hits[m] = []
            for r, t, g in zip(routings, top.tolist(), gold):
                fused = dict(fusing(r, model.fuse_layers))
                fused.update({-1 - i: [(d, 0.0) for d in t] for i in range(m)})
                hits[m].append(int(fused_top(fused, 1) == [g]))
        plain_top1 = mean_se([int(t[0] == g) for t, g in zip(top.tolist(), gold)])
        rows = {}
        for m in copies:
            gain = mean_se([x - y for x, y in zip(hits[m], hits[0])])
            rows[m] = {"top1": mean_se(hits[m]), "gain_over_routers": gain}
        result["splits"][split] = {"n": len(gold), "plain_top1": plain_top1, "by_copies": rows,
                                   "hits": {m: h for m, h in hits.items()}}
        print(split, f"plain alone {plain_top1[0]:.1f}", " ".join(
            f"x{m}: {r['top1'][0]:.1f} ({r['gain_over_routers'][0]:+.1f} ± {r['gain_over_routers'][1]:.1f})"
            for m, r in rows.items()), flush=True)
    result["seconds"] = round(time.perf_counter() - t0)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
