"""What a router layer's attention reads from a bank during a prefill (the `cached.Memory` of a batch): the
template prefix in every layer and, in router layers, each row's top-k documents. `BankMemory` routes over one
process's bank; `ShardedMemory` over a bank sharded by documents over ranks (memory/parallel.py), with the
answers of one process; `memory_for` picks the one a bank needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..memory.bank import MemoryBank
from ..memory.parallel import ShardedBank
from ..ops import has_triton
from .routing import Routing, capturing, top_documents, top_documents_eager

_FAR = float(2**53)  # the global id of a padding candidate (sorts after every real id)

DEVICE_GATHER_SEGMENTS = 8  # the device-side gather costs one indexing per segment and layer


def gathers_on_device(bank: MemoryBank) -> bool:
    """Whether routing and the gather of the selected chunks stay on the model's device (`BankMemory`): at most
    `DEVICE_GATHER_SEGMENTS` segments, and K̄/V̄ on the device or, with Triton, read zero-copy from pinned memory."""
    host = bank.model.device.type == "cuda" and bank.tier == "host"
    zero_copy = has_triton()
    return len(bank.segments) <= DEVICE_GATHER_SEGMENTS and (zero_copy or not host)


@dataclass
class BankMemory:
    """The `cached.Memory` of a batch over a bank: the template prefix in every layer, plus in router layers
    each row's top-k documents. Records the routing of each row and the time spent routing and gathering.

    On a GPU with Triton (K̄/V̄ on the device, or in pinned host memory read zero-copy by the GPU) and on the CPU,
    for a bank of at most `DEVICE_GATHER_SEGMENTS` segments, routing, top-k and the gather of the selected chunks
    stay on the device: no host round trip per layer; the routing is read back once, when asked for, and the
    times come from CUDA events. Otherwise (many segments, host tier without Triton) each layer's ids go to the
    host, which gathers the selected chunks (copied from pinned memory on a side stream)."""

    bank: MemoryBank
    route_mask: torch.Tensor  # (B, S)
    cosine: bool
    top_k: int
    depth: int = 0  # routing records each layer's top max(top_k, depth) documents; attention reads the top_k
    _routing: list[Routing] = field(default_factory=list)
    _pending: list = field(default_factory=list)  # (layer, (2, B, k') scores and table positions, table ids)
    _spans: list = field(default_factory=list)  # (start, routed, gathered) clocks per router layer
    _seconds: list = field(default_factory=lambda: [0.0, 0.0])  # host-tier route, gather seconds

    def __post_init__(self):
        self._routing = [{} for _ in range(self.route_mask.shape[0])]
        dev = self.route_mask.device
        self.via_host = not gathers_on_device(self.bank)
        # host tier: the selected chunks are copied on a side stream, asynchronously to the queued GPU work
        self.copy_stream = torch.cuda.Stream(dev) if self.via_host and self.bank.tier == "host" else None

    @property
    def routing(self) -> list[Routing]:
        """Per row: router layer -> [(doc id, score)], best first (read back from the device once)."""
        for layer, top, ids in self._pending:
            vals, pos = top.tolist()  # (B, k) each
            for b, (vb, pb) in enumerate(zip(vals, pos)):
                self._routing[b][layer] = [(ids[int(t)], v) for v, t in zip(vb, pb) if v != float("-inf")]
        self._pending = []
        return self._routing

    @property
    def route_seconds(self) -> float:
        """Scoring and top-k: device time (events) on the device path, synchronized wall time through the host."""
        return self._seconds[0] + sum(_elapsed(a, b) for a, b, _ in self._spans)

    @property
    def gather_seconds(self) -> float:
        """Assembling the selected chunks' K̄/V̄."""
        return self._seconds[1] + sum(_elapsed(b, c) for _, b, c in self._spans)

    def __call__(self, i, attn, h, q):
        bank = self.bank
        B = q.shape[0]
        pk, pv = bank.prefix_kv[i]  # (p, Hkv, D)
        if not (attn.is_router and bank.num_docs):
            return pk.expand(B, *pk.shape), pv.expand(B, *pv.shape), torch.ones(B, pk.shape[0], dtype=torch.bool,
                                                                                 device=pk.device)
        if self.via_host:
            return self._via_host(i, attn, h, q)
        timed = not capturing(q.device)  # no timing events inside a captured prefill
        t0 = _clock(q.device) if timed else None
        top = top_documents(bank, i, attn.router_queries(h, q), self.route_mask, self.cosine,
                            max(self.top_k, self.depth))  # (2, B, k'), best first
        self._pending.append((i, top.clone() if top.is_cuda else top, bank.routing_index().ids))
        t1 = _clock(q.device) if timed else None
        top = top[:, :, :self.top_k]
        k, v, valid = bank.gather_top(i, top[1].long(), torch.isfinite(top[0]))  # (B, k * m, ...)
        if timed:
            self._spans.append((t0, t1, _clock(q.device)))
        ones = torch.ones(B, pk.shape[0], dtype=torch.bool, device=pk.device)
        return (torch.cat([pk.expand(B, *pk.shape), k], 1), torch.cat([pv.expand(B, *pv.shape), v], 1),
                torch.cat([ones, valid], 1))

    def _via_host(self, i, attn, h, q):
        """Ids to the host (one sync per layer), which gathers the selected chunks (from the host tier: copies)."""
        bank = self.bank
        B = q.shape[0]
        pk, pv = bank.prefix_kv[i]  # (p, Hkv, D)
        rows_k, rows_v = [[pk] for _ in range(B)], [[pv] for _ in range(B)]
        sync(q.device)
        t0 = time.perf_counter()
        vals, top = top_documents(bank, i, attn.router_queries(h, q), self.route_mask, self.cosine,
                                  max(self.top_k, self.depth)).tolist()  # (B, k') each; waits for the device
        t1 = time.perf_counter()
        ids = bank.routing_index().ids
        for b, (vb, tb) in enumerate(zip(vals, top)):
            picked = [(ids[int(t)], v) for v, t in zip(vb, tb) if v != float("-inf")]
            self._routing[b][i] = picked
            k, v = bank.gather(i, sorted(d for d, _ in picked[:self.top_k]), self.copy_stream)  # in document order
            rows_k[b].append(k)
            rows_v[b].append(v)
        sync(q.device)
        self._seconds[0] += t1 - t0
        self._seconds[1] += time.perf_counter() - t1
        lens = [sum(t.shape[0] for t in r) for r in rows_k]
        M = max(lens)
        mk = pk.new_zeros(B, M, *pk.shape[1:])  # (B, M, Hkv, D)
        mv = pv.new_zeros(B, M, *pv.shape[1:])
        valid = torch.zeros(B, M, dtype=torch.bool, device=pk.device)
        for b in range(B):
            mk[b, :lens[b]] = torch.cat(rows_k[b])
            mv[b, :lens[b]] = torch.cat(rows_v[b])
            valid[b, :lens[b]] = True
        return mk, mv, valid


