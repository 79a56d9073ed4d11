"""`memsparse serve`: one MSA engine and its memory bank behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

OpenAI-compatible (the `openai` client works with base_url=http://HOST:PORT/v1; the memory answers from the bank):

    GET  /v1/models                 the one model served ({"object": "list", "data": [{"id": MODEL, ...}]});
                                    GET /v1/models/{id}: that model (404 for any other; so is a request naming one)
    POST /v1/chat/completions       the last user message is the question (system and earlier turns are not read);
                                    max_tokens | max_completion_tokens, temperature, top_p, seed, stop, stream
    POST /v1/completions            prompt: the question (a string, or a list of them: one choice each)

    Both take memsparse's own fields beside OpenAI's (extra_body= in the openai client): "interleave" ("model" |
    "router" | "off"; default the server's --interleave), "inject_k", "router_rounds"; every answer carries a
    "memsparse" object: {"rounds": documents read in each round, "routing": the first round's routing, "timings"}.
    `stream: true` answers with Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`: the
    answer's text is sent as the engine decodes it (the text after the answer marker; while the model may still be
    writing the marker, nothing); the first chunk carries the role, the last the finish reason. The status line
    leaves with the first text: a refusal before it is an HTTP error, one after it an `{"error": ...}` event.

Memory:

    GET    /v1/memory/documents?offset=0&limit=100   {"object": "list", "total", "offset", "data": [{"id", "name",
                                                      "tokens", "text" (cut to 200 characters)}]}
    POST   /v1/memory/documents  {"texts": [str], "names": [str]} -> {"ids": [...]}   (committed to the bank)
    GET    /v1/memory/documents/{id}                 that document, whole
    DELETE /v1/memory/documents/{id}                 {"id", "deleted": true}            (committed to the bank)
    POST   /v1/memory/route      {"question": str} -> {"routing": {layer: [[doc id, score], ...]}} (best first)
    GET    /v1/memory/info       the bank: documents, tokens, chunks, dtypes, router layers, model
    GET    /health               {"status": "ok"} (no key needed)
    GET    /metrics              Prometheus text: requests by route and status, latency histogram, queue length

The stdlib server's routes map as: /info -> /v1/memory/info, /docs -> /v1/memory/documents[/{id}], /route ->
/v1/memory/route, /ask -> /v1/completions (the answer object's rounds and routing under "memsparse"),
/docs/add -> POST /v1/memory/documents, /docs/delete -> DELETE /v1/memory/documents/{id}.

Guards, before anything is read or run: the Host header must name the bound address, localhost or an --allow-host
name (DNS rebinding; any Host when bound to a wildcard address, where a key is required); a browser request from
another origin (an Origin header that is not http(s)://HOST) is refused 403; every route but /health needs
`Authorization: Bearer KEY` when a key is set (401), and a key is required to bind a non-loopback address; a POST
must be application/json (415: a text/plain form post from a web page changes nothing); bodies are read up to
--max-body-mb whatever Content-Length says (a negative or non-numeric one is 400, a larger one 413 unread).
Validation errors are 400 in OpenAI's error format {"error": {"message", "type", "param", "code"}}; NaN or
infinite numbers are refused there. Limits: question tokens, max_tokens (--max-new-tokens), inject_k,
router_rounds (400 past them).

Engine work (answers, routing, the bank's reads and changes) runs in one worker thread, which owns the engine:
the GPU decode graphs and the bank are not shared. Answers are batched across clients: the oldest waiting request
waits up to --batch-window-ms for others with the same sampling settings (max_tokens may differ; a seeded sampled
request goes alone), up to --max-batch questions, and the engine answers them together (routing, prefill and
decode in batches: one routing pass per batch, see ops/routing_triton.py). Answers in one round (interleave
"router" or "off") are batched continuously: while a batch decodes, waiting requests of its kind join it before
its next step, up to --max-batch questions, and each leaves with its answer (`engine.ask_continuous`).
/v1/memory/route requests are batched the same way among themselves (`engine.route_batch`). Other work runs
alone, in arrival order. Up to --max-queue
requests wait their turn; more get 429. A request that is not answered within --timeout seconds gets 504; a client
that goes away while its request waits leaves the queue, and one whose answer is being generated stops its
questions at their next token (the engine's per-question `cancel`) while the rest of the batch goes on.
Document changes are committed to the bank's directory (as the bank's one writer, on its latest commit) and every
request first follows commits other processes made (one that joins a running batch answers from the bank as
the batch found it); a bank another process is writing for over WRITE_WAIT
seconds is 503, so is a batch that runs the device out of memory; a damaged bank 500 (the server keeps
serving). One JSON line is logged per request (method,
path, status, latency). Text in questions and documents is plain text: special tokens never act as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ..engine.config import REMOVED, key_of
from ..engine.config import fields as retrieval_fields
from ..engine.engine import Cancelled, MSAEngine, Question
from ..memory.bank import MemoryBank
from ..memory.corpus import CorpusError, check_document
from ..memory.store import BankBusy, read_manifest, writer
from ..memory.table import BankError
from .settings import LOOPBACK_NAMES, Settings

log = logging.getLogger("memsparse.serve")
WRITE_WAIT = 30.0  # seconds a document change waits for another process writing the bank
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ApiError(Exception):
    """A refusal: status, message, OpenAI error type and code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.code, self.param)


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# --------------------------------------------------------------------------------------------- request models
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Sampling(_Body):
    """Sampling fields common to both completion routes."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data):
        """A removed retrieval option: refused, saying why."""
        gone = [k for k in REMOVED if isinstance(data, dict) and k in data]
        if gone:
            raise ValueError(f"{gone[0]} was removed: {REMOVED[gone[0]]}")
        return data


def _request_fields() -> dict:
    """The RetrievalConfig settings a request may set, as optional fields (absent: the engine's config)."""
    out = {}
    for f in retrieval_fields():
        if f.metadata["request"]:
            kind = Literal[tuple(f.metadata["choices"])] if f.metadata["choices"] else type(f.default)
            ge = f.metadata["minimum"]
            out[key_of(f)] = (kind | None, Field(None, ge=ge, description=f.metadata["help"]))
    return out


REQUEST_KEYS = tuple(key_of(f) for f in retrieval_fields() if f.metadata["request"])
Generation = create_model("Generation", __base__=_Sampling, __doc__="Sampling and memory fields common to both "
                          "completion routes (memory: RetrievalConfig's request settings)", **_request_fields())


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Generation):
    prompt: str | list[str]


