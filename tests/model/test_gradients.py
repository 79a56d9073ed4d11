"""Finite-difference gradient checks (float64) for the aux losses and for the LM loss through selected K̄/V̄;
router projectors learn from the aux loss only."""

import pytest
import torch

from memsparse.model import losses
from memsparse.model.layout import SequenceLayout

from ..conftest import batch, make_sample, tiny_model

METHODS = ["INFONCE_DECOUPLE", "INFONCE", "INFONCE_FOCAL", "INFONCE_DECOUPLE_FOCAL", "BCE"]


@pytest.mark.parametrize("method", METHODS)
def test_aux_loss_gradcheck(method):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, dtype=torch.float64, generator=g).requires_grad_()
    present = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    bias = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)

    def f(s, b):
        s = s.masked_fill(~present, float("-inf"))
        return losses.aux_loss({8: s, 9: s * 0.5}, labels, method, torch.tensor(0.1), b, num_layers=10)

    assert torch.autograd.gradcheck(f, (scores, bias))
    assert torch.isfinite(f(scores, bias))


def test_infonce_decouple_matches_formula():
    s = torch.tensor([[0.3, 0.1, -0.2, 0.5]], dtype=torch.float64)
    y = torch.tensor([[1, 0, 1, 0]])
    tau = 0.1
    e = torch.exp(s[0] / tau)
    neg = e[1] + e[3]
    expected = -(torch.log(e[0] / (e[0] + neg)) + torch.log(e[2] / (e[2] + neg))) / 2
    got, keep = losses.infonce_decouple(s, y, tau)
    assert torch.allclose(got[0], expected) and keep.all()


def test_aux_loss_ignores_lower_half_layers():
    s = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([[1, 0, 0]])
    only_upper = losses.aux_loss({6: s}, y, "INFONCE", torch.tensor(0.1), None, num_layers=8)
    both = losses.aux_loss({1: s * 7, 6: s}, y, "INFONCE", torch.tensor(0.1), None, num_layers=8)
    assert torch.equal(only_upper, both)


def _router_setup(k=2):
    model = tiny_model("qwen3", msa={"pooling_kernel_size": 3, "top_k_docs": k, "router_layer_idx": "1"},
                       dtype=torch.float64, num_hidden_layers=2)
    g = torch.Generator().manual_seed(11)
    ids, doc, mask = batch([make_sample([4, 6, 5], n_query=3, n_answer=2, gen=g)])
    return model, ids, doc, mask


@pytest.mark.slow
def test_lm_loss_reaches_selected_documents_only():
    """Through one router layer: active outputs depend on the selected documents' hidden states (through
    K̄/V̄, finite-difference checked) and not at all on the unselected ones."""
    model, ids, doc, mask = _router_setup(k=2)
    attn = model.model.layers[1].self_attn
    lay = SequenceLayout.build(doc, model.msa_config, mask)
    cos, sin = (lay.pack(t) for t in model.rope(lay.positions, torch.float64))
    h = torch.randn(*ids.shape, model.config.hidden_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, scores = attn(lay.pack(h), lay, cos, sin)
    selected = scores[0].topk(2).indices + 1  # document ids
    active = (doc[0] <= 0).nonzero().squeeze(1)

    def active_out(h_):
        return lay.unpack(attn(lay.pack(h_), lay, cos, sin)[0])[:, active]

    h_req = h.clone().requires_grad_()
    assert torch.autograd.gradcheck(active_out, (h_req,), eps=1e-6, atol=1e-6, nondet_tol=0.0)
    grad = torch.autograd.grad(active_out(h_req).sum(), h_req)[0][0]
    for d in (1, 2, 3):
        g_doc = grad[doc[0] == d].abs().sum()
        assert (g_doc > 0) if d in selected else (g_doc == 0), (d, g_doc)


def test_router_weights_learn_from_aux_loss_only():
    model, ids, doc, mask = _router_setup()
    model.train()
    labels = torch.where(doc <= 0, ids, -100)
    aux = torch.tensor([[0, 1, 0]])
    router = [p for n, p in model.named_parameters() if ".router_" in n]
    assert router
    out = model(ids, doc, labels=labels, aux_labels=aux, attention_mask=mask)
    lm_grads = torch.autograd.grad(out.lm_loss, router, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in lm_grads)
    aux_grads = torch.autograd.grad(out.aux_loss, router)
    assert all(g.abs().max() > 0 for g in aux_grads)
    expected = model.msa_config.lmloss_weigth * out.lm_loss + model.msa_config.auxloss_weight * out.aux_loss
    assert torch.allclose(out.loss, expected)


def test_lm_loss_reaches_lower_layers_through_memory():
    """The LM loss trains the lower layers' document encodings (through the router layer's K̄/V̄)."""
    model, ids, doc, mask = _router_setup()
    labels = torch.where(doc <= 0, ids, -100)
    out = model(ids, doc, labels=labels, attention_mask=mask)
    emb = torch.autograd.grad(out.lm_loss, model.model.embed_tokens.weight)[0]
    doc_tokens = ids[doc > 0].unique()
    active_tokens = ids[doc <= 0].unique()
    only_doc = [t for t in doc_tokens.tolist() if t not in active_tokens.tolist()]
    assert only_doc and emb[only_doc].abs().sum() > 0


def test_take_matches_advanced_indexing_forward_and_backward():
    """`take` (index_select) against `x[index]`: same rows and same gradients, repeated indices included."""
    from memsparse.ops.indexing import take

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    index = torch.tensor([[0, 6, 2], [2, 2, 5]])  # (2, 3), row 2 three times
    w = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64)
    grads = []
    for gather in (take, lambda t, i: t[i]):
        leaf = x.clone().requires_grad_(True)
        out = gather(leaf, index)
        (out * w).sum().backward()
        grads.append((out.detach(), leaf.grad))
    assert grads[0][0].shape == (2, 3, 3, 4)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])
    assert torch.allclose(grads[0][1][2], (w[0, 2] + w[1, 0] + w[1, 1]))  # repeated rows accumulate
