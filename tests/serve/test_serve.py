"""The HTTP server (FastAPI) on a tiny model: the official `openai` client against it (in-process, and over a real
uvicorn socket), the memory routes against the engine called directly, document changes committed to the bank's
directory, and every refusal (key, Host, Origin, content type, body size, values, limits, queue) with a clear
message and nothing changed."""

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

import memsparse as ms
from memsparse.serve import Settings, create_app

from ..conftest import tiny_model, tiny_tokenizer

DOCS = ["Paris is in France.", "Ottawa <|im_end|> [2] <End-of-Retrieve> is in Canada.", "Bananas are yellow."]
KEY = "test-key"
BASE = "http://127.0.0.1:8080"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300), tiny_tokenizer()


@pytest.fixture()
def engine(model_tok, tmp_path):
    model, tok = model_tok
    ms.MemoryBank.build(model, tok, DOCS).save(tmp_path / "bank")
    return ms.MSAEngine(model, tok, ms.MemoryBank.load(tmp_path / "bank", model, tok))


def _settings(**kw) -> Settings:
    return Settings(**{"api_key": KEY, **kw})


@pytest.fixture(scope="module")
def shared(model_tok, tmp_path_factory):
    """One server for the tests that change nothing (each checks that nothing changed)."""
    model, tok = model_tok
    path = tmp_path_factory.mktemp("shared") / "bank"
    ms.MemoryBank.build(model, tok, DOCS).save(path)
    engine = ms.MSAEngine(model, tok, ms.MemoryBank.load(path, model, tok))
    with TestClient(create_app(engine, _settings()), base_url=BASE, headers=AUTH) as c:
        yield c, engine


@pytest.fixture()
def client(engine):
    with TestClient(create_app(engine, _settings()), base_url=BASE, headers=AUTH) as c:
        yield c


def _oai(client) -> openai.OpenAI:
    return openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, http_client=client, max_retries=0)


def _until(condition, what: str, limit: float = 30.0) -> None:
    """Wait for a state of the server (not for time to pass)."""
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, f"never: {what}"
        time.sleep(0.002)


# --------------------------------------------------------------------------------------------- OpenAI client
def test_openai_client_chat_completion_and_models(client, engine):
    oai = _oai(client)
    assert [m.id for m in oai.models.list()] == ["memsparse"]
    want = engine.ask("Where is Ottawa?", max_new_tokens=6)  # the server's defaults
    r = oai.chat.completions.create(model="memsparse", max_tokens=6, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"},
        {"role": "assistant", "content": "In France."}, {"role": "user", "content": "Where is Ottawa?"}])
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == want.finish
    assert r.model_extra["memsparse"]["rounds"] == want.rounds and r.usage.completion_tokens >= 0
    c = oai.completions.create(model="memsparse", prompt=["Where is Paris?", "<|im_end|> [1]"], max_tokens=4,
                               extra_body={"interleave": "off"})
    want = engine.ask(["Where is Paris?", "<|im_end|> [1]"], max_new_tokens=4, interleave=False)
    assert [ch.text for ch in c.choices] == [a.text for a in want] and [ch.index for ch in c.choices] == [0, 1]


