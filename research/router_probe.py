"""Can router projections alone learn a routing task on the model's frozen features?

Runs the shipped model (or `--weights`) over RULER samples of one subtask and captures, at each requested layer,
the layer's attention input for the document chunks (its mean over each chunk's tokens) and for the routing-query
tokens. Then, per layer, it trains only router_q_proj / router_k_proj (new ones, or the trained ones with `--keep`) with
the InfoNCE aux loss (temperature 0.1) on 80% of the samples and reports the held-out gold document's rank after
each epoch. The chunk mean of the inputs, projected, is exactly the mean-pooled routing key (the projection is
linear, without bias), so each step costs two small products. A rank that stays near the middle says the
features do not expose what routing needs (or not from this many samples).

    python research/router_probe.py --subtask niah_multikey_2 --samples 2000 --layers 9,22 --device cuda \\
        --out research/results/router_probe_multikey_2.json

`--chunk` pools over chunks of another size; `--standardize` z-scores every input feature (training samples'
statistics) before the projections; `--center` subtracts each sample's mean chunk input from its chunks (keys centred
over the memory); `--query-reduce` trains and scores with another reduction over the routing tokens; `--fresh tied`
starts the queries' projection as the keys' (scores start as feature similarities), `--fresh nulled` as the inputs'
singular directions after the top --null-rank (cf. `--null-top`); `--random-embed` (with `--layers 0`) gives every
token an i.i.d. normal embedding: purely lexical features, to test the routing form itself. `--null-top` trains
nothing and measures fixed projections (see null_probe). `--weights runs/NAME/delta --keep --epochs 0` measures a
newly trained delta's own routers on the same samples.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

from memsparse.engine.protocol import Protocol
from memsparse.eval.meta import run_meta
from memsparse.model.delta import load_delta
from memsparse.model.load import WEIGHTS
from memsparse.model.tokenizer import TokenCounter
from memsparse.ops.indexing import take
from memsparse.ops.pooling import chunk_mean_pool
from memsparse.ops.routing import chunk_scores, document_scores
from memsparse.resources import smollm2_gguf
from memsparse.tasks.niah import make_sample
from memsparse.train.router_init import set_router_from_directions
from memsparse.train.samples import collate, memory_stream, rounds


class _Captured(Exception):
    pass


def capture(model, tok, layers: list[int], args) -> dict[int, list]:
    """Per layer: ((chunk means (C, hidden), query-token inputs (1, A, hidden), layout), gold documents,
    number of documents) per sample, float32 on the model's device."""
    proto, rng, cap = Protocol(tok), random.Random(1), {}
    count = TokenCounter.of(tok)

    def hook_for(layer: int):
        def hook(module, inputs):
            h, lay = inputs[0].detach().flatten(0, 1).float(), inputs[1]  # (T, hidden)
            cap[layer] = (chunk_mean_pool(take(h, lay.doc_token_flat), lay.chunk_of_token, lay.chunk_counts),
                          take(h, lay.active_flat), lay)
            if layer == max(layers):
                raise _Captured
        return hook

    hooks = [model.model.layers[i].self_attn.register_forward_pre_hook(hook_for(i)) for i in layers]
    data = {i: [] for i in layers}
    t0 = time.time()
    try:
        for n in range(args.samples):
            s = make_sample(args.subtask, args.memory, count, rng, doc_tokens=args.doc_tokens, haystack_cache={})
            first = rounds(proto, memory_stream(tok, s.documents), s.documents, s.question, [s.gold], s.answers[0])[0]
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in collate([first], pad_id=0).items()}
            try:
                with torch.no_grad():
                    model(batch["input_ids"], batch["doc_ids"], attention_mask=batch["attention_mask"])
            except _Captured:
                pass
            for i in layers:
                data[i].append((cap[i], s.gold, len(s.documents)))
            if (n + 1) % 500 == 0:
                print(f"{n + 1} samples captured, {time.time() - t0:.0f} s", flush=True)
    finally:
        for h in hooks:
            h.remove()
    return data


