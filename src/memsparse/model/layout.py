"""The token layout of a Memory Sparse Attention sample, computed once per forward from `doc_ids`.

doc_ids: > 0 document tokens (id = document index + 1 within the sample), 0 routing-query tokens, -1 other
active tokens, -2 template tokens. Padding comes from `attention_mask` (0 = pad). Documents must be
contiguous runs. Non-document tokens are "active": they never enter a document's attention.

Default positions (document-wise RoPE): documents restart at 0; the active tokens before the first
document (the template prefix, p tokens) take 0..p-1; active tokens after it continue from p + k
(`query_position_offset="template+k"`, the official engine) or from k (`"k"`, the paper), k the engine's
top-k. Without documents the positions are simply 0..n-1. With `doc_positions="global"` (an ablation) a row's
memory is one sequence at p, p+1, ... and its later active tokens continue after all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.indexing import take
from ..ops.pooling import chunk_ids_for_documents
from .config import MSAConfig


@dataclass
class DocumentBucket:
    """Documents of similar length, right-padded to one length for batched causal attention."""

    gather: torch.Tensor  # (n, L) indices into the packed document tokens (0 where padded)
    valid: torch.Tensor  # (n, L) real tokens
    rows: torch.Tensor  # (m,) flat indices into (n * L) of the real tokens
    dest: torch.Tensor  # (m,) their indices in the packed document tokens


@dataclass
class SequenceLayout:
    batch: int
    length: int
    positions: torch.Tensor  # (B, T)
    # documents, in (sample, start) order; their tokens packed back to back
    doc_token_flat: torch.Tensor  # (Nd,) flat indices b * T + t of document tokens
    doc_sample: torch.Tensor  # (N,) sample of each document
    doc_column: torch.Tensor  # (N,) document id - 1
    doc_lengths: torch.Tensor  # (N,)
    buckets: list[DocumentBucket]
    doc_cu_seqlens: torch.Tensor  # (N + 1,) int32 start of each document in the packed tokens, then Nd
    max_doc_length: int
    num_doc_columns: int  # largest document id in the batch
    # chunks of P tokens, never crossing a document boundary
    chunk_of_token: torch.Tensor  # (Nd,)
    chunk_counts: torch.Tensor  # (C,)
    chunk_seq: torch.Tensor  # (C,) sequence index of each chunk's first token
    chunk_index: torch.Tensor  # (B, Cmax) chunk of each sample's slot (0 where padded)
    chunk_valid: torch.Tensor  # (B, Cmax)
    chunk_column: torch.Tensor  # (B, Cmax) document column of each slot, -1 where padded
    # active (non-document, non-pad) tokens, compacted per sample in order
    active_index: torch.Tensor  # (B, A) sequence index t (0 where padded)
    active_valid: torch.Tensor  # (B, A)
    route_mask: torch.Tensor  # (B, A) routing-query tokens (doc_ids == 0)
    active_rows: torch.Tensor  # (n,) flat indices into (B * A) of the real active slots
    max_selected_chunks: int  # bound on the chunks of the top-k documents of any sample

    @property
    def has_documents(self) -> bool:
        return self.doc_token_flat.numel() > 0

    @property
    def num_doc_tokens(self) -> int:
        return self.doc_token_flat.numel()

    @property
    def active_flat(self) -> torch.Tensor:
        """(B, A) flat indices b * T + t of the active slots."""
        offsets = torch.arange(self.batch, device=self.active_index.device).unsqueeze(1) * self.length
        return self.active_index + offsets

    @property
    def packed_index(self) -> torch.Tensor:
        """(Nd + B * A,) flat indices b * T + t of the rows the decoder layers work on: the document tokens packed
        back to back (in document order), then the (B, A) active slots (padded slots repeat a real row; their
        outputs are never read)."""
        return torch.cat([self.doc_token_flat, self.active_flat.flatten()])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) in sequence order -> (N, ...) packed rows (`packed_index`)."""
        return take(x.flatten(0, 1), self.packed_index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) packed rows -> (B, T, ...) in sequence order, zeros at padding and unused slots."""
        nd = self.num_doc_tokens
        rows = torch.cat([torch.arange(nd, device=x.device), nd + self.active_rows])
        out = x.new_zeros(self.batch * self.length, *x.shape[1:])
        return out.index_copy(0, self.packed_index[rows], take(x, rows)).unflatten(0, (self.batch, self.length))

    @classmethod
    def build(
        cls,
        doc_ids: torch.Tensor,
        msa: MSAConfig,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> SequenceLayout:
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be (batch, length), got shape {tuple(doc_ids.shape)}")
        if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
        B, T = doc_ids.shape
        dev = doc_ids.device
        valid = torch.ones_like(doc_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if valid.shape != doc_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(valid.shape)} != doc_ids shape {(B, T)}")
        doc_ids = doc_ids.long()
        is_doc = (doc_ids > 0) & valid
        ids = torch.where(is_doc, doc_ids, 0)
        max_id = int(ids.max()) if is_doc.any() else 0

        # document runs: a run starts where a document token differs from its predecessor
        prev = torch.cat([ids.new_zeros(B, 1), ids[:, :-1]], 1)
        prev_doc = torch.cat([is_doc.new_zeros(B, 1), is_doc[:, :-1]], 1)
        starts = is_doc & ~(prev_doc & (prev == ids))
        sample_of = torch.arange(B, device=dev).unsqueeze(1).expand(B, T)
        key = sample_of * (max_id + 1) + ids
        runs = torch.bincount(key[starts], minlength=B * (max_id + 1))
        if (runs > 1).any():
            bad = int((runs > 1).nonzero()[0])
            raise ValueError(
                f"document {bad % (max_id + 1)} of sample {bad // (max_id + 1)} is not a contiguous run of "
                "tokens; every document must occupy consecutive positions"
            )
        sizes = torch.bincount(key[is_doc], minlength=B * (max_id + 1))
        start_flat = starts.flatten().nonzero().squeeze(1)  # (N,) in (sample, start) order
        doc_sample = start_flat // T
        doc_column = ids.flatten()[start_flat] - 1
        doc_lengths = sizes[key.flatten()[start_flat]]
        doc_token_flat = is_doc.flatten().nonzero().squeeze(1)  # (Nd,)

        # active tokens, compacted per sample
        active = valid & ~is_doc
        n_active = active.sum(1)
        A = max(int(n_active.max()), 1)
        rank = active.long().cumsum(1) - 1
        active_index = torch.zeros(B, A, dtype=torch.long, device=dev)
        active_valid = torch.zeros(B, A, dtype=torch.bool, device=dev)
        b_idx, t_idx = active.nonzero(as_tuple=True)
        active_index[b_idx, rank[b_idx, t_idx]] = t_idx
        active_valid[b_idx, rank[b_idx, t_idx]] = True
        route_mask = active_valid & (doc_ids.gather(1, active_index) == 0)
        has_docs = torch.bincount(doc_sample, minlength=B) > 0
        missing = has_docs & active_valid.any(1) & ~route_mask.any(1)
        if missing.any():
            raise ValueError(
                f"sample {int(missing.nonzero()[0])} has documents but no routing-query tokens (doc_ids == 0); "
                "the question must be marked with doc_ids 0"
            )

        # chunks
        P = chunk_size or msa.pooling_kernel_size  # a refinement bank pools finer than the model (engine refine)
        chunk_of_token, chunk_counts = chunk_ids_for_documents(doc_lengths, P)
        chunks_per_doc = (doc_lengths + P - 1) // P
        chunk_doc = torch.repeat_interleave(torch.arange(len(doc_lengths), device=dev), chunks_per_doc)
        first_chunk = torch.cumsum(chunks_per_doc, 0) - chunks_per_doc
        chunk_rank = torch.arange(len(chunk_doc), device=dev) - first_chunk[chunk_doc]
        chunk_seq = start_flat[chunk_doc] % T + chunk_rank * P
        chunk_sample = doc_sample[chunk_doc]
        chunk_index, chunk_valid = _pad_by_sample(chunk_sample, B)
        chunk_col = doc_column[chunk_doc]
        if len(chunk_col):
            chunk_column = torch.where(chunk_valid, chunk_col[chunk_index], -1)
        else:
            chunk_column = torch.full_like(chunk_index, -1)

        if position_ids is None:
            position_ids = _default_positions(
                is_doc, active, doc_token_flat, start_flat, doc_lengths, msa.engine_top_k, msa.query_position_offset,
                msa.doc_positions == "global",
            )
        elif position_ids.shape != doc_ids.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != doc_ids shape {(B, T)}")

        return cls(
            batch=B,
            length=T,
            positions=position_ids.long(),
            doc_token_flat=doc_token_flat,
            doc_sample=doc_sample,
            doc_column=doc_column,
            doc_lengths=doc_lengths,
            buckets=_buckets(doc_lengths),
            doc_cu_seqlens=torch.cat([doc_lengths.new_zeros(1), doc_lengths.cumsum(0)]).to(torch.int32),
            max_doc_length=int(doc_lengths.max()) if len(doc_lengths) else 0,
            num_doc_columns=max_id,
            chunk_of_token=chunk_of_token,
            chunk_counts=chunk_counts,
            chunk_seq=chunk_seq,
            chunk_index=chunk_index,
            chunk_valid=chunk_valid,
            chunk_column=chunk_column,
            active_index=active_index,
            active_valid=active_valid,
            route_mask=route_mask,
            active_rows=active_valid.flatten().nonzero().squeeze(1),
            max_selected_chunks=_max_selected_chunks(chunks_per_doc, doc_sample, B, msa.top_k_docs),
        )


def _pad_by_sample(sample: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items sorted by sample -> (B, max items per sample) item indices and validity."""
    counts = torch.bincount(sample, minlength=batch)
    width = max(int(counts.max()) if len(sample) else 0, 1)
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(sample), device=sample.device) - offsets[sample]
    index = torch.zeros(batch, width, dtype=torch.long, device=sample.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=sample.device)
    index[sample, slot] = torch.arange(len(sample), device=sample.device)
    valid[sample, slot] = True
    return index, valid