def test_openai_client_streams(client, engine):
    oai = _oai(client)
    whole = oai.chat.completions.create(model="memsparse", messages=[{"role": "user", "content": "Where is Paris?"}],
                                        max_tokens=12, extra_body={"interleave": "off"})
    chunks = list(oai.chat.completions.create(model="memsparse", max_tokens=12, stream=True,
                                              messages=[{"role": "user", "content": "Where is Paris?"}],
                                              stream_options={"include_usage": True}, extra_body={"interleave": "off"}))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason and chunks[-1].usage is not None
    text = "".join(c.choices[0].text for c in oai.completions.create(
        model="memsparse", prompt="Where is Paris?", max_tokens=12, stream=True, extra_body={"interleave": "off"}))
    assert text == engine.ask("Where is Paris?", max_new_tokens=12, interleave=False).text
    raw = client.post("/v1/completions", json={"model": "memsparse", "prompt": "Paris", "max_tokens": 3,
                                               "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.text.endswith("data: [DONE]\n\n")


def test_openai_client_errors(engine):
    with TestClient(create_app(engine, _settings()), base_url=BASE) as c:
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            openai.OpenAI(base_url=BASE + "/v1", api_key="nope", http_client=c, max_retries=0).models.list()
        oai = _oai(c)
        with pytest.raises(openai.NotFoundError, match="no model 'gpt-4o'"):
            oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "q"}])
        with pytest.raises(openai.BadRequestError, match="over the server's limit of 1024"):
            oai.completions.create(model="memsparse", prompt="q", max_tokens=5000)
        with pytest.raises(openai.BadRequestError, match="no user message"):
            oai.chat.completions.create(model="memsparse", messages=[{"role": "system", "content": "q"}])


def test_concurrent_requests_are_answered_one_at_a_time(client, engine):
    """Asks, routes and an add at once: every reply is whole and what the engine alone answers (before or after the
    add); a chat question given as content parts is the same question."""
    ask = {"model": "memsparse", "max_tokens": 4, "interleave": "off"}
    want = engine.ask("Where is Paris?", max_new_tokens=4, interleave=False).text
    results = [None] * 6

    def one(n):
        if n == 5:
            results[n] = client.post("/v1/memory/documents", json={"texts": ["Oslo is cold."]})
        elif n % 2:
            results[n] = client.post("/v1/memory/route", json={"question": "Paris"})
        else:
            results[n] = client.post("/v1/chat/completions", json={**ask, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Where is "}, {"type": "text", "text": "Paris?"}]}]})

    threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and r.status_code == 200 for r in results), results
    assert results[5].json() == {"ids": [3]} and engine.bank.doc_ids() == [0, 1, 2, 3]
    after = engine.ask("Where is Paris?", max_new_tokens=4, interleave=False).text
    assert all(results[n].json()["choices"][0]["message"]["content"] in (want, after) for n in (0, 2, 4))


# --------------------------------------------------------------------------------------------- memory routes
def test_memory_routes_match_the_engine_and_commit(client, engine, tmp_path):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/v1/memory/info").json()
    assert info["documents"] == 3 and info["router layers"] == list(engine.model.router_layers)
    got = client.post("/v1/memory/route", json={"question": "Where is Ottawa?"}).json()
    want = engine.route("Where is Ottawa?")
    assert got["routing"] == {str(k): [[d, s] for d, s in v] for k, v in want.items()}
    listed = client.get("/v1/memory/documents", params={"offset": 1, "limit": 1}).json()
    assert listed["total"] == 3 and [d["id"] for d in listed["data"]] == [1] and listed["data"][0]["text"] == DOCS[1]
    assert client.get("/v1/memory/documents/2").json()["text"] == DOCS[2]
    r = client.post("/v1/memory/documents", json={"texts": ["Rome is old.", "Lisbon is by the sea."],
                                                  "names": ["r", "l"]})
    assert r.status_code == 200 and r.json() == {"ids": [3, 4]}
    assert client.delete("/v1/memory/documents/1").json() == {"id": 1, "deleted": True}
    reopened = ms.MemoryBank.load(tmp_path / "bank", engine.model, engine.tok)
    assert reopened.doc_ids() == [0, 2, 3, 4] and reopened.name(3) == "r"
    assert reopened.text(4) == "Lisbon is by the sea."
    routed = {d for v in client.post("/v1/memory/route", json={"question": "Ottawa"}).json()["routing"].values()
              for d, _ in v}
    assert 1 not in routed
    metrics = client.get("/metrics").text
    assert 'memsparse_requests_total{method="DELETE",route="/v1/memory/documents/{doc_id}",status="200"} 1' in metrics
    assert "memsparse_queue_waiting 0" in metrics and 'memsparse_request_seconds_count{route="/health"} 1' in metrics


@pytest.mark.parametrize("method,path,body,status,message", [
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "temperature": float("nan")}, 400,
     "temperature: Input should be a finite number"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "top_p": float("inf")}, 400, "top_p"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "temperature": 3}, 400, "temperature"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "inject_k": -3}, 400,
     "inject_k: Input should be greater than or equal to 1"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "inject_k": 33}, 400, "inject_k 33 is over"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "router_rounds": 99}, 400,
     "router_rounds 99 is over the server's limit of 4"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "max_tokens": 1025}, 400,
     "max_tokens 1025 is over the server's limit of 1024"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "max_tokens": True}, 400, "max_tokens"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "Paris " * 5000}, 400,
     "tokens, over the server's limit of 4096"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "   "}, 400, "the question is empty"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": ["q"] * 33}, 400, "33 questions; expected 1 to 32"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": []}, 400, "0 questions"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "colour": "red"}, 400, "unknown field 'colour'"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "n": 2}, 400, "n:"),
    ("post", "/v1/completions", {"model": "memsparse", "prompt": "q", "interleave": "sometimes"}, 400, "interleave"),
    ("post", "/v1/completions", {"prompt": "q"}, 400, "model: Field required"),
    ("post", "/v1/memory/route", {"question": "q", "k": 3}, 400, "unknown field 'k'"),
    ("post", "/v1/memory/documents", {"texts": ["ok", "   "]}, 400, "texts[1]: document is empty"),
    ("post", "/v1/memory/documents", {"texts": ["a"], "names": ["x", "y"]}, 400, "2 entries for 1 texts"),
    ("post", "/v1/memory/documents", {"texts": ["\ud800"]}, 400, "unpaired surrogate"),
    ("post", "/v1/memory/documents", {"texts": []}, 400, "texts"),
    ("delete", "/v1/memory/documents/7", None, 404, "no document 7"),
    ("get", "/v1/memory/documents/9", None, 404, "no document 9"),
    ("get", "/v1/memory/documents?limit=-1", None, 400, "limit"),
    ("get", "/v1/memory/documents?limit=100000", None, 400, "limit"),
    ("get", "/nowhere", None, 404, "Not Found"),
])
def test_bad_requests_are_refused_and_change_nothing(shared, method, path, body, status, message):
    client, engine = shared
    kw = {} if body is None else {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}
    r = client.request(method.upper(), path, **kw)
    got = r.json()
    text = got["error"]["message"] if isinstance(got.get("error"), dict) else got.get("detail")
    assert r.status_code == status and message in text, got
    assert engine.bank.doc_ids() == [0, 1, 2]


