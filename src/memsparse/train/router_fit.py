"""Router fitting: the router projections fitted on many questions per encoded memory (a recipe's `[router_fit]`).

In joint training each step encodes a memory for one question, so the routers see a few thousand questions in a
run. But a router layer's inputs at document tokens do not depend on the router projections, and its routing key
of a chunk is the key projection of the chunk's mean input (pooling is linear); at question tokens they depend on
them only through the chunks earlier router layers selected. So one pass per memory gives, per router layer, the
mean input of every document chunk and the input at every routing token of each question routed over it as the
engine routes (engine/calibrate.py `route_rows`); the projections are then fitted to those fixed features by the
model's routing loss (its `aux_loss_method` over every document of the memory), a step costing a few small matrix
products per router layer rather than a forward and backward pass of the model. The best step is chosen on groups
held back from fitting (fused top-1 over the router layers, as the engine ranks), and then on the same groups the
router layers the engine fuses (msa_config.fuse_layer_idx: the upper layers from one of them on).

Questions come from the recipe's task mix, `questions` at a time: their own memories (gold passages among hard
negatives from the same corpus, `memory_tokens` each) are pooled into one memory, equal texts merged, so that every
question is scored against every document of the group. With `same_task` a group's questions all come from one task
(drawn by the mix's weights), so that the other questions' documents are negatives from the same corpus as well.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..engine.routing import RRF_OFFSET, uses_cosine
from ..ops.pooling import chunk_mean_pool
from ..ops.routing import chunk_scores, document_scores


@dataclass
class RouterFit:
    """A recipe's `[router_fit]` table."""

    groups: int = 400  # question groups (one pooled memory each) whose features are computed
    questions: int = 32  # questions per group
    memory_tokens: int = 2048  # each question's own memory before pooling
    val_groups: int = 40  # of `groups`, held back to choose the best step
    steps: int = 2000
    lr: float | list[float] = 3e-4  # several: each fitted from the same start, the best on the held-back groups kept
    eval_every: int = 100
    same_task: bool = False  # each group's questions from one task: every document a negative from its corpus

    @property
    def lrs(self) -> list[float]:
        return list(self.lr) if isinstance(self.lr, list) else [self.lr]

    def __post_init__(self):
        if not 0 < self.val_groups < self.groups:
            raise ValueError(f"router_fit: val_groups must be between 1 and groups - 1, got {self.val_groups} "
                             f"of {self.groups}")
        if min(self.questions, self.memory_tokens, self.steps, self.eval_every) < 1 or min(self.lrs, default=0) <= 0:
            raise ValueError("router_fit: questions, memory_tokens, steps, eval_every and lr must be positive")


@dataclass
class Group:
    documents: list[str]
    questions: list[str]
    positives: list[list[int]]  # per question, the indices of its supporting documents


def draw_group(mixer, seed: int, index: int, questions: int, memory_tokens: int, same_task: bool = False) -> Group:
    """Group `index` of the stream seeded by `seed`: `questions` questions from the mixer (`same_task`: all of one
    task), their memories pooled."""
    mixer.rng.seed(f"{seed}-router-{index}")
    task = mixer.pick_task() if same_task else None
    docs: list[str] = []
    where: dict[str, int] = {}
    qs, pos = [], []
    for _ in range(questions):
        q = mixer.draw(memory_tokens, task)
        ids = []
        for text in q.documents:
            if text not in where:
                where[text] = len(docs)
                docs.append(text)
            ids.append(where[text])
        qs.append(q.question)
        pos.append(sorted({ids[d] for h in q.hops for d in h}))
    return Group(docs, qs, pos)


class _Groups(torch.utils.data.IterableDataset):
    def __init__(self, recipe, tok, fit: RouterFit):
        self.recipe, self.tok, self.fit = recipe, tok, fit

    def __iter__(self):
        from .trainer import make_mixer

        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        mixer = make_mixer(self.recipe, self.tok)
        for g in range(w, self.fit.groups, n):
            yield draw_group(mixer, self.recipe.seed, g, self.fit.questions, self.fit.memory_tokens,
                             self.fit.same_task)


