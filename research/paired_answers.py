"""Paired comparison of two models' answer files (`eval niah --answers` or `eval qa --answers`, plain or gzip):
the samples both answered, matched by what they asked (NIAH: memory size, subtask, seed, sample and engine
setting; QA: system and question), with the mean gain of B over A and its standard error per group and overall.

    python research/paired_answers.py A.jsonl.gz B.jsonl.gz [--metric f1]
"""

from __future__ import annotations

import argparse
import json

from memsparse.eval.meta import answer_lines
from memsparse.eval.niah import setting_of
from memsparse.eval.qa import mean_se


def key(r: dict) -> tuple:
    """What a line answered: the same key in both files is the same sample."""
    if "subtask" in r:
        return r["tokens"], r["subtask"], r["seed"], r.get("split"), r["sample"], tuple(setting_of(r).items())
    return r["system"], r["question"]


def group(r: dict) -> str:
    return f"{r['tokens'] // 1024}K {r['subtask']}" if "subtask" in r else r["system"]


def compare(a: list[dict], b: list[dict], metric: str) -> dict:
    """Per group and overall: n, A's and B's mean score (in %), B - A and its standard error over the pairs."""
    left = {key(r): r for r in a}
    pairs: dict[str, list[tuple[float, float]]] = {}
    for r in b:
        if key(r) in left:
            pairs.setdefault(group(r), []).append((left[key(r)][metric], r[metric]))
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
    args = p.parse_args()
    a, b = answer_lines(args.a), answer_lines(args.b)
    metric = args.metric or ("score" if "subtask" in b[0] else "f1")
    result = compare(a, b, metric)
    for g, r in result.items():
        print(f"{g:28s} n={r['n']:4d}  A {r['a']:6.2f}  B {r['b']:6.2f}  B-A {r['gain']:+6.2f} +- {r['gain_se']:.2f}")
    print(json.dumps({"metric": metric, "groups": result}))


if __name__ == "__main__":
    main()
