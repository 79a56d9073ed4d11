"""The store under many processes and against damaged files: concurrent writers lose nothing, a reader keeps a
consistent snapshot through a compaction, the lock names its holder, every kind of damaged file is one BankError
line (from `load`, `verify` and the command line), format-1 banks open and migrate."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memsparse as ms
from memsparse.cli import main
from memsparse.memory import BankError, edits, store
from memsparse.memory.store import MANIFEST, BankBusy

from ..conftest import tiny_model, tiny_tokenizer

MSA = {"pooling_kernel_size": 4, "top_k_docs": 2}
DOCS = ["Paris is the capital of France.", "Ottawa is the capital of Canada.", "Bananas are yellow and sweet.",
        "Rome is in Italy, and it is old.", "x"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_model("qwen3", msa=MSA, vocab_size=300).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _model(seed=0):
    return tiny_model("qwen3", msa=MSA, vocab_size=300, seed=seed)


def _bank(tok, path, docs=DOCS, seed=0):
    return ms.MemoryBank.build(_model(seed), tok, docs).save(path)


# ---------------------------------------------------------------------------------------------- writers
def _cli_writer(bank, model_dir, corpus_dir, who, rounds, barrier):
    """A separate process running `memsparse docs add` `rounds` times on one bank."""
    barrier.wait()  # both writers start together
    for r in range(rounds):
        corpus = Path(corpus_dir) / f"{who}-{r}.txt"
        corpus.write_text(f"writer {who} round {r} first.\n\nwriter {who} round {r} second.\n")
        code = main(["docs", "add", bank, str(corpus), "--model", model_dir, "--device", "cpu", "--wait", "300"])
        if code != 0:
            raise SystemExit(f"writer {who} round {r}: exit {code}")


@pytest.mark.slow
def test_two_writer_processes_lose_nothing(tok, model_dir, tmp_path):
    bank = tmp_path / "bank"
    model = ms.MSAForCausalLM.from_pretrained(model_dir)
    ms.MemoryBank.build(model, tok, DOCS[:2]).save(bank)
    ctx = mp.get_context("spawn")
    barrier, rounds = ctx.Barrier(2), 3
    procs = [ctx.Process(target=_cli_writer, args=(str(bank), str(model_dir), str(tmp_path), w, rounds, barrier))
             for w in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    loaded = ms.MemoryBank.load(bank, model, tok)
    texts = [loaded.text(d) for d in loaded.doc_ids()]
    want = {f"writer {w} round {r} {n}." for w in "ab" for r in range(rounds) for n in ("first", "second")}
    assert len(texts) == 2 + len(want) and set(texts[2:]) == want  # every document of both writers
    assert loaded.doc_ids() == list(range(len(texts)))  # unique ids, none reused or skipped
    assert store.read_manifest(bank)["commit"] == 1 + 2 * rounds  # one commit per `docs add`
    for d in loaded.doc_ids():  # each document encoded with the id it has (its text names it)
        r = loaded.locate(d)
        assert loaded.segments[r.segment].doc_ids[r.local] == d
    assert store.verify(bank)["unverified"] == 0


def test_a_stale_copy_is_refused_not_committed(tok, tmp_path):
    path = _bank(tok, tmp_path / "b")
    model = _model()
    first, second = (ms.MemoryBank.load(path, model, tok) for _ in range(2))
    first.add(["from the first copy"])
    first.save()
    second.add(["from the second copy"])
    with pytest.raises(BankError, match=r"another writer committed to the bank since this copy was loaded "
                                        r"\(commit 1, now 2\); load it again"):
        second.save()
    with edits.update(path, model, tok) as bank:  # the way to do it: latest commit, under the lock
        assert bank.add(["from the second copy"]) == [6]
    assert [ms.MemoryBank.load(path, model, tok).text(d) for d in (5, 6)] == ["from the first copy",
                                                                              "from the second copy"]


def test_add_documents_encodes_again_after_a_commit_during_its_encoding(tok, tmp_path, monkeypatch):
    path = _bank(tok, tmp_path / "b")
    model = _model()
    real, calls = ms.MemoryBank.add, []

    def add(bank, texts, **kw):  # another writer commits while the first encoding runs
        calls.append(bank.commit)
        if len(calls) == 1:
            with edits.update(path, _model(), tok) as other:
                assert real(other, ["committed meanwhile"]) == [5]
        return real(bank, texts, **kw)

    monkeypatch.setattr(ms.MemoryBank, "add", add)
    bank, ids = edits.add_documents(path, model, tok, ["mine", "mine too"], names=["a", "b"])
    assert calls == [1, 2] and ids == [6, 7] and bank.commit == 3  # encoded again on commit 2, with ids 6 and 7
    monkeypatch.setattr(ms.MemoryBank, "add", real)
    loaded = ms.MemoryBank.load(path, model, tok)
    assert [loaded.name(6), loaded.text(7)] == ["a", "mine too"]

    def tail_keys(bank, n_docs):  # K̄ of the bank's last n documents, first router layer
        lay, seg = model.router_layers[0], bank.segments[-1]
        return seg.keys[lay][seg.num_chunks - sum(seg.chunk_count[-n_docs:]):]

    ok = ms.MemoryBank.build(model, tok, [*DOCS, "committed meanwhile", "mine", "mine too"])
    stale = ms.MemoryBank.build(model, tok, [*DOCS, "mine", "mine too"])  # as ids 5 and 6 would have been
    torch.testing.assert_close(tail_keys(loaded, 2), tail_keys(ok, 2))  # encoded as documents 6 and 7 are
    assert not torch.allclose(tail_keys(stale, 2), tail_keys(ok, 2))


_HOLDER = """
import sys, time
from memsparse.memory import store
with store.writer(sys.argv[1]):
    print("HOLDING", flush=True)
    time.sleep(120)
