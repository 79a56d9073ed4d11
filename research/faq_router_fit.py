"""A model's routers fitted further on whole training FAQs: one group per training FAQ package (its questions over
every answer of its FAQ and a sample of its documentation), so every other answer of the same FAQ is a negative, as
`eval qa` asks; beside them a few groups of the recipe's task mix (held-back ones guard the mix's routing).

Features are computed once per model (cached under --cache) and the fit is `train/router_fit.py`'s, started from the
model's routers; the step is chosen on the held-back FAQ packages. Runs on a CPU (features about 20 minutes, 600
steps about 25).

    python research/faq_router_fit.py --model runs/v16/delta --recipe recipes/smollm2-msa-v18.toml \
        --val-packages emacs-common,privoxy,zsh-common,nut --out runs/v16f/delta
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def faq_groups(packages: list[str], max_documentation: int, seed: int):
    """{package: Group}: the package's training questions over its training answers (equal texts merged) and at
    most `max_documentation` passages of its documentation."""
    from memsparse.tasks.faqs import faq_documents, training_faq_pairs
    from memsparse.train.router_fit import Group

    out = {}
    for pkg in packages:
        pairs = training_faq_pairs(pkg)
        docs = faq_documents(pkg)
        extra = random.Random(f"{seed}-{pkg}").sample([d.text for d in docs], min(max_documentation, len(docs)))
        where: dict[str, int] = {}
        texts: list[str] = []
        for t in [a for _, a in pairs] + extra:
            if t not in where:
                where[t] = len(texts)
                texts.append(t)
        out[pkg] = Group(texts, [q for q, _ in pairs], [[where[a]] for _, a in pairs])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the delta whose routers are fitted further")
    ap.add_argument("--recipe", required=True, help="its recipe (task mix, seed, FAQ packages)")
    ap.add_argument("--val-packages", required=True, help="training FAQ packages held back to choose the step")
    ap.add_argument("--mix-groups", type=int, default=12, help="groups of the recipe's mix (a third held back)")
    ap.add_argument("--mix-questions", type=int, default=16)
    ap.add_argument("--documentation", type=int, default=200, help="documentation passages per FAQ group")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--mix-guard", type=float, default=0.02, help="largest drop of mix val top-1 a step may have")
    ap.add_argument("--cache", default="runs/faq_fit_features")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    from memsparse.engine.routing import uses_cosine
    from memsparse.model.delta import delta_sha256, save_delta
    from memsparse.model.load import load_model
    from memsparse.tasks.faqs import training_faq_packages
    from memsparse.train.router_fit import Fitter, choose_fusion, draw_group, evaluate, group_features, router_weights
    from memsparse.train.trainer import ADDED_TOKENS, Recipe, make_mixer

    recipe = Recipe.load(a.recipe)
    model, tok = load_model(a.model, device="cpu")
    model.eval()
    cosine = uses_cosine(model, "train")
    packages = training_faq_packages(recipe.faq_packages)
    val_pk = a.val_packages.split(",")
    if set(val_pk) - set(packages):
        raise SystemExit(f"--val-packages not among the recipe's FAQ packages: {sorted(set(val_pk) - set(packages))}")
    cache = Path(a.cache) / f"{delta_sha256(a.model)[:12]}-d{a.documentation}-m{a.mix_groups}x{a.mix_questions}.pt"
    if cache.exists():
        feats = torch.load(cache, weights_only=False)
    else:
        t0 = time.perf_counter()
        feats = {}
        for pkg, g in faq_groups(packages, a.documentation, recipe.seed).items():
            feats[pkg] = group_features(model, tok, g)
            print(f"{pkg}: {len(g.documents)} documents, {len(g.questions)} questions, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        mixer = make_mixer(recipe, tok)
        for i in range(a.mix_groups):
            g = draw_group(mixer, f"{recipe.seed}-faqfit", i, a.mix_questions, recipe.router_fit.memory_tokens)
            feats[f"mix{i}"] = group_features(model, tok, g)
            print(f"mix {i}: {len(g.documents)} documents, {time.perf_counter() - t0:.0f} s", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, cache)
    mix_val = [f"mix{i}" for i in range(a.mix_groups // 3)]
    train = [f for k, f in feats.items() if k not in val_pk and k not in mix_val]
    val = [feats[k] for k in val_pk]
    mval = [feats[k] for k in mix_val]

    params = router_weights(model)
    start_w = {lay: tuple(p.detach().float().clone() for p in pair) for lay, pair in params.items()}
    fitter = Fitter(model, params, a.lr)
    master = fitter.master
    rng = random.Random(f"{recipe.seed}-faq-router-fit")
    log = [{"step": 0, "faq_val": evaluate(model, start_w, val, cosine), "mix_val": evaluate(model, start_w, mval,
                                                                                                cosine)}]
    print(json.dumps(log[0]), flush=True)
    best, best_w = log[0], start_w
    floor = log[0]["mix_val"]["top1"] - a.mix_guard
    t1 = time.perf_counter()
    for step in range(1, a.steps + 1):
        loss = fitter.step(train[rng.randrange(len(train))], cosine)
        if step % a.eval_every == 0:
            rec = {"step": step, "loss": round(loss.item(), 4), "faq_val": evaluate(model, master, val, cosine),
                   "mix_val": evaluate(model, master, mval, cosine), "elapsed_s": round(time.perf_counter() - t1, 1)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
            fv = rec["faq_val"]
            if rec["mix_val"]["top1"] >= floor and (fv["top1"], fv["top4"]) > (best["faq_val"]["top1"],
                                                                               best["faq_val"]["top4"]):
                best, best_w = rec, {lay: tuple(p.detach().clone() for p in pair) for lay, pair in master.items()}
    with torch.no_grad():
        for lay, pair in params.items():
            for p, m in zip(pair, best_w[lay]):
                p.copy_(m.to(p.dtype))
    fuse, fused = choose_fusion(model, best_w, val + mval, cosine)
    model.msa_config.fuse_layer_idx = None if fuse == model.router_layers else ",".join(map(str, fuse))
    new_ids = tok.convert_tokens_to_ids(ADDED_TOKENS)
    save_delta(model, a.out, base=recipe.base, added_tokens=ADDED_TOKENS, new_token_ids=new_ids,
               parent={"path": a.model, "sha256": delta_sha256(a.model)})
    summary = {"best": best, "fuse_layers": fuse, "val_fused": fused, "delta_sha256": delta_sha256(a.out)}
    Path(a.out, "fit_log.json").write_text(json.dumps({"args": vars(a), "log": log, **summary}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
