"""`memsparse bench serve`: what batching across clients buys, for the Qwen3-4B geometry (random weights, a bank of
random tensors of the right shapes and dtypes, as `bench speed`) at one memory size.

- Routing: ms per routing round (scoring + top-k in every router layer, timed as `bench speed` times it) for a
  batch of 1 question and of 8; the fused kernel reads each routing key once per batch, so the ratio should stay
  near 1 while the keys' bytes dominate (issue 33's target at 100M tokens on an H100: batch 8 within 1.5x).
- Both with the routing keys in the model's dtype (bf16 on a GPU) and in fp8 (the same bank, half the key bytes).
- Server: on the fp8-key bank (with bf16 keys at 100M tokens 8 clients' rows ran an H100 out of memory,
  2026-12-07), `memsparse serve`'s app on uvicorn (a real socket, greedy completions of `max_tokens` tokens, the
  server's default router injection) with 1 and with 8 concurrent clients: requests/s, decoded tokens/s and latency
  percentiles (target on a GPU: 8 clients at least 4x one client's throughput).

On a GPU (the figures that count):  memsparse bench serve --tokens 104857600
On a CPU, a smoke test of the code path (its timings mean nothing):  memsparse bench serve --tiny --tokens 65536
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..serve.load import clients_at_once, latency_percentiles
from .meta import run_meta
from .speed import QWEN3_4B, TINY, _qwen_banks, random_model, time_query
from .speed import Settings as SpeedSettings


@dataclass
class Settings:
    tokens: int = 104857600  # memory size
    batch: tuple[int, ...] = (1, 8)  # routing batch sizes, and concurrent clients
    q_len: int = 48  # routing tokens per question (routing)
    repeats: int = 5  # timed routing rounds per batch size (after one warm-up)
    requests: int = 4  # per client (server)
    max_tokens: int = 32  # tokens each completion decodes
    doc_len: int = 1024  # tokens per random document


def routing(bank, s: Settings, keys: str) -> list[dict]:
    """Routing ms per round for each batch size, the bank's routing keys named `keys`."""
    speed = SpeedSettings(q_len=s.q_len, repeats=s.repeats, doc_len=s.doc_len)
    out = []
    for b in s.batch:
        t = time_query(bank, speed, batch=b, decode=False)
        out.append({"keys": keys, "batch": b, "routing_ms": t["routing_ms"], "routing_timer": t["routing_timer"],
                    "routing_ms_per_question": round(t["routing_ms"] / b, 4)})
    return out


def _ratio(rows: list[dict]) -> float:
    """The largest batch's routing time over one question's."""
    return round(rows[-1]["routing_ms"] / rows[0]["routing_ms"], 3)


def throughput(engine, s: Settings, done=lambda rows: None) -> list[dict]:
    """The server on a local socket, driven by 1 and by 8 concurrent clients (each client: one untimed request,
    then `s.requests` timed ones): a row per client count, `done(rows so far)` called after each."""
    import httpx
    import uvicorn

    from ..serve import Settings as ServeSettings
    from ..serve import create_app

    settings = ServeSettings(max_batch=max(s.batch), max_queue=4 * max(s.batch), max_new_tokens=s.max_tokens,
                             timeout=600)
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    rows = []
    try:
        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=4 * max(s.batch))) as http:
            for clients in s.batch:
                _drive(http, url, clients, 1, s.max_tokens)  # warm-up: this batch size's graphs and kernels
                rows.append({"clients": clients, **_drive(http, url, clients, s.requests, s.max_tokens)})
                done(rows)
    finally:
        server.should_exit = True
        thread.join(60)
    return rows


