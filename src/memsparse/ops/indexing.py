"""Row gathers for the training path."""

from __future__ import annotations

import torch


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for an integer ``index`` of any shape, through ``index_select``: (*index.shape, *x.shape[1:]).

    Same values and gradients as advanced indexing, but the backward is an ``index_add`` instead of the sort-based
    accumulate of ``x[index]``'s backward, which took 83% of the GPU time of a training step at 16K-64K memory
    tokens on an H100 (benchmarks/train_step.py --batches)."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])
