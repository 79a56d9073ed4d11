"""`memsparse serve` under a distributed launch: rank 0 serves HTTP over a memory sharded over the ranks
(memory/parallel.py); the other ranks follow its engine work.

Every operation that is collective over the ranks (answers and routing: every rank runs the forward; adding and
deleting documents, committing, reopening after another process's commit) is run by rank 0's engine worker, one at
a time, as a `Mirror` call: rank 0 broadcasts the operation and its arguments, then every rank runs it; ranks > 0
sit in `Mirror.follow`, receiving operations until rank 0 sends "stop". Reads of the replicated document table
(/v1/memory/documents, /v1/memory/info) stay on rank 0. While idle, rank 0 sends "ping" every HEARTBEAT seconds so
the followers' waits never reach the process group's timeout.

A request given up (client gone, --timeout) is not stopped midway: every rank runs it to its end (a rank stopping
alone would leave the others in a collective).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch.distributed as dist

from ..engine.engine import MSAEngine
from ..memory.parallel import ShardedBank, read_index
from ..memory.store import writer
from ..ranks import share
from .server import WRITE_WAIT, ApiError, Service, Settings

HEARTBEAT = 60.0  # seconds


class Mirror:
    """Rank 0's collective engine work, run by every rank in the same order."""

    def __init__(self, engine: MSAEngine, path: str | Path):
        self.engine, self.path = engine, Path(path)
        self.rank = dist.get_rank()
        self.lock = threading.Lock()  # one operation at a time (the heartbeat comes between them)
        self._stopped = threading.Event()

    @property
    def bank(self) -> ShardedBank:
        return self.engine.bank

    def __call__(self, op: str, *args):
        """On rank 0: run `op` on every rank; its result (rank 0's)."""
        with self.lock:
            if self._stopped.is_set():
                raise RuntimeError("the ranks were stopped")
            share((op, args))
            return self._run(op, args)

    def follow(self) -> None:
        """On ranks > 0: run rank 0's operations until it sends "stop". Failures are rank 0's to report (each rank
        runs the same operation on the same arguments and fails alike)."""
        while True:
            op, args = share(None)
            if op == "stop":
                return
            try:
                self._run(op, args)
            except Exception:  # noqa: BLE001, S110  (rank 0 answers the request with its own, identical error)
                pass

    def heartbeat(self) -> threading.Thread:
        """On rank 0: a thread sending "ping" while idle, until `stop`."""
        def beat():
            while not self._stopped.wait(HEARTBEAT):
                if self.lock.acquire(blocking=False):
                    try:
                        if not self._stopped.is_set():
                            share(("ping", ()))
                    finally:
                        self.lock.release()

        t = threading.Thread(target=beat, name="memsparse-heartbeat", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """On rank 0: release the other ranks (once; ranks already gone are not waited for)."""
        with self.lock:
            if not self._stopped.is_set():
                self._stopped.set()
                with contextlib.suppress(RuntimeError):  # a rank killed meanwhile: the launcher ends the others
                    share(("stop", ()))

    def _run(self, op: str, args: tuple):
        e, bank = self.engine, self.bank
        if op == "ask":
            questions, kw = args
            return e.ask_batch(questions, **kw)
        if op == "route":
            return e.route_batch(*args)
        if op == "add":
            texts, names = args
            ids = bank.add(texts, names=names)
            bank.save(self.path)
            return ids
        if op == "delete":
            bank.delete(list(args))
            bank.save(self.path)
            return None
        if op == "reopen":
            fresh = ShardedBank.load(self.path, bank.model, bank.tok)
            fresh.shard.fused_routing = bank.shard.fused_routing
            e.bank = fresh
            return None
        if op == "ping":
            return None
        raise ValueError(f"unknown operation {op!r}")


class ShardedService(Service):
    """The server's bank operations (rank 0) over a `ShardedBank`, collective ones through a `Mirror`. Document
    changes are committed to the bank's directory under its write lock; every request first follows commits other
    processes made (the index's commit number)."""

    def __init__(self, mirror: Mirror, settings: Settings):
        self.mirror, self.engine, self.settings = mirror, mirror.engine, settings

    @property
    def bank(self) -> ShardedBank:
        return self.mirror.bank  # the current one (a reopen replaces it on every rank)

    def follow(self) -> None:
        """Reopen the bank on every rank if another process committed to it since (under its write lock, so that
        no commit is half written meanwhile)."""
        if read_index(self.mirror.path)["commit"] != self.bank.commit:
            with writer(self.mirror.path, timeout=WRITE_WAIT):
                self.mirror("reopen")

    def ask(self, questions: list[str], kw: dict, budgets: list[int], cancels: list, on_text) -> list:
        """Not cancelled midway, nor streamed: the text comes with the answers (see the module's doc)."""
        self.follow()
        return self.mirror("ask", questions, {**kw, "max_new_tokens": budgets, "batch_size": len(questions)})

    def continuous(self, kw: dict) -> None:
        """No continuous batching: the ranks follow the engine one operation at a time."""
        return None

    def route_batch(self, questions: list[str]) -> list[dict]:
        self.follow()
        return self.mirror("route", questions)

    def write(self, op: str, *args, check=None):
        """`op` on every rank, committed, as the bank's one writer on its latest commit; `check(bank)` first."""
        with writer(self.mirror.path, timeout=WRITE_WAIT):
            self.follow()
            if check is not None:
                check(self.bank)
            try:
                return self.mirror(op, *args)
            except BaseException:
                self.mirror("reopen")  # what did not commit is not served
                raise

    def add(self, texts: list[str], names: list[str] | None) -> dict:
        return {"ids": self.write("add", texts, names)}

    def delete(self, d: int) -> dict:
        def check(bank):
            if d not in bank:
                raise ApiError(404, f"no document {d} in the bank", code="document_not_found")

        self.write("delete", d, check=check)
        return {"id": d, "deleted": True}

    def info(self) -> dict:
        bank, model = self.bank, self.bank.model
        docs = bank.doc_ids()
        return {"documents": len(docs), "tokens": sum(bank.token_count(d) for d in docs), "chunks": sum(bank.loads()),
                "ranks": bank.world, "chunks per rank": bank.loads(), "routing keys": bank.shard.key_dtype,
                "document keys/values": bank.shard.content_dtype, "tier": bank.tier,
                "router layers": list(model.router_layers), "top_k": model.msa_config.engine_top_k,
                "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
                "directory": str(self.mirror.path), "commit": bank.commit}