class AddRequest(_Body):
    texts: list[str] = Field(min_length=1)
    names: list[str] | None = None


class RouteRequest(_Body):
    question: str


# --------------------------------------------------------------------------------------------- the engine queue
@dataclass(eq=False)
class Job:
    """One request's engine work: `work(cancel)` on its own, or (`work` None) its `questions` answered with `kw`
    (ask_batch's arguments), in a batch with other requests of the same `key` (None: a batch of its own).
    `on_text(i, text)`: its question i's answer text as it is decoded (called in the worker thread)."""

    work: Callable[[threading.Event], Any] | None = None
    questions: list[str] = field(default_factory=list)
    kw: dict = field(default_factory=dict)
    key: tuple | None = None
    on_text: Callable[[int, str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)


ROUTE = {"route": True}  # the kw of a /v1/memory/route job: routed in a batch with the others waiting


def batch_key(kw: dict) -> tuple | None:
    """Requests whose ask_batch arguments agree (max_new_tokens aside: each question has its own) share a batch;
    a seeded sampled request is answered alone (its random stream is its own). Routing requests share theirs."""
    if kw.get("temperature", 0) > 0 and kw.get("seed") is not None:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items() if k != "max_new_tokens"))


class EngineQueue:
    """Engine work in one worker thread, which owns the engine (the GPU decode graphs and the bank are not shared).
    Answers and routings are batched: the worker takes the oldest request and, for up to `window` seconds, gathers
    the waiting requests of the same batch key, up to `max_batch` questions, then runs them in one
    `answer(questions, kw, budgets, cancels, on_text)` call (routing, prefill and decode in batches). Other work runs
    alone, in arrival order. At most `max_queue` requests wait (429 past that)."""

    IDLE = 5.0  # seconds the worker thread waits for work before it exits (the next request starts another)

    def __init__(self, max_queue: int, answer: Callable | None = None, max_batch: int = 1, window: float = 0.0,
                 continuous: Callable[[dict], Callable | None] | None = None):
        self.max_queue, self.answer, self.max_batch, self.window = max_queue, answer, max_batch, window
        self.continuous = continuous
        self.jobs: deque[Job] = deque()
        self.running = 0  # requests in the engine now
        self.batches = 0  # engine batches run so far (answers)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for the engine."""
        return len(self.jobs)

    def submit(self, job: Job) -> None:
        """Queue `job` (429 when the queue is full)."""
        with self._cond:
            if (self.running or self.jobs) and len(self.jobs) >= self.max_queue:
                raise ApiError(429, f"the server is busy: {len(self.jobs)} requests are waiting for the engine (the "
                                    "limit, --max-queue); retry later", "rate_limit_error", "queue_full")
            self.jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="memsparse-engine", daemon=True)
                self._thread.start()
            self._cond.notify()

    def withdraw(self, job: Job) -> None:
        """Stop `job`: out of the queue if it waits there, else its questions end at their next token."""
        job.cancel.set()
        with self._cond:
            if job in self.jobs:
                self.jobs.remove(job)

    async def run(self, request: Request, job: Job, timeout: float, first: asyncio.Future | None = None):
        """Queue `job` and wait for its result (or, given `first`, for whichever of `first` and the result comes
        first: returns None when `first` did); 429 when the queue is full, 504 past `timeout` seconds, 499 when the
        client disconnects (the job withdrawn, its work stopped)."""
        self.submit(job)
        result = asyncio.wrap_future(job.future)
        deadline = asyncio.get_running_loop().time() + timeout
        await wait_for(request, job, self, {result} | ({first} if first else set()), deadline, timeout)
        return result.result() if result.done() else None

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self.jobs and not self._cond.wait_for(lambda: self.jobs, self.IDLE):
                    self._thread = None
                    return
                batch = [self.jobs.popleft()]
                self.running = 1
                if batch[0].work is None and batch[0].key is not None:
                    self._gather(batch)
            live = [j for j in batch if self._start(j)]
            run = live and live[0].work is None and live[0].key is not None and self.continuous
            run = run and self.continuous({k: v for k, v in live[0].kw.items() if k != "max_new_tokens"})
            try:
                if run:
                    self._run_continuous(live, run)
                else:
                    self._run(live)
            finally:
                with self._cond:
                    self.running = 0

    @staticmethod
    def _start(job: Job) -> bool:
        """Mark `job` running; False (and its future failed) when it was withdrawn meanwhile."""
        if not job.future.set_running_or_notify_cancel():
            return False
        if job.cancel.is_set():
            job.future.set_exception(Cancelled("the request was cancelled"))
            return False
        return True

    def _gather(self, batch: list[Job]) -> None:
        """Add waiting jobs of the first one's key, in arrival order, until `max_batch` questions or the window's end
        (called holding the lock; waiting releases it)."""
        end = time.monotonic() + self.window
        size = len(batch[0].questions)
        while True:
            for job in list(self.jobs):
                if job.work is None and job.key == batch[0].key and size + len(job.questions) <= self.max_batch:
                    self.jobs.remove(job)
                    batch.append(job)
                    size += len(job.questions)
            self.running = len(batch)
            left = end - time.monotonic()
            if size >= self.max_batch or left <= 0:
                return
            self._cond.wait(left)

    def _run_continuous(self, batch: list[Job], answer: Callable[[Callable, int], int]) -> None:
        """Continuous batching: `batch`'s questions start the engine's decode batch, and before every decode step
        waiting jobs of the same key join it, in arrival order (up to the first job of another kind, which then
        waits for the batch to drain), as far as its free rows allow; each job's answers go out as soon as its
        last question ends. Once the batch has emptied, the run ends: what comes next starts a batch of its own
        (gathered over the window). `answer(admit, slots)` is the engine's `ask_continuous`."""
        key, offered, inside, busy = batch[0].key, list(batch), [], [0]  # busy: questions in the engine

        def queries(job: Job) -> list[Question]:
            answers, left = [None] * len(job.questions), [len(job.questions)]

            def done(n: int, answer) -> None:
                answers[n] = answer
                left[0] -= 1
                busy[0] -= 1
                if not left[0]:
                    job.future.set_result(answers)
                    with self._cond:
                        self.running -= 1

            def text(n: int) -> Callable[[str], None] | None:
                if job.on_text is None:
                    return None
                return lambda t: None if job.cancel.is_set() else job.on_text(n, t)

            return [Question(q, done=lambda a, n=n: done(n, a), budget=job.kw["max_new_tokens"],
                          cancel=job.cancel, on_text=text(n)) for n, q in enumerate(job.questions)]

        def admit(n: int) -> list[Question]:
            out: list[Question] = []
            with self._cond:
                while (offered or self.jobs) and (busy[0] or offered):
                    job = offered[0] if offered else self.jobs[0]
                    if job.key != key or job.work is not None or len(job.questions) > n - len(out):
                        break
                    if offered:
                        offered.pop(0)
                    else:
                        self.jobs.popleft()
                        if not self._start(job):
                            continue
                        self.running += 1
                    inside.append(job)
                    out += queries(job)
                    busy[0] += len(job.questions)
            self.batches += bool(out)
            return out

        try:
            answer(admit, max(self.max_batch, sum(len(j.questions) for j in batch)))
        except BaseException as e:  # noqa: BLE001  (every request inside learns what happened)
            self._fail(inside + offered, e)

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        try:
            if batch[0].work is not None:
                batch[0].future.set_result(batch[0].work(batch[0].cancel))
                return
            owners = [(job, n) for job in batch for n in range(len(job.questions))]

            def on_text(i: int, text: str) -> None:
                job, n = owners[i]
                if job.on_text is not None and not job.cancel.is_set():
                    job.on_text(n, text)

            kw = {k: v for k, v in batch[0].kw.items() if k != "max_new_tokens"}
            self.batches += 1
            budgets = [job.kw.get("max_new_tokens") for job, _ in owners]  # (none for routing)
            answers = self.answer([q for job in batch for q in job.questions], kw, budgets,
                                  [job.cancel for job, _ in owners],
                                  on_text if any(job.on_text for job in batch) else None)  # (text costs a decode)
            for job in batch:
                job.future.set_result(answers[:len(job.questions)])
                answers = answers[len(job.questions):]
        except BaseException as e:  # noqa: BLE001  (every request of the batch learns what happened)
            self._fail(batch, e)

    @staticmethod
    def _fail(jobs: list[Job], e: BaseException) -> None:
        """Every unanswered job of a failed batch gets `e`; after running out of device memory, the failed
        batch's cached blocks are released for the batches that follow."""
        if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(e)


