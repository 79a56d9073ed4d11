"""Data-dependent router start: projections onto the router inputs' directions after the dominant ones.

Router projections trained by the aux loss from a random (or tied) start stay at chance on tasks whose key is one
rare word among similar documents (NIAH multikey: research/router_probe.py, docs/msa-smollm2.md, "Why multikey_2/3
failed"), although the layer inputs carry it: removing the inputs' top singular directions and scoring the rest by
cosine routes them. `nulled_router_init` starts every router layer there: over some batches it sums the Gram matrix of
the layer's attention inputs (document chunk means and routing-query tokens), and gives the key projection the
eigenvectors ranked `null_rank` .. `null_rank + Hkv * D` (eigenvalues descending; key head j takes the j-th block
of D), and each query head the rows of its key head, so that routing starts as cosine similarity of the inputs in
that subspace.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..ops.pooling import chunk_mean_pool


class _Done(Exception):
    """Raised by the capture hook after the last router layer: the rest of the forward is not needed."""


@torch.no_grad()
def router_input_grams(model, batches: Iterable[dict]) -> dict[int, torch.Tensor]:
    """{router layer: Gram matrix (hidden, hidden), float64} of its attention inputs over `batches` (collated
    training batches on the model's device): every document chunk's mean input and every routing-query token."""
    layers = list(model.router_layers)
    grams: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module, inputs):
            h, lay = inputs[0], inputs[1]  # (N, hidden): the layout's packed rows
            nd = lay.num_doc_tokens
            rows = [h.new_zeros(0, h.shape[1])]
            if lay.has_documents:
                rows.append(chunk_mean_pool(h[:nd], lay.chunk_of_token, lay.chunk_counts))
            rows.append(h[nd:].unflatten(0, lay.active_index.shape)[lay.route_mask])  # (routing tokens, hidden)
            x = torch.cat(rows).double()
            grams[layer] = grams.get(layer, 0) + x.T @ x
            if layer == layers[-1]:
                raise _Done
        return hook

    hooks = [model.model.layers[i].self_attn.register_forward_pre_hook(hook_for(i)) for i in layers]
    try:
        for b in batches:
            try:
                model(b["input_ids"], b["doc_ids"], attention_mask=b["attention_mask"])
            except _Done:
                pass
    finally:
        for h in hooks:
            h.remove()
    if len(grams) != len(layers):
        raise ValueError("no batch reached the router layers")
    return grams


def ranked_directions(gram: torch.Tensor) -> torch.Tensor:
    """Unit directions (hidden, hidden) as rows, by eigenvalue of the symmetric `gram`, largest first."""
    _, vecs = torch.linalg.eigh(gram)  # ascending
    return vecs.flip(1).T


@torch.no_grad()
def set_router_from_directions(attn, keys: torch.Tensor) -> None:
    """Key projection = `keys` (Hkv * D, hidden); query head h = the rows of key head h // G."""
    H, Hkv = attn.cfg.num_attention_heads, attn.cfg.num_key_value_heads
    wk, wq = attn.router_k_proj[0].weight, attn.router_q_proj[0].weight
    if keys.shape != wk.shape:
        raise ValueError(f"router keys need shape {tuple(wk.shape)}, got {tuple(keys.shape)}")
    wk.copy_(keys)
    wq.copy_(keys.view(Hkv, -1, keys.shape[1]).repeat_interleave(H // Hkv, 0).reshape(wq.shape))


def nulled_router_init(model, batches: Iterable[dict], null_rank: int) -> None:
    """Start every router layer's projections on its inputs' directions after the top `null_rank` (see above)."""
    if not model.msa_config.decouple_router:
        raise ValueError("router_init = 'nulled' needs decoupled router projections (decouple_router)")
    was_training = model.training
    model.eval()
    grams = router_input_grams(model, batches)
    model.train(was_training)
    for layer, gram in grams.items():
        attn = model.model.layers[layer].self_attn
        width = attn.router_k_proj[0].weight.shape[0]
        if null_rank + width > gram.shape[0]:
            raise ValueError(f"null_rank {null_rank} + {width} router dimensions exceed the hidden size "
                             f"{gram.shape[0]}")
        keys = ranked_directions(gram)[null_rank:null_rank + width]
        set_router_from_directions(attn, keys.to(attn.router_k_proj[0].weight.dtype))
