"""The memory bank (stage 1): documents encoded once into per-chunk K̄, V̄ and routing keys K̄r per router layer,
plus the template prefix's keys/values for every layer. In memory only for now (store and tiers: issue 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..model.decoder import MSAForCausalLM
from ..ops.attention import sdpa

TEMPLATE_PREFIX = "<|im_start|>user\n"


def render_document(tok, doc_id: int, text: str) -> list[int]:
    """Token ids of `<|im_start|>[i]. {text}[i]<|im_end|>`; the text is always plain text: special-token
    strings inside it are split into ordinary tokens, never read as control tokens."""
    if not isinstance(text, str):
        raise TypeError(f"document {doc_id}: expected str, got {type(text).__name__}")
    body = tok(f"[{doc_id}]. {text}[{doc_id}]", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [tok.convert_tokens_to_ids("<|im_start|>"), *body, tok.convert_tokens_to_ids("<|im_end|>")]


@dataclass
class MemoryBank:
    """Per router layer K̄, V̄, K̄r (chunks, Hkv, D); document table; template-prefix K/V for every layer."""

    model: MSAForCausalLM
    prefix_ids: list[int]
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (p, Hkv, D) keys, values
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # K̄
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # V̄
    route_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # K̄r
    chunk_start: list[int] = field(default_factory=list)  # per document
    chunk_count: list[int] = field(default_factory=list)
    token_count: list[int] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    alive: list[bool] = field(default_factory=list)
    tok: object = None  # the tokenizer that renders text documents

    @classmethod
    def build(cls, model: MSAForCausalLM, tok, docs: list[str], **kw) -> MemoryBank:
        """Encode `docs` (ids 0..N-1) rendered in the official document format."""
        bank = cls.empty(model, tok(TEMPLATE_PREFIX, add_special_tokens=False)["input_ids"])
        bank.tok = tok
        bank.add(docs, **kw)
        return bank

    @classmethod
    def empty(cls, model: MSAForCausalLM, prefix_ids: list[int]) -> MemoryBank:
        return cls(model=model, prefix_ids=list(prefix_ids), prefix_kv=prefix_cache(model, prefix_ids))

    @property
    def num_docs(self) -> int:
        return len(self.chunk_start)

    def add(self, docs: list[str], **kw) -> list[int]:
        """Encode new documents; returns their ids."""
        if self.tok is None:
            raise ValueError("this bank has no tokenizer (made from token ids): use add_tokens")
        start = self.num_docs
        tokens = [render_document(self.tok, start + i, d) for i, d in enumerate(docs)]
        return self.add_tokens(tokens, texts=list(docs), **kw)

    def add_tokens(self, tokens: list[list[int]], texts: list[str | None] | None = None,
                   batch_tokens: int = 65536, progress: bool = False) -> list[int]:
        """Encode already-tokenized documents, packed many per forward; returns their ids."""
        if any(len(t) == 0 for t in tokens):
            raise ValueError("empty document: a document needs at least one token")
        ids = list(range(self.num_docs, self.num_docs + len(tokens)))
        texts = texts or [None] * len(tokens)
        P = self.model.msa_config.pooling_kernel_size
        dev = self.model.device
        bar = tqdm(total=sum(map(len, tokens)), unit="tok", disable=not progress, desc="encoding")
        new: dict[int, list[tuple]] = {}  # router layer -> pooled (K̄, V̄, K̄r) per batch, concatenated once
        i = 0
        while i < len(tokens):
            j, n = i, 0
            while j < len(tokens) and (j == i or n + len(tokens[j]) <= batch_tokens):
                n += len(tokens[j])
                j += 1
            flat = torch.tensor([t for doc in tokens[i:j] for t in doc], device=dev)[None]  # (1, n)
            doc_ids = torch.cat([torch.full((len(d),), k + 1) for k, d in enumerate(tokens[i:j])]).to(dev)[None]
            for layer, pooled in self.model.encode_documents(flat, doc_ids).items():
                new.setdefault(layer, []).append(pooled)
            for d in tokens[i:j]:
                self.chunk_start.append(self.chunk_start[-1] + self.chunk_count[-1] if self.chunk_start else 0)
                self.chunk_count.append((len(d) + P - 1) // P)
                self.token_count.append(len(d))
            bar.update(n)
            i = j
        bar.close()
        for layer, parts in new.items():
            for n, store in enumerate((self.keys, self.values, self.route_keys)):
                store[layer] = torch.cat(([store[layer]] if layer in store else []) + [p[n] for p in parts])
        self.texts += texts
        self.alive += [True] * len(tokens)
        return ids

    def delete(self, ids: list[int]) -> None:
        """Tombstone documents: they are never routed to again."""
        for i in ids:
            if not 0 <= i < self.num_docs:
                raise KeyError(f"no document {i} in the bank (0..{self.num_docs - 1})")
            self.alive[i] = False

    def chunk_doc(self) -> torch.Tensor:
        """(C,) document id of every chunk."""
        counts = torch.tensor(self.chunk_count, device=self.model.device)
        return torch.repeat_interleave(torch.arange(self.num_docs, device=self.model.device), counts)


@torch.no_grad()
def prefix_cache(model: MSAForCausalLM, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values (p, Hkv, D) of the template prefix at positions 0..p-1, for every layer."""
    ids = torch.tensor([prefix_ids], device=model.device)
    x = model.model.embed_tokens(ids)
    cos, sin = model.rope(torch.arange(len(prefix_ids), device=model.device)[None], x.dtype)
    out = []
    for layer in model.model.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.project(h, cos, sin)  # (1, p, H|Hkv, D)
        out.append((k[0], v[0]))
        o = sdpa(q, k, v, causal=True)
        x = x + attn.o_proj(o.flatten(2))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return out