def draw_groups(recipe, tok, fit: RouterFit, workers: int = 0):
    """The groups in order, drawn in `workers` processes (the order does not depend on their number)."""
    import os

    from .trainer import _same

    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return torch.utils.data.DataLoader(_Groups(recipe, tok, fit), batch_size=None, collate_fn=_same,
                                       num_workers=workers, prefetch_factor=4 if workers else None)


@dataclass
class Features:
    """One group's router-layer inputs: chunk means (C, hidden) per layer, each chunk's document (C,), the inputs
    at every question's routing tokens packed (T, hidden) per layer, question b's token s at row query_index[b, s]
    where query_mask (Q, S) holds, and 0/1 labels (Q, N documents)."""

    docs: dict[int, torch.Tensor]
    chunk_doc: torch.Tensor
    queries: dict[int, torch.Tensor]
    query_index: torch.Tensor
    query_mask: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def group_features(model, tok, group: Group, similarity: str = "train", batch_size: int = 32) -> Features:
    """Encode the group's documents into a bank (capturing each router layer's chunk means) and route its
    questions over it as the engine does (capturing the inputs at their routing tokens)."""
    from ..engine.calibrate import route_rows
    from ..engine.protocol import Protocol
    from ..memory.bank import MemoryBank

    layers = list(model.router_layers)
    parts: dict[int, list[torch.Tensor]] = {lay: [] for lay in layers}

    def hook_for(layer: int):
        def hook(module, inputs):
            h, lay = inputs[0], inputs[1]
            parts[layer].append(chunk_mean_pool(h[:lay.num_doc_tokens], lay.chunk_of_token, lay.chunk_counts))
        return hook

    hooks = [model.model.layers[i].self_attn.register_forward_pre_hook(hook_for(i)) for i in layers]
    try:
        bank = MemoryBank.build(model, tok, group.documents)
    finally:
        for h in hooks:
            h.remove()
    bank.fused_routing = False  # the PyTorch scoring (the kernel's reference): no per-bank CUDA graphs to capture
    docs = {lay: torch.cat(p) for lay, p in parts.items()}
    chunk_doc = bank.routing_index().chunk_doc
    if any(d.shape[0] != chunk_doc.shape[0] for d in docs.values()):
        raise RuntimeError("router_fit: captured chunk means do not match the bank's chunks")
    proto = Protocol(tok)
    rows = [proto.question(q) for q in group.questions]  # as the engine encodes a question
    got: dict[int, list[torch.Tensor]] = {lay: [] for lay in layers}

    def visit(layer, attn, h, q, rmask, cosine):
        got[layer] += [h[b][rmask[b]] for b in range(h.shape[0])]

    route_rows(bank, [r for r, _ in rows], [m for _, m in rows], similarity, batch_size, visit)
    Q, dev = len(rows), model.device
    counts = torch.tensor([len(t) for t in got[layers[0]]], device=dev)
    mask = torch.arange(int(counts.max()), device=dev) < counts[:, None]  # (Q, S)
    index = torch.zeros(mask.shape, dtype=torch.long, device=dev)
    index[mask] = torch.arange(int(counts.sum()), device=dev)
    queries = {lay: torch.cat(got[lay]) for lay in layers}  # (routing tokens, hidden): no padding kept
    labels = torch.zeros(Q, len(group.documents), dtype=torch.long, device=dev)
    for b, p in enumerate(group.positives):
        labels[b, p] = 1
    return Features(docs, chunk_doc, queries, index, mask, labels)


def router_weights(model) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{router layer: (query projection (H*D, hidden), key projection (Hkv*D, hidden))}: the model's parameters."""
    out = {}
    for lay in model.router_layers:
        attn = model.model.layers[lay].self_attn
        out[lay] = (attn.router_q_proj[0].weight, attn.router_k_proj[0].weight)
    return out


