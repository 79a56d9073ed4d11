"""Stage 3: sampling and the decode loop over a preallocated KV cache, for a batch of rows at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..memory.bank import MemoryBank
from ..model import cached
from .bank_memory import sync
from .prefill import graphable, graphed_prefill, prefill_batch
from .routing import Routing


@dataclass
class Sampling:
    """Greedy when temperature is 0, else temperature sampling restricted to the top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / s.temperature, -1)
    if s.top_p < 1:
        sp, idx = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > s.top_p  # tokens after the nucleus (the top token is always kept)
        probs = torch.zeros_like(probs).scatter(-1, idx, sp.masked_fill(drop, 0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per row (including the one that ended it)
    events: list[str]  # why each row stopped: what `stop` returned, or 'length'
    routing: list[Routing]
    # seconds: route and gather (inside prefill), prefill, decode (all steps), decode_first (the first step: on a
    # GPU also the warm-up and capture of its CUDA graph); decode_tokens (steps taken)
    timings: dict[str, float]


@torch.no_grad()
def generate(bank: MemoryBank, rows: list[list[int]], route_masks: list[list[bool]], max_new_tokens: int,
             stop: Callable[[int, list[int]], str | None], sampling: Sampling | None = None,
             similarity: str = "train", top_k: int | None = None, cuda_graph: bool = True) -> Generation:
    """Prefill the rows, then decode until `stop(row, generated ids)` returns an event for every row or
    `max_new_tokens` are generated. Finished rows keep stepping with the batch; their tokens are dropped.
    On a GPU, unless `cuda_graph=False`, the decode step runs as a CUDA graph, and so does the whole prefill
    for short rows over a bank gathered on the device (`graphable`, `graphed_prefill`: captured once per shape,
    then replayed); each step is enqueued before the host sees the token before it (one step past the end may
    still run on return)."""
    sampling = sampling or Sampling()
    dev = bank.model.device
    gen = None
    if sampling.seed is not None:
        gen = torch.Generator(device=dev).manual_seed(sampling.seed)
    t0 = time.perf_counter()
    graphed = cuda_graph and dev.type == "cuda"
    if graphed and graphable(bank, rows):
        res, step = graphed_prefill(bank, rows, route_masks, similarity, top_k, extra=max_new_tokens)
    else:
        res = prefill_batch(bank, rows, route_masks, similarity, top_k, extra=max_new_tokens)
        step = (cached.GraphedDecode(bank.model, res.cache) if graphed
                else lambda ids: cached.decode(bank.model, ids, res.cache))
    sync(dev)
    t1 = time.perf_counter()
    out: list[list[int]] = [[] for _ in rows]
    events: list[str | None] = [None] * len(rows)
    logits, steps, first, n = res.logits, 0, 0.0, 0
    # on a GPU the next step is enqueued before this token reaches the host, so the device never waits for the
    # host's stop checks; a step after the last token is then wasted (and left running: nothing reads it)
    ahead = dev.type == "cuda"
    host = torch.empty(len(rows), dtype=torch.long, pin_memory=True) if ahead else None
    ready = torch.cuda.Event() if ahead else None

    def advance(ids: torch.Tensor) -> torch.Tensor:
        nonlocal steps, first
        logits = step(ids)
        steps += 1
        if steps == 1:
            sync(dev)
            first = time.perf_counter() - t1
        return logits

    while n < max_new_tokens:
        nxt = sample(logits, sampling, gen)  # (B,)
        n += 1
        if ahead:
            host.copy_(nxt, non_blocking=True)
            ready.record()
            if n < max_new_tokens:
                logits = advance(nxt)
            ready.synchronize()
        for b, t in enumerate((host if ahead else nxt).tolist()):
            if events[b] is None:
                out[b].append(t)
                events[b] = stop(b, out[b])
        if all(e is not None for e in events):
            break
        if not ahead and n < max_new_tokens:
            logits = advance(nxt)
    t2 = time.perf_counter()
    return Generation(
        tokens=out, events=[e or "length" for e in events], routing=res.memory.routing,
        timings={"route": res.memory.route_seconds, "gather": res.memory.gather_seconds, "prefill": t1 - t0,
                 "decode": t2 - t1, "decode_first": first, "decode_tokens": steps},
    )