def _max_selected_chunks(chunks_per_doc: torch.Tensor, doc_sample: torch.Tensor, batch: int, k: int) -> int:
    """Largest chunk count that k documents of one sample can have: a static size for the selected chunks,
    so that router layers need no device -> host synchronisation."""
    best = 1
    for b in range(batch):
        counts = chunks_per_doc[doc_sample == b]
        if len(counts):
            best = max(best, int(counts.topk(min(k, len(counts))).values.sum()))
    return best


def _buckets(doc_lengths: torch.Tensor, max_waste: float = 2.0) -> list[DocumentBucket]:
    """Group documents (longest first) so that padding at most doubles a bucket's tokens."""
    if len(doc_lengths) == 0:
        return []
    dev = doc_lengths.device
    lengths = doc_lengths.tolist()
    starts = (torch.cumsum(doc_lengths, 0) - doc_lengths).tolist()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = [[order[0]]]
    for i in order[1:]:
        if lengths[i] * max_waste < lengths[groups[-1][0]]:
            groups.append([i])
        else:
            groups[-1].append(i)
    buckets = []
    for g in groups:
        L = lengths[g[0]]
        st = torch.tensor([starts[i] for i in g], device=dev).unsqueeze(1)  # (n, 1)
        ln = torch.tensor([lengths[i] for i in g], device=dev).unsqueeze(1)  # (n, 1)
        ar = torch.arange(L, device=dev).unsqueeze(0)  # (1, L)
        valid = ar < ln
        gather = torch.where(valid, st + ar, 0)
        rows = valid.flatten().nonzero().squeeze(1)
        buckets.append(DocumentBucket(gather=gather, valid=valid, rows=rows, dest=gather.flatten()[rows]))
    return buckets


