"""The bank commands: `encode`, `ask`, `docs` (add / delete / list / compact / verify), `fsck` and `info`, in one
process or over the ranks of a distributed launch (Memory Parallel)."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
from pathlib import Path

from .. import cli, ranks
from ..model.load import SHIPPED
from . import _config, _config_args, _model_args, _priors_arg, _status, _wait_arg


def _bank_model(args: argparse.Namespace, device: str | None = None):
    """The model (and tokenizer) a bank was encoded with: --model, or the one its manifest names (a bank over ranks:
    its rank 0's); on `device`, else --device."""
    from ..memory.parallel import is_sharded, read_rank_manifest
    from ..memory.store import encoding_dtype, read_manifest

    manifest = read_rank_manifest(args.bank) if is_sharded(args.bank) else read_manifest(args.bank)
    model_path = args.model or manifest.get("meta", {}).get("model")
    return cli._load_model(model_path, device or args.device, args.dtype or encoding_dtype(manifest))


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
    model, tok = cli._load_model(args.model, args.device, args.dtype)
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
    from ..memory.edits import add_documents, update

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
    if args.action == "add":  # encoded outside the write lock, committed on the latest commit (edits.add_documents)
        model, tok = _bank_model(args)
        bank, ids = add_documents(args.bank, model, tok, texts, names, timeout=args.wait, progress=True)
        print(f"added documents {ids[0]}..{ids[-1]} to {args.bank} (commit {bank.commit})")
    elif args.action == "delete":  # as the bank's one writer, on its latest commit (edits.update)
        model, tok = _bank_model(args)
        ids = [int(x) for x in args.items]
        with update(args.bank, model, tok, timeout=args.wait) as bank:
            bank.delete(ids)
        print(f"deleted {len(ids)} documents from {args.bank} (commit {bank.commit})")
    elif args.action == "compact":  # as the bank's one writer, on its latest commit
        from ..memory.edits import compact

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
    model, tok = cli._load_model(args.model, dev, args.dtype)
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


def register(sub) -> None:
    """encode, ask, docs."""
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


def register_checks(sub) -> None:
    """fsck, info."""
    fmt = argparse.RawDescriptionHelpFormatter
    f = sub.add_parser("fsck", help="check every file of a bank (= docs verify)", formatter_class=fmt)
    f.add_argument("bank")
    f.set_defaults(func=cmd_verify)

    i = sub.add_parser("info", help="summarise a bank", formatter_class=fmt)
    i.add_argument("bank")
    i.set_defaults(func=cmd_info)
