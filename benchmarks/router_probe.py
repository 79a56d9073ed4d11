"""Can a router layer's projections alone learn a routing task on the model's frozen features?

Captures the input of one router layer (hidden states and layout) for RULER samples of one subtask, then trains
only that layer's router_q_proj / router_k_proj with the InfoNCE aux loss (temperature 0.1) on 80% of them and
reports the held-out gold document's rank after each epoch. A rank that stays near the middle says the features
do not expose what routing needs (or not from this many samples). `--pool max` pools the routing keys of a chunk
by their elementwise maximum instead of the mean (an experiment: a chunk keeps its sharpest token features).
CPU is enough:

    python benchmarks/router_probe.py --subtask niah_multikey_2 --memory 2048 --doc-tokens 128 --samples 200 --layer 29
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from memsparse.demo import load_shipped
from memsparse.engine.protocol import Protocol
from memsparse.ops.indexing import take
from memsparse.ops.pooling import chunk_mean_pool
from memsparse.train.samples import collate, memory_stream, rounds
from memsparse.train.tasks.niah import make_sample


class _Captured(Exception):
    pass


def capture(model, tok, attn, args) -> list:
    """(layer inputs (h, layout, cos, sin), gold documents, number of documents) per sample."""
    proto, rng, cap = Protocol(tok), random.Random(1), {}
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731

    def stop(module, inputs):
        cap["inputs"] = tuple(t.detach() if torch.is_tensor(t) else t for t in inputs[:4])
        raise _Captured

    hook = attn.register_forward_pre_hook(stop)
    data = []
    try:
        for _ in range(args.samples):
            s = make_sample(args.subtask, args.memory, count, rng, doc_tokens=args.doc_tokens, haystack_cache={})
            first = rounds(proto, memory_stream(tok, s.documents), s.documents, s.question, [s.gold], s.answers[0])[0]
            b = collate([first], pad_id=0)
            try:
                with torch.no_grad():
                    model(b["input_ids"], b["doc_ids"], attention_mask=b["attention_mask"])
            except _Captured:
                pass
            data.append((cap["inputs"], s.gold, len(s.documents)))
    finally:
        hook.remove()
    return data


def chunk_max_pool(x: torch.Tensor, chunk_of_token: torch.Tensor, chunks: int) -> torch.Tensor:
    """Elementwise maximum of x (N, ...) over tokens sharing a chunk: (C, ...)."""
    index = chunk_of_token.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
    return x.new_full((chunks, *x.shape[1:]), float("-inf")).scatter_reduce(0, index, x, "amax")


def fresh_router(attn, std: float, tied: bool) -> None:
    """Give a layer new router projections, normal(0, std) as at training start; `tied`: each query head takes
    the key projection of its key head."""
    H, Hkv, D, hid = (attn.cfg.num_attention_heads, attn.cfg.num_key_value_heads, attn.cfg.head_dim,
                      attn.cfg.hidden_size)
    attn.router_q_proj = torch.nn.Sequential(torch.nn.Linear(hid, H * D, bias=False))
    attn.router_k_proj = torch.nn.Sequential(torch.nn.Linear(hid, Hkv * D, bias=False))
    for p in [*attn.router_q_proj.parameters(), *attn.router_k_proj.parameters()]:
        torch.nn.init.normal_(p, std=std)
    if tied:
        with torch.no_grad():
            k = attn.router_k_proj[0].weight.view(Hkv, D, hid)
            attn.router_q_proj[0].weight.copy_(k.repeat_interleave(H // Hkv, 0).reshape(H * D, hid))


def doc_scores(attn, inputs, pool: str = "mean") -> torch.Tensor:
    """The layer's document scores (M,) from its captured inputs, through the (trainable) router projections."""
    h, lay, cos, sin = inputs
    with torch.no_grad():
        q, k, _ = attn.project(h, cos, sin)  # (1, T, H|Hkv, D)
    qf, kf, hf = q.flatten(0, 1), k.flatten(0, 1), h.flatten(0, 1)
    keys = attn.router_keys(take(hf, lay.doc_token_flat), take(kf, lay.doc_token_flat))  # (Nd, Hkv, D)
    pooled = (chunk_mean_pool(keys, lay.chunk_of_token, lay.chunk_counts) if pool == "mean"
              else chunk_max_pool(keys, lay.chunk_of_token, len(lay.chunk_counts)))  # (C, Hkv, D)
    queries = attn.router_queries(take(hf, lay.active_flat), take(qf, lay.active_flat))  # (1, A, H, D)
    return attn.score(queries, lay.route_mask, pooled, lay)[0]


def gold_ranks(attn, part, pool: str) -> list[int]:
    out = []
    with torch.no_grad():
        for inputs, gold, n in part:
            order = doc_scores(attn, inputs, pool)[:n].argsort(descending=True).tolist()
            out.append(min(order.index(g) for g in gold))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subtask", default="niah_multikey_2")
    ap.add_argument("--memory", type=int, default=2048)
    ap.add_argument("--doc-tokens", type=int, default=128)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--layer", type=int, help="router layer (default: the first)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--pool", choices=["mean", "max"], default="mean", help="routing keys of a chunk: mean or max")
    ap.add_argument("--fresh", choices=["normal", "tied"],
                    help="new router projections: HF-default init, or one random projection shared by queries "
                         "and keys (scores start as similarities of the features); normal for a layer without "
                         "routers unless given")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_shipped("cpu", "float32")
    model.eval()
    layer = model.router_layers[0] if args.layer is None else args.layer
    attn = model.model.layers[layer].self_attn
    if args.fresh or not hasattr(attn, "router_q_proj"):
        fresh_router(attn, model.config.initializer_range, args.fresh == "tied")
    data = capture(model, tok, attn, args)
    train, test = data[: len(data) * 4 // 5], data[len(data) * 4 // 5:]

    def report(label: str) -> None:
        r = gold_ranks(attn, test, args.pool)
        print(f"{label}: held-out gold rank median {statistics.median(r)} of {data[0][2]} documents, "
              f"first {sum(x == 0 for x in r)}/{len(r)}", flush=True)

    report(f"layer {layer}, {args.pool} pooling, before")
    params = [*attn.router_q_proj.parameters(), *attn.router_k_proj.parameters()]
    for p in model.parameters():
        p.requires_grad_(p in set(params))
    opt = torch.optim.Adam(params, lr=args.lr)
    for epoch in range(args.epochs):
        random.Random(epoch).shuffle(train)
        total = 0.0
        for inputs, gold, n in train:
            s = doc_scores(attn, inputs, args.pool)[:n] / 0.1
            loss = torch.logsumexp(s, 0) - torch.logsumexp(s[gold], 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        report(f"epoch {epoch}, train loss {total / len(train):.3f}")


if __name__ == "__main__":
    main()
