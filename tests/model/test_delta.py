"""A trained delta (new tokens, LoRA, routers) saved alone and loaded over its base gives the trained model."""

import pytest
import torch

from memsparse.model.delta import (
    LORA_PROJECTIONS,
    LORA_TARGETS,
    add_special_tokens,
    attach_lora,
    load_delta,
    save_delta,
    train_rows,
    trainable_parameters,
)

from ..conftest import make_sample, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("targets", [LORA_TARGETS, LORA_PROJECTIONS], ids=["attention", "attention+mlp"])
def test_delta_round_trip(tmp_path, targets):
    base = tmp_path / "base"
    model = tiny_model("llama", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300,
                       tie_word_embeddings=True)
    model.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    tok = tiny_tokenizer()
    ids = add_special_tokens(model, tok, ["<|new_a|>", "<|im_end|>", "<|new_b|>"])
    assert ids == [300, 301] and model.config.vocab_size == 302
    assert model.lm_head.weight is model.model.embed_tokens.weight
    attach_lora(model, rank=2, targets=targets)
    params = trainable_parameters(model)
    train_rows(model, ids)
    params.append(model.model.embed_tokens.weight)
    frozen = model.model.layers[0].mlp.up_proj.weight.clone()
    emb_before = model.model.embed_tokens.weight.detach().clone()
    opt = torch.optim.SGD(params, lr=0.5)
    g = torch.Generator().manual_seed(0)
    x, doc = make_sample([9, 6], n_query=3, n_answer=4, vocab=302, gen=g)
    x[-2] = 301
    for _ in range(3):
        out = model(x[None], doc[None], labels=torch.where(doc == -1, x, -100)[None],
                    aux_labels=torch.tensor([[1, 0]]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, frozen)
    changed = (model.model.embed_tokens.weight.detach() != emb_before).any(1).nonzero().flatten().tolist()
    assert changed == [300, 301]  # only the new rows learn
    assert all(model.lora[f"0_{t}"].B.abs().sum() > 0 for t in targets)
    size = save_delta(model, tmp_path / "delta", base="tiny", added_tokens=["<|new_a|>", "<|new_b|>"],
                      new_token_ids=ids)
    assert size < 60_000
    loaded, ltok = load_delta(tmp_path / "delta", base)
    assert ltok.convert_tokens_to_ids(["<|new_a|>", "<|new_b|>"]) == ids
    with torch.no_grad():  # the delta is stored in bfloat16: round the trained values alike
        for n, p in model.named_parameters():
            if ".router_" in n or n.startswith("lora."):
                p.copy_(p.to(torch.bfloat16))
        emb = model.model.embed_tokens.weight
        emb[ids] = emb[ids].to(torch.bfloat16).float()
        a = model(x[None], doc[None]).logits
        b = loaded(x[None], doc[None]).logits
    # float32 rounding of W x + s B A x against (W + s B A) x; through MLP adapters it grows with the logits
    tol = 1e-4 if tuple(targets) == LORA_TARGETS else 1e-5 * a.abs().max()
    assert (a - b).abs().max() < tol, ((a - b).abs().max(), a.abs().max())
    assert not hasattr(loaded, "lora")
