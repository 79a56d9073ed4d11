"""Memory Parallel: one memory bank sharded by documents over the ranks of a torch.distributed process group
(gloo on CPUs; the same collectives run on NCCL), with the answers of one process.

Layout. Every rank holds a `MemoryBank` shard of its documents under their GLOBAL ids (a shard's table is in
increasing global id order, as the one-process bank's table is). New documents go, one by one in id order, to the
rank holding the fewest live chunks (ties: the lower rank). The document table (owner rank, chunks, tokens, name
and text of every id) is replicated: every call that changes the memory (`add`, `add_encoded`, `delete`,
`compact`) is collective, made by every rank with the same arguments (checked), and each rank encodes only its
own documents.

Routing (engine/bank_memory.py `ShardedMemory`, the memory the engine's prefill routes a `ShardedBank` over). The
forward runs replicated on every rank (SPMD: every rank calls `route` / `ask` with the same question). In each
router layer rank 0's router queries are broadcast, every rank scores its shard with the bank's routing code and
takes its local top-k (ties: lower global id), the candidates (score, global id) are all-gathered and merged by
(score descending, global id ascending): exactly the order of the one-process top-k (`ops.routing.ranked_documents`
and the Triton kernel both put the lower table position first among equal scores). The selected documents' K̄/V̄ are
assembled in the one-process layout (`MemoryBank.gather_top`: table order, each padded to the longest document of
the table) by the ranks that hold them and summed over ranks (an all-reduce of a buffer that is zero except where a
rank holds the document), so every rank attends to the same memory as one process would.

8-bit routing keys and K̄/V̄ (`key_dtype`, `content_dtype` 'fp8' / 'int8'): each rank quantizes its own shard,
as a one-process bank does (one scale per chunk, or per chunk and head: a chunk's 8 bits depend on that chunk
alone), so routing and memory are the one process's with the same dtypes; keys calibrated for routing queries
(engine `calibrate_keys`, `set_key_dtype`) with rank 0's query moments, which every rank keeps. Document priors
(engine `calibrate_priors`): each rank scores its shard, the sums meet in one all-reduce over global ids, and every
shard keeps all of them (`set_doc_priors`), subtracting its documents' before its top-k. Not sharded: documents at
global positions (doc_positions='global').

On disk (`save`, `load`): one store directory per rank (`rank-{r}`, memory/store.py), each commit staged there as
new files and a manifest-<commit>.json (`store.stage`), then published by rank 0 writing the index
(memory-parallel.json: the replicated table, the commit number, each rank's manifest with its size and sha256, a
checksum of itself) under a temporary name and renaming it over the old one. A crash before that rename leaves the
previous commit (the old index and every file it names) intact; files no index names are removed after a commit,
unless a reader holds readers.lock (then by the next commit). The command line under torchrun: cli/bank.py,
cli/serve.py, ranks.py, serve/parallel.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .bank import MemoryBank
from .encode import TEMPLATE_PREFIX, render_documents
from .quant import QTensor, Tensor, dense, qmap
from .store import (
    LOCK,
    MANIFEST,
    READERS,
    collect_leftovers,
    file_sum,
    fsync_dir,
    named_files,
    open_lock,
    read_manifest,
    stage,
)
from .table import BankError

INDEX = "memory-parallel.json"
FORMAT, VERSION = "memsparse-parallel", 2  # 2: staged rank commits named by the index (1: rank manifest.json files)


def place(chunks: list[int], loads: list[int]) -> list[int]:
    """The rank of each new document (in order): the least loaded by live chunks, ties to the lower rank; `loads`
    (chunks per rank) is updated in place."""
    out = []
    for c in chunks:
        r = min(range(len(loads)), key=lambda n: (loads[n], n))
        loads[r] += c
        out.append(r)
    return out


def encoded(bank: MemoryBank, ids: list[int]) -> dict:
    """The stored encoding of documents of `bank`, in the arguments of `add_encoded` of a bank of the same dtypes:
    per router layer K̄, V̄ and routing keys (chunks, Hkv, D) of the documents in the given order, as stored (8-bit
    ones as QTensors, which `add_encoded` keeps unchanged; routing keys None where they are K̄ itself), token
    counts, texts and names."""
    spans = []  # (segment, first chunk, chunks) per document
    for d in ids:
        r = bank.locate(d)
        spans.append((bank.segments[r.segment], r.chunk_start, bank.segments[r.segment].chunk_count[r.local]))

    def take(store: str) -> dict:
        return {lay: _cat([qmap(getattr(seg, store)[lay], lambda x, a=a, n=n: x[a:a + n]) for seg, a, n in spans])
                for lay in bank.model.router_layers}

    shared = all(seg.route_keys is seg.keys for seg, _, _ in spans)
    return {"keys": take("keys"), "values": take("values"), "route_keys": None if shared else take("route_keys"),
            "token_count": [bank.token_count(d) for d in ids], "texts": [bank.text(d) for d in ids],
            "names": [bank.name(d) for d in ids]}


def _cat(parts: list[Tensor]) -> Tensor:
    """Concatenate along chunks (QTensors: data and scales)."""
    if parts and isinstance(parts[0], QTensor):
        return QTensor(torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]))
    return torch.cat(parts)


class ShardedBank:
    """A memory bank sharded by documents over the ranks of `group` (default: the world). Build with
    `ShardedBank.build` (collective) or `ShardedBank.load`; use it where a `MemoryBank` goes in `MSAEngine`
    (every rank calling `route` / `ask` with the same questions)."""

    def __init__(self, shard: MemoryBank, group=None):
        msa = shard.model.msa_config
        if msa.doc_positions == "global":
            raise ValueError("Memory Parallel: documents at global positions (doc_positions='global') are not sharded")
        self.shard, self.group = shard, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.src = dist.get_global_rank(group, 0) if group is not None else 0  # rank 0 of the group, globally
        self.owner: dict[int, int] = {}  # global id -> rank, for every table row (tombstones too, until compaction)
        self.chunks: dict[int, int] = {}  # global id -> chunks
        self.tokens: dict[int, int] = {}  # global id -> tokens
        self.records: dict[int, tuple[str, str | None]] = {}  # global id -> (name, text)
        self.deleted: set[int] = set()
        self.next_id = 0
        self.commit = 0  # of the directory's index this bank was loaded from / last saved to
        self.path: Path | None = None  # that directory

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, model, tok, docs: list[str], group=None, tier: str = "auto", key_dtype: str = "model",
              content_dtype: str = "model", **kw) -> ShardedBank:
        """Encode `docs` (global ids 0..N-1), each on the rank `place` gives it (collective); `tier`: where each
        shard's K̄/V̄ live (MemoryBank.place); `key_dtype`, `content_dtype`: as MemoryBank.build's, each rank
        quantizing its own documents; `kw`: `add`'s."""
        shard = MemoryBank.empty(model, tok(TEMPLATE_PREFIX, add_special_tokens=False)["input_ids"], tok=tok,
                                 key_dtype=key_dtype, content_dtype=content_dtype)
        shard.place(tier)
        bank = cls(shard, group)
        bank.add(docs, **kw)
        return bank

    def _agree(self, what: str, payload) -> None:
        """Check that every rank made this collective call with the same arguments."""
        digest = hashlib.sha256(repr(payload).encode()).digest()
        mine = torch.tensor(list(digest), dtype=torch.int64, device=self.shard.model.device)  # NCCL: CUDA tensors
        got = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(got, mine, group=self.group)
        if any(not torch.equal(g, mine) for g in got):
            raise ValueError(f"ShardedBank.{what}: the ranks were given different arguments (the call is collective)")

    def loads(self) -> list[int]:
        """Live chunks per rank."""
        out = [0] * self.world
        for d, r in self.owner.items():
            if d not in self.deleted:
                out[r] += self.chunks[d]
        return out

    def add(self, docs: list[str], names: list[str] | None = None, **kw) -> list[int]:
        """Encode new documents (collective); returns their global ids."""
        docs = list(docs)
        self._agree("add", (docs, names))
        ids = list(range(self.next_id, self.next_id + len(docs)))
        tokens = render_documents(self.shard.tok, ids, docs)
        P = self.pool_size
        ranks = place([(len(t) + P - 1) // P for t in tokens], self.loads())
        mine = [j for j, r in enumerate(ranks) if r == self.rank]
        if mine:
            self.shard.add_tokens([tokens[j] for j in mine], texts=[docs[j] for j in mine],
                                  names=[names[j] for j in mine] if names else None, ids=[ids[j] for j in mine], **kw)
        names = names or [str(d) for d in ids]
        for j, d in enumerate(ids):
            self.enter(d, ranks[j], (len(tokens[j]) + P - 1) // P, len(tokens[j]), (names[j], docs[j]))
        return ids

    def add_encoded(self, keys: dict, values: dict, route_keys: dict | None, token_count: list[int],
                    texts: list[str | None] | None = None, names: list[str] | None = None) -> list[int]:
        """`MemoryBank.add_encoded` over the ranks (collective): each rank keeps the documents placed on it."""
        self._agree("add_encoded", (token_count, texts, names,
                                    [(lay, float(dense(k, torch.float64).sum())) for lay, k in sorted(keys.items())]))
        P = self.pool_size
        chunks = [(n + P - 1) // P for n in token_count]
        ids = list(range(self.next_id, self.next_id + len(token_count)))
        ranks = place(chunks, self.loads())
        starts = [sum(chunks[:j]) for j in range(len(chunks))]
        mine = [j for j, r in enumerate(ranks) if r == self.rank]
        if mine:
            rows = torch.cat([torch.arange(starts[j], starts[j] + chunks[j]) for j in mine])

            def pick(store):
                return {lay: qmap(t, lambda x: x.index_select(0, rows.to(x.device))) for lay, t in store.items()}

            self.shard.add_encoded(pick(keys), pick(values), pick(route_keys) if route_keys is not None else None,
                                   [token_count[j] for j in mine], [texts[j] for j in mine] if texts else None,
                                   [names[j] for j in mine] if names else None, ids=[ids[j] for j in mine])
        for j, d in enumerate(ids):
            self.enter(d, ranks[j], chunks[j], token_count[j],
                       ((names or [str(i) for i in ids])[j], texts[j] if texts else None))
        return ids

    def set_key_dtype(self, kind: str, moments: dict | None = None) -> ShardedBank:
        """`MemoryBank.set_key_dtype` on every shard (collective), with rank 0's `moments` (so every rank rounds
        for the same queries; engine `calibrate_keys` computes them over this bank)."""
        self._agree("set_key_dtype", (kind, sorted(moments) if moments is not None else None))
        if moments is not None:
            moments = {lay: m.contiguous().clone() for lay, m in sorted(moments.items())}
            for m in moments.values():
                dist.broadcast(m, src=self.src, group=self.group)
        self.shard.set_key_dtype(kind, moments)
        return self

    @property
    def doc_priors(self) -> dict | None:
        """The documents' routing-score priors (`MemoryBank.doc_priors`), every document's on every rank."""
        return self.shard.doc_priors

    def set_doc_priors(self, priors: dict | None) -> None:
        """Give every shard the priors of all documents (collective; engine `calibrate_priors` computes them over
        this bank): each shard subtracts its documents' before its top-k, and a document added later gets the mean
        of all, as in one process."""
        self._agree("set_doc_priors", None if priors is None else (
            priors["ids"].tolist(), [(lay, float(t.double().sum())) for lay, t in sorted(priors["scores"].items())]))
        self.shard.set_doc_priors(priors)

    def enter(self, d: int, rank: int, chunks: int, tokens: int, record: tuple[str, str | None]) -> None:
        self.owner[d], self.chunks[d], self.tokens[d], self.records[d] = rank, chunks, tokens, record
        self.next_id = max(self.next_id, d + 1)

    def delete(self, ids: list[int]) -> None:
        """Tombstone documents on the ranks that hold them (collective)."""
        ids = [int(d) for d in ids]
        self._agree("delete", ids)
        for d in ids:
            if d not in self:
                raise KeyError(f"no document {d} in the bank")
        mine = [d for d in ids if self.owner[d] == self.rank]
        if mine:
            self.shard.delete(mine)
        self.deleted.update(ids)

    def compact(self) -> None:
        """Drop deleted documents' data on every rank (collective; ids kept)."""
        self._agree("compact", sorted(self.deleted))
        self.shard.compact()
        for d in self.deleted:
            for table in (self.owner, self.chunks, self.tokens, self.records):
                del table[d]
        self.deleted = set()

    # ----------------------------------------------------------------------------------------- the bank interface
    @property
    def model(self):
        return self.shard.model

    @property
    def tok(self):
        return self.shard.tok

    @property
    def prefix_ids(self) -> list[int]:
        return self.shard.prefix_ids

    @property
    def prefix_kv(self):
        return self.shard.prefix_kv

    @property
    def next_position(self) -> int:
        return 0

    @property
    def pool_size(self) -> int:
        return self.shard.pool_size

    @property
    def tier(self) -> str:
        return self.shard.tier

    @property
    def num_docs(self) -> int:
        """Live documents over all ranks."""
        return len(self.owner) - len(self.deleted)

    @property
    def table_size(self) -> int:
        """Table rows over all ranks (tombstones included until compaction), as `len(routing_index().ids)`."""
        return len(self.owner)

    @property
    def max_chunks(self) -> int:
        """The longest document of the table in chunks (tombstones included), as `routing_index().max_chunks`."""
        return max(self.chunks.values(), default=0)

    def doc_ids(self) -> list[int]:
        return sorted(d for d in self.owner if d not in self.deleted)

    def __contains__(self, doc_id: int) -> bool:
        return doc_id in self.owner and doc_id not in self.deleted

    def _record(self, doc_id: int) -> tuple[str, str | None]:
        if doc_id not in self:
            raise KeyError(f"no document {doc_id} in the bank")
        return self.records[doc_id]

    def text(self, doc_id: int) -> str | None:
        return self._record(doc_id)[1]

    def name(self, doc_id: int) -> str:
        return self._record(doc_id)[0]

    def token_count(self, doc_id: int) -> int:
        return self.tokens[doc_id]

    def like(self, **overrides) -> MemoryBank:
        """An empty local (unsharded) bank for the same model (the engine's refinement re-encodes a shortlist)."""
        return self.shard.like(**overrides)

    # ----------------------------------------------------------------------------------------- on disk
    def save(self, path: str | Path) -> Path:
        """Commit to a directory (collective; deleted documents are compacted away first), atomically: every rank
        stages its shard in `rank-{r}` (`store.stage`: new files only, and a manifest-<commit>.json), then rank 0
        publishes the index naming them (see the module's doc) and removes what no index names (the directories of
        ranks beyond this world size too). The caller holds the directory's write lock (rank 0: `ranks.locked`).
        Into the directory it was loaded from / saved to, only if no other commit came since (BankError
        otherwise); another directory's bank is replaced."""
        path = Path(path)
        if self.deleted:
            self.compact()
        old = read_index(path) if is_sharded(path) else None
        latest = old["commit"] if old else 0
        if old and self.path is not None and path.resolve() == self.path.resolve() and self.commit != latest:
            raise BankError(f"{path}: another writer committed to the bank since this copy was loaded (commit "
                            f"{self.commit}, now {latest}); load it again and redo the change")
        commit = latest + 1

        def publish():  # rank 0
            if self.rank == 0:
                table = [[d, self.owner[d], self.chunks[d], self.tokens[d], *self.records[d]]
                         for d in sorted(self.owner)]
                name = f"manifest-{commit}.json"
                ranks = [{"manifest": name, **file_sum(path / f"rank-{r}" / name)} for r in range(self.world)]
                _publish(path, {"format": FORMAT, "version": VERSION, "world_size": self.world,
                                "next_id": self.next_id, "commit": commit, "ranks": ranks, "table": table})

        self._together("staging its shard", lambda: self._stage(path, old, commit))
        self._together("publishing the index", publish)
        if self.rank == 0:
            with contextlib.suppress(OSError, BankError):  # committed; what is left, the next commit removes
                _clean(path, read_index(path))
        dist.barrier(group=self.group)
        self.path, self.commit = path, commit
        return path

    def _together(self, what: str, step) -> None:
        """Run `step` on every rank; where it fails on any rank, raise on every rank (that rank's own error, the
        others one naming it) rather than leave the others waiting in the next collective."""
        err = None
        try:
            step()
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            err = e
        flag = torch.tensor([err is not None], dtype=torch.int64, device=self.shard.model.device)
        got = [torch.empty_like(flag) for _ in range(self.world)]
        dist.all_gather(got, flag, group=self.group)
        if err is not None:
            raise err
        bad = [r for r, g in enumerate(got) if int(g)]
        if bad:
            raise BankError(f"rank {bad[0]} failed {what}; the previous commit stands")

    def _stage(self, path: Path, old: dict | None, commit: int) -> None:
        """Write this rank's shard as a staged commit in its directory (only new segments where it was loaded
        from there)."""
        mine = path / f"rank-{self.rank}"
        base = None
        if old is not None and self.rank < old["world_size"] and self.shard.path is not None \
                and self.shard.path.resolve() == mine.resolve():
            base = read_manifest(mine, rank_manifests(old)[self.rank])
            if base.get("commit", 0) != self.shard.commit:
                base = None
        stage(self.shard, mine, base, commit)

    @classmethod
    def load(cls, path: str | Path, model, tok=None, group=None) -> ShardedBank:
        """Open the commit a bank directory's index names with any number of ranks (collective). With the world size
        it was saved with, each rank opens its own directory; otherwise the documents are placed again (`place`, in
        id order, as `add` would place them) and each rank copies its documents' encodings out of the saved shards
        (opened memory-mapped; 8-bit ones unchanged)."""
        path = Path(path)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        with _reading(path):  # no clean-up removes a file between reading the index and mapping it
            index = read_index(path)
            saved, table, names = index["world_size"], index["table"], rank_manifests(index)
            for r in range(saved):
                _check_rank(path, index, r)
            if saved == world:
                bank = cls(MemoryBank.load(path / f"rank-{rank}", model, tok, manifest=names[rank]), group)
                ranks = [r for _, r, *_ in table]
                if bank.shard.doc_ids() != [d for (d, *_), r in zip(table, ranks) if r == rank]:
                    raise BankError(f"{path}: rank-{rank} does not hold the documents {INDEX} gives it")
            else:
                olds = [MemoryBank.load(path / f"rank-{r}", model, tok, manifest=names[r]) for r in range(saved)]
                if len({(b.key_dtype, b.content_dtype) for b in olds}) > 1:
                    raise BankError(f"{path}: its ranks hold keys or K̄/V̄ in different dtypes")
                bank = cls(olds[0].like(tier="auto"), group)
                bank.shard.meta, bank.shard.key_moments = dict(olds[0].meta), olds[0].key_moments
                bank.shard.set_doc_priors(olds[0].doc_priors)
                lost = next(((d, r) for d, r, *_ in table if d not in olds[r]), None)
                if lost is not None:
                    raise BankError(f"{path}: rank-{lost[1]} does not hold document {lost[0]}, which {INDEX} gives it")
                ranks = place([c for _, _, c, *_ in table], [0] * world)
                mine = [(d, r) for (d, r, *_), new in zip(table, ranks) if new == rank]
                if mine:
                    parts = [encoded(olds[r], [d]) for d, r in mine]
                    stores = ("keys", "values") + (("route_keys",) if parts[0]["route_keys"] is not None else ())
                    cat = {n: {lay: _cat([p[n][lay] for p in parts]) for lay in parts[0][n]} for n in stores}
                    bank.shard.add_encoded(cat["keys"], cat["values"], cat.get("route_keys"),
                                           [p["token_count"][0] for p in parts], [p["texts"][0] for p in parts],
                                           [p["names"][0] for p in parts], ids=[d for d, _ in mine])
        for (d, _, chunks, tokens, name, text), r in zip(table, ranks):
            bank.enter(d, r, chunks, tokens, (name, text))
        bank.next_id = max(bank.next_id, index["next_id"])
        bank.shard.next_id = max(bank.shard.next_id, bank.next_id)
        bank.path, bank.commit = path, index["commit"]
        return bank


def is_sharded(path: str | Path) -> bool:
    """Whether `path` holds a bank saved by `ShardedBank.save`."""
    return (Path(path) / INDEX).is_file()


def _index_sum(index: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in index.items() if k != "checksum"}, sort_keys=True).encode()
                          ).hexdigest()


def read_index(path: str | Path) -> dict:
    """The index of a sharded bank directory: {"world_size", "next_id", "commit", "table", "ranks" (each rank's
    manifest, with its size and sha256; absent in version 1)}, checked (fields, its checksum)."""
    f = Path(path) / INDEX
    try:
        index = json.loads(f.read_text())
        index.setdefault("commit", 0)
        if not (isinstance(index["world_size"], int) and index["world_size"] > 0 and isinstance(index["table"], list)):
            raise ValueError("malformed")
        if index.get("version", 1) > VERSION:
            raise ValueError(f"format version {index['version']}, newer than this memsparse reads ({VERSION})")
        if "checksum" in index and index["checksum"] != _index_sum(index):
            raise ValueError("it fails its checksum")
        ranks = index.get("ranks")
        if ranks is not None and not (isinstance(ranks, list) and len(ranks) == index["world_size"] and all(
                isinstance(r, dict) and isinstance(r.get("manifest"), str) and r["manifest"].startswith("manifest-")
                and Path(r["manifest"]).name == r["manifest"] for r in ranks)):
            raise ValueError("malformed rank manifests")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BankError(f"{f}: unreadable ({e})") from None
    return index


def rank_manifests(index: dict) -> list[str]:
    """The manifest file of each rank directory the index names (version 1: their manifest.json)."""
    return [r["manifest"] for r in index["ranks"]] if "ranks" in index else [MANIFEST] * index["world_size"]


def read_rank_manifest(path: str | Path, rank: int = 0) -> dict:
    """The manifest of rank `rank`'s shard of a sharded bank's current commit."""
    return read_manifest(Path(path) / f"rank-{rank}", rank_manifests(read_index(path))[rank])


def _check_rank(path: Path, index: dict, r: int) -> None:
    """The manifest the index names for rank r exists and is the one committed (size and sha256)."""
    d = path / f"rank-{r}"
    if not d.is_dir():
        raise BankError(f"{path}: saved by {index['world_size']} ranks, but rank-{r} is missing")
    if "ranks" in index:
        rec = index["ranks"][r]
        f = d / rec["manifest"]
        if not f.is_file():
            raise BankError(f"{f}: missing (named by {INDEX}); the bank is damaged")
        if file_sum(f) != {"bytes": rec.get("bytes"), "sha256": rec.get("sha256")}:
            raise BankError(f"{f}: not the file {INDEX} names (size or sha256); the bank is damaged")


def _publish(path: Path, index: dict) -> None:
    """Write the index under a temporary name, fsync, rename it over the old one, fsync the directory: the commit."""
    index["checksum"] = _index_sum(index)
    tmp = path / f".{INDEX}.tmp"
    with open(tmp, "w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / INDEX)
    fsync_dir(path)


def _clean(path: Path, index: dict) -> None:
    """Remove what the published index does not name (files of earlier and interrupted commits in its rank
    directories, the directories of ranks beyond its world size), unless a reader holds readers.lock (then the
    next commit does)."""
    fd = open_lock(path / READERS)
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    try:
        for r, name in enumerate(rank_manifests(index)):
            d = path / f"rank-{r}"
            (d / MANIFEST).unlink(missing_ok=True)  # version 1's rank commit
            collect_leftovers(d, {LOCK, READERS, name, *named_files(read_manifest(d, name))})
        for old in path.glob("rank-*"):
            if old.name[5:].isdigit() and int(old.name[5:]) >= index["world_size"]:
                shutil.rmtree(old)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _reading(path: Path):
    """Hold the bank directory's readers.lock shared (a clean-up in progress is waited for)."""
    fd = open_lock(path / READERS) if path.is_dir() else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)