def _clock(device: torch.device):
    """A point in time: a recorded CUDA event on GPUs (read later, no sync now), else perf_counter."""
    if device.type != "cuda":
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def _elapsed(a, b) -> float:
    if isinstance(a, float):
        return b - a
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



class ShardedMemory(BankMemory):
    """The `cached.Memory` of a batch over a `ShardedBank`: routing merged over the ranks, and the selected
    documents' K̄/V̄ summed over the ranks that hold them, in the one-process layout (see the module's doc).
    With `timed` (the bench sets it) the device is synchronized before each routing collective, whose wall time
    is kept apart (`collective_seconds`)."""

    timed = False

    def __post_init__(self):
        self._routing = [{} for _ in range(self.route_mask.shape[0])]
        self.via_host = False
        self.copy_stream = None
        self._collective = 0.0

    @property
    def collective_seconds(self) -> float:
        """With `timed`: wall time of routing's collectives (rank 0's queries broadcast, the candidates
        all-gathered), part of `route_seconds`; else 0."""
        return self._collective

    def _timed(self, op, *args, **kw) -> None:
        if not self.timed:
            return op(*args, **kw)
        sync(self.bank.model.device)
        t = time.perf_counter()
        op(*args, **kw)
        sync(self.bank.model.device)
        self._collective += time.perf_counter() - t

    def __call__(self, i, attn, h, q):
        sb: ShardedBank = self.bank
        B = q.shape[0]
        pk, pv = sb.prefix_kv[i]  # (p, Hkv, D)
        ones = torch.ones(B, pk.shape[0], dtype=torch.bool, device=pk.device)
        if not (attn.is_router and sb.num_docs):
            return pk.expand(B, *pk.shape), pv.expand(B, *pv.shape), ones
        t0 = time.perf_counter()
        rq = attn.router_queries(h, q).contiguous()  # (B, S, H, D)
        self._timed(dist.broadcast, rq, src=sb.src, group=sb.group)  # every rank scores rank 0's queries
        K = min(max(self.top_k, self.depth), sb.table_size)
        top = self._merge(i, rq, K)  # (2, B, K): scores, global ids, best first
        vals, gids = top.tolist()
        for b in range(B):
            self._routing[b][i] = [(int(g), v) for v, g in zip(vals[b], gids[b]) if v != float("-inf")]
        t1 = time.perf_counter()
        k, v, valid = self._gather(i, top[:, :, :min(self.top_k, K)])
        self._seconds[0] += t1 - t0
        self._seconds[1] += time.perf_counter() - t1
        return (torch.cat([pk.expand(B, *pk.shape), k], 1), torch.cat([pv.expand(B, *pv.shape), v], 1),
                torch.cat([ones, valid], 1))

    def _merge(self, i: int, rq: torch.Tensor, K: int) -> torch.Tensor:
        """(2, B, K) float64 scores and global ids of the global top-K, best first, ties to the lower id."""
        sb: ShardedBank = self.bank
        B = rq.shape[0]
        local = torch.full((2, B, K), float("-inf"), dtype=torch.float64, device=rq.device)
        local[1] = _FAR
        shard = sb.shard
        n = len(shard.routing_index().ids) if shard.segments else 0
        if n:
            top = top_documents_eager(shard, i, rq, self.route_mask, self.cosine, min(K, n))  # (2, B, k'): local
            ids = torch.tensor(shard.routing_index().ids, dtype=torch.float64, device=rq.device)
            local[0, :, :top.shape[2]] = top[0]
            local[1, :, :top.shape[2]] = ids[top[1].long()]
        got = [torch.empty_like(local) for _ in range(sb.world)]
        self._timed(dist.all_gather, got, local, group=sb.group)
        cand = torch.cat(got, 2)  # (2, B, world * K)
        by_id = cand[1].argsort(dim=1, stable=True)
        by_score = cand[0].gather(1, by_id).argsort(dim=1, descending=True, stable=True)
        order = by_id.gather(1, by_score)[:, :K]  # (B, K)
        return torch.stack([cand[0].gather(1, order), cand[1].gather(1, order)])

    def _gather(self, i: int, top: torch.Tensor):
        """K̄, V̄ (B, k * m, Hkv, D) and validity (B, k * m) of the picks `top` (2, B, k), as `gather_top` lays
        them out: each row's documents in id (table) order, missing picks last, each padded to m chunks."""
        sb: ShardedBank = self.bank
        B, k = top.shape[1:]
        m = sb.max_chunks
        ref = sb.prefix_kv[i][0]
        dev, dtype = ref.device, sb.model.dtype
        kv = torch.zeros(2, B, k, m, *ref.shape[1:], dtype=dtype, device=dev)  # (2, B, k, m, Hkv, D): K̄, V̄
        keys, values = kv[0], kv[1]
        valid = torch.zeros(B, k, m, dtype=torch.bool, device=dev)
        ok = torch.isfinite(top[0])
        order = torch.where(ok, top[1], _FAR).sort(1).values.tolist()  # (B, k) ids in table order, missing last
        for b in range(B):
            for j, g in enumerate(order[b]):
                if g == _FAR:
                    continue
                d = int(g)
                valid[b, j, :sb.chunks[d]] = True
                if sb.owner[d] == sb.rank:
                    kk, vv = sb.shard.gather(i, [d])  # (chunks, Hkv, D)
                    keys[b, j, :kk.shape[0]] = kk
                    values[b, j, :vv.shape[0]] = vv
        if sb.world > 1:
            dist.all_reduce(kv, group=sb.group)  # zero except on the rank that holds each document: exact sums
        return keys.flatten(1, 2), values.flatten(1, 2), valid.flatten(1)


def memory_for(bank, route_mask: torch.Tensor, cosine: bool, top_k: int, depth: int = 0) -> BankMemory:
    """The memory a batch routes over `bank`: a `ShardedMemory` for a `ShardedBank`, else a `BankMemory`."""
    kind = ShardedMemory if isinstance(bank, ShardedBank) else BankMemory
    return kind(bank, route_mask, cosine, top_k, depth)

