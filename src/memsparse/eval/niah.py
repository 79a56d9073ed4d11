"""`memsparse eval niah`: RULER NIAH (train/tasks/niah.py) answered from a memory bank.

Each sample's haystack becomes a bank (documents split by the generator's published rule); the question goes
through the engine in the official protocol (Memory Interleave on by default) and the answer is scored with
RULER's `string_match_all`. Also recorded per point: how many of the needle documents the router layers
selected (routing recall) and how many the model named (named recall).
"""

from __future__ import annotations

import inspect
import json
import random
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..engine import MSAEngine
from ..engine.engine import engine_settings
from ..memory import MemoryBank
from ..train.tasks.niah import SUBTASKS, make_sample, string_match_all
from .meta import pyplot, run_meta, save_figure


def evaluate(model, tok, tokens: list[int], subtasks=SUBTASKS, samples: int | list[int] = 100, seed: int = 42,
             doc_tokens: int = 512, max_new_tokens: int = 64, interleave: bool | str = "router",
             inject_k: int = 4, priors: int = 0, engine: dict | None = None, on_point=None,
             answers=None) -> list[dict]:
    """One point per (memory size, subtask): accuracy (%), routing and named recall, seconds per sample.
    `samples`: per subtask, one count for every size or one per size; `priors`: document priors from that many
    pseudo-queries per sample's memory (`MSAEngine.calibrate_priors`; 0: none); `engine`: MSAEngine keywords
    (fusion, refine, widen: how the injected documents are chosen). `on_point(points so far)` runs after each point
    (the command line writes the results file there, so an interrupted run keeps what it measured). `answers`: a
    text file to which every sample is written as it is scored, one JSON line (question, expected and given answer,
    score, the needle documents, the documents named or injected in each round and every router layer's first-round
    top-k with scores), to see what failed."""
    counts = [samples] * len(tokens) if isinstance(samples, int) else list(samples)
    settings = engine_settings(**(engine or {}))
    if len(counts) != len(tokens):
        raise ValueError(f"samples: one count, or one per memory size ({len(tokens)}), not {len(counts)}")
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    cache: dict = {}  # per-sentence token counts of the haystacks
    points = []
    for n, per_subtask in zip(tokens, counts):
        for sub in subtasks:
            rng = random.Random(f"{seed}-{sub}-{n}")
            acc, route_rec, named_rec = [], [], []
            t0 = time.perf_counter()
            for i in tqdm(range(per_subtask), desc=f"{sub} @ {n}", leave=False):
                s = make_sample(sub, n, count, rng, doc_tokens=doc_tokens, haystack_cache=cache)
                bank = MemoryBank.build(model, tok, s.documents, tier="auto")
                eng = MSAEngine(model, tok, bank, similarity="train", **(engine or {}))
                if priors:
                    eng.calibrate_priors(n=priors)
                ans = eng.ask(s.question, max_new_tokens=max_new_tokens, interleave=interleave, inject_k=inject_k)
                gold = set(s.gold)
                acc.append(string_match_all(ans.text, s.answers))
                picked = set().union(*({d for d, _ in v} for v in ans.routing.values())) if ans.routing else set()
                route_rec.append(len(gold & picked) / len(gold))
                named_rec.append(len(gold & {d for r in ans.rounds for d in r}) / len(gold))
                if answers is not None:
                    answers.write(json.dumps({"tokens": n, "subtask": sub, "seed": seed, "sample": i,
                                              "question": s.question, "expected": s.answers, "answer": ans.text,
                                              "score": acc[-1], "gold": sorted(gold), "rounds": ans.rounds,
                                              "routing": {str(layer): [[d, round(float(x), 4)] for d, x in picked]
                                                          for layer, picked in ans.routing.items()}}) + "\n")
                    answers.flush()
            points.append({"tokens": n, "subtask": sub, "interleave": str(interleave), "seed": seed, **settings,
                           "accuracy": round(100 * sum(acc) / len(acc), 2),
                           "samples": per_subtask, "routing_recall": round(sum(route_rec) / per_subtask, 4),
                           "named_recall": round(sum(named_rec) / per_subtask, 4),
                           "seconds_per_sample": round((time.perf_counter() - t0) / per_subtask, 3)})
            print(json.dumps(points[-1]), flush=True)
            if on_point:
                on_point(points)
    return points


def pool(points: list[dict]) -> list[dict]:
    """One point per (memory size, subtask) from runs with different seeds (disjoint sample streams): accuracy and
    recalls averaged over all their samples, each run kept under "runs" (seed, samples, accuracy, commit)."""
    names = inspect.signature(engine_settings).parameters
    engines = {tuple(engine_settings(**{k: p[k] for k in names if k in p}).items()) for p in points}
    if len(engines) > 1:
        raise ValueError(f"points of one engine setting (fusion, refine, widen) only, got {sorted(engines)}")
    settings = dict(next(iter(engines), ()))
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["tokens"], p["subtask"], p["interleave"]), []).append(p)
    pooled = []
    for (n, sub, mode), runs in groups.items():
        seeds = [r.get("seed", 42) for r in runs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{sub} @ {n}: two runs with seed {max(seeds, key=seeds.count)} measure the same samples")
        total = sum(r["samples"] for r in runs)
        mean = {key: sum(r[key] * r["samples"] for r in runs) / total
                for key in ("accuracy", "routing_recall", "named_recall", "seconds_per_sample")}
        pooled.append({"tokens": n, "subtask": sub, "interleave": mode, **settings,
                       "accuracy": round(mean["accuracy"], 2),
                       "samples": total, "routing_recall": round(mean["routing_recall"], 4),
                       "named_recall": round(mean["named_recall"], 4),
                       "seconds_per_sample": round(mean["seconds_per_sample"], 3),
                       **({"runs": [{k: r.get(k) for k in ("seed", "samples", "accuracy", "commit", "date")}
                                    for r in runs]}
                          if len(runs) > 1 else {k: runs[0][k] for k in ("seed", "commit", "date") if k in runs[0]})})
    return sorted(pooled, key=lambda p: (p["tokens"], SUBTASKS.index(p["subtask"])))


def write_results(points: list[dict], model_name: str, out: Path, meta: dict | None = None) -> None:
    """niah.json = {model, gpu, date, commit, averages, points} and a plot beside it (when matplotlib is installed);
    averages: per memory size, the mean accuracy over its subtasks. `meta`: gpu / date / commit of where the points
    were measured (default: this run)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sizes = sorted({p["tokens"] for p in points})
    averages = {str(n): round(statistics.mean(p["accuracy"] for p in points if p["tokens"] == n), 2) for n in sizes}
    out.write_text(json.dumps({"model": model_name, **(meta or run_meta()), "averages": averages, "points": points},
                              indent=1) + "\n")
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for sub in sorted({p["subtask"] for p in points}):
        pts = sorted((p["tokens"], p["accuracy"]) for p in points if p["subtask"] == sub)
        ax.plot([t for t, _ in pts], [a for _, a in pts], marker="o", label=sub)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"RULER NIAH, {model_name}")
    ax.legend(fontsize=7)
    save_figure(fig, out.with_suffix(".png"))
