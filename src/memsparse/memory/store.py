"""The on-disk memory bank: a manifest plus safetensors shards, opened memory-mapped, committed atomically.

Layout of a bank directory:
    manifest.json          format version, model fingerprint, msa parameters, dtypes, counts, the shard list,
                           deleted ids (tombstones), the next free id
    prefix-<uid>.safetensors   template-prefix keys/values of every layer
    seg-<uid>.safetensors      one per segment: K̄ / V̄ / K̄r per router layer, the document table, texts
A commit writes new files only (never modifies a referenced one), fsyncs them, writes the manifest to a
temporary name, fsyncs, renames it over manifest.json and fsyncs the directory; files no manifest references
are removed afterwards. A crash at any point leaves the previous manifest and everything it names intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..model.decoder import MSAForCausalLM
from .bank import MemoryBank, PackedTexts, Segment
from .quant import QTensor

FORMAT = "memsparse-bank"
VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn}


class BankError(ValueError):
    """A bank directory that cannot be used: missing, damaged, from another model or a newer format."""


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


# ---------------------------------------------------------------------------------------------- files
def _fsync_write(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return path.stat().st_size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_shard(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, memory-mapped (nothing is read until used). Checks the file is whole."""
    if not path.exists():
        raise BankError(f"{path.parent}: shard {path.name} is missing; the bank is damaged")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise BankError(f"{path}: not a readable shard ({e}); the bank is damaged") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise BankError(f"{path}: shard is truncated ({size} of {8 + n + end} bytes); the bank is damaged")
    mm = np.memmap(path, dtype=np.uint8, mode="c", offset=0, shape=(size,)) if end else None
    out = {}
    for name, v in header.items():
        a, b = v["data_offsets"]
        dtype = _DTYPES[v["dtype"]]
        if b == a:
            out[name] = torch.zeros(v["shape"], dtype=dtype)
            continue
        raw = torch.from_numpy(mm[8 + n + a: 8 + n + b])  # (bytes,) uint8, a view of the mapping
        out[name] = raw.view(dtype).view(v["shape"])
    return out


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
    """Commit the bank to `path` (default: where it was loaded from / last saved). Into its own directory
    only new segments are written; `compact` (default: when over a quarter of the chunks are deleted)
    rewrites the segments that hold deleted documents first."""
    path = Path(path) if path is not None else bank.path
    if path is None:
        raise ValueError("save(path): this bank has no directory yet")
    model_p = bank.model.msa_config.pooling_kernel_size
    if bank.pool_size != model_p:
        raise ValueError(f"this bank pools {bank.pool_size} tokens per chunk, the model {model_p}: a refinement "
                         "bank is not saved")
    dead = sum(bank.segments[r.segment].chunk_count[r.local] for d, r in bank._rows.items() if d in bank.deleted)
    if compact or (compact is None and dead * 4 > bank.num_chunks):
        bank.compact()
    path.mkdir(parents=True, exist_ok=True)
    same = bank.path is not None and path.resolve() == bank.path.resolve()
    old = _read_manifest(path) if (path / MANIFEST).exists() else None
    model = bank.model
    prefix_file = old["prefix"] if same and old else None
    if prefix_file is None:
        prefix_file = f"prefix-{uuid.uuid4().hex[:12]}.safetensors"
        _fsync_write(path / prefix_file, {f"layer.{i}.{n}": t for i, kv in enumerate(bank.prefix_kv)
                                          for n, t in zip("kv", kv)})
    shards = []
    for seg in bank.segments:
        if not (same and seg.file):
            seg.file = f"seg-{uuid.uuid4().hex[:12]}.safetensors"
            _fsync_write(path / seg.file, _segment_tensors(seg))
        shards.append({"file": seg.file, "docs": len(seg.doc_ids), "chunks": seg.num_chunks})
    moments_file = None  # the routing-query moments 8-bit keys are rounded for (small: rewritten every commit)
    if bank.key_moments is not None:
        moments_file = f"moments-{uuid.uuid4().hex[:12]}.safetensors"
        _fsync_write(path / moments_file, {f"layer.{lay}": m.float().contiguous().cpu()
                                           for lay, m in bank.key_moments.items()})
    priors_file = None  # the documents' routing-score priors (engine `calibrate_priors`)
    if bank.doc_priors is not None:
        priors_file = f"priors-{uuid.uuid4().hex[:12]}.safetensors"
        _fsync_write(path / priors_file, {"ids": bank.doc_priors["ids"].contiguous().cpu(),
                                          **{f"layer.{lay}": p.float().contiguous().cpu()
                                             for lay, p in bank.doc_priors["scores"].items()}})
    t = next((st for s in bank.segments for st in s.keys.values()), bank.prefix_kv[0][0])
    manifest = {
        "format": FORMAT, "version": VERSION, "fingerprint": fingerprint(model),
        "model": {"family": model.config.family, "layers": model.config.num_hidden_layers,
                  "hidden": model.config.hidden_size, "kv_heads": model.config.num_key_value_heads,
                  "head_dim": model.config.head_dim},
        "msa": model.msa_config.to_dict(model.config.num_hidden_layers), "router_layers": model.router_layers,
        "dtype": str(t.dtype).removeprefix("torch."), "model_dtype": str(model.dtype).removeprefix("torch."),
        "key_dtype": bank.key_dtype,
        "content_dtype": bank.content_dtype, "prefix_ids": bank.prefix_ids, "prefix": prefix_file,
        "segments": shards, "deleted": sorted(bank.deleted), "next_id": bank.next_id,
        "next_position": bank.next_position, "docs": bank.num_docs, "chunks": bank.num_chunks, "meta": bank.meta,
        "tokens": sum(n for s in bank.segments for n in s.token_count), "key_moments": moments_file,
        "doc_priors": priors_file,
    }
    tmp = path / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)
    _fsync_dir(path)
    keep = {MANIFEST, prefix_file, moments_file, priors_file, *(s["file"] for s in shards)}
    for p in path.iterdir():  # files of older commits and of interrupted ones
        if p.name not in keep and (p.name.startswith(("seg-", "prefix-", "moments-", "priors-"))
                                   or p.name.startswith(f".{MANIFEST}")):
            p.unlink(missing_ok=True)
    bank.path = path
    return path


