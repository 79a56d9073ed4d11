"""Memory Parallel (memory/parallel.py) on CPUs over gloo, 2 and 3 processes: routing scores and top-k, answers,
add / delete across ranks and a bank saved with one world size opened with others, all against one process on
the same documents. Each world size is one spawn running every check (a process start costs seconds)."""

import functools
import os
import random

import pytest
import torch
import torch.distributed as dist

from ..conftest import assert_same_routing, gloo_rank, run_ranks, tiny_model, tiny_tokenizer

WORDS = ("Paris capital France Ottawa Canada bananas yellow sweet Rome old answer question document river "
         "mountain 0 1 2 3 4 5 6 7 8 9 the of is").split()
QUESTIONS = ["Where is Paris?", "What is yellow and sweet?", "the capital of Canada 42"]
MSA = {"pooling_kernel_size": 4, "top_k_docs": 4, "router_layer_idx": "1,2,3"}
JOIN_SECONDS = 150


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _setup(device: str = "cpu"):
    tok = tiny_tokenizer()
    return tiny_model("qwen3", msa=MSA, vocab_size=300).to(device), tok


def _route(bank, question: str, k: int, engine_cls=None):
    """Routing of one question with top-k `k` (the engine's question layout)."""
    from memsparse import MSAEngine
    from memsparse.engine.prefill import prefill_batch

    engine = MSAEngine(bank.model, bank.tok, bank)
    ids, mask = engine.encode_question(question)
    return prefill_batch(bank, [ids], [mask], similarity="train", top_k=k, route_only=True).memory.routing[0]


def _same(a: dict, b: dict, where: str, exact: bool) -> None:
    """Same layers, same documents in the same order, the same scores: bit for bit where the shards hold the very
    encodings of the one-process bank (`exact`), else within float32 rounding (a document encoded on a rank was
    packed with other documents than in one process, which moves the last bits of its K̄/V̄)."""
    assert sorted(a) == sorted(b), where
    for layer in a:
        assert len(a[layer]) == len(b[layer]), (where, layer)
        if exact:
            assert a[layer] == b[layer], f"{where}, layer {layer}: {a[layer]} != {b[layer]}"
        else:  # scores within rounding; documents the same wherever no other score comes within that rounding
            assert all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(a[layer], b[layer])), (where, a[layer], b[layer])
            scores = [s for _, s in b[layer]]
            for j, ((da, _), (db, sb)) in enumerate(zip(a[layer], b[layer])):
                isolated = j < len(scores) - 1 and all(abs(sb - s) > 1e-5 for n, s in enumerate(scores) if n != j)
                assert da == db or not isolated, (where, layer, a[layer], b[layer])


def _check_routing(sharded, ref, where: str, exact: bool = False, light: bool = False) -> None:
    """Routing over the sharded bank (every rank) against one process (rank 0 compares), for several questions and
    k: below a shard's size, above it (17 > 15 documents a rank, for 2 ranks and more) and above the bank's."""
    questions, ks = (QUESTIONS, (3, 17, 40)) if exact and not light else (QUESTIONS[:2], (4, 40))
    for q in questions:
        for k in ks:
            got = _route(sharded, q, k)
            if sharded.rank == 0:
                _same(got, _route(ref, q, k), f"{where}: {q!r} k={k}", exact)


def _args(enc: dict) -> tuple:
    return enc["keys"], enc["values"], enc["route_keys"], enc["token_count"], enc["texts"], enc["names"]


def _worker(rank: int, world: int, init: str, out: str) -> None:
    gloo_rank(rank, world, init, out, _checks)


def _nccl_worker(rank: int, world: int, init: str, out: str) -> None:
    gloo_rank(rank, world, init, out, functools.partial(_checks, device=f"cuda:{rank}"), backend="nccl")


