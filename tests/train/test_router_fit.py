"""Router fitting (train/router_fit.py): its features and scores reproduce the engine's routing, groups pool the
questions' memories, fitting lowers the routing loss, and a `[router_fit]` recipe ships a delta with new routers."""

import json
import random

import pytest
import torch

from memsparse.engine.engine import MSAEngine
from memsparse.engine.routing import fused_top, uses_cosine
from memsparse.memory.bank import MemoryBank
from memsparse.model.losses import aux_loss
from memsparse.tasks.mix import Question
from memsparse.train import router_fit, trainer
from memsparse.train.router_fit import (
    Group,
    RouterFit,
    choose_fusion,
    draw_group,
    fused_hits,
    group_features,
    layer_scores,
    router_weights,
)

from ..conftest import tiny_model, tiny_tokenizer
from .test_trainer import RECIPE, _add_toy

MSA = {"router_layer_idx": "2,3", "top_k_docs": 2, "pooling_kernel_size": 4}


def _group(n_docs=9, n_questions=5, seed=0) -> Group:
    rng = random.Random(seed)
    docs = [f"item {i} has value {rng.randint(100, 999)} and colour {rng.choice('red blue green'.split())}."
            for i in range(n_docs)]
    gold = [rng.randrange(n_docs) for _ in range(n_questions)]
    return Group(docs, [f"What value has item {g}?" for g in gold], [[g] for g in gold])


def test_features_score_as_the_engine_routes():
    model, tok = tiny_model("llama", msa=MSA, vocab_size=300, tie_word_embeddings=True), tiny_tokenizer()
    model.eval()
    g = _group()
    f = group_features(model, tok, g)
    cosine = uses_cosine(model, "train")
    scores = layer_scores(model, router_weights(model), f, cosine)
    engine = MSAEngine(model, tok, MemoryBank.build(model, tok, g.documents))
    k = model.msa_config.engine_top_k
    for b, q in enumerate(g.questions):
        routing = engine.route(q)
        for layer, picked in routing.items():
            top = scores[layer][b].topk(len(picked))
            assert [d for d, _ in picked] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([s for _, s in picked]), top.values.float(), atol=1e-4, rtol=0)
        first = fused_top(routing, 1)[0]
        onehot = torch.zeros(1, len(g.documents), dtype=torch.long)
        onehot[0, first] = 1
        row = {lay: s[b:b + 1] for lay, s in scores.items()}
        assert fused_hits(row, onehot, k)[1].item()  # the fused ranking puts the engine's first document first
    assert f.labels.sum(1).tolist() == [1] * len(g.questions)
    assert [f.labels[b].nonzero().item() for b in range(len(g.questions))] == [p[0] for p in g.positives]


def test_groups_pool_memories_and_merge_equal_texts():
    shared = "a passage both questions hold"

    class Stub:
        rng = random.Random(0)

        def draw(self, memory_tokens, task=None):
            n = self.rng.randrange(1000)
            return Question([f"own {n}", shared, f"other {n}"], f"q{n}", [[0], [1]], "a", "stub")

    g = draw_group(Stub(), seed=3, index=0, questions=3, memory_tokens=10)
    assert g.documents.count(shared) == 1
    assert len(g.documents) == 7  # 2 own passages per question, the shared one once
    for q, p in zip(g.questions, g.positives):
        n = q[1:]
        assert [g.documents[i] for i in p] == sorted([f"own {n}", shared], key=g.documents.index)
    again = draw_group(Stub(), seed=3, index=0, questions=3, memory_tokens=10)
    assert again == g  # a group depends on its seed and index only


def test_same_task_groups_draw_every_question_from_one_task():
    class Stub:
        rng = random.Random(0)
        weights = {"a": 1.0, "b": 1.0}

        def pick_task(self):
            return self.rng.choice(sorted(self.weights))

        def draw(self, memory_tokens, task=None):
            task = task or self.pick_task()
            n = self.rng.randrange(10**6)
            return Question([f"{task} {n}"], f"{task}?{n}", [[0]], "x", task)

    mixed = [{q.split("?")[0] for q in draw_group(Stub(), 5, i, 8, 10).questions} for i in range(6)]
    same = [{q.split("?")[0] for q in draw_group(Stub(), 5, i, 8, 10, same_task=True).questions} for i in range(6)]
    assert any(len(t) == 2 for t in mixed)  # without it a group mixes the tasks
    assert all(len(t) == 1 for t in same) and {t for s in same for t in s} == {"a", "b"}


def test_a_mixer_refuses_a_task_outside_its_mix():
    from memsparse.tasks.mix import Mixer

    m = Mixer({"niah": 1.0}, lambda texts: [len(t.split()) for t in texts])
    with pytest.raises(ValueError, match="not in the mix"):
        m.draw(256, "faq")


