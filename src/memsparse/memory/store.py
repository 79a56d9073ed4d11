"""The on-disk memory bank: a manifest plus safetensors shards, opened memory-mapped, committed atomically, safe for
many processes (one writer at a time, any number of readers).

Layout of a bank directory:
    manifest.json          the current commit: format version, commit number, model fingerprint, msa parameters,
                           dtypes, counts, the shard list, deleted ids (tombstones), the next free id, the size and
                           sha256 of every file it names, and a sha256 of itself
    prefix-<uid>.safetensors   template-prefix keys/values of every layer
    seg-<uid>.safetensors      one per segment: K̄ / V̄ / K̄r per router layer, the document table, texts
    moments-<uid>, priors-<uid>.safetensors   optional: routing-query moments, document priors
    lock                   writers' lock (flock, exclusive); holds a line naming the current holder
    readers.lock           readers' lock (flock, shared) while they read the manifest and map its files

Writers. Every commit (`save`, hence `docs add/delete`, compaction, overwrite, the server's writes) holds `lock`
from reading the latest manifest to the end of its clean-up; a second writer waits, or after its timeout fails with
`BankBusy` naming the holder. `save` refuses a bank loaded from an older commit than the directory's (BankError:
reload and retry) instead of overwriting another writer's commit; edits.py `update()` locks, loads the latest commit,
lets the caller change it and commits, which is how every mutating command works (`add_documents` encodes before
locking and again under the lock only if another commit came meanwhile).

Commits and snapshots. A commit writes new files only (a referenced file is never modified), fsyncs them, writes the
manifest under a temporary name, fsyncs, renames it over manifest.json (the atomically replaced pointer; its
`commit` number is the version) and fsyncs the directory. A crash at any point leaves the previous commit intact.
Readers (`read`, hence `MemoryBank.load`, and `verify`) hold `readers.lock` shared from reading manifest.json until
every file it names is mapped; a mapping stays valid after its file is unlinked, so a reader keeps a consistent
snapshot for as long as it lives. Clean-up rule: after its commit a writer removes the files the new manifest does
not name (older commits' and interrupted ones') only if it gets `readers.lock` exclusively without waiting;
otherwise a reader is between manifest and mapping and the next commit cleans up instead. No timing is involved;
readers never wait for writers (only for a clean-up's unlinks), writers never wait for readers.

Integrity. Every file's sha256 is recorded at commit and checked on load against the bytes mapped; headers are
checked against the file (dtypes, shapes, offsets, size) and every tensor against the manifest (shapes, counts,
ids); floating tensors must be finite; shards carry the fingerprint of the model they were written for. Any failure
is one BankError line. Opening thus reads every byte once (sha256 and finiteness, files in parallel); a process that
reopens a bank (the server following a commit, `update`) skips the files it checked before and that have not changed
since (same inode, size and mtime; committed files are never rewritten). Stored texts are decoded on use (a damaged
one is a BankError) and all of them by `verify`, which checks every file every time.
Staged commits (`stage`): the files of a commit and its manifest as manifest-<commit>.json, published by someone
else (a bank over ranks: one staged commit per rank directory, published by the index that names them all,
memory/parallel.py); clean-up is then the publisher's.
Banks of format 1 (no commit number, no checksums) open unverified by checksum (every other check applies); their
next commit records the checksums of all their files (format 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import save_file

from ..model.decoder import MSAForCausalLM
from .table import BankError, PackedTexts, Segment

if TYPE_CHECKING:
    from .bank import MemoryBank
from .quant import QTensor

FORMAT = "memsparse-bank"
VERSION = 2  # 2: commit numbers, checksums, locks; 1 opens (unverified) and migrates on its next commit
MANIFEST = "manifest.json"
LOCK, READERS = "lock", "readers.lock"
_FILES = ("seg-", "prefix-", "moments-", "priors-", f".{MANIFEST}", "manifest-")  # what clean-up may remove
# (manifest-<commit>.json: a staged manifest, the commit of one rank of a bank over ranks: memory/parallel.py)
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn}
__all__ = ["BankBusy", "BankError", "DocumentEntry", "Stored", "documents", "read", "read_manifest", "save", "stage",
           "verify", "writer"]


class BankBusy(BankError):
    """Another process holds the bank's write lock past the timeout."""


