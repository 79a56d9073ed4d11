"""`memsparse serve`: one MSA engine and its memory bank behind a small JSON API (standard library only).

    GET  /health          {"status": "ok"}
    GET  /info            the bank: documents, tokens, chunks, dtypes, router layers, model
    GET  /docs?offset=0&limit=100   documents in insertion order: [{"id", "name", "tokens", "text"}] (text cut to
                          200 characters; ?id=N: that one document, whole)
    POST /route           {"question": str} -> {"routing": {layer: [[doc id, score], ...]}} (best first)
    POST /ask             {"question": str | [str], "max_new_tokens": 256, "interleave": "model" | "router" | "off",
                           "temperature": 0.0, "top_p": 1.0, "seed": null, "stop": [str], "inject_k": 4,
                           "router_rounds": 1} -> the answer object (a list of them for a list of questions);
                          interleave and inject_k default to the server's settings (as `memsparse ask`: router, 4)
    POST /docs/add        {"texts": [str], "names": [str]} -> {"ids": [...]}
    POST /docs/delete     {"ids": [int]} -> {"deleted": n}

Document changes are committed to the bank's directory (atomically, as `memsparse docs`: as the bank's one writer,
on its latest commit) when it has one; every request first follows commits other processes made (the bank is
reopened when the directory's commit moved). Bad requests get status 400 and {"error": "..."} and change nothing;
unknown paths 404, bodies over MAX_BODY 413, a bank another process is writing for over WRITE_WAIT seconds 503, a
damaged bank and failures of the server itself 500 (it keeps serving). Requests reach the
engine one at a time (a lock): the GPU decode graphs and the bank are not shared between threads. Text in
questions and documents is plain text: special tokens and protocol strings in it never act as such.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..engine.engine import MSAEngine
from ..memory.bank import BankError
from ..memory.corpus import CorpusError, check_document
from ..memory.store import BankBusy, load, read_manifest, writer

log = logging.getLogger("memsparse.serve")
MAX_BODY = 64 << 20  # bytes of one request body
WRITE_WAIT = 30.0  # seconds a document change waits for another process writing the bank
INTERLEAVE = {"model": True, "router": "router", "off": False, True: True, False: False}


class BadRequest(ValueError):
    """A request the server refuses (status 400)."""


class _TooLarge(Exception):
    """A request body over MAX_BODY (status 413)."""


def _field(body: dict, name: str, kind: type | tuple, default=None, required: bool = False):
    """body[name] checked to be of `kind` (booleans are not numbers); `default` when absent or null."""
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"missing field {name!r}")
        return default
    if kind in (int, float, (int, float)) and isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRequest(f"field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _strings(value, name: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"field {name!r} must be a non-empty list of strings")
    return value


class Service:
    """The API's operations over one engine, serialised by a lock; each takes and returns JSON-ready values."""

    def __init__(self, engine: MSAEngine, max_doc_bytes: int = 1 << 20, interleave: str = "router",
                 inject_k: int = 4):
        self.engine, self.bank = engine, engine.bank
        self.max_doc_bytes = max_doc_bytes
        self.interleave, self.inject_k = interleave, inject_k
        self.lock = threading.Lock()

    def _follow(self) -> None:
        """Reopen the bank if another process committed to its directory since (call holding self.lock)."""
        if self.bank.path is not None and read_manifest(self.bank.path).get("commit", 0) != self.bank.commit:
            self._reopen()

    def _reopen(self) -> None:
        old = self.bank
        bank = load(old.path, old.model, old.tok, tier=old.tier)
        bank.fused_routing = old.fused_routing
        self.engine.bank = self.bank = bank

    def _read(self, op):
        """op() on the bank's latest commit, serialised with every other request."""
        with self.lock:
            self._follow()
            return op()

    def _write(self, change):
        """change(bank) as the bank's one writer on its latest commit, then committed (on a failed commit the bank
        is reopened: what did not commit is not served)."""
        with self.lock:
            if self.bank.path is None:
                return change(self.bank)
            with writer(self.bank.path, timeout=WRITE_WAIT):
                self._follow()
                out = change(self.bank)
                try:
                    self.bank.save()
                except BaseException:
                    self._reopen()
                    raise
                return out

    def info(self, query: dict) -> dict:
        return self._read(self._info)

    def _info(self) -> dict:
        bank, model = self.bank, self.bank.model
        docs = bank.doc_ids()
        return {"documents": len(docs), "tokens": sum(bank.token_count(d) for d in docs), "chunks": bank.num_chunks,
                "routing keys": bank.key_dtype, "document keys/values": bank.content_dtype, "tier": bank.tier,
                "router layers": list(model.router_layers), "top_k": model.msa_config.engine_top_k,
                "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
                "directory": str(bank.path) if bank.path else None}

    def docs(self, query: dict) -> dict:
        _only(query, {"offset", "limit", "id"})
        return self._read(lambda: self._docs(query))

    def _docs(self, query: dict) -> dict:
        if "id" in query:
            d = _int_param(query, "id", 0)
            if d not in self.bank:
                raise BadRequest(f"no document {d} in the bank")
            return {"id": d, "name": self.bank.name(d), "tokens": self.bank.token_count(d), "text": self.bank.text(d)}
        offset, limit = _int_param(query, "offset", 0), _int_param(query, "limit", 100)
        ids = self.bank.doc_ids()
        rows = [{"id": d, "name": self.bank.name(d), "tokens": self.bank.token_count(d),
                 "text": (self.bank.text(d) or "")[:200]} for d in ids[offset:offset + limit]]
        return {"total": len(ids), "offset": offset, "documents": rows}

    def route(self, body: dict) -> dict:
        _only(body, {"question"})
        question = _field(body, "question", str, required=True)
        routing = self._read(lambda: self.engine.route(question))
        return {"routing": {str(layer): [[d, s] for d, s in picked] for layer, picked in routing.items()}}

    def ask(self, body: dict) -> dict | list:
        _only(body, {"question", "max_new_tokens", "interleave", "temperature", "top_p", "seed", "stop", "inject_k",
                     "router_rounds"})
        question = _field(body, "question", (str, list), required=True)
        if isinstance(question, list):
            _strings(question, "question")
        interleave = body.get("interleave", self.interleave)
        if not (isinstance(interleave, bool) or interleave in ("model", "router", "off")):
            raise BadRequest(f"field 'interleave' must be 'model', 'router', 'off' or a boolean, got {interleave!r}")
        kw = {"max_new_tokens": _field(body, "max_new_tokens", int, 256),
              "temperature": float(_field(body, "temperature", (int, float), 0.0)),
              "top_p": float(_field(body, "top_p", (int, float), 1.0)),
              "seed": _field(body, "seed", int), "inject_k": _field(body, "inject_k", int, self.inject_k),
              "router_rounds": _field(body, "router_rounds", int, 1)}
        if "stop" in body:
            kw["stop"] = _strings(body["stop"], "stop")
        if not 1 <= kw["max_new_tokens"] <= 8192:
            raise BadRequest(f"field 'max_new_tokens' must be in 1..8192, got {kw['max_new_tokens']}")
        ans = self._read(lambda: self.engine.ask(question, interleave=INTERLEAVE[interleave], **kw))
        return [a.to_dict() for a in ans] if isinstance(ans, list) else ans.to_dict()

    def add(self, body: dict) -> dict:
        _only(body, {"texts", "names"})
        texts = _strings(_field(body, "texts", list, required=True), "texts")
        names = body.get("names")
        if names is not None and (len(_strings(names, "names")) != len(texts)):
            raise BadRequest(f"field 'names' has {len(names)} entries for {len(texts)} texts")
        for n, text in enumerate(texts):
            try:
                check_document(text, f"texts[{n}]", self.max_doc_bytes)
            except CorpusError as e:
                raise BadRequest(str(e)) from None
        return {"ids": self._write(lambda bank: bank.add(texts, names=names))}

    def delete(self, body: dict) -> dict:
        _only(body, {"ids"})
        ids = _field(body, "ids", list, required=True)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadRequest("field 'ids' must be a non-empty list of integers")

        def change(bank):
            missing = [i for i in ids if i not in bank]
            if missing:
                raise BadRequest(f"no documents {missing} in the bank")
            bank.delete(ids)

        self._write(change)
        return {"deleted": len(ids)}