def _checks(rank: int, world: int, out: str, device: str = "cpu") -> None:
    import memsparse as ms
    from memsparse.memory.parallel import ShardedBank, encoded

    model, tok = _setup(device)
    docs = _docs(30, seed=7)
    sharded = ShardedBank.build(model, tok, docs)
    ref = ms.MemoryBank.build(model, tok, docs)

    # the documents are balanced by chunks; every rank holds its own, under global ids
    loads = sharded.loads()
    assert sum(loads) == ref.num_chunks and max(loads) - min(loads) <= max(sharded.chunks.values())
    assert sharded.shard.doc_ids() == [d for d in range(30) if sharded.owner[d] == rank]
    assert sharded.doc_ids() == ref.doc_ids() and sharded.num_docs == 30
    assert all(sharded.text(d) == docs[d] for d in range(30))
    _check_routing(sharded, ref, "built")
    # the same encodings as the one-process bank, sharded: the merge and the gathered memory are exact
    copy = ShardedBank(ms.MemoryBank.empty(model, ref.prefix_ids, tok=tok))
    assert copy.add_encoded(*_args(encoded(ref, ref.doc_ids()))) == ref.doc_ids()
    assert copy.owner == sharded.owner
    _check_routing(copy, ref, "copied", exact=True)

    # exact ties: copies of the documents the first question routes to, encoded identically
    top = sorted({d for picked in _route(ref, QUESTIONS[0], 3).values() for d, _ in picked})
    enc = encoded(ref, top)
    args = _args(enc)
    assert sharded.add_encoded(*args) == ref.add_encoded(*args) == list(range(30, 30 + len(top)))
    tied = _route(ref, QUESTIONS[0], 40)
    assert any(len({s for _, s in picked}) < len(picked) for picked in tied.values())  # ties are exercised
    _check_routing(sharded, ref, "ties")
    assert copy.add_encoded(*args) == list(range(30, 30 + len(top)))
    _check_routing(copy, ref, "ties, copied", exact=True)

    # adds go to the least loaded rank; deletes to the rank that holds the document
    new = _docs(4, seed=8)
    before = sharded.loads()
    ids = sharded.add(new)
    assert ids == ref.add(new)
    assert copy.add_encoded(*_args(encoded(ref, ids))) == ids
    first = min(range(world), key=lambda r: (before[r], r))
    assert sharded.owner[ids[0]] == first
    gone = [0, 5, 17, ids[1], 30]
    sharded.delete(gone)
    ref.delete(gone)
    assert all(d not in sharded.shard for d in gone) and sharded.num_docs == ref.num_docs
    _check_routing(sharded, ref, "add/delete")
    copy.delete(gone)
    assert copy.owner == sharded.owner and copy.loads() == sharded.loads()
    _check_routing(copy, ref, "add/delete, copied", exact=True)
    with pytest.raises(KeyError):
        sharded.delete([5])
    if world > 1:
        with pytest.raises(ValueError, match="different arguments"):  # a collective call, checked
            sharded.delete([1 + rank])
        # more ranks than documents: a rank with an empty shard still takes part
        small = ShardedBank.build(model, tok, docs[:world - 1])
        assert len(small.shard.doc_ids()) == (rank < world - 1)
        _check_routing(small, ms.MemoryBank.build(model, tok, docs[:world - 1]), "empty shard")

    # answers (over the exact copy): greedy decoding over the gathered K̄/V̄, in one round and with router
    # injection (the selected documents' text injected)
    plain = {"refine": 0, "refine_margin": 1.0, "refine_fuse": False}
    for mode, kw in (("plain", {"interleave": False}), ("router", {"interleave": "router", "inject_k": 2})):
        a = ms.MSAEngine(model, tok, copy, **plain).ask(QUESTIONS[:2], max_new_tokens=6, **kw)
        b = ms.MSAEngine(model, tok, ref, **plain).ask(QUESTIONS[:2], max_new_tokens=6, **kw)
        for x, y in zip(a, b):
            assert (x.text, x.rounds) == (y.text, y.rounds), mode
            if device == "cpu":
                assert x.routing == y.routing, mode
            else:  # one process prefills in a CUDA graph (graphed_prefill), the sharded bank op by op: scores may
                assert_same_routing(x.routing, y.routing)  # differ in float32's last bit (H100, 2026-12-07)
    # router injection with refinement (a local re-encoded shortlist, replicated)
    a = ms.MSAEngine(model, tok, copy).ask(QUESTIONS[1], 6)
    b = ms.MSAEngine(model, tok, ref).ask(QUESTIONS[1], 6)
    assert (a.text, a.rounds) == (b.text, b.rounds)

    # saved with this world size (the exact copy), opened with it, with 2 and with 1 (subgroups of the same
    # processes): the documents placed again, their encodings copied unchanged
    copy.save(os.path.join(out, "bank"))
    ref.compact()
    assert copy.deleted == set() and sorted(copy.owner) == ref.doc_ids()
    for size in sorted({world, min(world, 2), 1}, reverse=True):
        group = dist.new_group(list(range(size)))  # collective: every rank makes every group
        if rank < size:
            again = ShardedBank.load(os.path.join(out, "bank"), model, tok, group=None if size == world else group)
            assert again.world == size and again.doc_ids() == ref.doc_ids()
            assert sum(again.loads()) == sum(copy.loads()) and (size != world or again.owner == copy.owner)
            assert all(again.text(d) == ref.text(d) for d in ref.doc_ids())
            _check_routing(again, ref, f"saved with {world}, opened with {size}", exact=True, light=True)
            more = _docs(2, seed=9)
            assert again.add(more) == list(range(ref.next_id, ref.next_id + 2))
        dist.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_memory_parallel_equals_one_process(world, tmp_path):
    run_ranks(_worker, world, (world, f"file://{tmp_path / 'init'}", str(tmp_path)), tmp_path, JOIN_SECONDS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_parallel_over_nccl(tmp_path):
    """The same checks over NCCL, one rank per visible GPU (one GPU: a world of one, the collectives on the device,
    Triton's fused routing on the shard)."""
    world = torch.cuda.device_count()
    run_ranks(_nccl_worker, world, (world, f"file://{tmp_path / 'init'}", str(tmp_path)), tmp_path, JOIN_SECONDS)


def test_place_goes_to_the_least_loaded_rank():
    from memsparse.memory.parallel import place

    loads = [5, 2, 2]
    assert place([3, 1, 4, 1], loads) == [1, 2, 2, 0] and loads == [6, 5, 7]  # ties: the lower rank
    assert place([], [0]) == []


@pytest.mark.parametrize("n,k", [(7, 3), (200, 16), (50, 50)])
def test_routing_top_k_ties_go_to_the_lower_position(n, k):
    """The one-process order the merge over ranks reproduces: score descending, then position ascending (deleted
    documents -inf, -0.0 equal to 0.0)."""
    from memsparse.ops.routing import ranked_documents

    g = torch.Generator().manual_seed(n)
    x = (torch.randint(-2, 3, (3, n), generator=g).float() * 0.25)
    x[0, ::3] = -0.0
    alive = torch.rand(n, generator=g) > 0.2
    top = ranked_documents(x, k, alive)
    for b in range(3):
        s = x[b].masked_fill(~alive, float("-inf")).tolist()
        order = sorted(range(n), key=lambda j: (-s[j], j))[:k]
        assert top[1, b].long().tolist() == order and top[0, b].tolist() == [s[j] for j in order]
