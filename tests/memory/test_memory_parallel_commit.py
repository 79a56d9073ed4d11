"""Memory Parallel (memory/parallel.py) on 2 CPU processes over gloo, beyond tests/memory/test_memory_parallel.py: 8-bit
routing keys and K̄/V̄ quantized by each rank as one process quantizes them (routing and answers identical to a
one-process bank of the same dtypes; calibrated keys too; saved and re-sharded unchanged); document priors computed
over the ranks equal to one process's; atomic commits (a crash
between the ranks' staged shards and the index leaves the previous commit open with its documents); a sharded
service following a commit another process made. One spawn runs every check (a process start costs seconds)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ..conftest import gloo_rank, run_ranks, tiny_model, tiny_tokenizer
from .test_memory_parallel import MSA, QUESTIONS, _args, _check_routing, _docs, _route

JOIN_SECONDS = 150
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _worker(rank: int, world: int, init: str, out: str) -> None:
    gloo_rank(rank, world, init, out, lambda r, w, o: _checks(r, w, Path(o)))


def _stored(bank, d: int) -> list:
    """A document's stored tensors (8-bit ones as data and scale), every router layer."""
    from memsparse.memory.parallel import encoded
    from memsparse.memory.quant import QTensor

    enc = encoded(bank, [d])
    out = []
    for n in ("keys", "values", "route_keys"):
        for _, t in sorted((enc[n] or {}).items()):
            out += [t.data, t.scale] if isinstance(t, QTensor) else [t]
    return out


def _answers(engine_bank, ref, model, tok) -> None:
    import memsparse as ms

    plain = {"refine": 0, "refine_margin": 1.0, "refine_fuse": False}
    a = ms.MSAEngine(model, tok, engine_bank, similarity="train", **plain).ask(QUESTIONS[:2], max_new_tokens=5,
                                                                              interleave=False)
    b = ms.MSAEngine(model, tok, ref, similarity="train", **plain).ask(QUESTIONS[:2], max_new_tokens=5,
                                                                      interleave=False)
    assert [(x.text, x.routing) for x in a] == [(y.text, y.routing) for y in b]