def encoding_dtype(manifest: dict) -> str | None:
    """The dtype the bank's model ran in when it encoded (older banks: their float K̄ dtype), or None: opening the
    bank with the model in that dtype keeps its fingerprint (merged adapters round differently per dtype)."""
    dtype = manifest.get("model_dtype", manifest.get("dtype"))
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def fingerprint(model: MSAForCausalLM) -> str:
    """Identity of what shapes a bank: the decoder config, the encoding-relevant MSA settings, and a strided
    sample of every weight (in bfloat16, so fp32 and bf16 copies of one model agree)."""
    msa = model.msa_config
    config = {k: v for k, v in model.config.to_hf_dict().items() if k not in ("dtype", "torch_dtype")}
    h = hashlib.sha256(json.dumps({
        "config": config, "router_layers": model.router_layers,
        "pooling": msa.pooling_kernel_size, "decouple": msa.decouple_router,
        "offset": msa.query_position_offset,
        **({"doc_positions": msa.doc_positions} if msa.doc_positions != "document" else {}),
    }, sort_keys=True).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(flat[::step][:4096].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- locks
_held: dict[str, list] = {}  # resolved bank directory -> [thread lock, lock file descriptor, depth]
_held_guard = threading.Lock()


def _forget_locks() -> None:
    """In a forked child: the parent's locks are not the child's (closing the inherited descriptors leaves them
    held by the parent; keeping them would keep them held after the parent lets go)."""
    global _held_guard
    for entry in _held.values():
        if entry[1] is not None:
            os.close(entry[1])
    _held.clear()
    _held_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks)


@contextlib.contextmanager
def writer(path: str | Path, timeout: float | None = None):
    """Hold the bank's write lock (the directory is created if need be): one writer at a time across processes,
    reentrant within a thread. Waits for the holder; with `timeout` (seconds) raises BankBusy naming it."""
    path = Path(path)
    with _held_guard:
        entry = _held.setdefault(str(path.resolve()), [threading.RLock(), None, 0])
    if not entry[0].acquire(timeout=-1 if timeout is None else timeout):
        raise BankBusy(f"{path}: another thread of this process is writing the bank; gave up after {timeout:g} s")
    try:
        if entry[2] == 0:
            entry[1] = _take_lock(path, timeout)
        entry[2] += 1
        try:
            yield path
        finally:
            entry[2] -= 1
            if entry[2] == 0:
                fd, entry[1] = entry[1], None
                os.ftruncate(fd, 0)  # no holder any more
                os.close(fd)  # releases the lock
    finally:
        entry[0].release()


def _take_lock(path: Path, timeout: float | None) -> int:
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise BankError(f"{path}: cannot take the bank's write lock ({e.strerror})") from None
    deadline = None if timeout is None else time.monotonic() + timeout
    pause, looks = 0.01, 0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
            if not holder and looks < 20:  # the lock is changing hands (its line is written just after taking it)
                looks += 1
                time.sleep(0.005)
                continue
            os.close(fd)
            raise BankBusy(f"{path}: the bank is being written by another process ({holder or 'holder unknown'}); "
                           f"gave up after {timeout:g} s")
        time.sleep(pause if left is None else min(pause, left))
        pause = min(2 * pause, 0.5)
    cmd = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {cmd[:160]}, since {since}\n".encode(), 0)
    return fd


def open_lock(path: Path) -> int | None:
    """A descriptor of a lock file, created if need be; None where it is absent and cannot be created (a directory
    this process may not write, where no writer of this format has been either)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None


def _snapshot(path: Path, name: str = MANIFEST) -> tuple[dict, dict[str, _Shard]]:
    """The current manifest (or the one named `name`) and every file it names, mapped: a consistent snapshot (see
    the module docstring)."""
    fd = open_lock(path / READERS) if path.is_dir() else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for a clean-up in progress
        m = _read_manifest(path, name)
        return m, {f: _map(path / f) for f in named_files(m)}
    finally:
        if fd is not None:
            os.close(fd)


def collect_leftovers(path: Path, keep: set[str]) -> None:
    """Remove the files no commit needs (older commits', interrupted ones'), unless a reader is mapping files."""
    fd = open_lock(path / READERS)
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a reader holds it: the next commit cleans up
        os.close(fd)
        return
    try:
        for p in path.iterdir():
            if p.name not in keep and p.name.startswith(_FILES):
                p.unlink(missing_ok=True)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- files
def _nonfinite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds NaN or infinities (checked in pieces: the masks stay small)."""
    flat, step = t.reshape(-1), 1 << 24
    if t.dtype == torch.float8_e4m3fn:  # e4m3fn has no infinities; NaN is S.1111.111
        u = flat.view(torch.uint8)
        return any(bool(((u[a:a + step] & 0x7F) == 0x7F).any()) for a in range(0, len(u), step))
    if not t.is_floating_point():
        return False
    return any(not bool(torch.isfinite(flat[a:a + step]).all()) for a in range(0, len(flat), step))


def _sha256(data) -> str:
    h, view = hashlib.sha256(), memoryview(data).cast("B")
    for a in range(0, len(view), 1 << 26):
        h.update(view[a:a + (1 << 26)])
    return h.hexdigest()


def file_sum(path: Path) -> dict:
    with open(path, "rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _write(path: Path, tensors: dict[str, torch.Tensor], fp: str) -> dict:
    """Write a shard (tagged with the model's fingerprint), fsync it; its size and checksum for the manifest."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    for k, v in tensors.items():
        if _nonfinite(v):
            raise BankError(f"{path.parent}: tensor {k} of {path.name} holds NaN or infinite values; not written")
    save_file(tensors, str(path), metadata={"fingerprint": fp})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return file_sum(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Shard:
    """A mapped safetensors file: its tensors (views of the mapping), its metadata and the whole file."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict
    raw: np.ndarray  # (bytes,) the file
    stat: tuple  # (device, inode, size, mtime) when mapped: which file this was


def _map(path: Path) -> _Shard:
    """Map a safetensors file and check its header against itself: dtypes, shapes, byte ranges, size."""
    def bad(why: str) -> BankError:
        return BankError(f"{path}: {why}; the bank is damaged")

    if not path.is_file():
        raise BankError(f"{path.parent}: shard {path.name} is missing; the bank is damaged")
    st = path.stat()
    size = st.st_size
    if size < 8:
        raise bad(f"not a readable shard ({size} bytes)")
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=0, shape=(size,))
    n = int.from_bytes(raw[:8].tobytes(), "little")
    if not 0 < n <= size - 8:
        raise bad(f"not a readable shard (a {n} byte header in {size} bytes)")
    try:
        header = json.loads(raw[8:8 + n].tobytes())
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise bad(f"not a readable shard (header: {e})") from None
    meta = header.pop("__metadata__", {})
    spans = []
    for name, v in header.items():
        if not (isinstance(v, dict) and v.get("dtype") in _DTYPES and isinstance(v.get("shape"), list)
                and all(type(x) is int and x >= 0 for x in v["shape"]) and isinstance(v.get("data_offsets"), list)
                and len(v["data_offsets"]) == 2 and all(type(x) is int for x in v["data_offsets"])):
            raise bad(f"the header entry of tensor {name!r} is malformed")
        a, b = v["data_offsets"]
        need = int(np.prod(v["shape"])) * _DTYPES[v["dtype"]].itemsize
        if not 0 <= a <= b or b - a != need:
            raise bad(f"the header says tensor {name!r} is {v['dtype']} {v['shape']} ({need} bytes) but gives it "
                      f"bytes {a}..{b}")
        spans.append((a, b, name))
    end = 0
    for a, b, name in sorted(spans):
        if a != end:
            raise bad(f"tensor {name!r} starts at byte {a}, not {end} (overlapping or gapped data)")
        end = b
    if 8 + n + end > size:
        raise bad(f"shard is truncated ({size} of {8 + n + end} bytes)")
    if 8 + n + end < size:
        raise bad(f"{size - 8 - n - end} bytes follow the last tensor")
    out = {}
    for name, v in header.items():
        a, b = v["data_offsets"]
        dtype = _DTYPES[v["dtype"]]
        if b == a:
            out[name] = torch.zeros(v["shape"], dtype=dtype)
            continue
        part = torch.from_numpy(raw[8 + n + a: 8 + n + b])  # (bytes,) uint8, a view of the mapping
        out[name] = part.view(dtype).view(v["shape"])
    return _Shard(path.name, out, meta, raw, (st.st_dev, st.st_ino, size, st.st_mtime_ns))


_passed: set[tuple] = set()  # (file identity, recorded sha256) of the files this process checked: committed files
# are never rewritten in place, so reopening a bank (the server following a commit, `update`) checks its new files only


def _check_file(sh: _Shard, m: dict, where: Path, again: bool = True) -> None:
    """The shard was written for the bank's model, matches its recorded checksum (if any), holds finite floats.
    again=False: not if this process checked the same file against the same checksum before."""
    entry = m.get("files", {}).get(sh.name)
    seen = (sh.stat, m["fingerprint"], entry and entry.get("sha256"))
    if not again and seen in _passed:
        return
    fp = m["fingerprint"]
    if sh.meta.get("fingerprint", fp) != fp:
        raise BankError(f"{where}: shard {sh.name} was written for another model (fingerprint "
                        f"{sh.meta['fingerprint']}, the bank's {fp}); the bank is damaged")
    if entry is not None and (entry.get("bytes") != len(sh.raw) or entry.get("sha256") != _sha256(sh.raw)):
        raise BankError(f"{where}: shard {sh.name} fails its checksum (changed or replaced since it was committed); "
                        "the bank is damaged")
    for k, t in sh.tensors.items():
        if _nonfinite(t):
            raise BankError(f"{where}: shard {sh.name}: tensor {k} holds NaN or infinite values; the bank is damaged")
    _passed.add(seen)


def _expect(sh: _Shard, where: Path, key: str, shape: tuple, kinds: tuple[torch.dtype, ...]) -> torch.Tensor:
    t = sh.tensors.get(key)
    if t is None:
        raise BankError(f"{where}: shard {sh.name} lacks tensor {key}; the bank is damaged")
    if tuple(t.shape) != shape or t.dtype not in kinds:
        raise BankError(f"{where}: shard {sh.name}: tensor {key} is {str(t.dtype).removeprefix('torch.')} "
                        f"{list(t.shape)}, the manifest needs {list(shape)}; the bank is damaged")
    return t


_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_STORED = (*_FLOAT, torch.int8, torch.float8_e4m3fn)


def _check_segment(sh: _Shard, m: dict, s: dict, where: Path) -> None:
    """A segment shard against its manifest entry: the document table adds up, every router layer's K̄ / V̄ (/ K̄r)
    is (chunks, Hkv, D) (quantized: with a float32 scale per chunk or per chunk and head)."""
    docs, chunks, P = s["docs"], s["chunks"], m["msa"]["pooling_kernel_size"]
    hkv, d = m["model"]["kv_heads"], m["model"]["head_dim"]
    tc = _expect(sh, where, "token_count", (docs,), (torch.int64,)).tolist()
    cc = _expect(sh, where, "chunk_count", (docs,), (torch.int64,)).tolist()
    _expect(sh, where, "doc_ids", (docs,), (torch.int64,))
    data = sh.tensors.get("text_data")
    off = _expect(sh, where, "text_offsets", (docs + 1,), (torch.int64,))
    if min(tc, default=1) <= 0 or cc != [(n + P - 1) // P for n in tc] or sum(cc) != chunks:
        raise BankError(f"{where}: shard {sh.name}: its document table does not add up to the manifest's "
                        f"{docs} documents in {chunks} chunks; the bank is damaged")
    if (data is None or data.dtype != torch.uint8 or data.dim() != 1 or int(off[0]) != 0
            or bool((off[1:] < off[:-1]).any()) or int(off[-1]) != len(data)):
        raise BankError(f"{where}: shard {sh.name}: its text offsets do not fit its text data; the bank is damaged")
    layers = m["router_layers"]
    own_rk = [f"layer.{lay}.rk" in sh.tensors for lay in layers]
    if any(own_rk) and not all(own_rk):
        raise BankError(f"{where}: shard {sh.name} has routing keys for some router layers only; the bank is damaged")
    for lay in layers:
        for kind in ("k", "v", "rk") if all(own_rk) and layers else ("k", "v"):
            key = f"layer.{lay}.{kind}"
            t = _expect(sh, where, key, (chunks, hkv, d), _STORED)
            if t.dtype in _FLOAT and f"{key}.scale" not in sh.tensors:
                continue
            scale = sh.tensors.get(f"{key}.scale")
            shapes = ((chunks,), (chunks, hkv))
            if t.dtype in _FLOAT or scale is None or tuple(scale.shape) not in shapes or scale.dtype != torch.float32:
                raise BankError(f"{where}: shard {sh.name}: {key} and its scale do not match; the bank is damaged")


def _check_bank(m: dict, shards: dict[str, _Shard], where: Path, again: bool = True) -> None:
    """Every file of a snapshot: its own checks (again=False: see `_check_file`), the prefix / moments / priors
    shapes, every segment, the ids."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashing and isfinite release the GIL
        list(pool.map(lambda sh: _check_file(sh, m, where, again), shards.values()))
    hkv, d = m["model"]["kv_heads"], m["model"]["head_dim"]
    prefix = shards[m["prefix"]]
    for i in range(m["model"]["layers"]):
        for n in "kv":
            _expect(prefix, where, f"layer.{i}.{n}", (len(m["prefix_ids"]), hkv, d), _FLOAT)
    if m.get("key_moments"):
        for lay in m["router_layers"]:
            _expect(shards[m["key_moments"]], where, f"layer.{lay}", (hkv, d, d), (torch.float32,))
    if m.get("doc_priors"):
        pri = shards[m["doc_priors"]]
        ids = pri.tensors.get("ids")
        if ids is None or ids.dim() != 1 or ids.dtype != torch.int64:
            raise BankError(f"{where}: shard {pri.name} lacks its document ids (int64); the bank is damaged")
        for lay in m["router_layers"]:
            _expect(pri, where, f"layer.{lay}", tuple(ids.shape), (torch.float32,))
    ids: set[int] = set()
    for s in m["segments"]:
        sh = shards[s["file"]]
        _check_segment(sh, m, s, where)
        got = sh.tensors["doc_ids"].tolist()
        if ids.intersection(got) or len(set(got)) != len(got) or min(got, default=0) < 0:
            raise BankError(f"{where}: shard {sh.name} repeats document ids of the bank; the bank is damaged")
        ids.update(got)
    if not set(m["deleted"]) <= ids or max(ids, default=-1) >= m["next_id"]:
        raise BankError(f"{where}: the manifest's deleted ids or next id do not fit its documents; the bank is damaged")


def _segment_tensors(seg: Segment) -> dict[str, torch.Tensor]:
    texts = seg.records if isinstance(seg.records, PackedTexts) else PackedTexts.pack(seg.records)
    out = {
        "doc_ids": torch.tensor(seg.doc_ids, dtype=torch.int64),
        "chunk_count": torch.tensor(seg.chunk_count, dtype=torch.int64),
        "token_count": torch.tensor(seg.token_count, dtype=torch.int64),
        "text_data": texts.data, "text_offsets": texts.offsets,
    }
    stores = {"k": seg.keys, "v": seg.values, **({} if seg.route_keys is seg.keys else {"rk": seg.route_keys})}
    for layer in seg.keys:
        for n, store in stores.items():
            t = store[layer]
            if isinstance(t, QTensor):
                out[f"layer.{layer}.{n}"], out[f"layer.{layer}.{n}.scale"] = t.data, t.scale
            else:
                out[f"layer.{layer}.{n}"] = t
    return out


def _segment_from(t: dict[str, torch.Tensor], layers: list[int], file: str) -> Segment:
    def part(name: str):
        return QTensor(t[name], t[f"{name}.scale"]) if f"{name}.scale" in t else t[name]

    keys = {lay: part(f"layer.{lay}.k") for lay in layers}
    own_rk = bool(layers) and f"layer.{layers[0]}.rk" in t  # routing keys stored apart from K̄
    return Segment(
        keys=keys, values={lay: part(f"layer.{lay}.v") for lay in layers},
        route_keys={lay: part(f"layer.{lay}.rk") for lay in layers} if own_rk else keys,
        doc_ids=t["doc_ids"].tolist(), chunk_count=t["chunk_count"].tolist(), token_count=t["token_count"].tolist(),
        records=PackedTexts(t["text_data"], t["text_offsets"]), file=file,
    )


# ---------------------------------------------------------------------------------------------- save / load
def save(bank: MemoryBank, path: str | Path | None = None, compact: bool | None = None) -> Path:
    """Commit the bank to `path` (default: where it was loaded from / last saved), as the bank's one writer (see
    `writer`). Into its own directory only new segments are written, and only if no other commit came since this
    bank was loaded (BankError otherwise); another directory's bank is replaced. `compact` (default: when over a
    quarter of the chunks are deleted) rewrites the segments that hold deleted documents first."""
    path = Path(path) if path is not None else bank.path
    if path is None:
        raise ValueError("save(path): this bank has no directory yet")
    model_p = bank.model.msa_config.pooling_kernel_size
    if bank.pool_size != model_p:
        raise ValueError(f"this bank pools {bank.pool_size} tokens per chunk, the model {model_p}: a refinement "
                         "bank is not saved")
    with writer(path):
        old = _read_manifest(path) if (path / MANIFEST).exists() else None
        latest = old.get("commit", 0) if old else 0
        same = old is not None and bank.path is not None and path.resolve() == bank.path.resolve()
        if same and bank.commit != latest:
            raise BankError(f"{path}: another writer committed to the bank since this copy was loaded (commit "
                            f"{bank.commit}, now {latest}); load it again and redo the change")
        _commit(bank, path, compact, old if same else None, latest + 1)
    return path


def stage(bank: MemoryBank, path: str | Path, old: dict | None, commit: int) -> dict:
    """Write the bank's new files into `path` and a manifest naming them as manifest-<commit>.json, leaving
    manifest.json and every other file as they are (`old`: the manifest of the commit the bank was loaded from in
    this directory, whose files it keeps). The caller holds the write lock and publishes the commit (a bank over
    ranks: its index, memory/parallel.py). Returns {"manifest": name, "bytes", "sha256", "files": [names]}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    name = f"manifest-{commit}.json"
    files = _commit(bank, path, False, old, commit, name)
    return {"manifest": name, **file_sum(path / name), "files": sorted(files)}


