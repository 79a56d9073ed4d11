"""The data-dependent router start (train/router_init.py) against a loop reference of its Gram matrix."""

import pytest
import torch

from memsparse.train.router_init import nulled_router_init, ranked_directions, router_input_grams

from ..conftest import batch, make_sample, tiny_model

MSA = {"router_layer_idx": "1,3", "pooling_kernel_size": 4, "top_k_docs": 2, "decouple_router": True}


def _samples(gen):
    return [make_sample([9, 4, 7], gen=gen), make_sample([5, 12], n_query=3, gen=gen)]


def reference_gram(model, samples, layer: int) -> torch.Tensor:
    """Loop reference: the layer's attention inputs, one sample at a time; every document's chunks of P tokens
    averaged, plus every routing-query token (doc_ids == 0)."""
    seen = {}
    hook = model.model.layers[layer].self_attn.register_forward_pre_hook(
        lambda m, inputs: seen.__setitem__("h", inputs[1].unpack(inputs[0])[0].double()))  # sequence order
    P, rows = model.msa_config.pooling_kernel_size, []
    try:
        for ids, doc in samples:
            with torch.no_grad():
                model(ids[None], doc[None])
            h = seen["h"]  # (T, hidden)
            for d in sorted({int(x) for x in doc if x > 0}):
                tokens = [t for t in range(len(doc)) if doc[t] == d]
                rows += [h[tokens[i:i + P]].mean(0) for i in range(0, len(tokens), P)]
            rows += [h[t] for t in range(len(doc)) if doc[t] == 0]
    finally:
        hook.remove()
    x = torch.stack(rows)
    return x.T @ x


def test_grams_match_the_loop_reference(gen):
    model = tiny_model("llama", MSA)
    samples = _samples(gen)
    ids, doc, mask = batch(samples)  # one padded batch of both samples
    grams = router_input_grams(model, [{"input_ids": ids, "doc_ids": doc, "attention_mask": mask}])
    assert sorted(grams) == [1, 3]
    for layer in (1, 3):
        torch.testing.assert_close(grams[layer], reference_gram(model, samples, layer), rtol=1e-4, atol=1e-5)


def test_nulled_start_skips_the_dominant_directions_and_ties_the_queries(gen):
    model = tiny_model("llama", MSA)
    ids, doc, mask = batch(_samples(gen))
    b = {"input_ids": ids, "doc_ids": doc, "attention_mask": mask}
    grams = router_input_grams(model, [b])
    nulled_router_init(model, [b], null_rank=5)
    attn = model.model.layers[3].self_attn
    wk, wq = attn.router_k_proj[0].weight.double(), attn.router_q_proj[0].weight.double()
    torch.testing.assert_close(wk @ wk.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)  # orthonormal
    top = ranked_directions(grams[3])[:5]
    assert (wk @ top.T).abs().max() < 1e-5  # orthogonal to the 5 largest directions
    energy = lambda w: ((w @ grams[3]) * w).sum(1)  # noqa: E731  (the inputs' energy along each row)
    assert energy(wk).max() <= energy(top).min() + 1e-6
    D, G = 8, 3  # head_dim; query heads per key head
    for h in range(6):
        torch.testing.assert_close(wq[h * D:(h + 1) * D], wk[(h // G) * D:(h // G + 1) * D])
    assert not model.training


def test_nulled_start_rejects_what_it_cannot_do(gen):
    model = tiny_model("llama", MSA)
    ids, doc, mask = batch(_samples(gen))
    b = {"input_ids": ids, "doc_ids": doc, "attention_mask": mask}
    with pytest.raises(ValueError, match="exceed the hidden size"):
        nulled_router_init(model, [b], null_rank=40)  # 40 + 16 > 48
    with pytest.raises(ValueError, match="no batch"):
        nulled_router_init(model, [], null_rank=5)