def _default_positions(
    is_doc: torch.Tensor,
    active: torch.Tensor,
    doc_token_flat: torch.Tensor,
    start_flat: torch.Tensor,
    doc_lengths: torch.Tensor,
    k: int,
    offset_mode: str,
    global_positions: bool = False,
) -> torch.Tensor:
    B, T = is_doc.shape
    pos = torch.zeros(B * T, dtype=torch.long, device=is_doc.device)
    # document tokens: rank inside their document
    doc_of_token = torch.repeat_interleave(torch.arange(len(doc_lengths), device=is_doc.device), doc_lengths)
    pos[doc_token_flat] = doc_token_flat - start_flat[doc_of_token]
    pos = pos.view(B, T)
    # active tokens: prefix before the first document, then a gap for the k documents
    t = torch.arange(T, device=is_doc.device).expand(B, T)
    first_doc = torch.where(is_doc, t, T).amin(1, keepdim=True)  # (B, 1); T when no documents
    j = active.long().cumsum(1) - 1
    p = (active & (t < first_doc)).sum(1, keepdim=True)
    after = t > first_doc
    shift = k if offset_mode == "template+k" else k - p
    if global_positions:  # the row's memory as one sequence after the prefix; active tokens after all of it
        pos = torch.where(is_doc, p + is_doc.long().cumsum(1) - 1, pos)
        shift = is_doc.long().sum(1, keepdim=True)  # (B, 1) memory tokens of the row
    active_pos = torch.where(after, j + shift, j)
    return torch.where(active, active_pos, pos)
