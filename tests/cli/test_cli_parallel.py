"""The command line under a distributed launch (issue 34 item 3), on CPUs over gloo with 2 processes launched as
torchrun launches them (WORLD_SIZE, RANK, MASTER_ADDR / MASTER_PORT): a bank encoded by 2 ranks answers as a
one-process bank of the same corpus, asked by 2 ranks and by one process (re-sharded); documents added and deleted
across the ranks; `serve` over the ranks (rank 0 answers HTTP, rank 1 follows); `bench speed --world-size 2`
(spawning its ranks) writes its JSON. Documents are encoded one per forward (--batch-tokens 1) so that the ranks'
encodings are the one process's bit for bit."""

import json
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback

import torch

from memsparse.cli import main

from ..conftest import run_ranks

DOCS = ["Paris is in France.", "Ottawa is in Canada.", "Bananas are yellow and sweet.", "Rome is an old city.",
        "The river runs to the sea.", "Mountains are tall.", "The answer is 42.", "Lisbon is in Portugal."]
ASK = ["--json", "--max-new-tokens", "5", "--device", "cpu"]
JOIN_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_client(err_file: str, out_file: str) -> None:
    """Rank 0's HTTP client: waits for the server's line, asks, adds and deletes a document, then stops it."""
    import httpx

    try:
        for _ in range(600):
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", open(err_file).read())
            if m:
                break
            time.sleep(0.1)
        base = f"http://127.0.0.1:{m.group(1)}"
        with httpx.Client(base_url=base, timeout=60) as c:
            r = [c.post("/v1/completions", json={"model": "memsparse", "prompt": "Where is Paris?", "max_tokens": 3,
                                                 "interleave": "off"}),
                 c.post("/v1/memory/documents", json={"texts": ["Oslo is in Norway."]}),
                 c.delete("/v1/memory/documents/0"), c.delete("/v1/memory/documents/0"), c.get("/v1/memory/info"),
                 c.post("/v1/memory/route", json={"question": "Where is Oslo?"})]
        with open(out_file, "w") as f:
            json.dump([[x.status_code, x.json()] for x in r], f)
    finally:
        os.kill(os.getpid(), signal.SIGINT)  # uvicorn stops; rank 0 releases rank 1


def _rank(rank: int, world: int, ports: list[int], script: list[list[str]], out: str) -> None:
    """One rank: the environment torchrun gives it, then every command of `script` in turn (its own MASTER_PORT
    each: every command joins and leaves the process group); stdout / stderr of each in out/{i}-{rank}.*"""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    codes = []
    try:
        for i, (port, argv) in enumerate(zip(ports, script)):
            os.environ["MASTER_PORT"] = str(port)
            err_file = os.path.join(out, f"{i}-{rank}.err")
            with open(os.path.join(out, f"{i}-{rank}.out"), "w") as o, open(err_file, "w", buffering=1) as e:
                sys.stdout, sys.stderr = o, e
                try:
                    if argv[0] == "serve" and rank == 0:
                        threading.Thread(target=_serve_client, args=(err_file, os.path.join(out, "http.json")),
                                         daemon=True).start()
                    codes.append(main(argv))
                finally:
                    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        with open(os.path.join(out, f"codes-{rank}.json"), "w") as f:
            json.dump(codes, f)
    except BaseException:
        with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _launch(script: list[list], out, world: int = 2) -> list[tuple[int, str, str]]:
    """Run `script` on `world` ranks; per command: rank 0's exit code, stdout and stderr (and rank 1's stderr)."""
    script = [[str(a) for a in argv] for argv in script]
    run_ranks(_rank, world, (world, [_free_port() for _ in script], script, str(out)), out, JOIN_SECONDS)
    codes = [json.loads((out / f"codes-{r}.json").read_text()) for r in range(world)]
    assert codes[1] == codes[0], codes  # every rank ends alike
    return [(codes[0][i], (out / f"{i}-0.out").read_text(), (out / f"{i}-0.err").read_text() + "|" +
             (out / f"{i}-1.err").read_text()) for i in range(len(script))]


def _answer(out: str) -> tuple:
    a = json.loads(out)
    return a["text"], a["rounds"], a["routing"]


