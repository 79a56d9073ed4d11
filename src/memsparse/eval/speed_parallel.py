"""`memsparse bench speed --world-size N`: Memory Parallel (memory/parallel.py) over N ranks, at the Qwen3-4B
geometry with random weights (or the tiny one), on a random bank sharded by documents: per memory size and routing
key dtype, routing ms (every router layer of a real prefill: rank 0's queries broadcast, each rank's top-k over its
shard, the candidates all-gathered and merged; wall time), of which the two collectives' (`collectives_ms`: the
broadcast and the all-gather, the device synchronized before each), the selected K̄/V̄'s assembly ms (the
all-reduce that brings every document from its rank), time to first token and decode ms per token, as rank 0
sees them, beside the routing floor of the largest shard (its routing key bytes / this device's read rate): the
issue's target is routing within 1.3x of floor + collectives.

Runs under a launch of N ranks (`torchrun --nproc_per_node N -m memsparse.cli bench speed --world-size N`) or
spawns them (one per GPU, NCCL; on a CPU, gloo, sharing its cores). Writes speed_parallel_N.json (machine, date,
commit, like speed.json) after each point, and at the end speed_parallel.png beside it (with matplotlib): every
speed_parallel_*.json of that directory, routing ms against memory tokens and the scaling curve (routing and TTFT
against ranks).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import ranks
from ..engine.bank_memory import ShardedMemory, sync
from ..engine.generate import generate
from ..engine.prefill import prefill_batch
from ..memory.parallel import ShardedBank, place
from .meta import pyplot, run_meta, save_figure
from .speed import QWEN3_4B, TINY, Settings, _log, _median_ms, questions, random_bank, random_model, read_rate


def run(out: Path, tokens: list[int], s: Settings, tiny: bool, world: int) -> dict | None:
    """Measure over `world` ranks: this launch's (checked), else `world` spawned processes. The result on rank 0
    (and in the spawning process), None on the other ranks."""
    if world < 1:
        raise ValueError(f"--world-size {world}: expected at least 1")
    if ranks.launched() or dist.is_initialized():
        n = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
        if n != world:
            raise ValueError(f"--world-size {world}, but this launch has {n} ranks")
        dev = ranks.device(None)
        with ranks.group(dev):
            return measure(out, tokens, s, tiny)
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise ValueError(f"--world-size {world}: {torch.cuda.device_count()} GPUs visible (one rank per GPU)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(_spawned, args=(world, f"file://{tmp}/init", out, tokens, s, tiny), nprocs=world,
                               start_method="spawn")
        except mp.ProcessRaisedException as e:
            raise ValueError(f"--world-size {world}: rank {e.error_index} failed: "
                             f"{e.msg.strip().splitlines()[-1]}") from None
        except mp.ProcessExitedException as e:
            raise ValueError(f"--world-size {world}: rank {e.error_index} exited ({e.exit_code})") from None
    return json.loads(out.read_text())


def _spawned(rank: int, world: int, init: str, out: Path, tokens: list[int], s: Settings, tiny: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dev = ranks.device(None)
    if dev == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        torch.cuda.set_device(torch.device(dev))
    dist.init_process_group(ranks.backend(dev), init_method=init, rank=rank, world_size=world, timeout=ranks.TIMEOUT)
    try:
        measure(out, tokens, s, tiny)
    finally:
        dist.destroy_process_group()


def measure(out: Path, tokens: list[int], s: Settings, tiny: bool) -> dict | None:
    """Every size, bf16 then fp8 routing keys, in this process group (collective); rank 0 writes `out`."""
    dev = torch.device(ranks.device(None))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rank, world = dist.get_rank(), dist.get_world_size()
    ShardedMemory.timed = True  # routing's collectives timed apart (a device sync before each)
    model = random_model(TINY if tiny else QWEN3_4B, dev, dtype)  # the same weights on every rank (seeded)
    rate = read_rate(dev)
    result = {**run_meta(), "world_size": world, "backend": dist.get_backend(), "read_gbps": round(rate / 1e9, 1),
              "settings": vars(s) | {"batch": list(s.batch)}, "points": []}
    for n in sorted(tokens):
        kinds, tier, cdt = plan(model, n, s, world)
        if "model" not in kinds:
            result.setdefault("skipped", []).append(
                {"tokens": n, "key_dtype": "bf16", "why": "bf16 routing keys do not fit the device"})
        bank = sharded_random_bank(model, n, s, kinds[0], tier, cdt)
        for kd in kinds:
            if kd != bank.shard.key_dtype:
                bank.shard.set_key_dtype(kd)
            largest = torch.tensor([bank.shard.routing_bytes()], dtype=torch.float64)
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
            p = {"model": "qwen3-4b" + (" (tiny)" if tiny else ""), "tokens": n, "world_size": world,
                 "key_dtype": "bf16" if kd == "model" else kd, "tier": bank.tier, "chunks_per_rank": bank.loads(),
                 **time_point(bank, s), "routing_floor_ms": round(float(largest) / rate * 1e3, 4),
                 "shard_routing_bytes": int(largest)}
            if dev.type == "cuda":
                p["gpu_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 2)
            result["points"].append(p)
            if rank == 0:
                _log(p)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
        del bank
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        plot(out.parent)
    return result if rank == 0 else None


def plot(folder: Path) -> Path | None:
    """speed_parallel.png in `folder` from its speed_parallel_*.json (one per world size): routing ms (and the
    largest shard's floor) against memory tokens, and routing ms and TTFT against ranks per memory size and key
    dtype (the scaling curve). None without matplotlib or results."""
    plt = pyplot()
    runs = sorted((json.loads(f.read_text()) for f in folder.glob("speed_parallel_*.json")),
                  key=lambda r: r["world_size"])
    points = [p for r in runs for p in r["points"]]
    if plt is None or not points:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for (world, kd) in sorted({(p["world_size"], p["key_dtype"]) for p in points}):
        pts = sorted((p for p in points if (p["world_size"], p["key_dtype"]) == (world, kd)), key=lambda p: p["tokens"])
        x = [p["tokens"] for p in pts]
        line, = axes[0].plot(x, [p["routing_ms"] for p in pts], "o-", label=f"{world} ranks, {kd} keys")
        axes[0].plot(x, [p["routing_floor_ms"] for p in pts], ":", color=line.get_color())
        axes[0].plot(x, [p["routing_floor_ms"] + p["collectives_ms"] for p in pts], "--", color=line.get_color())
    for (n, kd) in sorted({(p["tokens"], p["key_dtype"]) for p in points}):
        pts = sorted((p for p in points if (p["tokens"], p["key_dtype"]) == (n, kd)), key=lambda p: p["world_size"])
        x = [p["world_size"] for p in pts]
        axes[1].plot(x, [p["routing_ms"] for p in pts], "o-", label=f"{n:,} tokens, {kd} keys")
        axes[2].plot(x, [p["ttft_ms"] for p in pts], "o-", label=f"{n:,} tokens, {kd} keys")
    titles = ["routing ms per round (dotted: largest shard's floor; dashed: + collectives)", "routing ms against ranks",
              "TTFT ms against ranks"]
    for ax, title, xlabel in zip(axes, titles, ["memory tokens", "ranks", "ranks"]):
        ax.set_xscale("log", base=10 if xlabel == "memory tokens" else 2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.set_xticks([r["world_size"] for r in runs], [str(r["world_size"]) for r in runs])
    last = runs[-1]
    fig.suptitle(f"memsparse Memory Parallel, {last.get('gpu')}, {last.get('backend')} ({last.get('date')}, "
                 f"{last.get('commit')})")
    path = folder / "speed_parallel.png"
    save_figure(fig, path)
    return path


def plan(model, tokens: int, s: Settings, world: int) -> tuple[tuple[str, ...], str, str]:
    """The routing-key dtypes to measure at `tokens` over `world` ranks and where each rank's K̄/V̄ go (`choose`),
    from the largest shard's bytes. Collective: the least free memory of any rank decides, so every rank plans
    alike."""
    cfg, dev, layers = model.config, model.device, len(model.router_layers)
    C = math.ceil(max(tokens // s.doc_len, 1) / world) * math.ceil(s.doc_len / model.msa_config.pooling_kernel_size)
    row = layers * C * cfg.num_key_value_heads * cfg.head_dim  # elements of a rank's routing keys (or K̄)
    keys = {"model": row * model.dtype.itemsize, "fp8": row + layers * C * 4}
    content = {"model": 2 * row * model.dtype.itemsize, "fp8": 2 * (row + layers * C * cfg.num_key_value_heads * 4)}
    if dev.type != "cuda":
        return ("model", "fp8"), "device", "model"
    least = torch.tensor([float(torch.cuda.mem_get_info(dev)[0]), float(_mem_available())], dtype=torch.float64,
                         device=dev)
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    free, avail = least.tolist()
    return choose(tokens, keys, content, free, avail, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def choose(tokens: int, keys: dict, content: dict, free: float, avail: float, local: int):
    """(key dtypes, K̄/V̄ tier, K̄/V̄ dtype) for a rank's routing-key and K̄/V̄ bytes (`keys`, `content`: per dtype,
    'model' or 'fp8'), its GPU's `free` bytes and the host's `avail` shared by `local` ranks: K̄/V̄ on the device in
    the model's dtype where they take under 40% of it, else fp8 in host memory where all local ranks' fit in 90%
    of `avail`, else fp8 on the device where they fit beside fp8 routing keys in 85% of it, else a one-line error
    (before anything is allocated); bf16 keys (measured first, then converted to fp8) only where they fit beside
    the K̄/V̄ on the device in 85% of it."""
    if content["model"] < 0.4 * free:
        tier, cdt, on_device = "device", "model", content["model"]
    elif content["fp8"] * local < 0.9 * avail:
        tier, cdt, on_device = "host", "fp8", 0
    elif content["fp8"] + keys["fp8"] < 0.85 * free:
        tier, cdt, on_device = "device", "fp8", content["fp8"]
    else:
        raise ValueError(f"--tokens {tokens}: each rank's fp8 K̄/V̄ ({content['fp8'] / 1e9:.1f} GB) fit neither its "
                         f"GPU beside fp8 routing keys ({keys['fp8'] / 1e9:.1f} GB; {free / 1e9:.1f} GB free) nor this "
                         f"host beside its {local - 1} other ranks' ({avail / 1e9:.0f} GB available): use more ranks")
    if keys["fp8"] + on_device > 0.85 * free:
        raise ValueError(f"--tokens {tokens}: each rank's fp8 routing keys ({keys['fp8'] / 1e9:.1f} GB) do not fit "
                         f"its GPU ({free / 1e9:.1f} GB free): use more ranks")
    return ("model", "fp8") if keys["model"] + on_device < 0.85 * free else ("fp8",), tier, cdt


def _mem_available() -> int:
    """Bytes of host memory available (/proc/meminfo), or 2**50 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**50