def fresh_router(attn, std: float, tied: bool, keys: torch.Tensor | None = None) -> None:
    """Give a layer new router projections, normal(0, std) as at training start; `tied`: each query head takes
    the key projection of its key head; `keys` (Hkv * D, hidden): the key projection to start from (tied)."""
    H, Hkv, D, hid = (attn.cfg.num_attention_heads, attn.cfg.num_key_value_heads, attn.cfg.head_dim,
                      attn.cfg.hidden_size)
    attn.router_q_proj = torch.nn.Sequential(torch.nn.Linear(hid, H * D, bias=False))
    attn.router_k_proj = torch.nn.Sequential(torch.nn.Linear(hid, Hkv * D, bias=False))
    for p in [*attn.router_q_proj.parameters(), *attn.router_k_proj.parameters()]:
        torch.nn.init.normal_(p, std=std)
    if tied or keys is not None:
        set_router_from_directions(attn, attn.router_k_proj[0].weight.detach().clone() if keys is None else keys)


def doc_scores(attn, item) -> torch.Tensor:
    """Document scores (M,) of one captured sample through the layer's (trainable) router projections."""
    (chunk_means, query_inputs, lay), _, n = item
    keys = attn.router_k_proj(chunk_means).unflatten(-1, (-1, attn.cfg.head_dim))  # (C, Hkv, D)
    queries = attn.router_queries(query_inputs, None)  # (1, A, H, D)
    return attn.score(queries, lay.route_mask, keys, lay)[0][:n]


def gold_ranks(score, items: list) -> dict:
    """Median held-out gold rank and how many samples put a gold document first, for score(item) -> (M,)."""
    with torch.no_grad():
        ranks = [min(score(it).argsort(descending=True).tolist().index(g) for g in it[1]) for it in items]
    return {"median_rank": statistics.median(ranks), "first": sum(r == 0 for r in ranks), "held_out": len(ranks)}


def training_split(data: list) -> int:
    """How many of the samples train (the first 80%); the rest are held out."""
    return len(data) * 4 // 5


def stacked_inputs(data: list) -> torch.Tensor:
    """The training samples' chunk and query inputs, stacked: (N, hidden)."""
    return torch.cat([torch.cat([c, q.flatten(0, 1)]) for (c, q, _), _, _ in data[:training_split(data)]])


def input_directions(data: list) -> torch.Tensor:
    """Right singular vectors (hidden, hidden) of the training samples' stacked inputs, by singular value."""
    return torch.linalg.svd(stacked_inputs(data), full_matrices=False).Vh


def null_probe(attn, data: list, tops: list[int]) -> list[dict]:
    """No training: P removes the top-r right singular directions of the training samples' chunk and query
    inputs. Per r, held-out ranks for the plain nulled inputs as routing vectors (one head of the hidden size,
    cosine, the model's reductions) and, where the layer has routers, for its routers applied after P."""
    msa, n_train = attn.msa, training_split(data)
    v = input_directions(data)
    eye = torch.eye(v.shape[1], device=v.device)

    def plain(item, proj):
        (chunk_means, query_inputs, lay), _, n = item
        keys = take((chunk_means @ proj).unsqueeze(1), lay.chunk_index)  # (1, Cmax, 1, hidden)
        cs = chunk_scores((query_inputs @ proj).unsqueeze(2), lay.route_mask, keys, lay.chunk_valid,
                          query_reduce=msa.query_reduce_method)  # (1, Cmax)
        return document_scores(cs, lay.chunk_column, lay.num_doc_columns, msa.chunk_reduce_method)[0][:n]

    rows = []
    for r in tops:
        proj = eye - v[:r].T @ v[:r]  # (hidden, hidden), symmetric
        row = {"null_top": r, "plain": gold_ranks(lambda it, p=proj: plain(it, p), data[n_train:])}
        if hasattr(attn, "router_q_proj"):
            wq, wk = attn.router_q_proj[0].weight, attn.router_k_proj[0].weight
            saved = wq.data.clone(), wk.data.clone()
            wq.data, wk.data = saved[0].float() @ proj, saved[1].float() @ proj
            row["routers"] = gold_ranks(lambda it: doc_scores(attn, it), data[n_train:])
            wq.data, wk.data = saved
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def standardized(data: list) -> list:
    """Every feature z-scored with the mean and deviation of the training samples' chunk and query inputs."""
    feats = stacked_inputs(data)
    mu, sd = feats.mean(0), feats.std(0).clamp(min=1e-6)
    return [(((c - mu) / sd, (q - mu) / sd, lay), g, n) for (c, q, lay), g, n in data]


