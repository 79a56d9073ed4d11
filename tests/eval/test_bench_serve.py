"""`memsparse bench serve` end to end on the CPU at a tiny geometry and a tiny memory: the file carries the card,
date and commit, routing for a batch of 1 and of 8, the server with 1 and 8 clients (no timing is asserted: CPU
timings mean nothing here), and bad values are one-line errors."""

import json

import pytest

from memsparse.cli import main
from memsparse.eval.serving import Settings, run


def test_bench_serve_tiny(tmp_path, capsys):
    out = tmp_path / "serve.json"
    res = run(out, Settings(tokens=4096, repeats=1, requests=1, max_tokens=2, doc_len=512), tiny=True)
    assert json.loads(out.read_text()) == res and "partial" not in res
    stages = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bench serve: ")]
    firsts = [line.split(":")[1].split()[0].strip(",") for line in stages]
    assert firsts == ["a", "routing", "routing", "server", "server"]
    assert {"gpu", "date", "commit"} <= res.keys() and res["model"] == "tiny" and res["tokens"] == 4096
    assert [(r["keys"], r["batch"]) for r in res["routing"]] == [("float32", 1), ("float32", 8), ("fp8", 1), ("fp8", 8)]
    assert all(r["routing_ms"] > 0 for r in res["routing"]) and res["server_keys"] == "fp8"
    assert [r["clients"] for r in res["server"]] == [1, 8]
    assert [r["requests"] for r in res["server"]] == [1, 8] and all(r["requests_per_s"] > 0 for r in res["server"])
    assert res["routing_ratio"] > 0 and res["routing_ratio_fp8"] > 0 and res["throughput_ratio"] > 0


@pytest.mark.parametrize("args,message", [
    (["--tokens", "4096,8192"], "bench serve measures one memory size"),
    (["--tokens", "lots"], "--tokens 'lots': expected memory sizes in tokens"),
    (["--repeats", "0"], "--repeats 0: expected at least 1"),
])
def test_bench_serve_refuses_bad_values(args, message, capsys):
    assert main(["bench", "serve", "--tiny", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_bench_serve_cut_short_leaves_what_it_measured(tmp_path, monkeypatch):
    """A run that fails in the server stage (or is killed there) has already written its routing figures."""
    import memsparse.eval.serving as serving

    def fail(*args, **kwargs):
        raise RuntimeError("out of time")

    monkeypatch.setattr(serving, "throughput", fail)
    out = tmp_path / "serve.json"
    with pytest.raises(RuntimeError, match="out of time"):
        run(out, Settings(tokens=4096, repeats=1, requests=1, max_tokens=2, doc_len=512), tiny=True)
    saved = json.loads(out.read_text())
    assert saved["partial"].startswith("routing with fp8 keys") and len(saved["routing"]) == 4
    assert saved["routing_ratio"] > 0 and "server" not in saved


def test_bench_serve_without_its_server_stack_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """A machine without httpx (the `eval` extra) is told so at once, not after minutes of bank building."""
    import importlib.util

    import memsparse.eval.serving as serving

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "httpx" else real(name, *a))
    monkeypatch.setattr(serving, "_qwen_banks", lambda *a, **k: pytest.fail("built a bank"))
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--tiny", "--tokens", "4096", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs httpx" in err[0] and "memsparse[eval]" in err[0] and not out.exists()