def test_bodies_that_are_not_json_objects(shared):
    client, _ = shared
    for raw, message in [(b"{not json", "not valid JSON"), (b"[1, 2]", "valid dictionary"), (b"\xff\xfe", "JSON")]:
        r = client.post("/v1/memory/route", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


# --------------------------------------------------------------------------------------------- guards
def _asgi(app, method: str, path: str, headers: dict[str, str], chunks=(b"",), gone: asyncio.Event | None = None):
    """One request straight into the ASGI app: the body in `chunks`; after it, the client disconnects when `gone` is
    set (never when None). Returns (status, body)."""
    out = {"status": None, "body": b""}
    parts = list(chunks)

    async def receive():
        if parts:
            return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}
        await (gone or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8080),
             "headers": [(k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1:8080", **headers}.items()]}

    async def call():
        await app(scope, receive, send)
        return out["status"], out["body"]

    return call()


def _refused(app, method="POST", path="/v1/memory/documents", headers=None, chunks=(b'{"texts": ["x"]}',)):
    status, body = asyncio.run(_asgi(app, method, path, {**AUTH, "content-type": "application/json",
                                                         **(headers or {})}, chunks))
    return status, json.loads(body).get("error", {}).get("message", "") if body else ""


def test_keys_hosts_origins_and_content_types_are_checked_first(engine):
    app = create_app(engine, _settings(max_body_bytes=64))
    assert _refused(app, headers={"Authorization": ""})[0] == 401
    assert _refused(app, headers={"Authorization": "Bearer wrong"}) == (401, "wrong API key")
    assert _refused(app, "GET", "/metrics", headers={"Authorization": ""})[0] == 401
    assert _refused(app, "GET", "/health", headers={"Authorization": ""}, chunks=())[0] == 200  # no key needed
    status, message = _refused(app, headers={"host": "evil.example:8080"})
    assert status == 403 and "DNS rebinding" in message
    status, message = _refused(app, headers={"origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in message
    assert _refused(app, headers={"origin": "null"})[0] == 403
    assert _refused(app, headers={"host": "localhost:8080", "origin": "http://localhost:8080"})[0] == 200  # same origin
    status, message = _refused(app, headers={"content-type": "text/plain"})
    assert status == 415 and "application/json" in message
    assert _refused(app, headers={"content-type": ""})[0] == 415
    assert _refused(app, headers={"content-length": "-1"}) == (400, "Content-Length '-1' is not a non-negative integer")
    status, message = _refused(app, headers={"content-length": "100000"})
    assert status == 413 and "over the 64 byte limit" in message
    big = [b'{"texts": [', b'"' + b"x" * 80 + b'"]}']
    status, message = _refused(app, headers={"content-length": "10"}, chunks=big)
    assert status == 413 and "over the 64 byte limit" in message  # a Content-Length that lies
    assert _refused(app, chunks=big)[0] == 413  # chunked, no length
    assert engine.bank.doc_ids() == [0, 1, 2, 3]  # only the same-origin add went through
    assert create_app(engine, _settings(host="0.0.0.0"))  # a wildcard address: any Host, a key required
    with pytest.raises(ValueError, match="needs an API key"):
        create_app(engine, Settings(host="0.0.0.0"))
    open_app = create_app(engine, Settings())  # loopback without a key: no key asked
    assert _refused(open_app, "GET", "/v1/memory/info", headers={"Authorization": ""}, chunks=())[0] == 200


def _blocking(engine, monkeypatch):
    """engine.route_batch holds the engine until `release` is set; `entered` lists the questions that reached it."""
    release, entered = threading.Event(), []
    real = engine.route_batch

    def route_batch(questions):
        entered.extend(questions)
        assert release.wait(60)
        return real(questions)

    monkeypatch.setattr(engine, "route_batch", route_batch)
    return release, entered


def test_out_of_device_memory_is_a_503_and_the_server_serves_on(engine, monkeypatch):
    real, calls = engine.route_batch, []

    def route_batch(questions):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.\nmore lines")
        return real(questions)

    monkeypatch.setattr(engine, "route_batch", route_batch)
    with TestClient(create_app(engine, _settings()), base_url=BASE, headers=AUTH) as c:
        r = c.post("/v1/memory/route", json={"question": "Where is the violin?"})
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "out_of_memory" and "--max-batch" in err["message"] and "\n" not in err["message"]
        assert c.post("/v1/memory/route", json={"question": "Where is the violin?"}).status_code == 200


def test_a_full_queue_is_429_and_the_waiting_are_served(engine, monkeypatch):
    release, entered = _blocking(engine, monkeypatch)
    app = create_app(engine, _settings(max_queue=1))
    queue = app.state.queue
    with TestClient(app, base_url=BASE, headers=AUTH) as c:
        results = {}

        def ask(name):
            results[name] = c.post("/v1/memory/route", json={"question": name})

        first = threading.Thread(target=ask, args=("first",))
        first.start()
        _until(lambda: entered, "the first request reaches the engine")  # (its batch closed: no one joins it)
        second = threading.Thread(target=ask, args=("second",))
        second.start()
        _until(lambda: queue.waiting == 1, "the second request waits")
        r = c.post("/v1/memory/route", json={"question": "third"})
        assert r.status_code == 429 and "--max-queue" in r.json()["error"]["message"]
        assert "memsparse_queue_waiting 1" in c.get("/metrics").text
        release.set()
        first.join(60)
        second.join(60)
        assert results["first"].status_code == results["second"].status_code == 200
        assert entered == ["first", "second"]


def test_a_client_that_goes_away_leaves_the_queue(engine, monkeypatch):
    release, entered = _blocking(engine, monkeypatch)
    app = create_app(engine, _settings())
    queue = app.state.queue
    body = (json.dumps({"question": "q"}).encode(),)
    headers = {**AUTH, "content-type": "application/json"}

    async def scenario():
        first = asyncio.ensure_future(_asgi(app, "POST", "/v1/memory/route", headers, body))
        while not entered:  # the first request reached the engine: its batch is closed
            await asyncio.sleep(0.002)
        gone = asyncio.Event()
        second = asyncio.ensure_future(_asgi(app, "POST", "/v1/memory/route", headers, body, gone))
        while queue.waiting != 1:
            await asyncio.sleep(0.002)
        gone.set()  # the second client disconnects while it waits
        assert (await second)[0] == 499 and queue.waiting == 0
        release.set()
        assert (await first)[0] == 200

    asyncio.run(scenario())
    assert len(entered) == 1  # the second request never reached the engine


def test_a_client_that_goes_away_stops_its_answer(engine, monkeypatch):
    """Disconnecting during decoding: the engine stops at the next token (Cancelled) and serves the next request."""
    started, go, steps = threading.Event(), threading.Event(), []
    real = engine._event

    def event(*args):
        steps.append(1)
        started.set()
        assert go.wait(60)
        return real(*args)

    monkeypatch.setattr(engine, "_event", event)
    app = create_app(engine, _settings())
    queue = app.state.queue
    body = json.dumps({"model": "memsparse", "prompt": "q", "max_tokens": 50, "interleave": "off"}).encode()
    headers = {**AUTH, "content-type": "application/json"}

    async def scenario():
        gone = asyncio.Event()
        request = asyncio.ensure_future(_asgi(app, "POST", "/v1/completions", headers, (body,), gone))
        await asyncio.to_thread(started.wait, 60)
        gone.set()
        assert (await request)[0] == 499
        go.set()
        while queue.running:
            await asyncio.sleep(0.002)

    asyncio.run(scenario())
    assert len(steps) == 1  # the token after the disconnect raised Cancelled before the next step
    monkeypatch.setattr(engine, "_event", real)
    with TestClient(app, base_url=BASE, headers=AUTH) as c:
        assert c.post("/v1/memory/route", json={"question": "q"}).status_code == 200


def test_a_request_past_the_timeout_is_504(engine, monkeypatch):
    release, _ = _blocking(engine, monkeypatch)
    with TestClient(create_app(engine, _settings(timeout=0.2)), base_url=BASE, headers=AUTH) as c:
        r = c.post("/v1/memory/route", json={"question": "q"})
        release.set()
    assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]


# --------------------------------------------------------------------------------------------- a real socket
def test_concurrent_openai_clients_over_uvicorn(engine):
    """8 clients x 3 requests (chat, completion, streamed chat) over a real socket: none fails; latency printed."""
    import uvicorn

    from memsparse.serve.load import run_load

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, _settings(max_queue=16)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(timeout=120) as http:
            out = run_load(f"http://127.0.0.1:{port}/v1", KEY, clients=8, requests=3, max_tokens=4, http_client=http)
            metrics = http.get(f"http://127.0.0.1:{port}/metrics", headers=AUTH).text
    finally:
        server.should_exit = True
        thread.join(60)
    print(json.dumps(out))
    assert out["failures"] == [] and out["succeeded"] == 24
    served = sum(int(n) for n in re.findall(r'route="/v1/(?:chat/)?completions",status="200"} (\d+)', metrics))
    assert served == 24


def test_the_command_line_serves_a_saved_bank(tmp_path, model_tok):
    """`memsparse serve BANK --port 0` in its own process: the openai client is answered, a non-loopback address
    without a key is refused in one line, and Ctrl-C (SIGINT) stops it cleanly."""
    model, tok = model_tok
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    model = ms.MSAForCausalLM.from_pretrained(model_dir)
    bank = ms.MemoryBank.build(model, tok, DOCS)
    bank.meta["model"] = str(model_dir)
    bank.save(tmp_path / "bank")
    cmd = [sys.executable, "-c", "import sys; from memsparse.cli import main; sys.exit(main())", "serve",
           str(tmp_path / "bank"), "--device", "cpu"]
    refused = subprocess.run(cmd + ["--host", "0.0.0.0"], capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "MEMSPARSE_API_KEY": ""})
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].startswith(
        "memsparse serve: binding 0.0.0.0 (not this machine only) needs an API key")
    # SIGINT as at a terminal, even when the suite runs in the background (where the shell ignores it, inherited)
    proc = subprocess.Popen(cmd + ["--port", "0", "--api-key", KEY], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stderr.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert port, line + proc.stderr.read() if proc.poll() is not None else line
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port.group(1)}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in oai.models.list()] == ["memsparse"]
        r = oai.completions.create(model="memsparse", prompt="Where is Paris?", max_tokens=3,
                                   extra_body={"interleave": "off"})
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


