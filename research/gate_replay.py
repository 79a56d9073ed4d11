"""A gated router-injection option replayed on measured `eval niah --answers` lines. Router injection re-ranks
(`MSAEngine(refine=N, refine_margin=M)`; widening, `widen=N, widen_margin=M`, was replayed too and removed) only
when the router layers cut no clear head (`engine.cut_drop` of the first-round routing below M). Given base lines
(the option off) and option lines (the option on, for at least the samples the gate picks) of the same samples, a
sample whose recorded routing falls below the margin takes the option line's score and every other sample the base
line's: what the engine with that margin answers, since on a clear cut the option changes nothing and the
first-round routing is the same in both runs (up to GPU summation order). An option line counts for a sample only
if its own run applied the option there (its recorded margin, if any, above the sample's cut); a margin for which
some gated sample has none is reported incomplete, with the subtasks whose gated samples all have one replayed alone.

    python research/gate_replay.py --base benchmarks/results/answers/niah_1m_v8_k4.jsonl.gz \\
        --option benchmarks/results/answers/niah_1m_v8_k8.jsonl.gz --margins 0,1/2,3/5,2/3,11/15,2 \\
        --out research/results/widen_replay.json

Writes per margin the accuracy per subtask, the average and the share of samples gated, with the machines, dates
and commits of the lines used (the replay's own under "replayed").
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from fractions import Fraction
from pathlib import Path

from memsparse.engine.routing import cut_drop, fused_top
from memsparse.eval.meta import run_meta
from memsparse.eval.niah import setting_of

Key = tuple[int, str, int, int]  # tokens, subtask, seed, sample


def load(paths: list[str], keep) -> dict[Key, dict]:
    """The lines of `paths` that `keep(line)` accepts, by sample (the first line of a sample wins)."""
    out: dict[Key, dict] = {}
    for path in paths:
        with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
            for line in map(json.loads, f):
                if keep(line):
                    out.setdefault((int(line["tokens"]), line["subtask"], int(line["seed"]), int(line["sample"])), line)
    return out


def routing_of(recorded: dict, depth: int | None = None) -> dict:
    """An answer line's recorded routing ({"layer": [[doc, score], ...]}) as the engine's Routing, each layer's
    list cut to its first `depth` (None: all)."""
    return {int(layer): [tuple(x) for x in picked[:depth]] for layer, picked in recorded.items()}


def live_margin(line: dict) -> float:
    """The gate of the run that wrote an option line: its refine or widen margin (refine without one: always)."""
    if line.get("refine"):
        return line.get("refine_margin", float("inf"))
    return line["widen_margin"] if line.get("widen") else float("inf")


def to_measure(keys: list[Key]) -> dict[str, list[int]]:
    """Samples still to answer with the option, as `eval niah` takes them: {"tokens:subtask:seed": sample ids}
    (`--tokens --subtasks --seed --sample-ids`)."""
    out: dict[str, list[int]] = {}
    for n, sub, seed, i in keys:
        out.setdefault(f"{n}:{sub}:{seed}", []).append(i)
    return out


def sources(lines) -> list[dict]:
    return [dict(zip(("gpu", "date", "commit"), m)) for m in sorted({(x.get("gpu"), x.get("date"), x.get("commit"))
                                                                     for x in lines}, key=str)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="comma list of answer files; their lines without refine or widen")
    ap.add_argument("--option", required=True, help="comma list of answer files with the option on")
    ap.add_argument("--select", default="", help="option lines: only those with these settings ('refine=64'); "
                                                  "default: every line of the --option files")
    ap.add_argument("--inject-k", type=int, default=4)
    ap.add_argument("--margins", default="0,1/2,3/5,2/3,11/15,2", help="0: never, > 1: always")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    plain = setting_of({"inject_k": args.inject_k})
    base = load(args.base.split(","), lambda x: setting_of(x) == plain)
    want = {k.strip(): json.loads(v) for k, _, v in (x.partition("=") for x in args.select.split(",") if x)}
    option = load(args.option.split(","), lambda x: all(x.get(k) == v for k, v in want.items()))
    drops = {}
    for key, line in base.items():
        routing = routing_of(line["routing"])
        drops[key] = cut_drop(routing, fused_top(routing, args.inject_k + 1), args.inject_k)
    # the samples each option line's run applied its option to: those below its own gate (none recorded: all)
    option = {k: x for k, x in option.items() if k in drops and drops[k] < live_margin(x)}
    subtasks = sorted({k[1] for k in base})
    measured = {"base": sources(base.values()), "option": sources(option.values())}
    result = {"base": args.base.split(","), "option": args.option.split(","), "select": want,
              "inject_k": args.inject_k, "measured": measured,
              "replayed": run_meta(), "samples": {s: sum(k[1] == s for k in base) for s in subtasks}, "margins": []}
    print(f"{'margin':>6} " + " ".join(f"{s.removeprefix('niah_'):>10}" for s in subtasks) + "   average   gated")
    for margin in (float(Fraction(m)) for m in args.margins.split(",")):
        gated = {k for k, d in drops.items() if d < margin}
        unmeasured = sorted(gated - set(option))
        missing = Counter(k[1] for k in unmeasured)
        acc, share = {}, {}
        for s in (s for s in subtasks if not missing[s]):  # a subtask counts only with every gated sample measured
            keys = [k for k in base if k[1] == s]
            acc[s] = round(100 * sum(float((option if k in gated else base)[k]["score"]) for k in keys) / len(keys), 2)
            share[s] = round(sum(k in gated for k in keys) / len(keys), 3)
        row = " ".join(f"{acc[s]:>10.1f}" if s in acc else f"{'-':>10}" for s in subtasks)
        if missing:
            result["margins"].append({"margin": margin, "incomplete": sum(missing.values()),
                                      "missing": dict(sorted(missing.items())), "to_measure": to_measure(unmeasured),
                                      **({"accuracy": acc, "gated": share} if acc else {})})
            print(f"{margin:>6.3f} {row}   incomplete: {sum(missing.values())} gated samples without an option line")
            continue
        avg = round(sum(acc.values()) / len(acc), 2)
        result["margins"].append({"margin": margin, "accuracy": acc, "average": avg, "gated": share})
        print(f"{margin:>6.3f} {row}   {avg:7.2f}  {len(gated) / len(base):6.1%}")  # of all samples
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
