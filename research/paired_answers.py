"""Paired comparison of two models' answer files (`eval niah --answers` or `eval qa --answers`, plain or gzip):
the samples both answered, matched by what they asked (NIAH: memory size, subtask, seed, sample and engine
setting; QA: system and question, or the question alone with `--across-systems`, to compare two systems such as
`memsparse` and `memsparse-priors-256`), with the mean gain of B over A and its standard error per group and overall.

    python research/paired_answers.py A.jsonl.gz B.jsonl.gz [--metric f1] [--across-systems]
    python research/paired_answers.py qa_test_v8.jsonl.gz new.jsonl.gz --a-system rag1-msa --across-systems
"""

from __future__ import annotations

import argparse
import json

from memsparse.eval.meta import answer_lines
from memsparse.eval.niah import setting_of
from memsparse.eval.qa import mean_se


def key(r: dict, across_systems: bool = False) -> tuple:
    """What a line answered: the same key in both files is the same sample."""
    if "subtask" in r:
        return r["tokens"], r["subtask"], r["seed"], r.get("split"), r["sample"], tuple(setting_of(r).items())
    return (r["question"],) if across_systems else (r["system"], r["question"])


def group(r: dict, across_systems: bool = False) -> str:
    if "subtask" in r:
        return f"{r['tokens'] // 1024}K {r['subtask']}"
    return "questions" if across_systems else r["system"]


def compare(a: list[dict], b: list[dict], metric: str, across_systems: bool = False) -> dict:
    """Per group and overall: n, A's and B's mean score (in %), B - A and its standard error over the pairs.
    `across_systems` (QA): pair by question alone, each file holding one system."""
    if across_systems and any(len({r["system"] for r in f if "subtask" not in r}) > 1 for f in (a, b)):
        raise ValueError("--across-systems: each file must hold the answers of one system")
    left = {key(r, across_systems): r for r in a}
    pairs: dict[str, list[tuple[float, float]]] = {}
    for r in b:
        k = key(r, across_systems)
        if k in left:
            pairs.setdefault(group(r, across_systems), []).append((left[k][metric], r[metric]))
    if not pairs:
        raise ValueError("no sample is in both files")
    pairs["all"] = [p for ps in pairs.values() for p in ps]
    out = {}
    for g, ps in pairs.items():
        gain, se = mean_se([y - x for x, y in ps])
        out[g] = {"n": len(ps), "a": mean_se([x for x, _ in ps])[0], "b": mean_se([y for _, y in ps])[0],
                  "gain": gain, "gain_se": se}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--metric", help="score field (default: score for NIAH, f1 for QA)")
    p.add_argument("--across-systems", action="store_true",
                   help="QA: pair by question alone (each file one system, e.g. with and without priors)")
    p.add_argument("--a-system", help="QA: only A's answers of this system (a file of several systems)")
    p.add_argument("--b-system", help="QA: only B's answers of this system")
    args = p.parse_args()
    a, b = answer_lines(args.a), answer_lines(args.b)
    for name, rows, system in (("A", a, args.a_system), ("B", b, args.b_system)):
        if system:
            rows[:] = [r for r in rows if r.get("system") == system]
            if not rows:
                p.error(f"--{name.lower()}-system {system!r}: no answers of that system in {name}")
    metric = args.metric or ("score" if "subtask" in b[0] else "f1")
    result = compare(a, b, metric, args.across_systems)
    for g, r in result.items():
        print(f"{g:28s} n={r['n']:4d}  A {r['a']:6.2f}  B {r['b']:6.2f}  B-A {r['gain']:+6.2f} +- {r['gain_se']:.2f}")
    print(json.dumps({"metric": metric, "groups": result}))


if __name__ == "__main__":
    main()