def _drive(http, url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `requests` completions in turn: wall time, requests/s, decoded tokens/s
    (max_tokens a request: random weights never write a stop token, as `finish_length` shows), latency percentiles.
    A failed request raises."""
    latencies, finishes, errors = [], [], []

    def one(n: int, i: int) -> None:
        t0 = time.perf_counter()
        r = http.post(url, json={"model": "memsparse", "prompt": f"Where is item {n}.{i}?", "max_tokens": max_tokens})
        if r.status_code != 200:
            errors.append(f"{r.status_code}: {r.text[:200]}")
            return
        latencies.append(time.perf_counter() - t0)
        finishes.append(r.json()["choices"][0]["finish_reason"])

    wall = clients_at_once(clients, requests, one)
    if errors:
        raise RuntimeError(f"bench serve: {len(errors)} requests failed, the first: {errors[0]}")
    n = len(latencies)
    return {"requests": n, "wall_s": round(wall, 3), "requests_per_s": round(n / wall, 3),
            "decoded_tokens_per_s": round(n * max_tokens / wall, 1),
            "finish_length": round(finishes.count("length") / len(finishes), 3),
            "latency_s": latency_percentiles(latencies)}


def _stage(out: Path, result: dict, line: str) -> None:
    """One stage done: its line on stderr, and `out` rewritten with what is measured so far ("partial" names the
    last stage), so that a run cut short still leaves its figures."""
    print(f"bench serve: {line}", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "partial": line}, indent=1) + "\n")


def _require_server_stack() -> None:
    """The server stage's packages (uvicorn, fastapi: dependencies; httpx, its clients: the `eval` extra) importable,
    else one line naming the missing ones."""
    import importlib.util

    from ..resources import ResourceUnavailable

    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        raise ResourceUnavailable(f"bench serve needs {', '.join(missing)} for its server stage: pip install "
                                  f"{' '.join(missing)} (httpx comes with memsparse[eval])")


def run(out: Path, s: Settings, tiny: bool = False) -> dict:
    """Measure routing and server throughput; write `out` (JSON, with gpu, date and commit), after each stage
    too."""
    from ..engine import MSAEngine
    from ..model.tokenizer import build_qwen_tokenizer

    if s.tokens < s.doc_len:
        raise ValueError(f"--tokens {s.tokens}: expected at least one document ({s.doc_len} tokens)")
    _require_server_stack()  # before minutes of bank building, not after
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tok = build_qwen_tokenizer()  # Qwen3's tokenizer: its ids fit the geometry's vocabulary (TINY's widened to it)
    model = random_model({**TINY, "vocab_size": QWEN3_4B["vocab_size"]} if tiny else QWEN3_4B, dev, dtype)
    t0 = time.perf_counter()
    banks = _qwen_banks(model, s.tokens, SpeedSettings(doc_len=s.doc_len))
    bank, _ = next(banks)  # routing keys in the model's dtype
    keys = "bf16" if dtype == torch.bfloat16 else "float32"
    result = {**run_meta(), "model": "tiny" if tiny else "qwen3-4b", "tokens": s.tokens, "key_dtype": keys,
              "tier": bank.tier, "settings": asdict(s) | {"batch": list(s.batch)}}
    _stage(out, result, f"a bank of {s.tokens:,} tokens ({bank.tier} tier) in {time.perf_counter() - t0:.1f} s")
    result["routing"] = routing(bank, s, keys)
    result["routing_ratio"] = _ratio(result["routing"])
    _stage(out, result, f"routing with {keys} keys: batch {s.batch[-1]} in {result['routing_ratio']}x one's time")
    bank, _ = next(banks)  # the same bank, fp8 routing keys
    fp8 = routing(bank, s, "fp8")
    result["routing"] += fp8
    result["routing_ratio_fp8"] = _ratio(fp8)
    _stage(out, result, f"routing with fp8 keys: batch {s.batch[-1]} in {result['routing_ratio_fp8']}x one's time")
    result["server_keys"] = "fp8"

    def served(rows: list[dict]) -> None:
        result["server"] = rows
        _stage(out, result, f"server, {rows[-1]['clients']} clients: {rows[-1]['requests_per_s']} requests/s")

    result["server"] = throughput(MSAEngine(model, tok, bank, similarity="official"), s, served)
    first, last = result["server"][0], result["server"][-1]
    result["throughput_ratio"] = round(last["requests_per_s"] / first["requests_per_s"], 3)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result
