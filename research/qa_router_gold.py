"""The router alone on the Debian FAQ QA set: how often each model's first routing pass (layers fused as the engine
fuses them, before refinement or injection) ranks the gold passage first and among the first four, and each router
layer's own first choice. No answers are
generated, so it runs on a CPU (the dev memory of 166K tokens encodes in minutes) and compares router candidates
before a GPU run. `memsparse eval qa` reports the same `gold_top1` / `gold_top4` beside its answers.

    python research/qa_router_gold.py --split dev --models shipped,runs/v10/delta --out research/results/x.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path


def router_gold(spec: str, split: str, device: str | None, batch: int = 16, chunk: int | None = None,
                fuse: list[str] = (), priors: list[int] = (0,), similarity: str = "train",
                query_reduce: str | None = None) -> Iterator[dict]:
    """Gold top-1 / top-4 of the model's first routing pass (its own fused layers), each router layer's top-1,
    and (`fuse`: layer sets such as '24-29' or '20,22,24') the same fused over other sets of layers: one result
    per entry of `priors` (document priors from that many sentences of the memory, `MSAEngine.calibrate_priors`;
    0: none), over one encoding of the memory, yielded as each is done. `similarity`: the engine's;
    `query_reduce`: the routing tokens' reduce in place of the model's ('max')."""
    from memsparse.engine import MSAEngine
    from memsparse.eval.faqs import load_qa
    from memsparse.eval.qa import mean_se
    from memsparse.memory import MemoryBank
    from memsparse.model.load import load_model

    data = load_qa(split)
    model, tok = load_model(spec, device=device)
    if query_reduce:
        model.msa_config.query_reduce_method = query_reduce
    t0 = time.perf_counter()
    bank = MemoryBank.build(model, tok, []).like(chunk_size=chunk)  # (routing keys pooled over `chunk` tokens)
    bank.add(data.paragraphs, progress=True)
    eng = MSAEngine(model, tok, bank, similarity=similarity)
    qs = [q for q, _, _ in data.questions]
    gold = [p for _, _, p in data.questions]
    for n in priors:
        bank.set_doc_priors(None)
        if n:
            eng.calibrate_priors(n=n)
        routings = [r for a in range(0, len(qs), batch) for r in eng.route_batch(qs[a:a + batch])]
        per_layer = {lay: mean_se([float(bool(r[lay]) and r[lay][0][0] == g) for r, g in zip(routings, gold)])[0]
                     for lay in model.router_layers}
        yield {"model": spec, "split": split, "chunk": bank.pool_size, "priors": n, "similarity": similarity,
               "query_reduce": model.msa_config.query_reduce_method, "n": len(qs),
               **gold_rates(routings, gold, model.fuse_layers), "layer_top1": per_layer,
               "fused": {f: gold_rates(routings, gold, layer_set(f)) for f in fuse},
               "seconds": round(time.perf_counter() - t0, 1)}


def gold_rates(routings: list, gold: list[int], layers: list[int]) -> dict:
    """Gold top-1 / top-4 rates (with standard errors and per-question hits) of routings fused over `layers`."""
    from memsparse.engine.routing import fused_top, fusing
    from memsparse.eval.qa import mean_se

    ranks = [fused_top(fusing(r, layers), 4) for r in routings]
    top1 = [int(r[:1] == [g]) for r, g in zip(ranks, gold)]
    top4 = [int(g in r) for r, g in zip(ranks, gold)]
    (m1, s1), (m4, s4) = mean_se(top1), mean_se(top4)
    return {"gold_top1": m1, "gold_top1_se": s1, "gold_top4": m4, "gold_top4_se": s4, "top1_hits": top1,
            "top4_hits": top4}


def layer_set(spec: str) -> list[int]:
    """'24-29' -> [24, ..., 29]; '20,22,24' -> [20, 22, 24]."""
    if "-" in spec:
        a, b = spec.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in spec.split(",")]


def paired(base: dict, other: dict) -> dict:
    """`other` minus `base` in gold top-1 / top-4 (points) over the same questions, with the paired standard error."""
    from memsparse.eval.qa import mean_se

    out = {"model": other["model"], "against": base["model"]}
    for k in ("top1", "top4"):
        m, se = mean_se([float(b - a) for a, b in zip(base[f"{k}_hits"], other[f"{k}_hits"])])
        out[f"gold_{k}_gain"], out[f"gold_{k}_gain_se"] = m, se
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="dev", choices=("dev", "test"))
    ap.add_argument("--models", default="shipped", help="comma list: 'shipped' or delta directories")
    ap.add_argument("--names", help="comma list: how the results name each model (default: --models)")
    ap.add_argument("--chunks", help="comma list: routing-key chunk sizes to try with every model (default: the "
                    "model's pooling_kernel_size); names get '@N'")
    ap.add_argument("--priors", help="comma list: document priors from N sentences of the memory to try with every "
                    "model (0: none; default 0); names get '+pN'")
    ap.add_argument("--similarity", default="train", help="the engine's routing similarity (default: train)")
    ap.add_argument("--query-reduce", choices=("max", "mean", "last"),
                    help="reduce over the routing tokens in place of the model's (names get '/R')")
    ap.add_argument("--fuse", help="';' list of router layer sets to fuse besides the model's own ('24-29;26-29')")
    ap.add_argument("--baseline", metavar="JSON:NAME",
                    help="pair every model with a model's stored per-question hits in an earlier result file of this "
                         "script (same split), e.g. research/results/v14_router_fit_dev.json:v10")
    ap.add_argument("--device")
    ap.add_argument("--out", help="a JSON file for the results (with the run's card, date and commit)")
    args = ap.parse_args()
    from memsparse.eval.meta import run_meta

    rows = []
    specs = args.models.split(",")
    names = args.names.split(",") if args.names else specs
    if len(names) != len(specs):
        ap.error(f"--names gives {len(names)} names for {len(specs)} models")
    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [None]
    priors = [int(n) for n in args.priors.split(",")] if args.priors else [0]
    stored = None
    if args.baseline:  # read before the models run: a wrong name fails at once
        path, sep, name = args.baseline.partition(".json:")  # stored names may hold colons
        path += ".json"
        if not sep or not Path(path).is_file():
            ap.error(f"--baseline {args.baseline!r}: expected an existing results JSON, ':' and a model's name")
        saved = json.loads(Path(path).read_text())
        found = [r for r in saved.get("router", saved).get("results", [])
                 if r["model"] == name and r.get("split", args.split) == args.split]
        if not found:
            ap.error(f"--baseline: no {args.split} result of {name!r} in {path}")
        stored = {**found[0], "model": f"{name} (stored)"}
    for spec, name in zip(specs, names):
        for chunk in chunks:
            for row in router_gold(spec, args.split, args.device, chunk=chunk,
                                   fuse=args.fuse.split(";") if args.fuse else (), priors=priors,
                                   similarity=args.similarity, query_reduce=args.query_reduce):
                n = row["priors"]
                rows.append({**row, "model": name + (f"@{chunk}" if chunk else "") + (f"+p{n}" if n else "")
                             + (f"/{args.query_reduce}" if args.query_reduce else "")})
                shown = {k: v for k, v in rows[-1].items() if not k.endswith("_hits") and k != "fused"}
                print(json.dumps(shown), flush=True)
                for f, rates in rows[-1]["fused"].items():
                    print(f"  fused over {f}: top-1 {rates['gold_top1']} +- {rates['gold_top1_se']}, top-4 "
                          f"{rates['gold_top4']} +- {rates['gold_top4_se']}", flush=True)
    base = rows[0]
    if stored is not None:
        if stored["n"] != rows[0]["n"]:
            ap.error(f"--baseline: {stored['model']} was measured over {stored['n']} questions, this run over "
                     f"{rows[0]['n']}")
        base = stored
    gains = [paired(base, r) for r in (rows if args.baseline else rows[1:])]
    for g in gains:
        print(json.dumps(g))
    if args.out:
        Path(args.out).write_text(json.dumps({
            **run_meta(), "model": " vs ".join(r["model"] for r in rows),
            "setting": f"split={args.split} router first pass, fused top-4",
            "results": rows, "paired": gains}) + "\n")


if __name__ == "__main__":
    main()