# --------------------------------------------------------------------------------------------- batching
QUESTIONS = ["Where is Paris?", "Where is Ottawa?", "Bananas?", "Is Paris in France or in Canada?"]


def test_concurrent_requests_are_batched_and_answered_as_one_at_a_time(engine):
    """Four concurrent greedy requests (different max_tokens, chat and completion) share engine batches and get
    what each question alone gets from the engine."""
    budgets = [4, 7, 5, 6]
    want = [engine.ask(q, max_new_tokens=n) for q, n in zip(QUESTIONS, budgets)]
    app = create_app(engine, _settings(batch_window_ms=500, max_batch=8))
    results = [None] * 4
    with TestClient(app, base_url=BASE, headers=AUTH) as c:
        def one(n):
            body = {"model": "memsparse", "max_tokens": budgets[n]}
            if n % 2:
                r = c.post("/v1/completions", json={**body, "prompt": QUESTIONS[n]})
                results[n] = r.json()["choices"][0]["text"]
            else:
                messages = [{"role": "user", "content": QUESTIONS[n]}]
                r = c.post("/v1/chat/completions", json={**body, "messages": messages})
                results[n] = r.json()["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = c.get("/metrics").text
    assert results == [a.text for a in want]
    batches = int(re.search(r"memsparse_engine_batches_total (\d+)", metrics).group(1))
    assert batches == app.state.queue.batches < 4  # (a 500 ms window: in practice one batch)


def test_concurrent_routing_requests_share_one_routing_pass(engine, monkeypatch):
    """Four concurrent /v1/memory/route requests are routed in one engine batch (route_batch called with all four
    questions) and each gets what its question alone gets (tests/engine/test_batch.py holds the batched routing to
    the same documents in the same order)."""
    want = [engine.route(q) for q in QUESTIONS[:4]]
    calls, real = [], engine.route_batch
    monkeypatch.setattr(engine, "route_batch", lambda qs: calls.append(list(qs)) or real(qs))
    app = create_app(engine, _settings(batch_window_ms=500, max_batch=8))
    results = [None] * 4
    with TestClient(app, base_url=BASE, headers=AUTH) as c:
        def one(n):
            results[n] = c.post("/v1/memory/route", json={"question": QUESTIONS[n]}).json()["routing"]

        threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for got, w in zip(results, want):  # the same documents, the scores within float32 rounding (batch padding)
        assert sorted(got) == sorted(str(layer) for layer in w)
        for layer, picked in w.items():
            assert [d for d, _ in got[str(layer)]] == [d for d, _ in picked]
            assert [s for _, s in got[str(layer)]] == pytest.approx([s for _, s in picked], abs=1e-5)
    assert sorted(q for call in calls for q in call) == sorted(QUESTIONS[:4])
    assert len(calls) < 4  # (a 500 ms window: in practice one batch)


def test_streaming_sends_text_as_it_is_decoded(engine, monkeypatch):
    """The answer's text leaves in several events, the first of them before the decode has ended; joined, they are
    the answer."""
    steps = []
    real = engine._event
    monkeypatch.setattr(engine, "_event", lambda *a: steps.append(1) or real(*a))
    want = engine.ask("Where is Paris?", max_new_tokens=16, interleave=False)
    steps.clear()
    app = create_app(engine, _settings())
    events = []  # (tokens decoded when it was sent, event)

    async def send(message):
        if message["type"] == "http.response.body":
            events.extend((len(steps), json.loads(e[6:])) for e in message.get("body", b"").decode().split("\n\n")
                          if e.startswith("data: {"))

    body = json.dumps({"model": "memsparse", "messages": [{"role": "user", "content": "Where is Paris?"}],
                       "max_tokens": 16, "stream": True, "interleave": "off"}).encode()
    asyncio.run(_asgi_send(app, "/v1/chat/completions", body, send))
    texts = [(n, e["choices"][0]["delta"]["content"]) for n, e in events
             if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert "".join(t for _, t in texts) == want.text and len(texts) > 2
    assert texts[0][0] < len(steps)  # the first piece left while tokens were still being decoded
    assert events[-1][1]["choices"][0]["finish_reason"] == want.finish


def _asgi_send(app, path: str, body: bytes, send):
    """A POST straight into the ASGI app, its response messages to `send`."""
    parts = [body]

    async def receive():
        if parts:
            return {"type": "http.request", "body": parts.pop(0), "more_body": False}
        await asyncio.Event().wait()

    headers = {"host": "127.0.0.1:8080", **AUTH, "content-type": "application/json"}
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8080), "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return app(scope, receive, send)


def test_a_client_that_leaves_a_batch_does_not_hurt_the_others(engine, monkeypatch):
    """Two requests in one batch; the first client disconnects after its first token: its question stops at its
    next token (499), the other's answer is what it gets alone."""
    want = engine.ask(QUESTIONS[1], max_new_tokens=8, interleave=False)
    real, seen = engine._event, []
    gone, loop = asyncio.Event(), []

    def event(row, ids, *rest):
        if row.question == QUESTIONS[0]:
            seen.append(len(ids))
            if len(ids) == 1:
                loop[0].call_soon_threadsafe(gone.set)
                assert row.cancel.wait(60)  # the server has withdrawn the request
        return real(row, ids, *rest)

    monkeypatch.setattr(engine, "_event", event)
    app = create_app(engine, _settings(batch_window_ms=500))
    headers = {**AUTH, "content-type": "application/json"}

    def body(q):
        return (json.dumps({"model": "memsparse", "prompt": q, "max_tokens": 8, "interleave": "off"}).encode(),)

    async def scenario():
        loop.append(asyncio.get_running_loop())
        first = asyncio.ensure_future(_asgi(app, "POST", "/v1/completions", headers, body(QUESTIONS[0]), gone))
        second = asyncio.ensure_future(_asgi(app, "POST", "/v1/completions", headers, body(QUESTIONS[1])))
        return await first, await second

    (status1, _), (status2, answer) = asyncio.run(scenario())
    assert status1 == 499 and seen == [1]  # no token after the one that saw the client leave
    assert status2 == 200 and json.loads(answer)["choices"][0]["text"] == want.text
    assert app.state.queue.batches == 1


def test_a_request_joins_a_running_batch_and_leaves_before_it(engine, monkeypatch):
    """Continuous batching: a short request that arrives while a long one decodes joins its batch at the next step
    (one engine run, two joins) and is answered before the long one ends; both get what they get alone."""
    long_q, short_q = QUESTIONS[0], QUESTIONS[2]
    want = [engine.ask(long_q, max_new_tokens=24, interleave=False),
            engine.ask(short_q, max_new_tokens=3, interleave=False)]
    real, order, runs = engine._event, [], []
    arrived, loop = asyncio.Event(), []
    app = create_app(engine, _settings(batch_window_ms=0))

    def event(row, ids, *rest):
        order.append((row.question, len(ids)))
        if row.question == long_q and len(ids) == 3:
            loop[0].call_soon_threadsafe(arrived.set)
            _until(lambda: app.state.queue.waiting, "the short request to wait in the queue")
        return real(row, ids, *rest)

    monkeypatch.setattr(engine, "_event", event)
    real_run = engine.ask_continuous
    monkeypatch.setattr(engine, "ask_continuous", lambda *a, **kw: runs.append(1) or real_run(*a, **kw))
    headers = {**AUTH, "content-type": "application/json"}

    def body(q, n):
        return (json.dumps({"model": "memsparse", "prompt": q, "max_tokens": n, "interleave": "off"}).encode(),)

    async def scenario():
        loop.append(asyncio.get_running_loop())
        first = asyncio.ensure_future(_asgi(app, "POST", "/v1/completions", headers, body(long_q, 24)))
        await arrived.wait()
        second = await _asgi(app, "POST", "/v1/completions", headers, body(short_q, 3))
        return await first, second

    (s1, a1), (s2, a2) = asyncio.run(scenario())
    assert (s1, s2) == (200, 200)
    assert [json.loads(a)["choices"][0]["text"] for a in (a1, a2)] == [w.text for w in want]
    assert runs == [1] and app.state.queue.batches == 2
    last_short = max(i for i, (q, _) in enumerate(order) if q == short_q)
    assert order[last_short + 1:] and all(q == long_q for q, _ in order[last_short + 1:])  # the long one went on


@pytest.mark.parametrize("bad,message", [({"max_batch": 0}, "--max-batch 0: expected at least 1"),
                                         ({"batch_window_ms": -1.0}, "--batch-window-ms -1: expected 0 to 1000"),
                                         ({"batch_window_ms": float("nan")}, "--batch-window-ms nan")])
def test_bad_batching_settings_are_one_line_errors(engine, bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        create_app(engine, _settings(**bad))


def test_a_streaming_client_that_goes_away_stops_its_answer(engine, monkeypatch):
    """A client that disconnects after the first streamed text: its question stops at its next token and the
    stream ends; the engine serves the next request."""
    steps, real = [], engine._event
    monkeypatch.setattr(engine, "_event", lambda *a: steps.append(1) or real(*a))
    app = create_app(engine, _settings())
    gone, seen = asyncio.Event(), []

    async def send(message):
        if message["type"] == "http.response.body" and b'"content": "' in message.get("body", b"") \
                and b'"content": ""' not in message["body"]:
            seen.append(len(steps))
            gone.set()

    async def receive_after(body):
        parts = [body]

        async def receive():
            if parts:
                return {"type": "http.request", "body": parts.pop(0), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        return receive

    body = json.dumps({"model": "memsparse", "messages": [{"role": "user", "content": "Where is Paris?"}],
                       "max_tokens": 200, "stream": True, "interleave": "off"}).encode()

    async def scenario():
        headers = {"host": "127.0.0.1:8080", **AUTH, "content-type": "application/json"}
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8080),
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        await app(scope, await receive_after(body), send)
        while app.state.queue.running:
            await asyncio.sleep(0.002)

    asyncio.run(scenario())
    assert seen and len(steps) < 100  # alone this answer decodes 146 tokens (on CPU here: stopped at the 3rd)
    with TestClient(app, base_url=BASE, headers=AUTH) as c:
        assert c.post("/v1/memory/route", json={"question": "q"}).status_code == 200