def layer_scores(model, weights: dict, f: Features, cosine: bool) -> dict[int, torch.Tensor]:
    """{router layer: document scores (Q, N)} of a group's questions under `weights` (as `router_weights`), scored
    as the training forward and the engine score (ops/routing.py)."""
    msa, cfg = model.msa_config, model.config
    D = cfg.head_dim
    Q, C, N = f.query_mask.shape[0], f.chunk_doc.shape[0], f.labels.shape[1]
    out = {}
    for lay, (wq, wk) in weights.items():
        keys = (f.docs[lay].to(wk.dtype) @ wk.T).unflatten(-1, (-1, D))  # (C, Hkv, D)
        rq = (f.queries[lay].to(wq.dtype) @ wq.T)[f.query_index].unflatten(-1, (-1, D))  # (Q, S, H, D)
        cs = chunk_scores(rq, f.query_mask, keys, torch.ones(C, dtype=torch.bool, device=keys.device),
                          head_reduce=msa.head_reduce_method, query_reduce=msa.query_reduce_method, cosine=cosine,
                          scale=msa.score_scale(D))  # (Q, C)
        out[lay] = document_scores(cs, f.chunk_doc.expand(Q, C), N, msa.chunk_reduce_method)
    return out


def fused_hits(scores: dict[int, torch.Tensor], labels: torch.Tensor, k: int, at: tuple[int, ...] = (1, 4)):
    """Per question, whether a positive is among the first `at` documents of the engine's fused ranking
    (reciprocal-rank fusion of every layer's top k): {n: (Q,) bool}."""
    Q, N = labels.shape
    fused = torch.zeros(Q, N, dtype=torch.float64, device=labels.device)
    w = 1.0 / (RRF_OFFSET + torch.arange(min(k, N), dtype=torch.float64, device=labels.device))
    for s in scores.values():
        fused.scatter_add_(1, s.topk(min(k, N), dim=1).indices, w.expand(Q, -1))
    order = fused.topk(max(at), dim=1).indices
    return {n: labels.gather(1, order[:, :n]).bool().any(1) for n in at}


def evaluate(model, weights, feats: list[Features], cosine: bool, fuse: list[list[int]] | None = None) -> dict | list:
    """Fused top-1 / top-4 over `feats` with the router layers the model fuses; with `fuse`, a list of layer sets:
    one result for each, fused over that set."""
    k = model.msa_config.engine_top_k
    sets = fuse or [model.fuse_layers]
    hits = [{1: [], 4: []} for _ in sets]
    with torch.no_grad():
        for f in feats:
            scores = layer_scores(model, weights, f, cosine)
            for got, layers in zip(hits, sets):
                for n, h in fused_hits({lay: scores[lay] for lay in layers}, f.labels, k).items():
                    got[n].append(h)
    out = [{f"top{n}": round(float(torch.cat(h).float().mean()), 4) for n, h in got.items()} for got in hits]
    return out if fuse else out[0]


def choose_fusion(model, weights, feats: list[Features], cosine: bool) -> tuple[list[int], dict]:
    """The router layers to fuse: of the upper ones from each router layer on (every router layer, ..., the last
    alone), the set that routes `feats` best (top-1, then top-4; ties to more layers), and its result."""
    routers = model.router_layers
    sets = [routers[i:] for i in range(len(routers))]
    got = evaluate(model, weights, feats, cosine, sets)
    best = max(range(len(sets)), key=lambda i: (got[i]["top1"], got[i]["top4"], -i))
    return sets[best], got[best]