"""


def test_lock_timeout_names_the_holder(tok, model_dir, tmp_path, capsys):
    path = _bank(tok, tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), "--doing", "it"], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "HOLDING"
        with pytest.raises(BankBusy, match=rf"{path}: the bank is being written by another process \(pid {proc.pid} "
                                           r"on .*: -c .*--doing it, since .* UTC\); gave up after 0 s"):
            with store.writer(path, timeout=0):
                pass
        assert ms.MemoryBank.load(path, _model(), tok).num_docs == len(DOCS)  # readers are not held up
        (tmp_path / "more.txt").write_text("more")
        code = main(["docs", "add", str(path), str(tmp_path / "more.txt"), "--model", str(model_dir), "--device",
                     "cpu", "--wait", "0"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and err.startswith(f"memsparse docs: error: {path}: the bank is being written by another "
                                            f"process (pid {proc.pid}")
    finally:
        proc.kill()
        proc.wait()
    with store.writer(path, timeout=0):  # released with its holder
        assert (path / store.LOCK).read_text().startswith(f"pid {os.getpid()} ")


def test_a_forked_child_does_not_inherit_the_lock(tok, tmp_path):
    path = _bank(tok, tmp_path / "b")
    (to_child, from_parent), (to_parent, from_child) = os.pipe()[::-1], os.pipe()[::-1]
    pid = None
    try:
        with store.writer(path):
            pid = os.fork()
            if pid == 0:  # the child: the parent's lock is not its own, and it does not keep it held
                try:
                    with store.writer(path, timeout=0):
                        os.write(to_parent, b"took it")
                except BankBusy:
                    os.write(to_parent, b"busy")
                os.read(from_parent, 1)  # lives on after the parent lets go
                os._exit(0)
            child_saw = os.read(from_child, 16)
        proc = subprocess.run([sys.executable, "-c", _TRY, str(path)], capture_output=True, text=True, cwd=ROOT)
    finally:
        if pid:
            os.write(to_child, b"x")
            os.waitpid(pid, 0)
    assert child_saw == b"busy"
    assert proc.stdout.strip() == "took it", proc.stderr  # the child, still alive, does not hold the lock


_TRY = """
import sys
from memsparse.memory import store
with store.writer(sys.argv[1], timeout=0):
    print("took it")