def _commit(bank: MemoryBank, path: Path, compact: bool | None, old: dict | None, commit: int,
            name: str = MANIFEST) -> dict:
    """Write the bank's new files and a manifest naming them (`old`: the commit it was loaded from, whose files it
    keeps), switch manifest.json to it, clean up; with another `name`, write the manifest under that name only (no
    switch, no clean-up). Returns the files the manifest names."""
    if compact or (compact is None and bank.dead_chunks * 4 > bank.num_chunks):
        bank.compact()
    model, fp = bank.model, fingerprint(bank.model)
    files: dict[str, dict] = {}  # name -> {"bytes", "sha256"}

    def write(prefix: str, tensors: dict[str, torch.Tensor]) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}.safetensors"
        files[name] = _write(path / name, tensors, fp)
        return name

    def kept(name: str) -> str:  # a file of the commit this bank was loaded from; format-1 banks get checksums now
        files[name] = old.get("files", {}).get(name) or file_sum(path / name)
        return name

    prefix_file = kept(old["prefix"]) if old else write("prefix", {
        f"layer.{i}.{n}": t for i, kv in enumerate(bank.prefix_kv) for n, t in zip("kv", kv)})
    shards = []
    committed = set(named_files(old)) if old else set()  # (a file named by a commit that failed is written again)
    for seg in bank.segments:
        if seg.file in committed:
            kept(seg.file)
        else:
            seg.file = write("seg", _segment_tensors(seg))
        shards.append({"file": seg.file, "docs": len(seg.doc_ids), "chunks": seg.num_chunks})
    moments_file = None  # the routing-query moments 8-bit keys are rounded for (small: rewritten every commit)
    if bank.key_moments is not None:
        moments_file = write("moments", {f"layer.{lay}": m.float() for lay, m in bank.key_moments.items()})
    priors_file = None  # the documents' routing-score priors (engine `calibrate_priors`)
    if bank.doc_priors is not None:
        priors_file = write("priors", {"ids": bank.doc_priors["ids"],
                                       **{f"layer.{lay}": p.float() for lay, p in bank.doc_priors["scores"].items()}})
    t = next((st for s in bank.segments for st in s.keys.values()), bank.prefix_kv[0][0])
    manifest = {
        "format": FORMAT, "version": VERSION, "commit": commit, "fingerprint": fp,
        "model": {"family": model.config.family, "layers": model.config.num_hidden_layers,
                  "hidden": model.config.hidden_size, "kv_heads": model.config.num_key_value_heads,
                  "head_dim": model.config.head_dim},
        "msa": model.msa_config.to_dict(model.config.num_hidden_layers), "router_layers": model.router_layers,
        "dtype": str(t.dtype).removeprefix("torch."), "model_dtype": str(model.dtype).removeprefix("torch."),
        "key_dtype": bank.key_dtype,
        "content_dtype": bank.content_dtype, "prefix_ids": bank.prefix_ids, "prefix": prefix_file,
        "segments": shards, "deleted": sorted(bank.deleted), "next_id": bank.next_id,
        "next_position": bank.next_position, "docs": bank.num_docs, "chunks": bank.num_chunks, "meta": bank.meta,
        "tokens": bank.num_tokens, "key_moments": moments_file,
        "doc_priors": priors_file, "files": files,
    }
    manifest["checksum"] = _manifest_sum(manifest)
    tmp = path / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / name)
    fsync_dir(path)
    bank.path, bank.commit = path, commit
    if name == MANIFEST:
        collect_leftovers(path, {MANIFEST, LOCK, READERS, *files})
    return files


