"""Which layers' features could route the FAQ questions? Every layer's input (after its norm) is captured while the
FAQ memory is encoded, mean-pooled per routing chunk, and the questions are encoded the same way (each as a
document of its own); then, with no trained projection at all, a question's documents are ranked by the cosine of
its mean vector with each chunk's (a document scores its best chunk), raw, centred on the memory's mean, and with
the top r principal directions of the memory's chunks removed. The gold passage's top-1 / top-4 rate per layer is
set beside the model's routers (`qa_router_gold.py`) and MiniLM's. No answers are generated: a CPU run.

    python research/layer_probe_faq.py --model runs/v16/delta --split dev --out research/results/x.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


@torch.no_grad()
def layer_means(model, tok, texts: list[str], chunk: int | None = None):
    """({layer: chunk means (C, hidden) float32}, each chunk's text index (C,), the bank) of `texts` encoded as a
    memory bank (routing keys pooled over `chunk` tokens, else the model's)."""
    from memsparse.memory.bank import MemoryBank
    from memsparse.ops.pooling import chunk_mean_pool

    layers = range(model.config.num_hidden_layers)
    parts: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def hook_for(i: int):
        def hook(module, inputs):
            h, lay = inputs[0], inputs[1]
            parts[i].append(chunk_mean_pool(h[:lay.num_doc_tokens].float(), lay.chunk_of_token, lay.chunk_counts))
        return hook

    hooks = [model.model.layers[i].self_attn.register_forward_pre_hook(hook_for(i)) for i in layers]
    try:
        bank = MemoryBank.build(model, tok, [])
        if chunk:
            bank = bank.like(chunk_size=chunk)
        bank.add(texts, progress=True)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(p) for i, p in parts.items()}, bank.routing_index().chunk_doc.cpu(), bank


def question_means(model, tok, questions: list[str]) -> dict[int, torch.Tensor]:
    """{layer: (Q, hidden)} each question's mean input, the question encoded as a document of its own."""
    means, chunk_doc, _ = layer_means(model, tok, questions, chunk=4096)
    if not torch.equal(chunk_doc, torch.arange(len(questions))):
        raise RuntimeError("a question spans more than one chunk")
    return means


def nulled(chunks: torch.Tensor, r: int):
    """x -> x centred on the mean of `chunks` (C, hidden) with their top `r` principal directions removed."""
    mu = chunks.mean(0)
    v = torch.linalg.svd(chunks - mu, full_matrices=False).Vh[:r]  # (r, hidden)
    return lambda x: (x - mu) - (x - mu) @ v.T @ v


def ranks(q: torch.Tensor, c: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int, k: int = 4) -> torch.Tensor:
    """(Q, k) the documents of the best cosine chunk per document, best first."""
    s = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T  # (Q, C)
    doc = torch.full((q.shape[0], n_docs), float("-inf"))
    doc.scatter_reduce_(1, chunk_doc.expand(q.shape[0], -1), s, "amax")
    return doc.topk(k, dim=1).indices


def training_features(model, tok, path: Path | None):
    """Per training FAQ package (`tasks/faqs.py`, all of them): ({layer: chunk means}, chunk_doc, {layer: question
    means}, gold document of each question), over the package's answers alone."""
    from memsparse.tasks.faqs import training_faq_packages, training_faq_pairs

    if path and path.exists():
        return torch.load(path)
    out = {}
    for pkg in training_faq_packages():
        pairs = training_faq_pairs(pkg)
        docs = list(dict.fromkeys(a for _, a in pairs))
        mem, chunk_doc, _ = layer_means(model, tok, docs)
        qs = question_means(model, tok, [q for q, _ in pairs])
        out[pkg] = (mem, chunk_doc, qs, torch.tensor([docs.index(a) for _, a in pairs]))
        print(f"{pkg}: {len(docs)} answers, {len(pairs)} questions", flush=True)
    if path:
        torch.save(out, path)
    return out


def fit_layer(train: dict, layer: int, dev: tuple, rank: int, steps: int, lr: float = 1e-3, tau: float = 0.05,
              seed: int = 0) -> list[dict]:
    """A query and a key projection (hidden -> `rank`) over one layer's standardised features fitted by InfoNCE
    over each training FAQ's answers (a document scores its best chunk); dev top-1 / top-4 every 50 steps."""
    torch.manual_seed(seed)
    allc = torch.cat([m[layer] for m, _, _, _ in train.values()])
    mu, sd = allc.mean(0), allc.std(0).clamp(min=1e-3)
    z = lambda x: (x - mu) / sd  # noqa: E731
    hid = allc.shape[1]
    wq = torch.nn.Parameter(torch.randn(rank, hid) / hid ** 0.5)
    wk = torch.nn.Parameter(wq.detach().clone())
    opt = torch.optim.Adam([wq, wk], lr=lr)
    groups = [(z(m[layer]), cd, z(q[layer]), g) for m, cd, q, g in train.values()]
    mem, chunk_doc, qs, gold = dev
    dm, dq = z(mem[layer]), z(qs[layer])
    n_docs = int(chunk_doc.max()) + 1
    rng = torch.Generator().manual_seed(seed)
    log = []
    for step in range(steps + 1):
        if step % 50 == 0:
            with torch.no_grad():
                top = ranks(dq @ wq.T, dm @ wk.T, chunk_doc, n_docs)
            log.append({"step": step, "top1": round(100 * (top[:, 0] == gold).float().mean().item(), 1),
                        "top4": round(100 * (top == gold[:, None]).any(1).float().mean().item(), 1)})
        if step == steps:
            break
        c, cd, q, g = groups[int(torch.randint(len(groups), (1,), generator=rng))]
        s = torch.nn.functional.normalize(q @ wq.T, dim=-1) @ torch.nn.functional.normalize(c @ wk.T, dim=-1).T
        doc = torch.full((q.shape[0], int(cd.max()) + 1), -1e4).scatter_reduce(1, cd.expand(q.shape[0], -1), s,
                                                                                 "amax")
        loss = torch.nn.functional.cross_entropy(doc / tau, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return log


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shipped")
    ap.add_argument("--split", default="dev", choices=("dev", "test"))
    ap.add_argument("--nulls", default="0,8,32,128", help="principal directions removed (0: centred only)")
    ap.add_argument("--rank", type=int, default=192, help="also: the centred features projected on this many "
                    "principal directions after the nulled ones (a key projection's width: heads x head dim)")
    ap.add_argument("--cache", help="a file to keep the captured features in (and read them from)")
    ap.add_argument("--fit-layers", help="comma list: also fit a projection per layer on the training FAQs")
    ap.add_argument("--train-cache", help="a file to keep the training FAQs' features in (and read them from)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out")
    a = ap.parse_args(argv)

    from memsparse.eval.faqs import load_qa
    from memsparse.eval.meta import run_meta
    from memsparse.eval.qa import mean_se
    from memsparse.model.load import load_model

    t0 = time.perf_counter()
    data = load_qa(a.split)
    model, tok = load_model(a.model, device="cpu")
    cache = Path(a.cache) if a.cache else None
    if cache and cache.exists():
        mem, chunk_doc, qs = torch.load(cache)
    else:
        mem, chunk_doc, _ = layer_means(model, tok, data.paragraphs)
        qs = question_means(model, tok, [q for q, _, _ in data.questions])
        if cache:
            torch.save((mem, chunk_doc, qs), cache)
    gold = torch.tensor([g for _, _, g in data.questions])
    n_docs = len(data.paragraphs)
    out = {}
    for lay in mem:
        c, q = mem[lay], qs[lay]
        row = {}
        variants = {"raw": (c, q)}
        mu = c.mean(0)
        cc, qc = c - mu, q - mu
        vh = torch.linalg.svd(cc, full_matrices=False).Vh
        for r in map(int, a.nulls.split(",")):
            if r == 0:
                variants["centred"] = (cc, qc)
            else:
                plain = nulled(c, r)
                variants[f"null{r}"] = (plain(c), plain(q))
            w = vh[r:r + a.rank]  # the next principal directions: what a key projection of that width could keep
            variants[f"null{r}_pca{a.rank}"] = (cc @ w.T, qc @ w.T)
        for name, (cv, qv) in variants.items():
            top = ranks(qv, cv, chunk_doc, n_docs)
            t1 = mean_se((top[:, 0] == gold).float().tolist())
            t4 = mean_se((top == gold[:, None]).any(1).float().tolist())
            row[name] = {"top1": t1[0], "top1_se": t1[1], "top4": t4[0]}
        out[lay] = row
        print(lay, " ".join(f"{n} {v['top1']:.1f}/{v['top4']:.1f}" for n, v in row.items()), flush=True)
    fits = {}
    if a.fit_layers:
        train = training_features(model, tok, Path(a.train_cache) if a.train_cache else None)
        for lay in map(int, a.fit_layers.split(",")):
            fits[lay] = fit_layer(train, lay, (mem, chunk_doc, qs, gold), a.rank, a.steps)
            best = max(fits[lay], key=lambda r: (r["top1"], r["top4"]))
            print(f"fitted layer {lay}: start {fits[lay][0]}, best {best}, last {fits[lay][-1]}", flush=True)
    result = {**run_meta(), "model": a.model, "split": a.split, "n": len(gold), "memory_passages": n_docs,
              "setting": "every layer's normed input, chunk means (64 tokens) of the memory, each question's mean "
                         "as one chunk; cosine, a document scores its best chunk; no trained projection",
              "seconds": round(time.perf_counter() - t0), "layers": out, "fitted": fits}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