"""


# ---------------------------------------------------------------------------------------------- readers
def test_reader_keeps_its_snapshot_through_a_compaction(tok, tmp_path, monkeypatch):
    path = _bank(tok, tmp_path / "b")
    model = _model()
    before = ms.MemoryBank.load(path, model, tok)
    old_files = set(store.named_files(store.read_manifest(path)))
    real = store._read_manifest
    state = {"hooked": False}

    def read_then_compact(p, *name):  # the reader has read the manifest; a writer compacts before it maps the files
        m = real(p, *name)
        if not state["hooked"]:
            state["hooked"] = True
            with edits.update(path, _model(), tok) as bank:
                bank.delete([0, 1, 2])  # over a quarter of the chunks: the commit compacts
            assert old_files <= {f.name for f in path.iterdir()}  # clean-up deferred: a reader is mapping files
        return m

    monkeypatch.setattr(store, "_read_manifest", read_then_compact)
    reader = ms.MemoryBank.load(path, model, tok)
    monkeypatch.setattr(store, "_read_manifest", real)
    assert reader.commit == 1 and reader.doc_ids() == list(range(len(DOCS)))  # the snapshot it started from
    assert [reader.text(d) for d in reader.doc_ids()] == DOCS
    engine, old_engine = ms.MSAEngine(model, tok, reader), ms.MSAEngine(model, tok, before)
    assert engine.route("Where is Ottawa?") == old_engine.route("Where is Ottawa?")
    assert store.verify(path)["leftover"] == 1  # the compacted segment's old shard, kept for the reader
    after = ms.MemoryBank.load(path, model, tok)
    assert after.commit == 2 and after.doc_ids() == [3, 4] and after.deleted == set()
    with edits.update(path, model, tok) as bank:  # the next commit, with no reader about, cleans up
        bank.add(["later"])
    names = {f.name for f in path.iterdir()}
    assert not old_files & names - set(store.named_files(store.read_manifest(path)))
    assert reader.text(0) == DOCS[0]  # its files are gone from the directory, not from its mapping


def test_server_follows_other_writers(tok, model_dir, tmp_path):
    from fastapi.testclient import TestClient

    from memsparse.serve import create_app

    path = tmp_path / "b"
    model = ms.MSAForCausalLM.from_pretrained(model_dir)
    ms.MemoryBank.build(model, tok, DOCS).save(path)
    engine = ms.MSAEngine(model, tok, ms.MemoryBank.load(path, model, tok))
    with TestClient(create_app(engine), base_url="http://127.0.0.1:8080") as client:

        def call(route, body=None):
            r = client.post(route, json=body) if body is not None else client.get(route)
            assert r.status_code == 200, r.text
            return r.json()

        (tmp_path / "more.txt").write_text("written elsewhere")
        subprocess.run([sys.executable, "-m", "memsparse.cli", "docs", "add", str(path), str(tmp_path / "more.txt"),
                        "--model", str(model_dir), "--device", "cpu"], check=True, cwd=ROOT, capture_output=True)
        assert call("/v1/memory/documents/5")["text"] == "written elsewhere"  # a read sees the other commit
        assert call("/v1/memory/documents", {"texts": ["written by the server"]}) == {"ids": [6]}  # no reused id
        with edits.update(path, _model(), tok) as other:
            other.delete([6])
        assert call("/v1/memory/documents", {"texts": ["again"]}) == {"ids": [7]}
        bank = ms.MemoryBank.load(path, model, tok)
        assert bank.doc_ids() == [0, 1, 2, 3, 4, 5, 7] and bank.text(5) == "written elsewhere"


# ---------------------------------------------------------------------------------------------- damage
def _header(file: Path) -> tuple[int, dict]:
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def _tensor_at(file: Path, name: str) -> int:
    n, h = _header(file)
    return 8 + n + h[name]["data_offsets"][0]


def _reseal(path: Path) -> None:
    """Record the files as they are now: damage the checksums would otherwise catch gets past them."""
    m = json.loads((path / MANIFEST).read_text())
    m["files"] = {name: store.file_sum(path / name) for name in m["files"]}
    m["checksum"] = store._manifest_sum(m)
    (path / MANIFEST).write_text(json.dumps(m))


def _rewrite_header(file: Path, change) -> None:
    data = file.read_bytes()
    n, h = _header(file)
    change(h)
    new = json.dumps(h, separators=(",", ":")).encode()
    assert len(new) <= n
    file.write_bytes(data[:8] + new + b" " * (n - len(new)) + data[8 + n:])


def _damage(case: str, path: Path, tok, tmp_path: Path) -> None:
    m = store.read_manifest(path)
    seg = path / m["segments"][0]["file"]
    key = f"layer.{m['router_layers'][0]}.k"
    data = bytearray(seg.read_bytes())
    if case == "flipped bytes":
        data[_tensor_at(seg, key) + 5] ^= 0x10
        seg.write_bytes(data)
    elif case == "NaN, resealed":
        at = _tensor_at(seg, key)
        data[at:at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
        seg.write_bytes(data)
        _reseal(path)
    elif case in ("shard of another model", "shard of another bank"):
        other = _bank(tok, tmp_path / "other", DOCS if case == "shard of another model" else DOCS[::-1],
                      seed=1 if case == "shard of another model" else 0)
        seg.write_bytes((other / store.read_manifest(other)["segments"][0]["file"]).read_bytes())
    elif case == "shard of another bank, resealed":
        other = _bank(tok, tmp_path / "other", DOCS[:2])
        seg.write_bytes((other / store.read_manifest(other)["segments"][0]["file"]).read_bytes())
        _reseal(path)
    elif case == "header lies about a shape":
        _rewrite_header(seg, lambda h: h[key]["shape"].__setitem__(0, h[key]["shape"][0] + 1))
    elif case == "header lies consistently, resealed":  # (C, Hkv, D) -> (C, D, Hkv): same bytes, wrong shape
        _rewrite_header(seg, lambda h: h[key].__setitem__("shape", [h[key]["shape"][i] for i in (0, 2, 1)]))
        _reseal(path)
    elif case == "truncated":
        seg.write_bytes(data[:-7])
    elif case == "manifest edited":
        man = json.loads((path / MANIFEST).read_text())
        man["next_id"] = 2
        (path / MANIFEST).write_text(json.dumps(man))
    else:
        raise AssertionError(case)


DAMAGE = {
    "flipped bytes": "fails its checksum",
    "NaN, resealed": "tensor layer.2.k holds NaN",
    "shard of another model": "was written for another model",
    "shard of another bank": "fails its checksum",
    "shard of another bank, resealed": r"tensor token_count is int64 \[2\], the manifest needs \[5\]",
    "header lies about a shape": "the header says tensor 'layer.2.k' is F32",
    "header lies consistently, resealed": r"layer.2.k is float32 \[\d+, 8, 2\], the manifest needs \[\d+, 2, 8\]",
    "truncated": "shard is truncated",
    "manifest edited": "the manifest fails its checksum",
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_files_are_one_line_errors(tok, tmp_path, capsys, case):
    path = _bank(tok, tmp_path / "b")
    model = _model()
    assert model.router_layers[0] == 2  # the layer DAMAGE names
    ms.MemoryBank.load(path, model, tok)  # checked once: what changes afterwards is checked again
    _damage(case, path, tok, tmp_path)
    with pytest.raises(BankError, match=DAMAGE[case]):
        ms.MemoryBank.load(path, model, tok)
    with pytest.raises(BankError, match=DAMAGE[case]):
        store.verify(path)
    assert main(["fsck", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "the bank is damaged" in err, err


def test_damaged_text_is_one_line_error(tok, tmp_path, capsys, model_dir):
    path = _bank(tok, tmp_path / "b")
    seg = path / store.read_manifest(path)["segments"][0]["file"]
    data = bytearray(seg.read_bytes())
    at = _tensor_at(seg, "text_data")
    data[at + 2:at + 6] = b"\xff\x00\xff\x00"  # inside the first record's zlib stream
    seg.write_bytes(data)
    with pytest.raises(BankError, match="fails its checksum"):
        ms.MemoryBank.load(path, _model(), tok)
    _reseal(path)
    bank = ms.MemoryBank.load(path, _model(), tok)  # texts are decoded on use
    with pytest.raises(BankError, match="the stored text of table row 0 is damaged"):
        bank.text(0)
    assert bank.text(1) == DOCS[1]
    with pytest.raises(BankError, match="text of table row 0 is damaged .*; the bank is damaged"):
        store.verify(path)
    m = json.loads((path / MANIFEST).read_text())
    m["meta"] = {"model": str(model_dir)}
    m["checksum"] = store._manifest_sum(m)
    (path / MANIFEST).write_text(json.dumps(m))
    assert main(["docs", "list", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text of table row 0 is damaged" in err[0], err


def test_nan_is_not_written(tok, tmp_path):
    bank = ms.MemoryBank.build(_model(), tok, DOCS)
    bank.segments[0].values[2][0, 0, 0] = float("nan")
    with pytest.raises(BankError, match="tensor layer.2.v of seg-.* holds NaN or infinite values; not written"):
        bank.save(tmp_path / "b")
    assert not (tmp_path / "b" / MANIFEST).exists()
    bank.segments[0].values[2][0, 0, 0] = 0.0
    bank.save(tmp_path / "b")
    bank.add(["later"])
    bank.key_moments = {lay: torch.full((2, 8, 8), float("inf")) for lay in bank.model.router_layers}
    with pytest.raises(BankError, match="tensor layer.2 of moments-.* holds NaN or infinite values"):
        bank.save()  # the new segment is written, the commit is not
    bank.key_moments = None
    bank.save()  # the segment named by the failed commit is written again
    assert store.verify(tmp_path / "b")["documents"] == len(DOCS) + 1
    assert ms.MemoryBank.load(tmp_path / "b", _model(), tok).text(len(DOCS)) == "later"


# ---------------------------------------------------------------------------------------------- format 1
def test_format_1_bank_opens_unverified_and_migrates(tok, tmp_path, capsys):
    path = _bank(tok, tmp_path / "b")
    m = json.loads((path / MANIFEST).read_text())
    for k in ("commit", "files", "checksum"):
        del m[k]
    (path / MANIFEST).write_text(json.dumps({**m, "version": 1}))  # as memsparse wrote banks before
    model = _model()
    assert main(["docs", "verify", str(path)]) == 0
    assert capsys.readouterr().out == (f"{path}: commit 0, 2 files intact, 2 without checksums (format 1: recorded at "
                                       f"its next commit), {len(DOCS)} documents\n")
    assert store.verify(path) == {"commit": 0, "files": 2, "unverified": 2, "leftover": 0,
                                  "documents": len(DOCS)}
    assert ms.MemoryBank.load(path, model, tok).doc_ids() == list(range(len(DOCS)))
    with edits.update(path, model, tok) as bank:  # the next commit records every file's checksum
        bank.add(["new"])
    m = store.read_manifest(path)
    assert m["version"] == 2 and m["commit"] == 1 and set(m["files"]) == set(store.named_files(m))
    assert store.verify(path) == {"commit": 1, "files": 3, "unverified": 0, "leftover": 0,
                                  "documents": len(DOCS) + 1}
