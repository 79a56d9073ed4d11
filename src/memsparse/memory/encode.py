"""The encoder side of a bank: documents rendered as the protocol renders them (`render_documents`), encoded many
per forward into each router layer's pooled K̄, V̄ and K̄r (`encode_documents`), and the template prefix's keys and
values (`prefix_cache`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..model import cached
from ..model.decoder import MSAForCausalLM
from ..ops.attention import shape_varying_attention

TEMPLATE_PREFIX = "<|im_start|>user\n"


def render_document(tok, doc_id: int, text: str) -> list[int]:
    """Token ids of `<|im_start|>[i]. {text}[i]<|im_end|>`; the text is always plain text: special-token
    strings inside it are split into ordinary tokens, never read as control tokens."""
    return render_documents(tok, [doc_id], [text])[0]


def render_documents(tok, doc_ids: list[int], texts: list[str], batch: int = 1024) -> list[list[int]]:
    """`render_document` for many documents, tokenized in batches (the fast tokenizer works in parallel)."""
    for i, t in zip(doc_ids, texts):
        if not isinstance(t, str):
            raise TypeError(f"document {i}: expected str, got {type(t).__name__}")
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for a in range(0, len(texts), batch):
        bodies = tok([f"[{i}]. {t}[{i}]" for i, t in zip(doc_ids[a:a + batch], texts[a:a + batch])],
                     add_special_tokens=False, split_special_tokens=True)["input_ids"]
        out += [[start, *b, end] for b in bodies]
    return out


def encode_documents(model: MSAForCausalLM, tokens: list[list[int]], chunk_size: int, batch_tokens: int | None = None,
                     host: bool = False, start: int | None = None, progress: bool = False) -> dict[int, list]:
    """Per router layer [K̄, V̄, K̄r] (chunks, Hkv, D) of tokenized documents, in order, packed many per forward
    (`batch_tokens`: 65,536 on a GPU, 8,192 on a CPU, where attention within a pack costs its length squared) and
    pooled over `chunk_size` tokens; `host`: each pack's results leave the device as they come; `start`: global
    positions from there (doc_positions="global"), else each document from 0."""
    dev = model.device
    batch_tokens = batch_tokens or (65536 if dev.type == "cuda" else 8192)
    bar = tqdm(total=sum(map(len, tokens)), unit="tok", unit_scale=True, disable=not progress, desc="encoding")
    parts: dict[int, list[tuple]] = {}  # router layer -> pooled (K̄, V̄, K̄r) per pack, concatenated once
    i, done = 0, 0  # documents and tokens encoded so far
    while i < len(tokens):
        j, n = i, 0
        while j < len(tokens) and (j == i or n + len(tokens[j]) <= batch_tokens):
            n += len(tokens[j])
            j += 1
        flat = torch.tensor([t for doc in tokens[i:j] for t in doc], device=dev)[None]  # (1, n)
        doc_ids = torch.cat([torch.full((len(d),), k + 1) for k, d in enumerate(tokens[i:j])]).to(dev)[None]
        pos = None if start is None else torch.arange(start + done, start + done + n, device=dev)[None]  # (1, n)
        with shape_varying_attention():
            encoded = model.encode_documents(flat, doc_ids, pos, chunk_size=chunk_size)
        for layer, pooled in encoded.items():
            parts.setdefault(layer, []).append(tuple(t.cpu() if host else t for t in pooled))
        bar.update(n)
        i, done = j, done + n
    bar.close()
    return {layer: [torch.cat([p[n] for p in ps]) for n in range(3)] for layer, ps in parts.items()}


@torch.no_grad()
def prefix_cache(model: MSAForCausalLM, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values (p, Hkv, D) of the template prefix at positions 0..p-1, for every layer."""
    dev = model.device
    p = len(prefix_ids)
    ids = torch.tensor([prefix_ids], device=dev)  # (1, p)
    positions = torch.arange(p, device=dev)[None]  # (1, p)
    _, kv = cached.prefill(model, ids, positions, torch.ones_like(ids, dtype=torch.bool), cached.no_memory,
                           logits="none")
    return [(lc.k[0, :p], lc.v[0, :p]) for lc in kv.layers]