@dataclass
class DocumentEntry:
    """A live document of a bank's table, read without the model (`documents`); its name and text decoded on use."""

    id: int
    tokens: int
    _texts: PackedTexts
    _row: int

    @property
    def name(self) -> str:
        return self._texts[self._row][0]

    @property
    def text(self) -> str | None:
        return self._texts[self._row][1]


def documents(path: str | Path) -> list[DocumentEntry]:
    """The live documents of a bank's current commit in insertion order, from its shards' document tables alone (no
    model is loaded, no checksum is checked: `verify` does that). Token counts are the ones MemoryBank reports."""
    path = Path(path)
    m, shards = _snapshot(path)
    deleted, out = set(m["deleted"]), []
    for s in m["segments"]:
        sh = shards[s["file"]]
        t = sh.tensors
        try:
            ids, tokens = t["doc_ids"].tolist(), t["token_count"].tolist()
            texts = PackedTexts(t["text_data"], t["text_offsets"])
        except KeyError as e:
            raise BankError(f"{path}: shard {sh.name} lacks tensor {e}; the bank is damaged") from None
        if not len(ids) == len(tokens) == len(texts) == s["docs"]:
            raise BankError(f"{path}: shard {sh.name}: its document table does not match the manifest; the bank is "
                            "damaged")
        out += [DocumentEntry(d, n, texts, row) for row, (d, n) in enumerate(zip(ids, tokens)) if d not in deleted]
    return out