def _read_manifest(path: Path) -> dict:
    mf = path / MANIFEST
    if not mf.exists():
        what = "no such directory" if not path.exists() else f"no {MANIFEST} (not a memsparse bank)"
        raise BankError(f"{path}: {what}")
    try:
        m = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"{mf}: unreadable manifest ({e})") from None
    if m.get("format") != FORMAT:
        raise BankError(f"{path}: not a memsparse bank (format {m.get('format')!r})")
    if m.get("version", 0) > VERSION:
        raise BankError(f"{path}: bank format version {m['version']} is newer than this memsparse reads "
                        f"({VERSION}); upgrade memsparse")
    return m


def read_manifest(path: str | Path) -> dict:
    """The manifest of a bank directory (checked: format and version)."""
    return _read_manifest(Path(path))


def load(path: str | Path, model: MSAForCausalLM, tok=None, tier: str = "auto") -> MemoryBank:
    """Open a saved bank for `model`: shards are memory-mapped; routing keys go to the model's device and
    K̄/V̄ to the chosen tier (see MemoryBank.place)."""
    path = Path(path)
    m = _read_manifest(path)
    fp = fingerprint(model)
    if m["fingerprint"] != fp:
        raise BankError(f"{path}: this bank was encoded by a different model (fingerprint {m['fingerprint']}, "
                        f"the given model has {fp}); re-encode the corpus with this model")
    layers = model.router_layers
    prefix = open_shard(path / m["prefix"])
    kv = [tuple(prefix[f"layer.{i}.{n}"].to(model.device, model.dtype) for n in "kv")
          for i in range(model.config.num_hidden_layers)]
    bank = MemoryBank(model=model, prefix_ids=m["prefix_ids"], prefix_kv=kv, tok=tok, path=path, tier="device",
                      key_dtype=m.get("key_dtype", "model"), content_dtype=m.get("content_dtype", "model"))
    for s in m["segments"]:
        t = open_shard(path / s["file"])
        seg = _segment_from(t, layers, s["file"])
        if len(seg.doc_ids) != s["docs"] or seg.num_chunks != s["chunks"]:
            raise BankError(f"{path}: shard {s['file']} does not match the manifest; the bank is damaged")
        bank._append(seg)
    bank.deleted = set(m["deleted"])
    bank.next_id = m["next_id"]
    bank.next_position = m.get("next_position", 0)
    bank.meta = m.get("meta", {})
    if m.get("key_moments"):
        t = open_shard(path / m["key_moments"])
        bank.key_moments = {lay: t[f"layer.{lay}"].to(model.device) for lay in layers}
    if m.get("doc_priors"):
        t = open_shard(path / m["doc_priors"])
        bank.doc_priors = {"ids": t["ids"], "scores": {lay: t[f"layer.{lay}"] for lay in layers}}
    return bank.place(tier)