def probe_layer(attn, data: list, args, std: float) -> list[dict]:
    """Train the layer's router projections on 80% of `data`; the held-out ranks before and after each epoch."""
    if not args.keep or not hasattr(attn, "router_q_proj"):
        keys = None
        if args.fresh == "nulled":  # the next Hkv * D directions after the top r
            r, width = args.null_rank, attn.cfg.num_key_value_heads * attn.cfg.head_dim
            keys = input_directions(data)[r:r + width]
        fresh_router(attn, std, args.fresh == "tied", keys)
    attn.router_q_proj.to(data[0][0][0].device, torch.float32)
    attn.router_k_proj.to(data[0][0][0].device, torch.float32)
    n_train = training_split(data)
    if args.standardize:
        data = standardized(data)
    if args.center:
        data = [((c - c.mean(0), q, lay), g, n) for (c, q, lay), g, n in data]
    train, test = data[:n_train], data[n_train:]
    params = [*attn.router_q_proj.parameters(), *attn.router_k_proj.parameters()]
    opt = torch.optim.Adam(params, lr=args.lr)
    log = []

    def report(epoch: int | None, loss: float | None) -> None:
        row = {"epoch": epoch, "train_loss": loss, **gold_ranks(lambda it: doc_scores(attn, it), test),
               "documents": data[0][2]}
        log.append(row)
        print(json.dumps(row), flush=True)

    report(None, None)
    for epoch in range(args.epochs):
        random.Random(epoch).shuffle(train)
        total = 0.0
        for item in train:
            s = doc_scores(attn, item) / 0.1
            loss = torch.logsumexp(s, 0) - torch.logsumexp(s[item[1]], 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        report(epoch, round(total / len(train), 4))
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subtask", default="niah_multikey_2")
    ap.add_argument("--memory", type=int, default=2048, help="haystack tokens per sample")
    ap.add_argument("--doc-tokens", type=int, default=128)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--layers", help="comma-separated layers (default: the first router layer)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="start from the layer's trained router projections")
    ap.add_argument("--fresh", choices=["normal", "tied", "nulled"], default="normal",
                    help="init of new projections (nulled: see --null-rank)")
    ap.add_argument("--null-rank", type=int, default=120,
                    help="--fresh nulled: the keys take the inputs' singular directions after this many")
    ap.add_argument("--chunk", type=int, help="chunk size to pool over (default: the model's)")
    ap.add_argument("--standardize", action="store_true", help="z-score the inputs before the projections")
    ap.add_argument("--center", action="store_true", help="subtract each sample's mean chunk input from its chunks")
    ap.add_argument("--query-reduce", choices=["max", "mean", "last"],
                    help="reduction over routing tokens (default: the model's)")
    ap.add_argument("--random-embed", action="store_true", help="i.i.d. normal token embeddings (use --layers 0)")
    ap.add_argument("--null-top", help="comma-separated r: measure fixed projections that remove the inputs' "
                                       "top-r singular directions (no training; see null_probe)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", default=str(WEIGHTS), help="a delta directory over SmolLM2 (default: the shipped)")
    ap.add_argument("--out", help="JSON file for the settings and every layer's log")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_delta(args.weights, smollm2_gguf(), dtype="bfloat16", device=args.device)
    model.eval()
    if args.chunk:
        model.msa_config.pooling_kernel_size = args.chunk
    if args.query_reduce:
        model.msa_config.query_reduce_method = args.query_reduce
    if args.random_embed:
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_()
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [model.router_layers[0]]
    data = capture(model, tok, layers, args)
    result = {**run_meta(), "model": f"MSA-SmolLM2 ({args.weights})", "command": " ".join(sys.argv[1:]),
              "settings": {**vars(args), "chunk": model.msa_config.pooling_kernel_size,
                           "query_reduce": model.msa_config.query_reduce_method}, "layers": {}}
    for layer in layers:
        print(f"layer {layer}", flush=True)
        torch.manual_seed(0)
        attn = model.model.layers[layer].self_attn
        if args.null_top:
            if hasattr(attn, "router_q_proj"):
                attn.router_q_proj.float()
                attn.router_k_proj.float()
            log = null_probe(attn, data[layer], [int(x) for x in args.null_top.split(",")])
        else:
            log = probe_layer(attn, data[layer], args, model.config.initializer_range)
        result["layers"][str(layer)] = log
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
