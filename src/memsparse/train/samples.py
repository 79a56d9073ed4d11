"""Training samples in the official protocol: one token stream per retrieval round, with `doc_ids`, LM labels
and aux-loss positives, laid out exactly as the engine runs it (memory/bank.py, engine/protocol.py).

A question whose answer needs documents `hops` (ids named per round, e.g. [[4], [7]] for a two-hop chain)
gives len(hops) + 2 samples (the paper trains each retrieval step as a separate sample), one more with `noise`
(the engine's router-injection layout: per round, that hop's documents with noise ones, then the answer):
  round r < len(hops): [prompt; earlier namings and injections] -> naming(hops[r])
  round len(hops):     [... all injections]                      -> `<End-of-Retrieve>`
  answer:              [...; <End-of-Retrieve>; restatement]      -> `The answer to the question is: a<|im_end|>`
Routing tokens (doc_ids 0) are the question block plus the latest injected block, as in the engine. The aux
positives of every round are the documents that support the answer (all hops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.protocol import Protocol
from ..memory.encode import TEMPLATE_PREFIX, render_document


@dataclass
class Sample:
    input_ids: list[int]
    doc_ids: list[int]  # -2 template, i + 1 document i, 0 routing token, -1 other active token
    labels: list[int]  # -100 except the target tokens
    positives: list[int]  # document indices supporting the answer
    num_docs: int

    def __len__(self) -> int:
        return len(self.input_ids)


def memory_stream(tok, documents: list[str]) -> tuple[list[int], list[int]]:
    """Template prefix and rendered documents (document i rendered with id i): ids and doc_ids."""
    prefix = tok(TEMPLATE_PREFIX, add_special_tokens=False)["input_ids"]
    ids, doc = list(prefix), [-2] * len(prefix)
    for i, text in enumerate(documents):
        toks = render_document(tok, i, text)
        ids += toks
        doc += [i + 1] * len(toks)
    return ids, doc


def rounds(proto: Protocol, memory: tuple[list[int], list[int]], documents: list[str], question: str,
           hops: list[list[int]], answer: str, interleave: bool = True,
           noise: list[list[int]] | None = None) -> list[Sample]:
    """The samples of one question (see the module docstring); `interleave=False` gives one sample that
    answers straight after the prompt. `noise` (document indices per hop) adds a sample in the engine's
    router-injection layout: in round r the documents of hops[r] and noise[r] are named and injected together;
    after the last round, the answer."""
    mem_ids, mem_doc = memory
    positives = sorted({d for h in hops for d in h})
    ids, mask = proto.question(question)
    block = mask.index(False)
    active, route = list(ids), list(mask)
    out = []

    def emit(target: list[int]):
        doc = [0 if r else -1 for r in route] + [-1] * len(target)
        out.append(Sample(
            input_ids=mem_ids + active + target, doc_ids=mem_doc + doc,
            labels=[-100] * (len(mem_ids) + len(active)) + target, positives=positives, num_docs=len(documents),
        ))

    if not interleave:
        emit(proto.answer(answer))
        return out
    def inject(docs: list[int]):
        nonlocal active, route
        text = proto.injection([(d, documents[d]) for d in docs])
        active += proto.naming(docs)
        route = proto.injected_route(block, len(active), len(text))
        active += text

    def answer_sample():
        nonlocal active, route
        active += proto.end_of_retrieve() + proto.restatement(question)
        route += [False] * (len(active) - len(route))
        emit(proto.answer(answer))

    if noise:
        if len(noise) != len(hops):
            raise ValueError(f"noise has {len(noise)} rounds for {len(hops)} hops")
        for h, extra in zip(hops, noise):
            inject(sorted(set(h) | set(extra)))
        answer_sample()
        active, route = list(ids), list(mask)
    for h in hops:
        emit(proto.naming(h))
        inject(h)
    emit(proto.end_of_retrieve())
    answer_sample()
    return out


def collate(samples: list[Sample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, doc_ids, labels, attention_mask (B, T) and aux_labels (B, max docs)."""
    T = max(map(len, samples))
    D = max(s.num_docs for s in samples)
    B = len(samples)
    batch = {"input_ids": torch.full((B, T), pad_id), "doc_ids": torch.full((B, T), -1),
             "labels": torch.full((B, T), -100), "attention_mask": torch.zeros(B, T, dtype=torch.long),
             "aux_labels": torch.zeros(B, max(D, 1), dtype=torch.long)}
    for b, s in enumerate(samples):
        n = len(s)
        batch["input_ids"][b, :n] = torch.tensor(s.input_ids)
        batch["doc_ids"][b, :n] = torch.tensor(s.doc_ids)
        batch["labels"][b, :n] = torch.tensor(s.labels)
        batch["attention_mask"][b, :n] = 1
        batch["aux_labels"][b, s.positives] = 1
    return batch