async def wait_for(request: Request, job: Job, queue: EngineQueue, futures: set, deadline: float,
                   timeout: float) -> None:
    """Wait until one of `futures` is done; 504 past `deadline` (loop time; the request's `timeout` seconds) and 499
    when the client disconnects (in both cases, and when the wait itself is cancelled, the job is withdrawn)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(futures | {gone}, timeout=max(deadline - asyncio.get_running_loop().time(), 0),
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        queue.withdraw(job)
        raise
    finally:
        gone.cancel()
    if done - {gone}:
        return
    queue.withdraw(job)
    for f in futures:
        f.cancel()  # (a wrapped future of a closed loop is never set)
    if gone in done:
        raise ApiError(499, "the client went away", "cancelled", "client_closed")
    raise ApiError(504, f"no answer within the server's {timeout:g} s timeout (--timeout)", "timeout_error", "timeout")


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the request's body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --------------------------------------------------------------------------------------------- the bank's operations
class Service:
    """The bank's operations over one engine (called in the engine's worker thread, one at a time)."""

    def __init__(self, engine: MSAEngine, settings: Settings):
        self.engine, self.bank, self.settings = engine, engine.bank, settings

    def follow(self) -> None:
        """Reopen the bank if another process committed to its directory since."""
        if self.bank.path is not None and read_manifest(self.bank.path).get("commit", 0) != self.bank.commit:
            self._reopen()

    def _reopen(self) -> None:
        old = self.bank
        bank = MemoryBank.load(old.path, old.model, old.tok, tier=old.tier)
        bank.fused_routing = old.fused_routing
        self.engine.bank = self.bank = bank

    def read(self, op):
        self.follow()
        return op()

    def ask(self, questions: list[str], kw: dict, budgets: list[int], cancels: list, on_text) -> list:
        """One batch of questions: `budgets` their max_new_tokens, `cancels` their cancel events, `on_text(i, text)`
        their decoded text as it comes."""
        return self.read(lambda: self.engine.ask_batch(questions, max_new_tokens=budgets, cancel=cancels,
                                                       on_text=on_text, batch_size=len(questions), **kw))

    def batch(self, questions: list[str], kw: dict, budgets: list, cancels: list, on_text) -> list:
        """One engine batch of the queue: routings (`kw` {"route": True}: `engine.route_batch`, one read of the
        routing keys for all) or answers (`ask`)."""
        if kw.get("route"):
            return self.route_batch(questions)
        return self.ask(questions, kw, budgets, cancels, on_text)

    def route_batch(self, questions: list[str]) -> list[dict]:
        return self.read(lambda: self.engine.route_batch(questions))

    def continuous(self, kw: dict) -> Callable[[Callable, int], int] | None:
        """Continuous batching of answers asked with `kw` where it fits (answers in one round: interleave 'router'
        or 'off'; not routings): `ask(admit, slots)` over the engine's `ask_continuous`; None: batches as gathered."""
        if kw.get("route") or kw.get("interleave", self.engine.config.interleave) == "model":
            return None
        kw = {k: v for k, v in kw.items() if k != "seed"}  # (a seeded sampled request never shares a batch)
        return lambda admit, slots: self.read(lambda: self.engine.ask_continuous(admit, slots, **kw))

    def write(self, change):
        """change(bank) as the bank's one writer on its latest commit, then committed (on a failed commit the bank
        is reopened: what did not commit is not served)."""
        if self.bank.path is None:
            return change(self.bank)
        with writer(self.bank.path, timeout=WRITE_WAIT):
            self.follow()
            out = change(self.bank)
            try:
                self.bank.save()
            except BaseException:
                self._reopen()
                raise
            return out

    def info(self) -> dict:
        bank, model = self.bank, self.bank.model
        docs = bank.doc_ids()
        return {"documents": len(docs), "tokens": sum(bank.token_count(d) for d in docs), "chunks": bank.num_chunks,
                "routing keys": bank.key_dtype, "document keys/values": bank.content_dtype, "tier": bank.tier,
                "router layers": list(model.router_layers), "top_k": model.msa_config.engine_top_k,
                "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
                "directory": str(bank.path) if bank.path else None, "commit": bank.commit}

    def document(self, d: int, cut: int | None = None) -> dict:
        text = self.bank.text(d) or ""
        return {"id": d, "name": self.bank.name(d), "tokens": self.bank.token_count(d),
                "text": text[:cut] if cut else text}

    def documents(self, offset: int, limit: int) -> dict:
        ids = self.bank.doc_ids()
        return {"object": "list", "total": len(ids), "offset": offset,
                "data": [self.document(d, 200) for d in ids[offset:offset + limit]]}

    def get(self, d: int) -> dict:
        if d not in self.bank:
            raise ApiError(404, f"no document {d} in the bank", code="document_not_found")
        return self.document(d)

    def add(self, texts: list[str], names: list[str] | None) -> dict:
        return {"ids": self.write(lambda bank: bank.add(texts, names=names))}

    def delete(self, d: int) -> dict:
        def change(bank):
            if d not in bank:
                raise ApiError(404, f"no document {d} in the bank", code="document_not_found")
            bank.delete([d])

        self.write(change)
        return {"id": d, "deleted": True}