def _checks(rank: int, world: int, out: Path) -> None:
    import memsparse as ms
    from memsparse.memory.parallel import ShardedBank, encoded, read_index
    from memsparse.memory.quant import STORAGE, QTensor
    from memsparse.memory.table import BankError

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", msa=MSA, vocab_size=300)
    docs = _docs(24, seed=3)
    base = ms.MemoryBank.build(model, tok, docs)  # model dtypes: the encodings both sides quantize
    enc = _args(encoded(base, base.doc_ids()))
    sub = dist.new_group([0])  # one process (rank 0) opening what 2 ranks saved

    # 8-bit keys and K̄/V̄: each rank quantizes its documents as one process does, chunk for chunk
    for kd, cd in (("fp8", "fp8"), ("int8", "model"), ("model", "int8")):
        ref = ms.MemoryBank.empty(model, base.prefix_ids, tok=tok, key_dtype=kd, content_dtype=cd)
        ref.add_encoded(*enc)
        sb = ShardedBank(ms.MemoryBank.empty(model, base.prefix_ids, tok=tok, key_dtype=kd, content_dtype=cd))
        assert sb.add_encoded(*enc) == ref.doc_ids()
        seg = sb.shard.segments[0]
        want = {"model": model.dtype, **STORAGE}
        assert seg.route_keys[1].dtype == want[kd] and seg.keys[1].dtype == want[cd]
        assert isinstance(seg.values[1], QTensor) == (cd != "model")
        for d in sb.shard.doc_ids():
            assert all(torch.equal(x, y) for x, y in zip(_stored(sb.shard, d), _stored(ref, d), strict=True)), d
        where = f"{kd} keys, {cd} K̄/V̄"
        _check_routing(sb, ref, where, exact=True, light=True)
        _answers(sb, ref, model, tok)
        if kd == "fp8":  # saved by 2 ranks, opened by 2 and by one: the 8-bit tensors unchanged
            sb.delete([4])
            ref.delete([4])
            sb.save(out / "b8")
            ref.compact()
            for group in (None, sub):
                if rank == 0 or group is None:
                    again = ShardedBank.load(out / "b8", model, tok, group=group)
                    assert again.shard.key_dtype == kd and again.doc_ids() == ref.doc_ids()
                    for d in again.shard.doc_ids():
                        assert all(torch.equal(x, y) for x, y in zip(_stored(again.shard, d), _stored(ref, d)))
                    _check_routing(again, ref, f"{where}, saved and opened by {again.world}", exact=True, light=True)
                dist.barrier()
    # built by the ranks (each encodes and quantizes its own documents) against one process
    built = ShardedBank.build(model, tok, docs, key_dtype="fp8", content_dtype="fp8")
    _check_routing(built, ms.MemoryBank.build(model, tok, docs, key_dtype="fp8", content_dtype="fp8"), "built fp8")

    # keys calibrated for routing queries (engine calibrate_keys): the same moments, the same 8 bits
    ref = ms.MemoryBank.empty(model, base.prefix_ids, tok=tok)
    ref.add_encoded(*enc)
    sb = ShardedBank(ms.MemoryBank.empty(model, base.prefix_ids, tok=tok))
    sb.add_encoded(*enc)
    m_ref = ms.MSAEngine(model, tok, ref, similarity="train").calibrate_keys("fp8", n=12)
    m_sb = ms.MSAEngine(model, tok, sb, similarity="train").calibrate_keys("fp8", n=12)
    assert all(torch.equal(m_ref[lay], m_sb[lay]) for lay in m_ref)
    assert all(torch.equal(sb.shard.key_moments[lay], m_ref[lay]) for lay in m_ref)
    for d in sb.shard.doc_ids():
        assert all(torch.equal(x, y) for x, y in zip(_stored(sb.shard, d), _stored(ref, d)))
    _check_routing(sb, ref, "calibrated fp8", exact=True, light=True)
    sb.save(out / "cal")
    if rank == 0:
        again = ShardedBank.load(out / "cal", model, tok, group=sub)
        assert again.shard.key_moments is not None and again.add(["Paris is old"]) == ref.add(["Paris is old"])
        assert all(torch.equal(x, y) for x, y in zip(_stored(again.shard, 24), _stored(ref, 24)))
    dist.barrier()

    # document priors (engine calibrate_priors): each rank scores its shard; every rank keeps all priors, as one
    # process has them; routing with them, saved and re-sharded, and a document added later (the mean prior)
    ref = ms.MemoryBank.empty(model, base.prefix_ids, tok=tok)
    ref.add_encoded(*enc)
    sb = ShardedBank(ms.MemoryBank.empty(model, base.prefix_ids, tok=tok))
    sb.add_encoded(*enc)
    sb.delete([3])
    ref.delete([3])
    p_ref = ms.MSAEngine(model, tok, ref, similarity="train").calibrate_priors(n=8)
    p_sb = ms.MSAEngine(model, tok, sb, similarity="train").calibrate_priors(n=8)
    assert torch.equal(p_sb["ids"], p_ref["ids"]) and 3 not in p_sb["ids"].tolist()
    assert all(torch.equal(p_sb["scores"][lay], p_ref["scores"][lay]) for lay in p_ref["scores"])
    _check_routing(sb, ref, "priors", exact=True, light=True)
    sb.save(out / "priors")
    ref.compact()
    if rank == 0:
        again = ShardedBank.load(out / "priors", model, tok, group=sub)
        assert torch.equal(again.doc_priors["ids"], p_ref["ids"])
        assert again.add(["Paris is old"]) == ref.add(["Paris is old"])
        _check_routing(again, ref, "priors, saved, opened by one, added to", exact=True, light=True)
    dist.barrier()

    # atomic commits: a crash after the ranks staged their shards, before rank 0 published the index
    path = out / "atomic"
    first = ShardedBank.build(model, tok, docs[:8])
    first.save(path)
    bank = ShardedBank.load(path, model, tok)
    bank.add(docs[8:12])
    bank.delete([0, 9])
    bank._stage(path, read_index(path), 2)  # every rank's new files and manifest-2.json, then the "crash"
    dist.barrier()
    assert (path / f"rank-{rank}" / "manifest-2.json").is_file() and read_index(path)["commit"] == 1
    before = _route(first, QUESTIONS[0], 5)
    for group in (None, sub):
        if rank == 0 or group is None:
            back = ShardedBank.load(path, model, tok, group=group)
            assert back.commit == 1 and back.doc_ids() == list(range(8))
            assert all(back.text(d) == docs[d] for d in range(8))
            got = _route(back, QUESTIONS[0], 5)
            if rank == 0:
                assert got == before
        dist.barrier()
    # a rank failing to stage (a full disk): every rank raises, none waits in a collective; commit 1 stands
    import memsparse.memory.parallel as par

    def full(*a):
        raise OSError(28, "No space left on device")

    real, par.stage = par.stage, (full if rank == 1 else par.stage)
    try:
        with pytest.raises(OSError if rank == 1 else BankError, match="No space" if rank else "rank 1 failed"):
            ShardedBank.load(path, model, tok).save(path)
    finally:
        par.stage = real
    assert read_index(path)["commit"] == 1
    # the next commit goes through; what the crash left is removed
    back = ShardedBank.load(path, model, tok)
    back.add(docs[12:14])
    back.save(path)
    index = read_index(path)
    assert index["commit"] == 2 and back.commit == 2 and back.doc_ids() == list(range(8)) + [8, 9]
    from memsparse.memory.store import read_manifest, verify

    for r in range(world):
        d = path / f"rank-{r}"
        m = read_manifest(d, "manifest-2.json")
        named = {m["prefix"], *(s["file"] for s in m["segments"])}
        assert {p.name for p in d.iterdir()} <= {"lock", "readers.lock", "manifest-2.json", *named}
        assert verify(d, "manifest-2.json")["leftover"] == 0
    with pytest.raises(BankError, match="another writer committed"):  # a copy of commit 1 does not overwrite 2
        bank.save(path)
    # a bank of format version 1 (rank manifest.json files, an index naming none) opens, and its next commit
    # moves it to version 2
    dist.barrier()
    if rank == 0:
        import json

        old = read_index(path)
        for r in range(world):
            (path / f"rank-{r}" / "manifest-2.json").rename(path / f"rank-{r}" / "manifest.json")
        (path / "memory-parallel.json").write_text(json.dumps(
            {k: v for k, v in old.items() if k in ("world_size", "next_id", "commit", "table")}))
    dist.barrier()
    v1 = ShardedBank.load(path, model, tok)
    assert v1.commit == 2 and v1.doc_ids() == back.doc_ids() and "ranks" not in read_index(path)
    v1.delete([1])
    v1.save(path)
    assert read_index(path)["version"] == 2 and not (path / f"rank-{rank}" / "manifest.json").exists()
    assert ShardedBank.load(path, model, tok).doc_ids() == [d for d in back.doc_ids() if d != 1]
    # a rank's manifest that is not the one the index names: refused in one line
    dist.barrier()
    if rank == 0:
        f = path / "rank-1" / "manifest-3.json"
        saved = f.read_bytes()
        f.write_bytes(saved.replace(b'"commit": 3', b'"commit": 4'))
        with pytest.raises(BankError, match="not the file memory-parallel.json names"):
            ShardedBank.load(path, model, tok, group=sub)
        f.write_bytes(saved)
    dist.barrier()

    _follow(rank, out, model, tok, docs)