def fit_routers(model, tok, recipe, fit: RouterFit, log=None, workers: int = 0, similarity: str = "train") -> dict:
    """Compute the groups' features with the model as it is, fit its router projections (fp32 copies, AdamW),
    and leave the model with the step that routes the held-back groups best. Returns the summary (written to
    `log` too, a text file, one JSON object per line)."""
    cosine = uses_cosine(model, similarity)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    feats = []
    for g in tqdm(draw_groups(recipe, tok, fit, workers), total=fit.groups, desc="router features", unit="group"):
        feats.append(group_features(model, tok, g, similarity))
    model.train(was_training)
    t_feat = time.perf_counter() - t0
    val, train = feats[:fit.val_groups], feats[fit.val_groups:]
    params = router_weights(model)
    best_w = {lay: tuple(p.detach().float().clone() for p in pair) for lay, pair in params.items()}
    start = evaluate(model, best_w, val, cosine)
    write = _writer(log)
    write({"router_fit": "start", "groups": fit.groups, "questions": fit.questions, "features_s": round(t_feat, 1),
           "val": start})
    best = {"step": 0, "lr": None, **start}
    t1 = time.perf_counter()
    for lr in fit.lrs:
        best, best_w = _fit_one(model, recipe, fit, lr, params, train, val, cosine, write, best, best_w)
    with torch.no_grad():
        for lay, pair in params.items():
            for p, m in zip(pair, best_w[lay]):
                p.copy_(m.to(p.dtype))
    fuse, fused = choose_fusion(model, best_w, val, cosine)
    model.msa_config.fuse_layer_idx = None if fuse == model.router_layers else ",".join(map(str, fuse))
    summary = {"router_fit": "done", "val_start": start, "val_best": best, "fuse_layers": fuse, "val_fused": fused,
               "features_s": round(t_feat, 1), "fit_s": round(time.perf_counter() - t1, 1)}
    write(summary)
    return summary


def _writer(log):
    def write(rec):
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
    return write


class Fitter:
    """fp32 copies (`master`, as `router_weights`) of router weights `params` and their AdamW at `lr`; `step` fits
    them to one group's features by the model's routing loss."""

    def __init__(self, model, params: dict, lr: float):
        self.model = model
        self.master = {lay: tuple(p.detach().float().clone().requires_grad_(True) for p in pair)
                       for lay, pair in params.items()}
        self.flat = [p for pair in self.master.values() for p in pair]
        self.opt = torch.optim.AdamW(self.flat, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))

    def step(self, f: Features, cosine: bool) -> torch.Tensor:
        from ..model.losses import aux_loss

        model = self.model
        loss = aux_loss(layer_scores(model, self.master, f, cosine), f.labels, model.msa_config.aux_loss_method,
                        getattr(model, "temperature", torch.tensor(1.0)), getattr(model, "b", None),
                        model.config.num_hidden_layers)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.flat, 1.0)
        self.opt.step()
        return loss


def _fit_one(model, recipe, fit: RouterFit, lr: float, params, train, val, cosine, write, best, best_w):
    """Fit fp32 copies of `params` (from their start) at `lr`; returns the best step so far and its weights."""
    fitter = Fitter(model, params, lr)
    master = fitter.master
    rng = random.Random(f"{recipe.seed}-router-fit")
    bar = tqdm(range(1, fit.steps + 1), desc=f"router fit (lr {lr:g})", unit="step")
    t1 = time.perf_counter()
    for step in bar:
        loss = fitter.step(train[rng.randrange(len(train))], cosine)
        if step % fit.eval_every == 0 or step == fit.steps:
            got = evaluate(model, master, val, cosine)
            write({"router_fit": step, "lr": lr, "loss": round(loss.item(), 4), **got,
                   "elapsed_s": round(time.perf_counter() - t1, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}", val_top1=got["top1"])
            if (got["top1"], got["top4"]) > (best["top1"], best["top4"]):
                best = {"step": step, "lr": lr, **got}
                best_w = {lay: tuple(p.detach().clone() for p in pair) for lay, pair in master.items()}
    return best, best_w
