"""`memsparse eval multihop`: two-hop questions (train/tasks/mix.py `multihop`) answered with one or more rounds
of router-selected injection, to measure what Memory Interleave adds.

Questions come from their own seed (training draws from the recipe's seed), so keys, links and values are new;
each sample's memory becomes a bank. Per (memory size, rounds): accuracy (the value in the answer) and how often
each hop's document was injected.
"""

from __future__ import annotations

import json
import time

from tqdm.auto import tqdm

from ..engine import MSAEngine
from ..engine.engine import ROUTER_DEFAULTS, engine_settings
from ..memory import MemoryBank
from ..model.tokenizer import TokenCounter
from ..train.tasks.mix import Mixer
from ..train.tasks.niah import string_match_all

EVAL_SEED = 987_654  # far from any recipe's seed + 1000 * rank


def evaluate(model, tok, tokens: list[int], samples: int = 100, router_rounds: tuple[int, ...] = (1, 2),
             inject_k: int = 4, doc_tokens: int = 512, seed: int = EVAL_SEED) -> list[dict]:
    """One point per (memory size, rounds): accuracy (%), hop-1 / hop-2 injection recall, seconds per sample.
    Every rounds setting answers the same questions."""
    count = TokenCounter.of(tok).many
    points = []
    for n in tokens:
        mixer = Mixer({"multihop": 1.0}, count, doc_tokens=doc_tokens, seed=seed + n)
        questions = [mixer.multihop(n) for _ in range(samples)]
        stats = {r: {"acc": [], "hop1": [], "hop2": [], "t": 0.0} for r in router_rounds}
        for q in tqdm(questions, desc=f"multihop @ {n}", leave=False):
            bank = MemoryBank.build(model, tok, q.documents, tier="auto")
            engine = MSAEngine(model, tok, bank, similarity="train")
            for r in router_rounds:
                t0 = time.perf_counter()
                ans = engine.ask(q.question, max_new_tokens=32, interleave="router", inject_k=inject_k,
                                 router_rounds=r)
                s = stats[r]
                s["t"] += time.perf_counter() - t0
                injected = {d for rnd in ans.rounds for d in rnd}
                s["acc"].append(string_match_all(ans.text, [q.answer]))
                s["hop1"].append(q.hops[0][0] in injected)
                s["hop2"].append(q.hops[1][0] in injected)
        for r, s in stats.items():
            points.append({"tokens": n, "router_rounds": r, **engine_settings(**ROUTER_DEFAULTS),
                           "inject_k": inject_k, "samples": samples,
                           "accuracy": round(100 * sum(s["acc"]) / samples, 2),
                           "hop1_injected": round(sum(s["hop1"]) / samples, 4),
                           "hop2_injected": round(sum(s["hop2"]) / samples, 4),
                           "seconds_per_sample": round(s["t"] / samples, 3)})
            print(json.dumps(points[-1]), flush=True)
    return points