def sharded_random_bank(model, tokens: int, s: Settings, key_dtype: str = "model", tier: str = "device",
                        content_dtype: str = "model") -> ShardedBank:
    """`tokens` // doc_len random documents placed over the ranks as `ShardedBank.add` places them, each rank
    making only its own, in the given dtypes and tier (`plan`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n_docs = max(tokens // s.doc_len, 1)
    chunks = math.ceil(s.doc_len / model.msa_config.pooling_kernel_size)
    owners = place([chunks] * n_docs, [0] * world)
    mine = [d for d, r in enumerate(owners) if r == rank]
    bank = ShardedBank(random_bank(model, 0, s, key_dtype, content_dtype, tier, ids=mine))
    for d, r in enumerate(owners):
        bank.enter(d, r, chunks, s.doc_len, (str(d), None))
    return bank


def time_point(bank: ShardedBank, s: Settings) -> dict:
    """Median routing (and its collectives'), K̄/V̄ assembly and TTFT ms and decode ms per token (steady state)
    over `s.repeats` questions after one warm-up, as rank 0 sees them (every rank runs the same questions)."""
    dev = bank.model.device
    route, coll, gather, ttft, dec = [], [], [], [], []
    for r in range(s.repeats + 1):
        rows, masks = questions(1, s.q_len, bank.model.config.vocab_size, r)
        dist.barrier()
        sync(dev)
        t0 = time.perf_counter()
        res = prefill_batch(bank, rows, masks)
        res.logits.argmax(-1).tolist()  # the first token, on the host
        t1 = time.perf_counter()
        if r:
            route.append(res.memory.route_seconds)
            coll.append(res.memory.collective_seconds)
            gather.append(res.memory.gather_seconds)
            ttft.append(t1 - t0)
            del res
            t = generate(bank, rows, masks, s.new_tokens, lambda b, ids: None).timings
            dec.append((t["decode"] - t["decode_first"]) / max(t["decode_tokens"] - 1, 1))
    return {"routing_ms": _median_ms(route), "collectives_ms": _median_ms(coll), "gather_ms": _median_ms(gather),
            "ttft_ms": _median_ms(ttft),
            "decode_ms_per_token": _median_ms(dec)}
