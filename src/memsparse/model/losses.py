"""Routing auxiliary losses over document scores (spec/official-msa.md §4).

Every function takes scores (B, M) with -inf for documents absent from a sample and 0/1 labels (B, M), and
returns the per-sample losses (B,) and a (B,) mask of samples that have at least one document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_GAMMA = 2.0


def _prep(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    present = torch.isfinite(scores)
    pos = (labels > 0) & present
    return present, pos, pos.sum(1).to(scores.dtype)


def infonce_decouple(scores: torch.Tensor, labels: torch.Tensor, tau: float, focal: bool = False):
    """Paper Eq. 5: each positive against all negatives, p_i = e^{s_i/t} / (e^{s_i/t} + sum_neg e^{s_j/t})."""
    present, pos, n_pos = _prep(scores, labels)
    logits = scores.masked_fill(~present, 0) / tau
    neg = present & ~pos
    lse_neg = torch.logsumexp(logits.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)  # (B, 1)
    log_p = (logits - torch.logaddexp(logits, lse_neg)).masked_fill(~pos, 0)  # (B, M)
    term = -log_p
    if focal:
        term = term * (1 - log_p.exp()) ** FOCAL_GAMMA
        denom = n_pos + 1e-6
    else:
        denom = n_pos.clamp(min=1)
    loss = term.masked_fill(~pos, 0).sum(1) / denom
    return loss, present.any(1)


def infonce(scores: torch.Tensor, labels: torch.Tensor, tau: float, focal: bool = False):
    """Softmax over all present documents; mean of -log p over the positives."""
    present, pos, n_pos = _prep(scores, labels)
    safe = (scores / tau).masked_fill(~present, float("-inf"))
    log_p = torch.log_softmax(safe.masked_fill(~present.any(1, keepdim=True), 0), dim=1)
    log_p = log_p.masked_fill(~pos, 0)  # only positives count; keeps -inf out of the backward pass
    term = -log_p
    if focal:
        term = term * (1 - log_p.exp()) ** FOCAL_GAMMA
    loss = term.masked_fill(~pos, 0).sum(1) / n_pos.clamp(min=1)
    return loss, present.any(1)


def bce(scores: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor):
    """Mean over present documents of -log sigmoid((s + b) * y), y = +1 for positives, -1 otherwise."""
    present, pos, _ = _prep(scores, labels)
    y = pos.to(scores.dtype) * 2 - 1
    term = -F.logsigmoid((scores.masked_fill(~present, 0) + bias) * y)
    loss = term.masked_fill(~present, 0).sum(1) / present.sum(1).clamp(min=1)
    return loss, present.any(1)


def aux_loss(
    doc_scores: dict[int, torch.Tensor],
    aux_labels: torch.Tensor,
    method: str,
    temperature: torch.Tensor,
    bias: torch.Tensor | None,
    num_layers: int,
) -> torch.Tensor:
    """Average of the per-(layer, sample) loss over router layers in the upper half (as the official code),
    skipping samples without documents. Temperature is clamped to [0.001, 0.5] and gets no gradient."""
    tau = float(temperature.detach().clamp(0.001, 0.5))
    total, count = None, 0
    for layer, scores in doc_scores.items():
        if layer < num_layers // 2:
            continue
        labels = aux_labels[:, : scores.shape[1]].to(scores.device)
        if method == "INFONCE_DECOUPLE":
            loss, keep = infonce_decouple(scores, labels, tau)
        elif method == "INFONCE_DECOUPLE_FOCAL":
            loss, keep = infonce_decouple(scores, labels, tau, focal=True)
        elif method == "INFONCE":
            loss, keep = infonce(scores, labels, tau)
        elif method == "INFONCE_FOCAL":
            loss, keep = infonce(scores, labels, tau, focal=True)
        elif method == "BCE":
            loss, keep = bce(scores, labels, bias)
        else:
            raise ValueError(f"unknown aux_loss_method {method!r}")
        part = loss.masked_fill(~keep, 0).sum()
        total = part if total is None else total + part
        count += int(keep.sum())
    if total is None or count == 0:
        raise ValueError("aux loss needs a router layer in the upper half and a sample with documents")
    return total / count
