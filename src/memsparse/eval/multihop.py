"""`memsparse eval multihop`: two-hop questions answered with one or more rounds of router-selected injection, to
measure what Memory Interleave adds.

The questions are built as training's `multihop` task builds them (tasks/mix.py `hidden_chains`), but in
evaluation-only material: the Paul Graham essays packed into passages, RULER's adjective-noun words as keys and
links, 7-digit values and RULER-style wording (`HOP_LINK`, `HOP_VALUE`, `HOP_QUESTION`). Each sample's memory
becomes a bank. Per (memory size, rounds): accuracy (the value in the answer) and how often each hop's document was
injected.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..engine import MSAEngine, RetrievalConfig
from ..memory import MemoryBank
from ..model.tokenizer import TokenCounter
from ..tasks.mix import MULTIHOP_CHAINS, Pool, Question, hidden_chains, line_passages
from ..tasks.niah import _draw, _essay_sentences, _words, string_match_all
from .meta import load_model, run_meta

EVAL_SEED = 987_654  # far from any recipe's seed + 1000 * rank
HOP_LINK = "The {key} leads to the {link}."
HOP_VALUE = "The special magic number of the {link} is: {value}."
HOP_QUESTION = "What is the special magic number of the place that the {key} leads to?"


def questions(count_many, memory_tokens: int, n: int, rng: random.Random) -> list[Question]:
    """`n` two-hop questions over the essays (see the module docstring)."""
    pool, words = Pool(line_passages([" ".join(_essay_sentences())]), count_many), _words()
    out = []
    for _ in range(n):
        drawn: list[str] = []
        while len(drawn) < 2 * MULTIHOP_CHAINS:
            w = _draw("words", rng, words)
            drawn += [w] if w not in drawn else []
        keys, links = drawn[:MULTIHOP_CHAINS], drawn[MULTIHOP_CHAINS:]
        values = [_draw("numbers", rng, words) for _ in keys]
        out.append(hidden_chains(rng, pool, count_many, memory_tokens,
                                 [HOP_LINK.format(key=k, link=lk) for k, lk in zip(keys, links)],
                                 [HOP_VALUE.format(link=lk, value=v) for lk, v in zip(links, values)],
                                 HOP_QUESTION, keys, values))
    return out


def evaluate(model, tok, tokens: list[int], samples: int = 100, router_rounds: tuple[int, ...] = (1, 2),
             config: RetrievalConfig | None = None, seed: int = EVAL_SEED) -> list[dict]:
    """One point per (memory size, rounds): accuracy (%), hop-1 / hop-2 injection recall, seconds per sample.
    Every rounds setting answers the same questions, in router mode, otherwise as `config` says."""
    count, config = TokenCounter.of(tok).many, config or RetrievalConfig()
    points = []
    for n in tokens:
        asked = questions(count, n, samples, random.Random(seed + n))
        stats = {r: {"acc": [], "hop1": [], "hop2": [], "t": 0.0} for r in router_rounds}
        for q in tqdm(asked, desc=f"multihop @ {n}", leave=False):
            bank = MemoryBank.build(model, tok, q.documents, tier="auto")
            engine = MSAEngine(model, tok, bank, config, interleave="router")
            for r in router_rounds:
                t0 = time.perf_counter()
                ans = engine.ask(q.question, max_new_tokens=32, router_rounds=r)
                s = stats[r]
                s["t"] += time.perf_counter() - t0
                injected = {d for rnd in ans.rounds for d in rnd}
                s["acc"].append(string_match_all(ans.text, [q.answer]))
                s["hop1"].append(q.hops[0][0] in injected)
                s["hop2"].append(q.hops[1][0] in injected)
        for r, s in stats.items():
            points.append({"tokens": n, "router_rounds": r, **config.settings(), "samples": samples,
                           "accuracy": round(100 * sum(s["acc"]) / samples, 2),
                           "hop1_injected": round(sum(s["hop1"]) / samples, 4),
                           "hop2_injected": round(sum(s["hop2"]) / samples, 4),
                           "seconds_per_sample": round(s["t"] / samples, 3)})
            print(json.dumps(points[-1]), flush=True)
    return points


@dataclasses.dataclass(frozen=True)
class MultihopRun:
    """One `eval multihop` run's settings: the memory sizes (`tokens`), samples per size, the rounds of router
    injection to compare, the other retrieval settings, the results file (`out`) and the model (as `load_model`
    takes it)."""

    tokens: tuple[int, ...]
    out: str
    samples: int = 100
    router_rounds: tuple[int, ...] = (1, 2)
    retrieval: RetrievalConfig = dataclasses.field(default_factory=RetrievalConfig)
    model: str | None = None
    device: str | None = None
    dtype: str | None = None


def run(config: MultihopRun, load=load_model) -> list[dict]:
    """`eval multihop`: load the model (`load(model, device, dtype)` -> (model, tokenizer)), `evaluate`, write
    multihop.json = {model, gpu, date, commit, points} to `config.out` and print the table."""
    from ..model.load import SHIPPED

    model, tok = load(config.model, config.device, config.dtype)
    points = evaluate(model, tok, list(config.tokens), config.samples, tuple(config.router_rounds), config.retrieval)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(config.model or SHIPPED), **run_meta(), "points": points}, indent=1)
                   + "\n")
    print(f"{'tokens':>8} {'rounds':>6} {'accuracy':>8} {'hop 1':>6} {'hop 2':>6}")
    for p in points:
        print(f"{p['tokens']:>8} {p['router_rounds']:>6} {p['accuracy']:>8} {p['hop1_injected']:>6} "
              f"{p['hop2_injected']:>6}")
    print(f"wrote {out}")
    return points
