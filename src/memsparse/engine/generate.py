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


def _stepper(bank: MemoryBank, cache: cached.KVCache, cuda_graph: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decode step of `cache`: a CUDA graph on a GPU (unless `cuda_graph=False`), else `cached.decode`."""
    if cuda_graph and bank.model.device.type == "cuda":
        return cached.GraphedDecode(bank.model, cache)
    return lambda ids: cached.decode(bank.model, ids, cache)


def _prefilled(bank: MemoryBank, rows: list[list[int]], route_masks: list[list[bool]], similarity: str,
               top_k: int | None, extra: int, cuda_graph: bool):
    """Prefill `rows` with room for `extra` generated tokens, and the decode step of their cache (the graphed
    prefill where it serves the rows)."""
    if cuda_graph and bank.model.device.type == "cuda" and graphable(bank, rows):
        return graphed_prefill(bank, rows, route_masks, similarity, top_k, extra=extra)
    res = prefill_batch(bank, rows, route_masks, similarity, top_k, extra=extra)
    return res, _stepper(bank, res.cache, cuda_graph)


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
    res, step = _prefilled(bank, rows, route_masks, similarity, top_k, max_new_tokens, cuda_graph)
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


@dataclass
class Entry:
    """A row that joins a continuous batch (`generate_continuous`): its active tokens, routing mask and token
    budget; `stop(ids)` says why it ends after generating `ids` (None: go on); `done(ids, event, routing, timings)`
    receives it when it ends (event as `Generation.events`; timings: its join's route / prefill seconds, its decode
    seconds and tokens)."""

    tokens: list[int]
    route: list[bool]
    budget: int
    stop: Callable[[list[int]], str | None]
    done: Callable[[list[int], str, Routing, dict], None]


@torch.no_grad()
def generate_continuous(bank: MemoryBank, admit: Callable[[int], list[Entry]], slots: int,
                        sampling: Sampling | None = None, similarity: str = "train", top_k: int | None = None,
                        cuda_graph: bool = True, room: int = 256) -> int:
    """Continuous batching: decode a batch that rows join and leave between steps. Before every step `admit(n)`
    hands over up to n new rows (n: the batch's free rows, up to `slots` rows in all); they are prefilled
    together and placed in free rows of the running cache (`cached.place`), which grows (`cached.regrow`, `room`
    columns to spare) when they need more rows, earlier columns or later ones; a row that ends leaves at once and
    its `done` is called. Rows decode exactly as in `generate` (greedy answers are the same whoever shares the
    batch). Returns when no row is left and `admit` gives none; returns the number of joins (prefills).
    `sampling` must not be seeded (one random stream serves every row that comes)."""
    sampling = sampling or Sampling()
    if sampling.seed is not None:
        raise ValueError("continuous batching takes no seed: every row shares the batch's random stream")
    dev = bank.model.device
    ahead = dev.type == "cuda"  # as in `generate`: the next step is enqueued before the host sees this token
    cache = step = logits = None
    rows: list[dict | None] = []  # per cache row: its entry, generated ids, join time and timings; None = free
    joins = 0

    def join(entries: list[Entry]) -> None:
        nonlocal cache, step, logits, joins
        t0 = time.perf_counter()
        need = max(e.budget for e in entries) + 1  # (+1: the step enqueued ahead of the last token)
        if cache is None:
            res, step = _prefilled(bank, [e.tokens for e in entries], [e.route for e in entries], similarity, top_k,
                                   need, cuda_graph)
            cache, logits, slot_ids = res.cache, res.logits, list(range(len(entries)))
            rows.extend([None] * len(entries))
        else:
            res = prefill_batch(bank, [e.tokens for e in entries], [e.route for e in entries], similarity, top_k)
            free = [b for b, r in enumerate(rows) if r is None]
            more = max(0, len(entries) - len(free))
            left = cached.shortfall(cache, res.cache)
            right = max(0, cache.length + need - cache.capacity)
            if more or any(left) or right:
                batch = len(rows) + (max(more, slots - len(rows)) if more else 0)
                cache = cached.regrow(cache, batch, [n + room if n else 0 for n in left], right + room if right else 0)
                step = _stepper(bank, cache, cuda_graph)
                rows.extend([None] * (batch - len(rows)))
                logits = torch.cat([logits, logits.new_zeros(batch - logits.shape[0], logits.shape[1])])
                free = [b for b, r in enumerate(rows) if r is None]
            slot_ids = free[:len(entries)]
            for j, b in enumerate(slot_ids):
                cached.place(cache, b, res.cache, j)
            logits = logits.clone()
            logits[slot_ids] = res.logits
        sync(dev)
        t1 = time.perf_counter()
        for j, (b, e) in enumerate(zip(slot_ids, entries)):
            rows[b] = {"entry": e, "ids": [], "routing": res.memory.routing[j], "start": t1,
                       "timings": {"route": res.memory.route_seconds, "gather": res.memory.gather_seconds,
                                   "prefill": t1 - t0}}
        joins += 1

    def leave(b: int, event: str) -> None:
        r, rows[b] = rows[b], None
        r["timings"].update(decode=time.perf_counter() - r["start"], decode_tokens=len(r["ids"]))
        r["entry"].done(r["ids"], event, r["routing"], r["timings"])

    host = None
    while True:
        free = sum(r is None for r in rows) + max(0, slots - len(rows))
        entries = admit(free) if free else []
        if entries:
            join(entries)
        if all(r is None for r in rows):
            return joins
        nxt = sample(logits, sampling)  # (B,)
        if ahead:
            if host is None or host.shape[0] != nxt.shape[0]:
                host = torch.empty(nxt.shape[0], dtype=torch.long, pin_memory=True)
            host.copy_(nxt, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            logits = step(nxt)
            ready.synchronize()
        for b, t in enumerate((host if ahead else nxt).tolist()):
            r = rows[b]
            if r is None:
                continue
            r["ids"].append(t)
            event = r["entry"].stop(r["ids"])
            if event is not None or len(r["ids"]) >= r["entry"].budget:
                leave(b, event or "length")
        if not ahead and any(r is not None for r in rows):
            logits = step(nxt)
