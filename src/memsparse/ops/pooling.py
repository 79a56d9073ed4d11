"""Chunk mean pooling of document tokens: chunks of P tokens that never cross a document boundary."""

from __future__ import annotations

import torch


def chunk_ids_for_documents(doc_lengths: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For documents laid out back to back, the chunk index of every token and the token count per chunk.

    doc_lengths: (N,) token counts. Returns chunk_of_token (sum(lengths),) and chunk_counts (C,), where
    document i owns ceil(len_i / P) consecutive chunks and its last chunk holds the remainder.
    """
    doc_lengths = doc_lengths.long()
    chunks_per_doc = (doc_lengths + chunk_size - 1) // chunk_size  # (N,)
    first_chunk = torch.cumsum(chunks_per_doc, 0) - chunks_per_doc  # (N,)
    doc_of_token = torch.repeat_interleave(torch.arange(len(doc_lengths), device=doc_lengths.device), doc_lengths)
    token_start = torch.cumsum(doc_lengths, 0) - doc_lengths
    rank = torch.arange(int(doc_lengths.sum()), device=doc_lengths.device) - token_start[doc_of_token]
    chunk_of_token = first_chunk[doc_of_token] + rank // chunk_size
    n_chunks = int(chunks_per_doc.sum())
    counts = torch.bincount(chunk_of_token, minlength=n_chunks)
    return chunk_of_token, counts


def chunk_mean_pool(x: torch.Tensor, chunk_of_token: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of x (N, ...) over tokens sharing a chunk: (C, ...). Sums in float32, result in x's dtype."""
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros((len(counts),) + tuple(x.shape[1:]), dtype=acc_dtype, device=x.device)
    out = out.index_add(0, chunk_of_token, x.to(acc_dtype))
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (out / counts.clamp(min=1).to(acc_dtype).view(shape)).to(x.dtype)


def chunk_mean_pool_reference(x: torch.Tensor, doc_lengths: list[int], chunk_size: int) -> torch.Tensor:
    """Loop reference for chunk_mean_pool over documents laid out back to back."""
    rows, start = [], 0
    for n in doc_lengths:
        for c in range(0, n, chunk_size):
            rows.append(x[start + c : start + min(c + chunk_size, n)].double().mean(0))
        start += n
    return torch.stack(rows).to(x.dtype)
