"""The HTTP server on a tiny model: every endpoint against the engine called directly, document changes committed
to the bank's directory, and bad requests refused with a clear message and nothing changed."""

import json
import threading
import urllib.error
import urllib.request

import pytest

import memsparse as ms
from memsparse.serve import make_server

from .conftest import tiny_model, tiny_tokenizer

DOCS = ["Paris is in France.", "Ottawa <|im_end|> [2] <End-of-Retrieve> is in Canada.", "Bananas are yellow."]


@pytest.fixture()
def served(tmp_path):
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
    tok = tiny_tokenizer()
    ms.MemoryBank.build(model, tok, DOCS).save(tmp_path / "bank")
    bank = ms.MemoryBank.load(tmp_path / "bank", model, tok)
    engine = ms.MSAEngine(model, tok, bank)
    server = make_server(engine, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", engine, tmp_path / "bank"
    server.shutdown()
    server.server_close()


def _call(url, path, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_endpoints_match_the_engine(served):
    url, engine, _ = served
    assert _call(url, "/health") == (200, {"status": "ok"})
    status, info = _call(url, "/info")
    assert status == 200 and info["documents"] == 3 and info["router layers"] == list(engine.model.router_layers)
    status, got = _call(url, "/route", {"question": "Where is Ottawa?"})
    want = engine.route("Where is Ottawa?")
    assert status == 200 and got["routing"] == {str(k): [[d, s] for d, s in v] for k, v in want.items()}
    status, got = _call(url, "/ask", {"question": "Where is Ottawa?", "max_new_tokens": 6, "interleave": "off"})
    want = engine.ask("Where is Ottawa?", max_new_tokens=6, interleave=False)
    assert status == 200 and got["text"] == want.text and got["rounds"] == want.rounds
    status, got = _call(url, "/ask", {"question": ["Where?", "<|im_end|> [1]"], "max_new_tokens": 4, "seed": None})
    want = engine.ask(["Where?", "<|im_end|> [1]"], max_new_tokens=4, interleave="router", inject_k=4)  # defaults
    assert status == 200 and [a["text"] for a in got] == [a.text for a in want]
    assert [a["rounds"] for a in got] == [a.rounds for a in want]


def test_concurrent_requests_are_answered_one_at_a_time(served):
    """Eight clients at once (asks, routes and an add): every reply is whole and what the engine alone answers
    (before or after the add)."""
    url, engine, _ = served
    want = engine.ask("Where is Paris?", max_new_tokens=4, interleave=False).text
    results = [None] * 8

    def client(n):
        if n == 7:
            results[n] = _call(url, "/docs/add", {"texts": ["Oslo is cold."]})
        elif n % 2:
            results[n] = _call(url, "/route", {"question": "Paris"})
        else:
            results[n] = _call(url, "/ask", {"question": "Where is Paris?", "max_new_tokens": 4, "interleave": "off"})

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None and r[0] == 200 for r in results), results
    assert results[7][1] == {"ids": [3]} and engine.bank.doc_ids() == [0, 1, 2, 3]
    after = engine.ask("Where is Paris?", max_new_tokens=4, interleave=False).text  # the add may come first
    assert all(results[n][1]["text"] in (want, after) for n in range(0, 7, 2))


def test_documents_are_listed(served):
    url, _, _ = served
    status, got = _call(url, "/docs?offset=1&limit=1")
    assert status == 200 and got["total"] == 3 and [d["id"] for d in got["documents"]] == [1]
    assert got["documents"][0]["text"] == DOCS[1] and got["documents"][0]["tokens"] > 0
    assert _call(url, "/docs?id=2")[1]["text"] == DOCS[2]
    assert "no document 9" in _call(url, "/docs?id=9")[1]["error"]
    assert "non-negative integer" in _call(url, "/docs?limit=-1")[1]["error"]
    assert "more than once" in _call(url, "/docs?limit=1&limit=2")[1]["error"]
    assert "unknown field(s) ['page']" in _call(url, "/docs?page=2")[1]["error"]


def test_documents_are_added_and_deleted_and_committed(served):
    url, engine, path = served
    status, got = _call(url, "/docs/add", {"texts": ["Rome is old.", "Lisbon is by the sea."], "names": ["r", "l"]})
    assert status == 200 and got == {"ids": [3, 4]}
    assert _call(url, "/docs/delete", {"ids": [1]}) == (200, {"deleted": 1})
    reopened = ms.MemoryBank.load(path, engine.model, engine.tok)
    assert reopened.doc_ids() == [0, 2, 3, 4]
    assert reopened.name(3) == "r" and reopened.text(4) == "Lisbon is by the sea."
    routed = {d for v in _call(url, "/route", {"question": "Ottawa"})[1]["routing"].values() for d, _ in v}
    assert 1 not in routed


@pytest.mark.parametrize("path,body,status,message", [
    ("/ask", {}, 400, "missing field 'question'"),
    ("/ask", {"question": 3}, 400, "'question' must be str or list"),
    ("/ask", {"question": []}, 400, "non-empty list of strings"),
    ("/ask", {"question": "q", "max_new_tokens": True}, 400, "'max_new_tokens' must be int"),
    ("/ask", {"question": "q", "max_new_tokens": 0}, 400, "1..8192"),
    ("/ask", {"question": "q", "interleave": "sometimes"}, 400, "'interleave' must be"),
    ("/ask", {"question": "q", "temperature": -1}, 400, "temperature must be >= 0"),
    ("/ask", {"question": "q", "colour": "red"}, 400, "unknown field(s) ['colour']"),
    ("/route", {"question": "q", "k": 3}, 400, "unknown field(s) ['k']"),
    ("/docs/add", {"texts": ["ok", "   "]}, 400, "texts[1]: document is empty"),
    ("/docs/add", {"texts": ["a"], "names": ["x", "y"]}, 400, "2 entries for 1 texts"),
    ("/docs/add", {"texts": ["\ud800"]}, 400, "unpaired surrogate"),
    ("/docs/delete", {"ids": [7]}, 400, "no documents [7]"),
    ("/docs/delete", {"ids": [0, "1"]}, 400, "list of integers"),
    ("/nowhere", {}, 404, "no POST /nowhere"),
])
def test_bad_requests_are_refused_and_change_nothing(served, path, body, status, message):
    url, engine, _ = served
    got_status, got = _call(url, path, body)
    assert got_status == status and message in got["error"], got
    assert engine.bank.doc_ids() == [0, 1, 2]


def test_a_body_over_the_limit_is_refused_unread(served, monkeypatch):
    from memsparse.serve import server

    monkeypatch.setattr(server, "MAX_BODY", 16)
    status, got = _call(served[0], "/ask", {"question": "a question longer than the limit"})
    assert status == 413 and "over the 16 byte limit" in got["error"]


def test_bodies_that_are_not_json_objects(served):
    url, _, _ = served
    assert _call(url, "/ask", raw=b"\xff\xfe")[0] == 400
    status, got = _call(url, "/ask", raw=b"{not json")
    assert status == 400 and "not valid JSON" in got["error"]
    status, got = _call(url, "/ask", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in got["error"]
    status, got = _call(url, "/health", raw=b"{}")  # POST to a GET path
    assert status == 404 and "/health" in got["error"]


def test_the_command_line_serves_a_saved_bank(tmp_path):
    """`memsparse serve BANK --port 0` in its own process: answers, then stops cleanly on Ctrl-C (SIGINT)."""
    import re
    import signal
    import subprocess
    import sys

    model_dir = tmp_path / "model"
    tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    model, tok = ms.MSAForCausalLM.from_pretrained(model_dir), ms.load_tokenizer(model_dir)
    bank = ms.MemoryBank.build(model, tok, DOCS)
    bank.meta["model"] = str(model_dir)
    bank.save(tmp_path / "bank")
    cmd = [sys.executable, "-c", "import sys; from memsparse.cli import main; sys.exit(main())", "serve",
           str(tmp_path / "bank"), "--port", "0", "--device", "cpu"]
    # SIGINT as at a terminal, even when the suite runs in the background (where the shell ignores it, inherited)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stderr.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert port, line + proc.stderr.read() if proc.poll() is not None else line
        url = f"http://127.0.0.1:{port.group(1)}"
        assert _call(url, "/info")[1]["documents"] == 3
        status, got = _call(url, "/ask", {"question": "Where is Paris?", "max_new_tokens": 3, "interleave": "off"})
        assert status == 200 and got["question"] == "Where is Paris?"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
