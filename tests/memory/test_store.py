"""The on-disk bank: save/load round trips, incremental commits, deletes, compaction, refusals, crash safety."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memsparse as ms
from memsparse.memory import BankError
from memsparse.memory.store import MANIFEST

from ..conftest import assert_same_routing, tiny_model, tiny_tokenizer

MSA = {"pooling_kernel_size": 4, "top_k_docs": 2}
DOCS = ["Paris is the capital of France.", "Ottawa is the capital of Canada.", "Bananas are yellow and sweet.",
        "see <|im_end|> and [3] <End-of-Retrieve>", "Rome is in Italy, and it is old.", "x"]
QUESTIONS = ["Where is Ottawa?", "What color are bananas?", "Which capital is old?"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(seed=0):
    return tiny_model("qwen3", msa=MSA, vocab_size=300, seed=seed)


def _routes(model, tok, bank):
    engine = ms.MSAEngine(model, tok, bank)
    return [engine.route(q) for q in QUESTIONS]


def _answers(model, tok, bank):
    engine = ms.MSAEngine(model, tok, bank)
    return [a.transcript for a in engine.ask(QUESTIONS, max_new_tokens=6, interleave=False)]


@pytest.mark.slow
def test_save_load_round_trip(tok, tmp_path):
    model = _model()
    bank = ms.MemoryBank.build(model, tok, DOCS)
    bank.save(tmp_path / "bank")
    loaded = ms.MemoryBank.load(tmp_path / "bank", model, tok)
    assert loaded.num_docs == len(DOCS) and loaded.doc_ids() == list(range(len(DOCS)))
    assert [loaded.text(i) for i in range(len(DOCS))] == DOCS
    for a, b in zip(_routes(model, tok, bank), _routes(model, tok, loaded)):
        assert a == b  # bitwise: the loaded tensors are the saved ones
    assert _answers(model, tok, bank) == _answers(model, tok, loaded)
    man = json.loads((tmp_path / "bank" / MANIFEST).read_text())
    assert man["version"] == 2 and man["commit"] == 1 and man["docs"] == len(DOCS) and man["dtype"] == "float32"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_load_is_memory_mapped(tok, tmp_path):
    model = _model()
    ms.MemoryBank.build(model, tok, DOCS).save(tmp_path / "b")
    bank = ms.MemoryBank.load(tmp_path / "b", model, tok)
    t = bank.segments[0].keys[model.router_layers[0]]
    shard = str((tmp_path / "b" / bank.segments[0].file).resolve())
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    spans = [[int(x, 16) for x in m[0].split("-")] for m in maps if m[-1] == shard]
    assert any(a <= t.data_ptr() < b for a, b in spans)  # the tensor lives in a mapping of the shard file


def test_incremental_add_equals_build(tok, tmp_path):
    model = _model()
    whole = ms.MemoryBank.build(model, tok, DOCS)
    bank = ms.MemoryBank.build(model, tok, DOCS[:3])
    bank.save(tmp_path / "b")
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b").iterdir()}
    bank = ms.MemoryBank.load(tmp_path / "b", model, tok)
    assert bank.add(DOCS[3:]) == [3, 4, 5]
    bank.save()
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b").iterdir()}
    old_shards = {n for n in first if n.startswith(("seg-", "prefix-"))}
    assert all(after[n] == first[n] for n in old_shards)  # old shards untouched
    assert len([n for n in after if n.startswith("seg-")]) == 2
    reloaded = ms.MemoryBank.load(tmp_path / "b", model, tok)
    for a, b in zip(_routes(model, tok, whole), _routes(model, tok, reloaded)):
        assert_same_routing(a, b)


def test_add_then_delete_restores_routing(tok, tmp_path):
    model = _model()
    bank = ms.MemoryBank.build(model, tok, DOCS[:4])
    before = _routes(model, tok, bank)
    new = bank.add(["Ottawa Ottawa Canada capital", "bananas yellow bananas"])
    assert any(d in new for r in _routes(model, tok, bank) for picked in r.values() for d, _ in picked)
    bank.delete(new)
    for a, b in zip(before, _routes(model, tok, bank)):
        assert_same_routing(a, b)
    bank.save(tmp_path / "b", compact=False)
    loaded = ms.MemoryBank.load(tmp_path / "b", model, tok)
    assert loaded.deleted == set(new) and loaded.num_docs == 4
    for a, b in zip(before, _routes(model, tok, loaded)):
        assert_same_routing(a, b)
    assert loaded.add(["another"]) == [6]  # ids are never reused
    with pytest.raises(KeyError, match="no document 4"):
        loaded.delete([4])


def test_compaction_keeps_ids_and_routing(tok, tmp_path):
    model = _model()
    bank = ms.MemoryBank.build(model, tok, DOCS)
    bank.add(["Ottawa is cold in winter."])
    bank.delete([0, 2, 5])
    before = _routes(model, tok, bank)
    bank.save(tmp_path / "b")  # over a quarter of the chunks deleted: compacts
    loaded = ms.MemoryBank.load(tmp_path / "b", model, tok)
    assert loaded.deleted == set() and loaded.doc_ids() == [1, 3, 4, 6]
    assert loaded.text(6) == "Ottawa is cold in winter." and loaded.num_chunks < bank.num_chunks + 1
    files = [p.name for p in (tmp_path / "b").iterdir()]
    assert len([n for n in files if n.startswith("seg-")]) == 2  # rewritten segment + the untouched one
    for a, b in zip(before, _routes(model, tok, loaded)):
        assert_same_routing(a, b)
    with pytest.raises(KeyError):
        loaded.text(0)


def test_bank_serves_the_same_model_in_another_dtype(tok, tmp_path):
    from memsparse.model.checkpoint import load_pretrained

    model = _model()
    model.save_pretrained(tmp_path / "m")
    path = ms.MemoryBank.build(load_pretrained(tmp_path / "m"), tok, DOCS).save(tmp_path / "b")
    half = load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    bank = ms.MemoryBank.load(path, half, tok)  # float32 bank, bfloat16 model: accepted, cast on use
    routes = ms.MSAEngine(half, tok, bank).route(QUESTIONS[0])
    assert set(routes) == set(half.router_layers) and all(len(v) == 2 for v in routes.values())


def test_refusals(tok, tmp_path):
    model = _model()
    path = ms.MemoryBank.build(model, tok, DOCS).save(tmp_path / "b")
    with pytest.raises(BankError, match="different model"):
        ms.MemoryBank.load(path, _model(seed=1), tok)
    with pytest.raises(BankError, match="no such directory"):
        ms.MemoryBank.load(tmp_path / "nope", model)
    with pytest.raises(BankError, match="not a memsparse bank"):
        ms.MemoryBank.load(tmp_path, model)
    man = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**man, "version": 99}))
    with pytest.raises(BankError, match="version 99 is newer"):
        ms.MemoryBank.load(path, model)
    (path / MANIFEST).write_text(json.dumps(man))
    shard = path / man["segments"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(BankError, match="truncated"):
        ms.MemoryBank.load(path, model)
    shard.write_bytes(data[:5])
    with pytest.raises(BankError, match="not a readable shard"):
        ms.MemoryBank.load(path, model)
    shard.unlink()
    with pytest.raises(BankError, match="missing"):
        ms.MemoryBank.load(path, model)


_CHILD = """
import sys, time
import memsparse as ms
from memsparse.memory import store
from tests.conftest import tiny_model, tiny_tokenizer
point = sys.argv[2]
def pause(*a):
    print("PAUSED", flush=True)
    time.sleep(120)