def _int_param(query: dict, name: str, default: int) -> int:
    """A non-negative integer query parameter."""
    value = query.get(name, str(default))
    if not value.isdigit():
        raise BadRequest(f"query parameter {name!r} must be a non-negative integer, got {value!r}")
    return int(value)


def _only(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise BadRequest(f"unknown field(s) {extra}; expected some of {sorted(allowed)}")


ROUTES = {("GET", "/health"): lambda s, q: {"status": "ok"}, ("GET", "/info"): Service.info,
          ("GET", "/docs"): Service.docs, ("POST", "/route"): Service.route, ("POST", "/ask"): Service.ask,
          ("POST", "/docs/add"): Service.add, ("POST", "/docs/delete"): Service.delete}


class Handler(BaseHTTPRequestHandler):
    service: Service  # set by make_server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        op = ROUTES.get((method, path))
        if op is None:
            known = [p for m, p in ROUTES if m == method]
            return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no {method} {self.path}; try {known}"})
        try:
            body = self._body() if method == "POST" else self._query(query)
            return self._reply(HTTPStatus.OK, op(self.service, body))
        except _TooLarge as e:
            return self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": str(e)})
        except BankBusy as e:  # another process is writing the bank
            return self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)})
        except BankError as e:  # the bank on disk is damaged or was changed under a stale copy: not the request's fault
            log.error("request %s %s: %s", method, self.path, e)
            return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(e)})
        except KeyError as e:  # an unknown document in the bank
            return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e.args[0])})
        except ValueError as e:  # BadRequest, or refused by the engine or the bank: the request's fault
            return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:  # noqa: BLE001  (the server keeps serving; the client learns what happened)
            log.exception("request %s %s failed", method, self.path)
            return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})

    @staticmethod
    def _query(query: str) -> dict:
        """The query string's parameters (each given once)."""
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        twice = sorted(k for k, v in params.items() if len(v) > 1)
        if twice:
            raise BadRequest(f"query parameter(s) {twice} given more than once")
        return {k: v[0] for k, v in params.items()}

    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest("a POST needs a Content-Length header") from None
        if n > MAX_BODY:
            self.close_connection = True  # the body is not read
            raise _TooLarge(f"request body of {n} bytes is over the {MAX_BODY} byte limit")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRequest(f"request body is not UTF-8: {e}") from None
        except json.JSONDecodeError as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def _reply(self, status: HTTPStatus, payload) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        log.info("%s %s", self.address_string(), format % args)


def make_server(engine: MSAEngine, host: str = "127.0.0.1", port: int = 8080, max_doc_bytes: int = 1 << 20,
                interleave: str = "router", inject_k: int = 4) -> ThreadingHTTPServer:
    """A threaded HTTP server over `engine` (not yet serving: call `serve_forever()`; port 0 picks a free one).
    `interleave` and `inject_k`: what /ask does when a request does not say."""
    handler = type("BoundHandler", (Handler,), {"service": Service(engine, max_doc_bytes, interleave, inject_k)})
    return ThreadingHTTPServer((host, port), handler)