# --------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Requests by route and status, a latency histogram per route, in Prometheus' text format."""

    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, list] = {}  # route -> [bucket counts..., sum, count]
        self.lock = threading.Lock()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(method, route, status)] += 1
            h = self.latency.setdefault(route, [0] * len(BUCKETS) + [0.0, 0])
            for i, b in enumerate(BUCKETS):
                h[i] += seconds <= b
            h[-2] += seconds
            h[-1] += 1

    def text(self, queue: EngineQueue) -> str:
        out = ["# HELP memsparse_requests_total HTTP requests answered, by method, route and status.",
               "# TYPE memsparse_requests_total counter"]
        with self.lock:
            for (method, route, status), n in sorted(self.requests.items()):
                out.append(f'memsparse_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            out += ["# HELP memsparse_request_seconds Time from request to response, by route.",
                    "# TYPE memsparse_request_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                for b, n in zip(BUCKETS, h):
                    out.append(f'memsparse_request_seconds_bucket{{route="{route}",le="{b:g}"}} {n}')
                out.append(f'memsparse_request_seconds_bucket{{route="{route}",le="+Inf"}} {h[-1]}')
                out.append(f'memsparse_request_seconds_sum{{route="{route}"}} {h[-2]:.6f}')
                out.append(f'memsparse_request_seconds_count{{route="{route}"}} {h[-1]}')
        out += ["# HELP memsparse_queue_waiting Requests waiting for the engine.",
                "# TYPE memsparse_queue_waiting gauge", f"memsparse_queue_waiting {queue.waiting}",
                "# HELP memsparse_engine_busy 1 while the engine runs requests.",
                "# TYPE memsparse_engine_busy gauge", f"memsparse_engine_busy {int(queue.running > 0)}",
                "# HELP memsparse_engine_requests Requests in the engine now (one batch).",
                "# TYPE memsparse_engine_requests gauge", f"memsparse_engine_requests {queue.running}",
                "# HELP memsparse_engine_batches_total Engine batches of answers run.",
                "# TYPE memsparse_engine_batches_total counter", f"memsparse_engine_batches_total {queue.batches}"]
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------- guards (ASGI)
class Guard:
    """Host, Origin, API key, content type and body size, checked before the app sees a request; the body is read
    here (at most max_body_bytes) and replayed to the app. Logs one JSON line and counts every request."""

    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.hosts = {h.lower() for h in settings.allow_hosts} | LOOPBACK_NAMES | {settings.host.strip("[]").lower()}
        self.any_host = settings.host in ("0.0.0.0", "::", "") or "*" in settings.allow_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            body = b""
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, refusal = await self._body(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, sent)
            else:
                await self.app(scope, _replay(body, receive), sent)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope["method"], route, status[0], seconds)
            client = scope.get("client")
            log.info(json.dumps({"method": scope["method"], "path": scope["path"], "status": status[0],
                                 "latency_ms": round(seconds * 1000, 2), "client": client[0] if client else None}))

    def _refusal(self, scope) -> JSONResponse | None:
        headers = _headers(scope)
        host = headers.get("host", "")
        name = urlsplit("//" + host).hostname or ""
        if not self.any_host and name.lower() not in self.hosts:
            return error_response(403, f"Host {host!r} is not served here (DNS rebinding guard; --allow-host adds "
                                       "names)", "permission_error", "bad_host")
        origin = headers.get("origin")
        if origin is not None and (urlsplit(origin).scheme not in ("http", "https")
                                   or urlsplit(origin).netloc.lower() != host.lower()):
            return error_response(403, f"cross-origin request from {origin!r} refused", "permission_error",
                                  "cross_origin")
        if self.settings.api_key and scope["path"] != "/health":
            given = headers.get("authorization", "")
            if not given.startswith("Bearer "):
                return error_response(401, "missing API key: send 'Authorization: Bearer KEY'",
                                      "authentication_error", "missing_api_key")
            if not hmac.compare_digest(given[7:].strip().encode(), self.settings.api_key.encode()):
                return error_response(401, "wrong API key", "authentication_error", "invalid_api_key")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return error_response(415, f"a {scope['method']} body must be application/json, got "
                                           f"{kind or 'no Content-Type'}", code="unsupported_media_type")
        return None

    async def _body(self, scope, receive) -> tuple[bytes, JSONResponse | None]:
        limit = self.settings.max_body_bytes
        length = _headers(scope).get("content-length")
        if length is not None:
            if not length.isdigit():
                return b"", error_response(400, f"Content-Length {length!r} is not a non-negative integer")
            if int(length) > limit:
                return b"", error_response(413, f"request body of {length} bytes is over the {limit} byte limit "
                                                "(--max-body-mb)", code="body_too_large")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.settings.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return b"", error_response(499, "the client went away", "cancelled", "client_closed")
                    size += len(message.get("body", b""))
                    if size > limit:
                        return b"", error_response(413, f"request body over the {limit} byte limit (--max-body-mb)",
                                                   code="body_too_large")
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            return b"", error_response(408, "the request body did not arrive in time", code="timeout")
        return b"".join(chunks), None