def test_fitting_lowers_the_routing_loss(tmp_path):
    model, tok = tiny_model("llama", msa=MSA, vocab_size=300, tie_word_embeddings=True), tiny_tokenizer()
    model.eval()
    feats = [group_features(model, tok, _group(seed=s)) for s in range(4)]
    cosine = uses_cosine(model, "train")
    tau = model.temperature

    @torch.no_grad()
    def loss(w):
        return float(sum(aux_loss(layer_scores(model, w, f, cosine), f.labels, model.msa_config.aux_loss_method,
                                  tau, None, model.config.num_hidden_layers) for f in feats))

    before = loss(router_weights(model))
    master = {lay: tuple(p.detach().clone().requires_grad_(True) for p in pair)
              for lay, pair in router_weights(model).items()}
    opt = torch.optim.AdamW([p for pair in master.values() for p in pair], lr=1e-2, weight_decay=0.0)
    for step in range(40):
        f = feats[step % len(feats)]
        opt.zero_grad()
        aux_loss(layer_scores(model, master, f, cosine), f.labels, model.msa_config.aux_loss_method, tau, None,
                 model.config.num_hidden_layers).backward()
        opt.step()
    assert loss(master) < 0.7 * before


def test_router_fit_recipe_ships_new_routers_and_keeps_the_rest(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    base = tmp_path / "base"
    tiny_model("llama", vocab_size=300, tie_word_embeddings=True).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    _add_toy(monkeypatch)
    first = tmp_path / "first.toml"
    first.write_text(RECIPE.format(base=base))
    trainer.train(trainer.Recipe.load(first), tmp_path / "run1", device="cpu", max_steps=1)
    head = RECIPE.format(base=base).split("[[phase]]")[0]
    fit = tmp_path / "fit.toml"
    fit.write_text(f'init = "{tmp_path / "run1" / "delta"}"\n' + head +
                   "[router_fit]\ngroups = 6\nquestions = 4\nmemory_tokens = 40\nval_groups = 2\nsteps = 30\n"
                   "lr = [1e-2, 1e-3]\neval_every = 10\n")
    trainer.train(trainer.Recipe.load(fit), tmp_path / "run2", device="cpu")
    a = load_file(tmp_path / "run1" / "delta" / "delta.safetensors")
    b = load_file(tmp_path / "run2" / "delta" / "delta.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if ".router_" in name:
            continue
        assert torch.equal(a[name], b[name]), name  # adapters and token rows untouched
    assert any(not torch.equal(a[n], b[n]) for n in a if ".router_" in n)
    lines = [json.loads(x) for x in (tmp_path / "run2" / "train_log.jsonl").read_text().splitlines()]
    done = [x for x in lines if x.get("router_fit") == "done"]
    assert len(done) == 1 and done[0]["val_best"]["step"] in (0, 10, 20, 30)
    fitted = [(x["lr"], x["router_fit"]) for x in lines if isinstance(x.get("router_fit"), int)]
    assert fitted == [(lr, s) for lr in (1e-2, 1e-3) for s in (10, 20, 30)]  # each rate from the same start
    cfg = json.loads((tmp_path / "run2" / "delta" / "delta.json").read_text())["msa_config"]
    fuse = done[0]["fuse_layers"]  # the fused layers chosen on the held-back groups travel with the delta
    assert cfg.get("fuse_layer_idx", cfg["router_layer_idx"]) == ",".join(map(str, fuse))


def test_fusion_is_the_best_upper_set_on_held_back_groups():
    msa = {**MSA, "router_layer_idx": "1,2,3"}
    model, tok = tiny_model("llama", msa=msa, vocab_size=300, tie_word_embeddings=True), tiny_tokenizer()
    model.eval()
    feats = [group_features(model, tok, _group(seed=s)) for s in range(3)]
    cosine, w = uses_cosine(model, "train"), router_weights(model)
    fuse, got = choose_fusion(model, w, feats, cosine)
    sets = [[1, 2, 3], [2, 3], [3]]
    results = router_fit.evaluate(model, w, feats, cosine, sets)
    assert fuse in sets and got == results[sets.index(fuse)]
    assert all((got["top1"], got["top4"]) >= (r["top1"], r["top4"]) for r in results)
    assert all((r["top1"], r["top4"]) < (got["top1"], got["top4"]) for r in results[:sets.index(fuse)])
    model.msa_config.fuse_layer_idx = ",".join(map(str, fuse))
    assert router_fit.evaluate(model, w, feats, cosine) == got  # the model then fuses those layers


def test_router_fit_table_is_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "x"\n[router_fit]\ngroups = 4\nval_groups = 4\n')
    with pytest.raises(ValueError, match="val_groups must be between"):
        trainer.Recipe.load(bad)
    bad.write_text('base = "x"\n[router_fit]\nsteps_per_group = 4\n')
    with pytest.raises(ValueError, match=r"\[router_fit\]"):
        trainer.Recipe.load(bad)
    bad.write_text('base = "x"\n')
    with pytest.raises(ValueError, match="at least one"):
        trainer.Recipe.load(bad)
    assert router_fit.RouterFit().val_groups < RouterFit().groups
