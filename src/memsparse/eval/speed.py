"""`memsparse bench speed`: routing, time to first token and decode against the size of the memory, each next to
its floor (docs/architecture.md, "What fast means"), for the shipped MSA-SmolLM2 with real encoded banks and for
the Qwen3-4B geometry (random weights, banks of random tensors of the right shapes and dtypes).

Per point: routing ms per round (scoring + top-k in every router layer of a real prefill, summed: with the fused
kernel on a GPU, the per-layer routing graphs replayed back to back, as the graphed prefill runs them; else device
time from CUDA events when the gather stays on the device, synchronized wall time when each layer's ids go through
the host; the eager prefill's event spans as routing_ms_eager; in the same run the PyTorch path), its floor (bytes
of routing keys / the GPU's measured read rate), time to first token (the whole prefill of a question, routing
included, replayed from a CUDA graph where possible, and eager), decode ms per token (steady state of the CUDA-graph
step; the first step, which captures it, apart) and its floor (weights + KV cache bytes / read rate), GPU and host
GB, bytes per token, achieved GB/s and TFLOP/s of routing. Dense attention (PyTorch SDPA, causal, one layer) is
timed where it fits.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.bank_memory import sync
from ..engine.generate import generate
from ..engine.prefill import graphable, graphed_prefill, prefill_batch
from ..engine.routing import routing_round_seconds
from ..memory.bank import MemoryBank
from ..memory.quant import STORAGE, QTensor, quantize
from ..model.config import DecoderConfig
from ..model.decoder import MSAForCausalLM
from .meta import pyplot, run_meta, save_figure

QWEN3_4B = dict(family="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                rope={"rope_type": "default", "rope_theta": 1000000.0}, max_position_embeddings=40960)
TINY = dict(family="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
MSA = {"pooling_kernel_size": 64, "top_k_docs": 16}


@dataclass
class Settings:
    q_len: int = 48  # routing tokens per question
    new_tokens: int = 32
    repeats: int = 5
    doc_len: int = 1024  # tokens per random document
    batch: tuple[int, ...] = (1, 8)  # decode batch sizes (at the smallest memory)


def read_rate(device: torch.device) -> float:
    """Bytes/s the device reads (the floors' denominator): the best of 10 timed sums over a 2 GiB (CPU: 128 MiB)
    bf16 tensor, after 5 untimed ones (two runs on one H100 measured 2840 and 2962 GB/s without them; a low rate
    flatters every floor ratio)."""
    n = 2**30 if device.type == "cuda" else 2**26
    x = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    for _ in range(5):
        x.sum(dtype=torch.float32)
    best = math.inf
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del x
    return 2 * n / best


def random_model(cfg: dict, device: torch.device, dtype: torch.dtype) -> MSAForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        return MSAForCausalLM(DecoderConfig(**cfg), MSA).to(dtype).eval()


def _random_part(shape: tuple, kind: str, per_head: bool, dtype: torch.dtype, device: torch.device,
                 pinned: bool) -> torch.Tensor | QTensor:
    """A (C, Hkv, D) bank tensor of random values in `kind`, filled piece by piece on the GPU (or CPU)."""
    gen_dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out = (torch.empty(shape, dtype=dtype, device=device, pin_memory=pinned) if kind == "model" else
           QTensor(torch.empty(shape, dtype=STORAGE[kind], device=device, pin_memory=pinned),
                   torch.empty(shape[:2] if per_head else shape[:1], device=device, pin_memory=pinned)))
    piece = 1 << 18
    for a in range(0, shape[0], piece):
        part = quantize(torch.randn(min(piece, shape[0] - a), *shape[1:], device=gen_dev, dtype=dtype), kind, per_head)
        if isinstance(part, QTensor):
            out.data[a:a + piece].copy_(part.data)
            out.scale[a:a + piece].copy_(part.scale)
        else:
            out[a:a + piece].copy_(part)
    return out


def random_bank(model: MSAForCausalLM, tokens: int, s: Settings, key_dtype: str, content_dtype: str,
                tier: str, ids: list[int] | None = None) -> MemoryBank:
    """A bank of `tokens` // doc_len random documents (one segment), in the given dtypes and tier; `ids`: the
    documents' ids instead (a shard of a memory over ranks: their number is the count; `tokens` is unused)."""
    bank = MemoryBank.empty(model, [1, 2, 3], key_dtype=key_dtype, content_dtype=content_dtype).place(tier)
    n_docs = max(tokens // s.doc_len, 1) if ids is None else len(ids)
    if not n_docs:
        return bank
    C = n_docs * math.ceil(s.doc_len / model.msa_config.pooling_kernel_size)
    cfg, dev = model.config, model.device
    shape = (C, cfg.num_key_value_heads, cfg.head_dim)
    host = bank.tier == "host" and dev.type == "cuda"
    content_dev = torch.device("cpu") if host else dev

    def part(kind, per_head, where, pinned=False):
        return {lay: _random_part(shape, kind, per_head, model.dtype, where, pinned) for lay in model.router_layers}

    bank.add_encoded(part(content_dtype, True, content_dev, host), part(content_dtype, True, content_dev, host),
                     part(key_dtype, False, dev), [s.doc_len] * n_docs, ids=ids)
    return bank


def real_bank(base: MemoryBank, tokens: int, key_dtype: str) -> MemoryBank:
    """A bank of `tokens` made of the base bank's encoded documents repeated (one segment, real K̄/V̄/K̄r)."""
    seg = base.segments[0]
    n = max(1, round(tokens / sum(seg.token_count)))
    bank = base.like(key_dtype=key_dtype, tier="device")
    rep = lambda d: {lay: t.repeat(n, 1, 1) for lay, t in d.items()}  # noqa: E731  (n*C, Hkv, D)
    bank.add_encoded(rep(seg.keys), rep(seg.values), rep(seg.route_keys), seg.token_count * n)
    return bank


def questions(batch: int, q_len: int, vocab: int, seed: int):
    """Random token questions: rows of q_len routing tokens + 3 more, and their routing masks."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(10, vocab, (batch, q_len + 3), generator=g).tolist()
    return rows, [[True] * q_len + [False] * 3 for _ in rows]


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def time_query(bank: MemoryBank, s: Settings, batch: int = 1, decode: bool = True) -> dict:
    """Median routing ms (on a GPU with fused routing: the round's per-layer routing graphs replayed back to back,
    `routing_round_seconds`; the eager prefill's event spans, which include its launch gaps, as routing_ms_eager),
    TTFT ms (the path `generate` takes: a replayed CUDA graph of the whole prefill where the
    bank allows one, else eager; the eager prefill's TTFT beside it), decode ms/token (steady state) and the first
    decode step's ms (with the capture of its CUDA graph) over `s.repeats` questions (after one warm-up)."""
    dev = bank.model.device
    route, route_eager, eager, ttft, dec, first = [], [], [], [], [], []
    for r in range(s.repeats + 1):
        rows, masks = questions(batch, s.q_len, bank.model.config.vocab_size, r)
        graph = graphable(bank, rows)
        sync(dev)
        t0 = time.perf_counter()
        res = prefill_batch(bank, rows, masks)
        res.logits.argmax(-1).tolist()  # the first token, on the host
        t1 = time.perf_counter()
        if r:
            replayed = routing_round_seconds(res.memory) if dev.type == "cuda" else None
            timer = ("routing graphs replayed" if replayed is not None else
                     "wall" if res.memory.via_host or dev.type != "cuda" else "device events")
            route.append(replayed if replayed is not None else res.memory.route_seconds)
            route_eager.append(res.memory.route_seconds)
            eager.append(t1 - t0)
        del res
        if graph:
            sync(dev)
            t0 = time.perf_counter()
            graphed_prefill(bank, rows, masks, extra=s.new_tokens)[0].logits.argmax(-1).tolist()
            if r:
                ttft.append(time.perf_counter() - t0)
        if decode and r:
            g = generate(bank, rows, masks, s.new_tokens, lambda b, ids: None)
            t = g.timings  # steady state: the steps after the first (which captures the CUDA graph)
            dec.append((t["decode"] - t["decode_first"]) / max(t["decode_tokens"] - 1, 1))
            first.append(t["decode_first"])
    out = {"routing_ms": _median_ms(route), "routing_timer": timer, "routing_ms_eager": _median_ms(route_eager),
           "ttft_ms": _median_ms(ttft or eager),
           "ttft_ms_eager": _median_ms(eager), "prefill": "cuda graph" if graph else "eager"}
    if decode:
        out["decode_ms_per_token"] = _median_ms(dec)
        out["decode_first_step_ms"] = _median_ms(first)
    return out


def decode_bytes(model: MSAForCausalLM, bank: MemoryBank, s: Settings, batch: int) -> int:
    """Bytes one decode step reads: every weight once, plus each layer's KV cache (memory + question + answer)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    k = model.msa_config.engine_top_k
    mem = k * math.ceil(s.doc_len / model.msa_config.pooling_kernel_size) if bank.num_docs else 0
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize  # K and V per cache column
    cols = [len(bank.prefix_ids) + (mem if i in model.router_layers else 0) + s.q_len + 3 + s.new_tokens
            for i in range(cfg.num_hidden_layers)]
    return weights + batch * per_layer * sum(cols)


def dense_attention_ms(cfg: dict, tokens: int, device: torch.device, dtype: torch.dtype) -> float:
    """One layer of causal dense attention (PyTorch SDPA, grouped-query) over `tokens` tokens, in ms."""
    F = torch.nn.functional
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = torch.randn(1, H, tokens, D, device=device, dtype=dtype)
    k = torch.randn(1, Hkv, tokens, D, device=device, dtype=dtype)
    v = torch.randn_like(k)
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return round(min(times[1:]) * 1e3, 2)


def measure_point(name: str, bank: MemoryBank, tokens: int, s: Settings, rate: float, torch_path: bool) -> dict:
    """One point: the fused kernel (when the device has Triton) and, when asked, the PyTorch path."""
    model = bank.model
    dev = model.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rbytes = bank.routing_bytes()
    layers = len(model.router_layers)
    cfg = model.config
    flops = 2 * s.q_len * cfg.num_key_value_heads * cfg.head_dim * bank.num_chunks * layers
    bank.fused_routing = None  # the default: fused on GPUs
    fused = time_query(bank, s)
    p = {"model": name, "tokens": tokens, "key_dtype": "bf16" if bank.key_dtype == "model" else bank.key_dtype,
         "content_dtype": "bf16" if bank.content_dtype == "model" else bank.content_dtype, "tier": bank.tier,
         "routing": "fused" if dev.type == "cuda" else "torch", **fused,
         "routing_floor_ms": round(rbytes / rate * 1e3, 4), "routing_bytes": rbytes,
         "routing_gbps": round(rbytes / fused["routing_ms"] * 1e-6, 1),
         "routing_tflops": round(flops / fused["routing_ms"] * 1e-9, 2),
         "decode_floor_ms": round(decode_bytes(model, bank, s, 1) / rate * 1e3, 3),
         "bytes_per_token": round((rbytes + bank.content_bytes()) / tokens, 1)}
    if torch_path and dev.type == "cuda":
        bank.fused_routing = False
        p["routing_ms_torch"] = time_query(bank, s, decode=False)["routing_ms"]
        bank.fused_routing = None
    gpu = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else 0.0
    p["gpu_gb"] = round(gpu, 2)
    p["host_gb"] = round((bank.content_bytes() if bank.tier == "host" else 0) / 1e9, 2)
    p["process_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    return p


def _log(p: dict) -> None:
    print(json.dumps(p), flush=True)


def run(out: Path, tokens: list[int], models: list[str], s: Settings, tiny: bool = False) -> dict:
    """Measure every model at every size, writing `out` (JSON) after each point, and a plot beside it."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rate = read_rate(dev)
    result = {**run_meta(), "read_gbps": round(rate / 1e9, 1), "settings": vars(s) | {"batch": list(s.batch)},
              "points": [], "decode_batches": [], "dense": []}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    for name in models:
        model, banks = _setup(name, dev, dtype, min(tokens), s, tiny)
        for n in sorted(tokens):
            for bank, torch_path in banks(n):
                p = measure_point(name, bank, n, s, rate, torch_path)
                result["points"].append(p)
                _log(p)
                save()
                if n == min(tokens):
                    for b in s.batch[1:]:
                        d = {"model": name, "tokens": n, "batch": b, **time_query(bank, s, batch=b),
                             "decode_floor_ms": round(decode_bytes(model, bank, s, b) / rate * 1e3, 3)}
                        result["decode_batches"].append(d)
                        _log(d)
                del bank
                gc.collect()  # a bank's captured graphs go with it
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        del model, banks
    if dev.type == "cuda":
        cfg = TINY if tiny else QWEN3_4B
        for n in (32768, 131072):
            d = {"model": "qwen3-4b", "tokens": n, "sdpa_causal_ms_per_layer": dense_attention_ms(cfg, n, dev, dtype)}
            result["dense"].append(d)
            _log(d)
    save()
    plot(result, out.with_suffix(".png"))
    return result


def _setup(name: str, dev: torch.device, dtype: torch.dtype, base_tokens: int, s: Settings, tiny: bool):
    """The model and a function: memory tokens -> the banks to measure at that size."""
    if name == "qwen3-4b":
        model = random_model(TINY if tiny else QWEN3_4B, dev, dtype)
        return model, functools.partial(_qwen_banks, model, s=s)
    if name == "smollm2":
        from ..model.load import load_model

        model, tok = load_model(None, str(dev), "bfloat16" if dev.type == "cuda" else "float32")
        return model, functools.partial(_smollm2_banks, _essay_bank(model, tok, base_tokens))
    raise ValueError(f"model {name!r}: expected qwen3-4b or smollm2")


def _qwen_banks(model, n: int, s: Settings):
    """bf16 routing keys, then the same bank with fp8 keys; K̄/V̄ on the device when they fit, else fp8 in pinned
    host memory."""
    dev = model.device
    cfg = model.config
    chunks = n // model.msa_config.pooling_kernel_size
    content = 2 * len(model.router_layers) * chunks * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 2**40
    tier, cdt = ("device", "model") if content < free * 0.4 else ("host", "fp8")
    bank = random_bank(model, n, s, "model", cdt, tier)
    yield bank, True
    bank.set_key_dtype("fp8")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    yield bank, True


def _smollm2_banks(base: MemoryBank, n: int):
    for kd in ("model", "fp8"):
        yield real_bank(base, n, kd), kd == "model"


def _essay_bank(model, tok, tokens: int) -> MemoryBank:
    """About `tokens` of real text (the essay haystack, in ~1,000-token documents), encoded once."""
    from ..tasks.haystacks import paul_graham_essays

    words = paul_graham_essays().split()
    docs, i, chars = [], 0, 0
    while chars < tokens * 4:  # ~4 characters per token
        docs.append(" ".join(words[i % len(words):i % len(words) + 700]))
        chars += len(docs[-1])
        i += 700
    return MemoryBank.build(model, tok, docs, tier="device")


def plot(result: dict, path: Path) -> None:
    """Routing ms and TTFT against memory tokens, with the routing floors."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = sorted({(p["model"], p["key_dtype"]) for p in result["points"]})
    for model, kd in series:
        pts = sorted((p for p in result["points"] if (p["model"], p["key_dtype"]) == (model, kd)),
                     key=lambda p: p["tokens"])
        x = [p["tokens"] for p in pts]
        line, = axes[0].plot(x, [p["routing_ms"] for p in pts], "o-", label=f"{model} {kd} keys (fused)")
        axes[0].plot(x, [p["routing_floor_ms"] for p in pts], ":", color=line.get_color(), label=f"{model} {kd} floor")
        if all("routing_ms_torch" in p for p in pts):
            axes[0].plot(x, [p["routing_ms_torch"] for p in pts], "x--", color=line.get_color(),
                         label=f"{model} {kd} (PyTorch)")
        axes[1].plot(x, [p["ttft_ms"] for p in pts], "o-", label=f"{model} {kd} keys")
    for ax, title in zip(axes, ["routing ms per round", "time to first token (ms)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("memory tokens")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"memsparse speed, {result.get('gpu')} ({result.get('date')}, {result.get('commit')})")
    save_figure(fig, path)