def _manifest_sum(m: dict) -> str:
    body = json.dumps({k: v for k, v in m.items() if k != "checksum"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _read_manifest(path: Path, name: str = MANIFEST) -> dict:
    mf = path / name
    if not mf.exists():
        what = "no such directory" if not path.exists() else f"no {name} (not a memsparse bank)"
        raise BankError(f"{path}: {what}")
    try:
        m = json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BankError(f"{mf}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BankError(f"{path}: not a memsparse bank (format {m.get('format') if isinstance(m, dict) else m!r})")
    if not isinstance(m.get("version", 0), int) or m.get("version", 0) > VERSION:
        raise BankError(f"{path}: bank format version {m['version']} is newer than this memsparse reads "
                        f"({VERSION}); upgrade memsparse")
    if "checksum" in m and m["checksum"] != _manifest_sum(m):
        raise BankError(f"{mf}: the manifest fails its checksum; the bank is damaged")
    if not _well_formed(m):
        raise BankError(f"{mf}: the manifest lacks fields or holds malformed ones; the bank is damaged")
    return m


def _well_formed(m: dict) -> bool:
    def ints(x, n=None):
        return isinstance(x, list) and all(type(i) is int for i in x) and (n is None or len(x) == n)

    def name(x, kind):
        return isinstance(x, str) and x.startswith(kind) and Path(x).name == x

    model, msa, segs = m.get("model"), m.get("msa"), m.get("segments")
    return (isinstance(m.get("fingerprint"), str) and isinstance(model, dict)
            and all(type(model.get(k)) is int and model[k] > 0 for k in ("layers", "kv_heads", "head_dim"))
            and isinstance(msa, dict) and type(msa.get("pooling_kernel_size")) is int and msa["pooling_kernel_size"] > 0
            and ints(m.get("router_layers")) and ints(m.get("prefix_ids")) and ints(m.get("deleted"))
            and type(m.get("next_id")) is int and name(m.get("prefix"), "prefix-") and isinstance(segs, list)
            and all(isinstance(s, dict) and name(s.get("file"), "seg-") and type(s.get("docs")) is int
                    and type(s.get("chunks")) is int for s in segs)
            and (not m.get("key_moments") or name(m["key_moments"], "moments-"))
            and (not m.get("doc_priors") or name(m["doc_priors"], "priors-"))
            and isinstance(m.get("files", {}), dict) and all(isinstance(v, dict) for v in m.get("files", {}).values()))


def named_files(m: dict) -> list[str]:
    """Every file a manifest names."""
    return [m["prefix"], *(s["file"] for s in m["segments"]), *(f for f in (m.get("key_moments"), m.get("doc_priors"))
                                                               if f)]


def read_manifest(path: str | Path, name: str = MANIFEST) -> dict:
    """The manifest of a bank directory, or the one named `name` there (checked: format, version, fields, its
    checksum)."""
    return _read_manifest(Path(path), name)


@dataclass
class Stored:
    """A commit of a bank directory as read for a model (`read`): what `MemoryBank.load` builds the bank from."""

    path: Path
    manifest: dict
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, on the model's device
    segments: list[Segment]
    key_moments: dict | None
    doc_priors: dict | None


def read(path: str | Path, model: MSAForCausalLM, manifest: str = MANIFEST) -> Stored:
    """Read a bank's current commit (or the one `manifest` names, a file of the directory) for `model`: every file
    is mapped and checked (see the module docstring); tensors stay memory-mapped but the template prefix's K/V and
    the routing-query moments, which go to the model's device."""
    path = Path(path)
    m, shards = _snapshot(path, manifest)
    fp = fingerprint(model)
    if m["fingerprint"] != fp:
        raise BankError(f"{path}: this bank was encoded by a different model (fingerprint {m['fingerprint']}, "
                        f"the given model has {fp}); re-encode the corpus with this model")
    _check_bank(m, shards, path, again=False)
    layers = model.router_layers
    prefix = shards[m["prefix"]].tensors
    kv = [tuple(prefix[f"layer.{i}.{n}"].to(model.device, model.dtype) for n in "kv")
          for i in range(model.config.num_hidden_layers)]
    segments = [_segment_from(shards[s["file"]].tensors, layers, s["file"]) for s in m["segments"]]
    moments = priors = None
    if m.get("key_moments"):
        t = shards[m["key_moments"]].tensors
        moments = {lay: t[f"layer.{lay}"].to(model.device) for lay in layers}
    if m.get("doc_priors"):
        t = shards[m["doc_priors"]].tensors
        priors = {"ids": t["ids"], "scores": {lay: t[f"layer.{lay}"] for lay in layers}}
    return Stored(path, m, kv, segments, moments, priors)


def verify(path: str | Path, manifest: str = MANIFEST) -> dict:
    """Check every file of a bank's current commit (or the one `manifest` names) without its model: the checks of
    `read` plus every stored text.
    Returns {"commit", "files", "unverified" (files without a recorded checksum: format 1), "leftover" (files no
    commit names, removed by the next commit), "documents"}; the first damage found is a BankError."""
    path = Path(path)
    m, shards = _snapshot(path, manifest)
    _check_bank(m, shards, path)
    for s in m["segments"]:
        sh = shards[s["file"]]
        texts = PackedTexts(sh.tensors["text_data"], sh.tensors["text_offsets"])
        for i in range(len(texts)):
            try:
                texts[i]
            except BankError as e:
                raise BankError(f"{path}: shard {sh.name}: {e}; the bank is damaged") from None
    return {"commit": m.get("commit", 0), "files": len(shards),
            "unverified": sum(name not in m.get("files", {}) for name in shards),
            "leftover": sum(p.name.startswith(_FILES) and p.name not in shards and p.name != manifest
                            for p in path.iterdir()),
            "documents": sum(s["docs"] for s in m["segments"]) - len(m["deleted"])}
