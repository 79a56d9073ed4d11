"""`memsparse bench`: speed at 1M-100M tokens of memory against the hardware floors (one process or Memory
Parallel), and what batching across clients buys."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import ranks
from . import results_path


def cmd_bench(args: argparse.Namespace) -> None:
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: expected at least 1")
    if args.world_size is not None:
        return _bench_parallel(args)
    if args.what == "serve":
        return _bench_serve(args)
    from ..eval.speed import Settings, run

    if ranks.launched():
        raise ValueError("bench speed under a distributed launch: pass --world-size (the launch's number of ranks)")
    out = results_path(args.out, "speed.json")
    res = run(Path(out), _sizes(args.tokens or "1048576,10485760,104857600"),
              (args.models or "qwen3-4b,smollm2").split(","),
              Settings(repeats=args.repeats), tiny=args.tiny)
    print(f"{'model':<9} {'tokens':>10} {'keys':>4} {'route ms':>8} {'floor':>7} {'torch':>7} {'TTFT':>7} "
          f"{'dec ms':>6} {'floor':>6} {'GPU GB':>6} {'host GB':>7}")
    for p in res["points"]:
        print(f"{p['model']:<9} {p['tokens']:>10} {p['key_dtype']:>4} {p['routing_ms']:>8} "
              f"{p['routing_floor_ms']:>7} {p.get('routing_ms_torch', '-'):>7} {p['ttft_ms']:>7} "
              f"{p['decode_ms_per_token']:>6} {p['decode_floor_ms']:>6} {p['gpu_gb']:>6} {p['host_gb']:>7}")
    print(f"wrote {out}")


def _sizes(spec: str) -> list[int]:
    try:
        sizes = [int(t) for t in spec.split(",")]
    except ValueError:
        raise ValueError(f"--tokens {spec!r}: expected memory sizes in tokens, comma separated") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--tokens {spec!r}: expected positive sizes")
    return sizes


def _bench_serve(args: argparse.Namespace) -> None:
    from ..eval.serving import Settings, run

    sizes = _sizes(args.tokens or str(Settings.tokens))
    if len(sizes) != 1:
        raise ValueError(f"--tokens {args.tokens}: bench serve measures one memory size")
    out = results_path(args.out, "serve.json")
    res = run(Path(out), Settings(tokens=sizes[0], repeats=args.repeats), tiny=args.tiny)
    print(f"{res['model']} at {res['tokens']} tokens on {res['gpu']}")
    for r in res["routing"]:
        print(f"  routing, {r['keys']:>7} keys, batch {r['batch']:>2}: {r['routing_ms']:>9} ms ({r['routing_timer']})")
    print(f"  server on {res['server_keys']} routing keys")
    for r in res["server"]:
        print(f"  server, {r['clients']:>2} clients: {r['requests_per_s']:>7} requests/s, "
              f"{r['decoded_tokens_per_s']:>8} tokens/s, p50 {r['latency_s']['p50']} s")
    print(f"  batch {res['routing'][-1]['batch']} routes in {res['routing_ratio']}x the time of one question "
          f"({res['routing_ratio_fp8']}x with fp8 keys); "
          f"{res['server'][-1]['clients']} clients get {res['throughput_ratio']}x one client's throughput")
    print(f"wrote {out}")


def _bench_parallel(args: argparse.Namespace) -> None:
    from ..eval.speed import Settings
    from ..eval.speed_parallel import run

    if args.models not in (None, "qwen3-4b"):
        raise ValueError("--world-size: --models qwen3-4b only (random weights and banks)")
    if args.what != "speed":
        raise ValueError("--world-size: bench speed only")
    out = results_path(args.out, "speed.json").with_name(f"speed_parallel_{args.world_size}.json")
    res = run(out, _sizes(args.tokens or "1048576,10485760,104857600"), Settings(repeats=args.repeats), args.tiny,
              args.world_size)
    if res is None:  # ranks > 0
        return
    print(f"{'ranks':>5} {'tokens':>10} {'keys':>4} {'route ms':>8} {'floor':>7} {'collect':>7} {'gather':>7} "
          f"{'TTFT':>7} {'dec ms':>6}")
    for p in res["points"]:
        print(f"{p['world_size']:>5} {p['tokens']:>10} {p['key_dtype']:>4} {p['routing_ms']:>8} "
              f"{p['routing_floor_ms']:>7} {p['collectives_ms']:>7} {p['gather_ms']:>7} {p['ttft_ms']:>7} "
              f"{p['decode_ms_per_token']:>6}")
    from ..eval.meta import pyplot

    png = out.with_name("speed_parallel.png")
    drawn = f" and {png} (every speed_parallel_*.json there)" if pyplot() else " (no plot: matplotlib is not installed)"
    print(f"wrote {out}{drawn}")


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    b = sub.add_parser("bench", help="speed at 1M-100M tokens of memory against the hardware floors, or what batching "
                                     "across clients buys (GPU)", formatter_class=fmt,
                       description="speed: routing, time to first token and decode against the memory size, next to "
                                   "their floors. serve: routing ms for a batch of 1 vs 8 questions at one memory "
                                   "size, and the server's throughput with 1 vs 8 concurrent clients (Qwen3-4B "
                                   "geometry, random weights). The figures that count come from a GPU: on an H100, "
                                   "'memsparse bench serve --tokens 104857600' (100M tokens); on a CPU use --tiny "
                                   "and small --tokens, a smoke test whose timings mean nothing.")
    b.add_argument("what", choices=["speed", "serve"])
    b.add_argument("--tokens", help="memory sizes, comma separated (speed: default 1048576,10485760,104857600; "
                                    "serve: one size, default 104857600)")
    b.add_argument("--models", help="speed: qwen3-4b (random weights), smollm2 (shipped); default both "
                                    "(--world-size: qwen3-4b only)")
    b.add_argument("--repeats", type=int, default=5, help="timed rounds per point")
    b.add_argument("--tiny", action="store_true", help="a tiny random geometry instead of Qwen3-4B (smoke test)")
    b.add_argument("--world-size", type=int, metavar="N",
                   help="speed: Memory Parallel over N ranks (this torchrun launch's, else N spawned: one per GPU, or "
                        "CPU processes over gloo): routing, K̄/V̄ gather, TTFT and decode per point, written to "
                        "speed_parallel_N.json beside --out")
    b.add_argument("--out", help="default: memsparse-results/speed.json or serve.json under the working "
                                    "directory")
    b.set_defaults(func=cmd_bench)