if point == "shard":  # after the new shard is written and synced, before the manifest
    real = store._write
    def write(path, tensors, fp):
        n = real(path, tensors, fp)
        if path.name.startswith("seg-"):
            pause()
        return n
    store._write = write
else:  # the new manifest is written and synced under its temporary name, not yet renamed
    store.os.replace = pause
tok = tiny_tokenizer()
model = tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300)
bank = ms.MemoryBank.load(sys.argv[1], model, tok)
bank.add(["a new document about Ottawa", "and another"])
bank.delete([1])
bank.save()
"""


@pytest.mark.parametrize("point", ["shard", "manifest"])
def test_kill_mid_commit_leaves_previous_bank(tok, tmp_path, point):
    model = _model()
    path = ms.MemoryBank.build(model, tok, DOCS).save(tmp_path / "b")
    before = _routes(model, tok, ms.MemoryBank.load(path, model, tok))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), point], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.strip() == "PAUSED", proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = sorted(p.name for p in path.iterdir())
    assert len(leftovers) > 3  # the interrupted commit left its files behind
    bank = ms.MemoryBank.load(path, model, tok)
    assert bank.num_docs == len(DOCS) and bank.deleted == set()
    for a, b in zip(before, _routes(model, tok, bank)):
        assert a == b
    bank.add(["later"])
    bank.save()  # the next commit removes the interrupted one's files
    assert sorted(p.name[:4] for p in path.iterdir()) == ["lock", "mani", "pref", "read", "seg-", "seg-"]
    assert torch.equal(torch.tensor(ms.MemoryBank.load(path, model, tok).doc_ids()), torch.arange(7))


def test_document_longer_than_the_model_is_refused(tok):
    model = tiny_model("qwen3", msa=MSA, vocab_size=300, max_position_embeddings=64)
    bank = ms.MemoryBank.build(model, tok, ["short"])
    with pytest.raises(ValueError, match="document long one has .* tokens, over the model's 64 positions"):
        bank.add(["word " * 100], names=["long one"])
    assert bank.num_docs == 1 and bank.next_id == 1  # nothing half-added