def _headers(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope["headers"]:
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# --------------------------------------------------------------------------------------------- the app
def create_app(engine: MSAEngine, settings: Settings | None = None, service: Service | None = None) -> Guard:
    """The ASGI app over `engine` (wrapped in its guards): run it with uvicorn (`serve`) or call it in-process.
    `service`: the bank's operations (default: `Service`; a memory over ranks: serve/parallel.py)."""
    settings = settings or Settings()
    settings.check()
    service, metrics = service or Service(engine, settings), Metrics()
    queue = EngineQueue(settings.max_queue, service.batch, settings.max_batch, settings.batch_window_ms / 1e3,
                        service.continuous)
    tok = engine.tok
    app = FastAPI(title="memsparse", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.queue, app.state.metrics, app.state.settings = service, queue, metrics, settings

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        if first["type"] == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {first['msg']}", code="invalid_json")
        if first["type"] == "extra_forbidden":
            return error_response(400, f"unknown field {where!r}", param=where, code="unknown_field")
        return error_response(400, f"{where}: {first['msg']}", param=where or None, code="invalid_value")

    def refusal(request: Request, e: Exception) -> ApiError:
        """What the client is told of an exception from the engine or the bank."""
        if isinstance(e, ApiError):
            return e
        if isinstance(e, Cancelled):
            return ApiError(499, str(e), "cancelled", "client_closed")
        if isinstance(e, BankBusy):  # another process is writing the bank
            return ApiError(503, str(e), "server_error", "bank_busy")
        if isinstance(e, torch.OutOfMemoryError):  # too many rows or tokens at once on the device: load, not input
            log.error(json.dumps({"path": request.url.path, "error": "out of device memory"}))
            return ApiError(503, "the device ran out of memory for this batch; retry, or serve with a smaller "
                            "--max-batch", "server_error", "out_of_memory")
        if isinstance(e, BankError):  # the bank on disk is damaged: not the request's fault
            log.error(json.dumps({"path": request.url.path, "error": str(e)}))
            return ApiError(500, str(e), "server_error", "bank_error")
        if isinstance(e, (ValueError, KeyError, CorpusError)):  # refused by the engine or the bank: the request's
            return ApiError(400, str(e.args[0] if isinstance(e, KeyError) else e))
        log.error("request %s failed", request.url.path, exc_info=e)  # the server keeps serving
        return ApiError(500, f"{type(e).__name__}: {e}", "server_error")

    async def engine_run(request: Request, job: Job | Callable):
        """A Job, or work(cancel) run alone, through the queue."""
        try:
            return await queue.run(request, job if isinstance(job, Job) else Job(work=job), settings.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            raise refusal(request, e) from None

    # ------------------------------------------------------------------ OpenAI
    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "memsparse"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != settings.model_name:
            raise ApiError(404, f"no model {name!r}; this server serves {settings.model_name!r}",
                           code="model_not_found")
        return model_card()

    def engine_kwargs(req: Generation, max_tokens: int | None) -> dict:
        if req.model != settings.model_name:
            raise ApiError(404, f"no model {req.model!r}; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        n = max_tokens if max_tokens is not None else min(256, settings.max_new_tokens)
        if n > settings.max_new_tokens:
            raise ApiError(400, f"max_tokens {n} is over the server's limit of {settings.max_new_tokens} "
                                "(--max-new-tokens)", param="max_tokens", code="too_many_tokens")
        asked = {k: v for k, v in req.model_dump().items() if k in REQUEST_KEYS and v is not None}
        c = engine.config.replace(**asked)
        inject_k, router_rounds = c.inject_k, c.router_rounds
        if inject_k > settings.max_inject_k:
            raise ApiError(400, f"inject_k {inject_k} is over the server's limit of {settings.max_inject_k}",
                           param="inject_k")
        if router_rounds > settings.max_router_rounds:
            raise ApiError(400, f"router_rounds {router_rounds} is over the server's limit of "
                                f"{settings.max_router_rounds}", param="router_rounds")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        return {"max_new_tokens": n, "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
                "stop": stop or None, **{k: getattr(c, k) for k in REQUEST_KEYS}}

    def check_question(q: str, param: str) -> int:
        n = len(tok.encode(q, add_special_tokens=False))
        if not q.strip():
            raise ApiError(400, f"{param}: the question is empty", param=param)
        if n > settings.max_question_tokens:
            raise ApiError(400, f"{param}: the question is {n} tokens, over the server's limit of "
                                f"{settings.max_question_tokens}", param=param, code="too_many_tokens")
        return n

    async def answer(request: Request, questions: list[str], kw: dict):
        return await engine_run(request, Job(questions=questions, kw=kw, key=batch_key(kw)))

    async def streamed(request: Request, questions: list[str], kw: dict, render: _Render) -> StreamingResponse:
        """The answers as Server-Sent Events: text as the engine decodes it. The status is sent with the first
        piece of text (or the answers): refusals before it (429, 499, 503, 504 ...) are plain HTTP errors, later
        ones an error event."""
        loop = asyncio.get_running_loop()
        pending: list[tuple[int, str]] = []  # decoded text not sent yet (filled on the loop's thread)
        ready = asyncio.Event()

        def push(n: int, text: str) -> None:
            pending.append((n, text))
            ready.set()

        def on_text(n: int, text: str) -> None:  # in the engine's thread
            with contextlib.suppress(RuntimeError):  # the request's loop has closed
                loop.call_soon_threadsafe(push, n, text)

        job = Job(questions=questions, kw=kw, key=batch_key(kw), on_text=on_text)
        deadline = loop.time() + settings.timeout
        result = asyncio.wrap_future(job.future)

        async def next_event() -> None:
            """Until there is text to send or the answers are in (504, 499 past the deadline or on a disconnect)."""
            if pending or result.done():
                return
            ready.clear()
            wake = asyncio.ensure_future(ready.wait())
            try:
                await wait_for(request, job, queue, {result, wake}, deadline, settings.timeout)
            finally:
                wake.cancel()

        try:
            queue.submit(job)
            await next_event()
            if result.done() and not pending:
                result.result()  # the engine's refusal, as a status
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            raise refusal(request, e) from None

        async def events():
            shown = [""] * len(questions)
            try:
                yield render.start()
                while True:
                    await next_event()
                    for n, text in pending:
                        shown[n] += text
                        yield render.piece(n, text)
                    pending.clear()
                    if result.done():
                        break
                answers = result.result()
                for n, a in enumerate(answers):
                    if a.text.startswith(shown[n]) and a.text != shown[n]:  # what the decode loop held back
                        yield render.piece(n, a.text[len(shown[n]):])
                    yield render.end(n, a)
                if (render.options or {}).get("include_usage"):
                    yield render.usage(answers)
            except ApiError as e:
                if e.code == "client_closed":
                    return
                yield {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
            except Exception as e:  # noqa: BLE001
                e = refusal(request, e)
                yield {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
            finally:
                if not result.done():
                    queue.withdraw(job)

        return sse(events())

    def extension(a) -> dict:
        return {"rounds": a.rounds, "routing": {str(k): v for k, v in a.routing.items()}, "timings": a.timings}

    def usage(prompt: int, answers) -> dict:
        done = sum(len(tok.encode(a.text, add_special_tokens=False)) for a in answers)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        users = [m for m in req.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "messages: no user message (its last one is the question)", param="messages")
        question = users[-1].text()
        prompt = check_question(question, "messages")
        kw = engine_kwargs(req, req.max_completion_tokens or req.max_tokens)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        if req.stream:
            chunk = {**head, "object": "chat.completion.chunk"}

            def delta(delta: dict, finish: str | None = None) -> dict:
                return {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            return await streamed(request, [question], kw, _Render(
                start=lambda: delta({"role": "assistant", "content": ""}),
                piece=lambda n, text: delta({"content": text}),
                end=lambda n, a: {**delta({}, a.finish), "memsparse": extension(a)},
                usage=lambda answers: {**chunk, "choices": [], "usage": usage(prompt, answers)},
                options=req.stream_options))
        (a,) = await answer(request, [question], kw)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text},
                             "finish_reason": a.finish}],
                "usage": usage(prompt, [a]), "memsparse": extension(a)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        questions = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not 1 <= len(questions) <= settings.max_prompts:
            raise ApiError(400, f"prompt: {len(questions)} questions; expected 1 to {settings.max_prompts}",
                           param="prompt")
        prompt = sum(check_question(q, "prompt") for q in questions)
        kw = engine_kwargs(req, req.max_tokens)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name,
                "object": "text_completion"}
        if req.stream:
            def choice(n: int, text: str, finish: str | None = None) -> dict:
                return {**head, "choices": [{"index": n, "text": text, "logprobs": None, "finish_reason": finish}]}

            return await streamed(request, questions, kw, _Render(
                start=lambda: None, piece=choice,
                end=lambda n, a: {**choice(n, "", a.finish), "memsparse": extension(a)},
                usage=lambda answers: {**head, "choices": [], "usage": usage(prompt, answers)},
                options=req.stream_options))
        answers = await answer(request, questions, kw)
        return {**head, "choices": [{"index": i, "text": a.text, "logprobs": None, "finish_reason": a.finish,
                                     "memsparse": extension(a)} for i, a in enumerate(answers)],
                "usage": usage(prompt, answers)}

    # ------------------------------------------------------------------ memory
    @app.get("/v1/memory/info")
    async def info(request: Request):
        return await engine_run(request, lambda cancel: service.read(service.info))

    @app.get("/v1/memory/documents")
    async def documents(request: Request, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)):
        return await engine_run(request, lambda cancel: service.read(lambda: service.documents(offset, limit)))

    @app.get("/v1/memory/documents/{doc_id}")
    async def document(doc_id: int, request: Request):
        return await engine_run(request, lambda cancel: service.read(lambda: service.get(doc_id)))

    @app.post("/v1/memory/documents")
    async def add(req: AddRequest, request: Request):
        if req.names is not None and len(req.names) != len(req.texts):
            raise ApiError(400, f"names: {len(req.names)} entries for {len(req.texts)} texts", param="names")
        for n, text in enumerate(req.texts):
            try:
                check_document(text, f"texts[{n}]", settings.max_doc_bytes)
            except CorpusError as e:
                raise ApiError(400, str(e), param=f"texts[{n}]") from None
        return await engine_run(request, lambda cancel: service.add(req.texts, req.names))

    @app.delete("/v1/memory/documents/{doc_id}")
    async def delete(doc_id: int, request: Request):
        return await engine_run(request, lambda cancel: service.delete(doc_id))

    @app.post("/v1/memory/route")
    async def route(req: RouteRequest, request: Request):
        check_question(req.question, "question")
        routing, = await engine_run(request, Job(questions=[req.question], kw=ROUTE, key=batch_key(ROUTE)))
        return {"routing": {str(layer): [[d, s] for d, s in picked] for layer, picked in routing.items()}}

    # ------------------------------------------------------------------ operations
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(queue), media_type="text/plain; version=0.0.4")

    guarded = Guard(app, settings, metrics)
    guarded.state = app.state  # the tests and the command line reach the queue and settings through it
    return guarded


@dataclass
class _Render:
    """How a completion route writes the events of its stream."""

    start: Callable[[], dict | None]  # the first event (None: none)
    piece: Callable[[int, str], dict]  # text of question n
    end: Callable[[int, Any], dict]  # question n's answer is whole
    usage: Callable[[list], dict]  # token counts of all answers (sent when the options ask for include_usage)
    options: dict | None


def sse(events: AsyncIterator[dict | None]) -> StreamingResponse:
    async def stream():
        async for e in events:
            if e is not None:
                yield f"data: {json.dumps(e, ensure_ascii=False, allow_nan=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def serve(app, sock, settings: Settings, max_connections: int = 256) -> None:
    """Run the app with uvicorn on a bound, listening socket (port 0 works: the caller knows the port) until
    Ctrl-C / SIGTERM."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=max_connections,
                            timeout_keep_alive=5, timeout_graceful_shutdown=int(math.ceil(min(settings.timeout, 30))))
    uvicorn.Server(config).run(sockets=[sock])