def test_cli_under_a_distributed_launch(model_dir, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": f"doc-{n}"}) + "\n" for n, t in enumerate(DOCS)))
    more = tmp_path / "more.txt"
    more.write_text("Oslo is in Norway.\n")
    one, two, served = tmp_path / "one", tmp_path / "two", tmp_path / "served"
    enc = ["--model", model_dir, "--device", "cpu", "--batch-tokens", "1"]

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    run("encode", corpus, "--out", one, *enc)
    before = _answer(run("ask", one, "Where is Ottawa?", *ASK))
    steps = _launch([["encode", corpus, "--out", two, *enc],
                     ["ask", two, "Where is Ottawa?", *ASK],
                     ["docs", "add", two, more],
                     ["docs", "delete", two, "1", "3"],
                     ["docs", "delete", two, "17"],
                     ["encode", corpus, "--out", two, *enc],
                     ["encode", corpus, "--out", served, *enc, "--key-dtype", "fp8", "--content-dtype", "fp8",
                      "--calibrate-keys", "8", "--priors", "4"],
                     ["serve", served, "--port", "0", "--device", "cpu"],
                     ["ask", one, "Where is Ottawa?", *ASK],
                     ["bench", "speed", "--world-size", "3", "--tiny"],
                     ["eval", "niah"]], tmp_path)
    (code, out, err), *rest = steps
    assert code == 0 and "8 documents" in out and "over 2 ranks" in out, err
    assert sorted(p.name for p in two.iterdir() if p.is_dir()) == ["rank-0", "rank-1"]
    code, out, err = rest[0]
    assert code == 0 and _answer(out) == before, err  # 2 ranks answer as one process
    assert [c for c, _, _ in rest[1:3]] == [0, 0] and "added documents 8..8" in rest[1][1]
    code, _, err = rest[3]  # an unknown id: one line from each rank, nothing changed
    assert code == 2 and err == "memsparse docs: error: no document 17 in the bank\n|memsparse docs (rank 1): error: " \
                                "no document 17 in the bank\n"
    code, _, err = rest[4]
    assert code == 2 and "already holds a bank" in err.split("|")[0] and err.count("\n") == 2
    assert rest[5][0] == 0 and rest[6][0] == 0
    for (code, _, err), why in zip(rest[7:], ("is a one-process bank: use it without torchrun",
                                              "--world-size 3, but this launch has 2 ranks", "not under torchrun")):
        lines = err.replace("|", "").splitlines()
        assert code == 2 and len(lines) == 2 and all(why in x for x in lines), err  # one line from each rank

    # the same changes to the one-process bank; asked by one process, the bank of 2 ranks (re-sharded) answers alike
    run("docs", "add", one, more)
    run("docs", "delete", one, "1", "3")
    assert run("docs", "list", two) == run("docs", "list", one)
    for q in ("Where is Ottawa?", "Where is Oslo?"):
        assert _answer(run("ask", two, q, *ASK)) == _answer(run("ask", one, q, *ASK)), q
    assert "ranks: 2\n" in run("info", two)
    verified = run("docs", "verify", two).splitlines()
    assert len(verified) == 2 and all(f"rank-{r}: commit" in x for r, x in enumerate(verified))
    assert main(["docs", "compact", str(two)]) == 2 and "dropped at every commit" in capsys.readouterr().err

    # serve: rank 0 answered over HTTP while rank 1 followed; the changes were committed over both ranks
    (ans, added, deleted, again, info, route) = json.loads((tmp_path / "http.json").read_text())
    assert ans[0] == 200 and ans[1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert added == [200, {"ids": [8]}] and deleted[0] == 200 and again[0] == 404
    assert info[0] == 200 and info[1]["documents"] == 8 and info[1]["ranks"] == 2
    assert (info[1]["routing keys"], info[1]["document keys/values"]) == ("fp8", "fp8")
    assert route[0] == 200 and all(len(v) == 2 for v in route[1]["routing"].values())
    assert "document priors: yes" in run("info", served)
    listed = run("docs", "list", served)
    assert "[0]\t" not in listed and "[8]\t8\t" in listed and "Oslo is in Norway." in listed


def test_bench_speed_world_size(tmp_path, capsys):
    """`bench speed --world-size 2` spawns its 2 ranks (gloo) and writes speed_parallel_2.json beside --out."""
    out = tmp_path / "speed.json"
    code = main(["bench", "speed", "--world-size", "2", "--tiny", "--tokens", "4096", "--repeats", "1",
                 "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads((tmp_path / "speed_parallel_2.json").read_text())
    assert {"gpu", "date", "commit"} <= set(res) and res["world_size"] == 2 and res["backend"] == "gloo"
    assert [(p["tokens"], p["key_dtype"]) for p in res["points"]] == [(4096, "bf16"), (4096, "fp8")]
    for p in res["points"]:
        assert {"routing_ms", "collectives_ms", "gather_ms", "ttft_ms", "decode_ms_per_token", "routing_floor_ms"} \
            <= set(p) and 0 < p["collectives_ms"] <= p["routing_ms"]
        assert p["chunks_per_rank"] == [32, 32]  # 4 documents of 16 chunks (tiny geometry: 1024 tokens, 64 a chunk)
    assert "speed_parallel_2.json" in printed
    drawn = (tmp_path / "speed_parallel.png").exists()
    assert ("speed_parallel.png" in printed) == drawn and ("no plot: matplotlib" in printed) != drawn
    code = main(["bench", "speed", "--world-size", "2", "--models", "smollm2"])
    assert code == 2 and "qwen3-4b only" in capsys.readouterr().err
