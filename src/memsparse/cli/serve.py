"""`memsparse serve`: answer questions from a bank over HTTP (OpenAI-compatible API), in one process or over the
ranks of a distributed launch."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .. import ranks
from . import EXAMPLES, _config, _config_args, _model_args
from .bank import _open_bank, _sharded_bank


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    from ..engine import MSAEngine
    from ..serve import Settings, create_app

    settings = Settings(
        host=args.host, api_key=args.api_key or os.environ.get("MEMSPARSE_API_KEY") or None,
        allow_hosts=args.allow_host or [], model_name=args.model_name, max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * (1 << 20)), max_doc_bytes=int(args.max_doc_mb * (1 << 20)),
        max_new_tokens=args.max_new_tokens, max_question_tokens=args.max_question_tokens,
        max_router_rounds=args.max_router_rounds, timeout=args.timeout, max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms)
    try:
        settings.check()
    except ValueError as e:
        sys.exit(f"memsparse serve: {e}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # one JSON line per request on stderr
    from ..memory.parallel import is_sharded

    if ranks.launched() or is_sharded(args.bank):
        return _serve_sharded(args, settings)
    bank = _open_bank(args)
    engine = MSAEngine(bank.model, bank.tok, bank, _config(args))
    _listen(args, settings, create_app(engine, settings), f"{bank.num_docs} documents")


def _listen(args: argparse.Namespace, settings, app, what: str) -> None:
    """Serve `app` on --host:--port until Ctrl-C / SIGTERM."""
    import socket

    from ..serve import serve

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        sock = socket.create_server((args.host.strip("[]"), args.port), family=family, backlog=2048)
    except OSError as e:
        sys.exit(f"memsparse serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    keyed = " with an API key" if settings.api_key else ""
    print(f"serving {args.bank} ({what}) as model {settings.model_name!r} on "
          f"http://{shown}:{port}/v1 (OpenAI API; /v1/memory/...; /health, /metrics){keyed}; Ctrl-C stops",
          file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        serve(app, sock, settings, max_connections=args.max_connections)


def _serve_sharded(args: argparse.Namespace, settings) -> None:
    """`serve` over a bank over ranks: rank 0 serves HTTP, the other ranks follow its engine work
    (serve/parallel.py)."""
    from ..engine import MSAEngine
    from ..serve import create_app
    from ..serve.parallel import Mirror, ShardedService

    with _sharded_bank(args) as bank:
        mirror = Mirror(MSAEngine(bank.model, bank.tok, bank, _config(args)),
                        args.bank)
        if bank.rank > 0:  # Ctrl-C / SIGTERM reach every rank of a launch: rank 0 stops, then releases the others
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            return mirror.follow()
        try:
            mirror.heartbeat()
            app = create_app(mirror.engine, settings, ShardedService(mirror, settings))
            _listen(args, settings, app, f"{bank.num_docs} documents over {bank.world} ranks")
        finally:
            mirror.stop()


def register(sub) -> None:
    from ..serve.settings import Settings as ServeSettings

    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("serve", help="answer questions from a bank over HTTP (OpenAI-compatible API)",
                       epilog=EXAMPLES, formatter_class=fmt)
    s.add_argument("bank")
    _model_args(s, "the model the bank was encoded with")
    d = ServeSettings()  # the one source of the flags' defaults
    s.add_argument("--host", default=d.host,
                   help="address to listen on (default: this machine only; any other needs an API key)")
    s.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    s.add_argument("--api-key", help="clients send 'Authorization: Bearer KEY' (default: $MEMSPARSE_API_KEY)")
    s.add_argument("--allow-host", action="append", metavar="NAME",
                   help="a Host name served besides the bound address and localhost (repeatable; '*': any)")
    s.add_argument("--model-name", default=d.model_name, help="the model id of /v1/models (default: %(default)s)")
    s.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting for the engine; more get 429")
    s.add_argument("--max-connections", type=int, default=256, help="open connections; more get 503")
    s.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / (1 << 20),
                   help="refuse larger request bodies (413)")
    s.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="the most max_tokens a request may ask")
    s.add_argument("--max-question-tokens", type=int, default=d.max_question_tokens, help="refuse longer questions")
    s.add_argument("--max-router-rounds", type=int, default=d.max_router_rounds,
                   help="the most router_rounds a request may ask")
    s.add_argument("--timeout", type=float, default=d.timeout, help="seconds from arrival to answer (504 past it)")
    s.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="questions answered together in one engine batch; while it decodes, requests that arrive "
                        "join it (continuous batching, one-round answers) (1: one at a time; default %(default)s)")
    s.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                   help="how long a request waits for others to start a batch with it (default %(default)s)")
    s.add_argument("--max-doc-mb", type=float, default=d.max_doc_bytes / (1 << 20), help="refuse larger documents")
    _config_args(s)  # the engine's, and the completions' defaults
    s.set_defaults(func=cmd_serve)
