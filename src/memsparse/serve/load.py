"""Concurrent clients against a running `memsparse serve`, with the official `openai` client: every request's
outcome and latency, and the percentiles.

    python -m memsparse.serve.load http://127.0.0.1:8080/v1 --clients 8 --requests 3 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time


def clients_at_once(clients: int, requests: int, one) -> float:
    """`clients` threads, client n calling `one(n, i)` for i in range(requests) in turn; the wall time (s)."""
    def worker(n: int) -> None:
        for i in range(requests):
            one(n, i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def latency_percentiles(latencies: list[float]) -> dict:
    """p50, p90, p99 and max of `latencies` (s; nan / None when there are none)."""
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 4) if lat else float("nan")

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": round(lat[-1], 4) if lat else None}


def run_load(base_url: str, api_key: str = "none", clients: int = 8, requests: int = 3, model: str = "memsparse",
             max_tokens: int = 8, http_client=None) -> dict:
    """`clients` threads, each sending `requests` requests in turn (chat, completion, streamed chat, ...).
    Returns {"requests", "failures": [str], "latency_s": {"p50", "p90", "p99", "max"}}."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600, http_client=http_client)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one(n: int, i: int) -> None:
        question = f"Where is Paris? ({n}.{i})"
        start = time.perf_counter()
        try:
            kind = (n + i) % 3
            if kind == 0:
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                   max_tokens=max_tokens)
                ok = r.choices[0].finish_reason in ("stop", "length")
            elif kind == 1:
                r = client.completions.create(model=model, prompt=question, max_tokens=max_tokens)
                ok = r.choices[0].finish_reason in ("stop", "length")
            else:
                chunks = list(client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, stream=True))
                ok = chunks[-1].choices[0].finish_reason in ("stop", "length")
            if not ok:
                raise RuntimeError("no finish reason")
        except Exception as e:  # noqa: BLE001  (every failure is counted and reported)
            with lock:
                failures.append(f"client {n} request {i}: {type(e).__name__}: {e}")
            return
        with lock:
            latencies.append(time.perf_counter() - start)

    wall = clients_at_once(clients, requests, one)
    return {"requests": clients * requests, "succeeded": len(latencies), "failures": failures, "wall_s": round(wall, 3),
            "latency_s": latency_percentiles(latencies)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base_url", help="e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default=os.environ.get("MEMSPARSE_API_KEY", "none"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=3, help="per client")
    p.add_argument("--model", default="memsparse")
    p.add_argument("--max-tokens", type=int, default=8)
    a = p.parse_args()
    out = run_load(a.base_url, a.api_key, a.clients, a.requests, a.model, a.max_tokens)
    print(json.dumps(out, indent=1))
    raise SystemExit(1 if out["failures"] else 0)


if __name__ == "__main__":
    main()