def _follow(rank: int, out: Path, model, tok, docs: list[str]) -> None:
    """A sharded service (rank 0) follows a commit another process made: `memsparse docs add` by one process, which
    saved the bank with one rank; both ranks reopen it (re-sharded over 2) and route over the new document."""
    from memsparse import MSAEngine
    from memsparse.memory.parallel import ShardedBank, read_index
    from memsparse.serve.parallel import Mirror, ShardedService
    from memsparse.serve.settings import Settings

    path, model_dir = out / "served", out / "model"
    if rank == 0:
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        (out / "more.txt").write_text("Oslo is in Norway.\n")
    ShardedBank.build(model, tok, docs[:6]).save(path)
    mirror = Mirror(MSAEngine(model, tok, ShardedBank.load(path, model, tok), similarity="train"), path)
    if rank > 0:
        mirror.follow()
        assert mirror.bank.commit == 2 and mirror.bank.world == 2 and 6 in mirror.bank
        return
    try:
        service = ShardedService(mirror, Settings())
        assert service.info()["documents"] == 6
        before, = service.route_batch(["Where is Oslo?"])
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        done = subprocess.run([sys.executable, "-m", "memsparse.cli", "docs", "add", str(path), str(out / "more.txt"),
                               "--model", str(model_dir), "--device", "cpu"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert read_index(path)["world_size"] == 1  # saved by one process
        after, = service.route_batch(["Where is Oslo?"])  # follows the commit first, on both ranks
        assert service.bank.commit == 2 and service.bank.world == 2 and 6 in service.bank
        assert service.info()["documents"] == 7 and service.bank.text(6) == "Oslo is in Norway."
        assert before and all(d in service.bank for picked in after.values() for d, _ in picked)
    finally:
        mirror.stop()


@pytest.mark.slow
def test_memory_parallel_8bit_commits_and_following(tmp_path):
    world = 2
    run_ranks(_worker, world, (world, f"file://{tmp_path / 'init'}", str(tmp_path)), tmp_path, JOIN_SECONDS)


def test_bench_plan_at_the_issue_sizes():
    """`bench speed --world-size N` at Qwen3-4B geometry (18 router layers, 8 KV heads of 128, 64-token chunks):
    1B tokens over 8 ranks fits an H200 with fp8 keys and fp8 K̄/V̄ on the device, not an H100 (nor its host);
    100M over 2 ranks measures bf16 and fp8 keys, K̄/V̄ in fp8 in host memory."""
    import math

    from memsparse.eval.speed_parallel import choose

    def sizes(tokens, world):
        C = math.ceil(tokens // 1024 / world) * 16
        row = 18 * C * 8 * 128
        return {"model": 2 * row, "fp8": row + 18 * C * 4}, {"model": 4 * row, "fp8": 2 * (row + 18 * C * 8 * 4)}

    gib = 2**30
    with pytest.raises(ValueError, match="fit neither its GPU"):
        choose(2**30, *sizes(2**30, 8), 78 * gib - 8.5e9, 540 * gib, 8)
    assert choose(2**30, *sizes(2**30, 8), 139 * gib - 8.5e9, 540 * gib, 8) == (("fp8",), "device", "fp8")
    assert choose(100 * 2**20, *sizes(100 * 2**20, 2), 78 * gib - 8.5e9, 540 * gib, 2) == (("model", "fp8"), "host",
                                                                                            "fp8")
