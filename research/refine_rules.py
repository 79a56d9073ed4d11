"""How refinement should combine with the first pass, judged by named recall (the share of needle documents among
the injected ones) on measured samples: the first-round routing from the answer lines, the refined routing from
`research/refined_routing.py`. Rules: the first pass alone; the refined routing alone (`MSAEngine(refine=N)`);
both passes' layers fused (`refine_fuse=True`); each always or gated (only below a cut_drop margin). The injected
set a rule predicts is exactly the engine's (checked against live answer lines), but named recall is not accuracy:
the chosen rule still has to be answered live (`gate_replay.py`).

    python research/refine_rules.py --base benchmarks/results/answers/niah_1m_v8_k4.jsonl.gz,... \\
        --refined benchmarks/results/answers/refined_1m_v8.jsonl.gz --out research/results/refine_rules.json
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from gate_replay import load, routing_of

from memsparse.engine.routing import Routing, cut_drop, fused_top, joint_routing
from memsparse.eval.meta import run_meta
from memsparse.eval.niah import setting_of

MARGINS = (0.4, 0.5, 0.6, 1.01)  # 1.01: always


def rule_label(margin: float) -> str:
    """A gate's name in the rules' labels ("refined, gated 0.5", "fused, always")."""
    return "always" if margin > 1 else f"gated {margin}"


def rule_picks(first: Routing, fine: Routing, k: int) -> dict[str, list[int]]:
    """The k documents each rule injects, from the first pass's routing and the refined routing of its shortlist."""
    cut = cut_drop(first, fused_top(first, k + 1), k)
    picks = {"first pass": fused_top(first, k)}
    for margin in MARGINS:
        label = rule_label(margin)
        picks[f"refined, {label}"] = fused_top(fine if cut < margin else first, k)
        picks[f"fused, {label}"] = fused_top(joint_routing(first, fine) if cut < margin else first, k)
    return picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="comma list of answer files (their plain lines)")
    ap.add_argument("--refined", required=True, help="refined_routing.py output")
    ap.add_argument("--inject-k", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=16, help="the model's k: the refined routing the engine fuses")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    base = load(args.base.split(","), lambda x: setting_of(x) == setting_of({"inject_k": args.inject_k}))
    with gzip.open(args.refined, "rt") as f:
        refined = {(x["tokens"], x["subtask"], x["seed"], x["sample"]): x for x in map(json.loads, f)}
    k = args.inject_k
    recall: dict[str, dict[str, list[float]]] = {}
    for key, line in base.items():
        if key not in refined:
            continue
        first = routing_of(line["routing"])
        fine = routing_of(refined[key]["refined"], args.top_k)  # the engine's refined routing: each layer's top k
        gold = set(line["gold"])
        for rule, top in rule_picks(first, fine, k).items():
            recall.setdefault(rule, {}).setdefault(key[1], []).append(len(gold & set(top)) / len(gold))
    table = {rule: {s: round(100 * sum(v) / len(v), 1) for s, v in sorted(per.items())} for rule, per in recall.items()}
    subtasks = sorted(next(iter(recall.values())))
    print(f"{'named recall %':<20}" + "".join(f"{s.removeprefix('niah_'):>12}" for s in subtasks))
    for rule, row in table.items():
        print(f"{rule:<20}" + "".join(f"{row[s]:>12.1f}" for s in subtasks))
    samples = {s: len(v) for s, v in next(iter(recall.values())).items()}
    Path(args.out).write_text(json.dumps({"base": args.base.split(","), "refined": args.refined, "inject_k": k,
                                          "samples": samples, "named_recall": table, "computed": run_meta()},
                                         indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
