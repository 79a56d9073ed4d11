"""Training-forward cost against memory size: forward + backward time and peak memory of one Memory Sparse
Attention training step at 8K..64K tokens of memory, next to a dense causal forward over the same tokens.

The Memory Sparse Attention step must grow linearly with the memory (documents are processed independently,
the question only sees the top-k documents' chunks); dense attention grows with the square of the length.

    python benchmarks/train_step.py                 # small config on CPU, SmolLM2 geometry on a GPU
    python benchmarks/train_step.py --sizes 8192,16384 --repeats 2
    python benchmarks/train_step.py --save-batches recipes/history/smollm2-msa-v2.toml:0,130,300,500 --batches b.pt
    python benchmarks/train_step.py --batches b.pt --profile   # real training batches (LoRA, frozen base)

Results are merged into benchmarks/results/train_step.json under the device kind ("cpu", "cuda",
"cuda-checkpointing").
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from pathlib import Path

import torch
from common import RESULTS, SMALL, SMOLLM2, peak_mb, sync, timed

from memsparse import DecoderConfig, MSAForCausalLM
from memsparse.eval.meta import run_header, save_run
from memsparse.ops.attention import shape_varying_attention


def make_batch(memory_tokens: int, doc_len: int, vocab: int, device, n_query=64, n_answer=64, prefix=3):
    """[template; documents of doc_len tokens filling memory_tokens; question; answer], labels on the answer,
    the first two documents as aux positives."""
    n_docs = max(memory_tokens // doc_len, 1)
    doc = [torch.full((prefix,), -2)]
    doc += [torch.full((doc_len,), i + 1) for i in range(n_docs)]
    doc += [torch.zeros(n_query, dtype=torch.long), torch.full((n_answer,), -1)]
    doc = torch.cat(doc)[None].to(device)
    ids = torch.randint(0, vocab, doc.shape, device=device)
    labels = torch.where(doc == -1, ids, -100)
    aux = torch.zeros(1, n_docs, dtype=torch.long, device=device)
    aux[0, :2] = 1
    return ids, doc, labels, aux


def measure(model, size: int, args, device, dense: bool) -> dict:
    ids, doc, labels, aux = make_batch(size, args.doc_len, model.config.vocab_size, device)

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, doc, labels=labels, aux_labels=aux).loss.backward()

    def msa_forward():
        with torch.no_grad():
            model(ids, doc)

    def dense_forward():
        with torch.no_grad():
            model(ids)  # no doc_ids: plain causal attention over every token

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_ms = timed(step, args.repeats, device)
    return {
        "memory_tokens": size, "total_tokens": ids.shape[1], "train_step_ms": round(step_ms, 2),
        "peak_mem_mb": round(peak_mb(device), 1),
        "train_tokens_per_s": round(ids.shape[1] / step_ms * 1e3),
        "msa_forward_ms": round(timed(msa_forward, args.repeats, device), 2),
        "dense_forward_ms": round(timed(dense_forward, args.repeats, device), 2) if dense else None,
    }


def profile_step(model, size: int, args, device) -> None:
    ids, doc, labels, aux = make_batch(size, args.doc_len, model.config.vocab_size, device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if
                                                          device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        model(ids, doc, labels=labels, aux_labels=aux).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))


def save_batches(spec: str, path: str) -> None:
    """Write the trainer's batches of the given steps (`RECIPE:step,step,...`) to `path` (needs the tokenizer)."""
    from memsparse.engine.protocol import Protocol
    from memsparse.model.load import base_path
    from memsparse.model.tokenizer import load_tokenizer
    from memsparse.train import trainer

    recipe_path, steps = spec.rsplit(":", 1)
    recipe = trainer.Recipe.load(recipe_path)
    tok = load_tokenizer(base_path(recipe.base))
    tok.add_tokens(trainer.ADDED_TOKENS, special_tokens=True)
    mixer, proto = trainer.make_mixer(recipe, tok), Protocol(tok)
    out = []
    for step in (int(s) for s in steps.split(",")):
        _, phase, _, mem, b = trainer.step_batch(recipe, mixer, proto, tok, 0, step)
        out.append({"step": step, "memory_tokens": mem, "w": (phase.w_lm, phase.w_aux), **b})
    torch.save({"recipe": recipe_path, "vocab": len(tok), "batches": out}, path)


def _train_batch(model, params, b: dict, backends) -> None:
    for p in params + [model.model.embed_tokens.weight]:
        p.grad = None
    with backends():
        model(b["input_ids"], b["doc_ids"], labels=b["labels"], aux_labels=b["aux_labels"],
              attention_mask=b["attention_mask"]).loss.backward()


def measure_batches(path: str, args, device) -> None:
    """Forward + backward of real batches through the SmolLM2 geometry with LoRA adapters and a frozen base, as
    `memsparse train` runs them: ms per batch at first sight of its shapes (as in training) and once warm; with
    --profile, the slowest batch's profile. Saved under "<device>-real-batches" (or "...-cudnn-first")."""
    from memsparse.model.delta import attach_lora, train_rows, trainable_parameters

    saved = torch.load(path)
    cfg = DecoderConfig(**{**SMOLLM2, "vocab_size": saved["vocab"]})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = MSAForCausalLM(cfg, {"pooling_kernel_size": 64, "top_k_docs": 16, "router_layer_idx": list(range(15, 30))})
    model = model.to(device, dtype).train()
    attach_lora(model, 8)
    params = trainable_parameters(model)
    train_rows(model, [saved["vocab"] - 1])
    backends = contextlib.nullcontext if args.cudnn_first else shape_varying_attention
    times, points = [], []
    for b in saved["batches"]:
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        model.msa_config.lmloss_weigth, model.msa_config.auxloss_weight = b["w"]
        model.gradient_checkpointing = device.type == "cuda" and b["memory_tokens"] >= 32768

        step = functools.partial(_train_batch, model, params, b, backends)
        sync(device)
        t0 = time.perf_counter()
        step()  # first sight of this batch's shapes, as in training
        sync(device)
        first_ms = (time.perf_counter() - t0) * 1e3
        ms = timed(step, args.repeats, device)
        times.append((ms, b))
        points.append({"step": b["step"], "memory_tokens": b["memory_tokens"], "shape": list(b["input_ids"].shape),
                       "active": int((b["doc_ids"] <= 0).sum()), "docs": int(b["doc_ids"].max()),
                       "first_ms": round(first_ms, 1), "ms": round(ms, 1)})
        print(json.dumps(points[-1]), flush=True)
    if args.profile:
        _, b = max(times, key=lambda t: t[0])
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            _train_batch(model, params, b, backends)
            if device.type == "cuda":
                torch.cuda.synchronize()
        keys = ("self_cuda_time_total", "self_cpu_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
        for key in keys:
            print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))
    run = {**run_header(device), "dtype": str(dtype), "config": "SmolLM2-135M geometry, LoRA rank 8, frozen base",
           "batches": saved["recipe"], "sdpa": "default order" if args.cudnn_first else "cuDNN last", "points": points}
    save_run(Path(args.out), f"{device.type}-real-batches" + ("-cudnn-first" if args.cudnn_first else ""), run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8192,16384,32768,65536")
    ap.add_argument("--doc-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-max", type=int, default=None, help="largest size for the dense forward")
    ap.add_argument("--checkpointing", choices=["on", "off"], default=None,
                    help="gradient checkpointing per layer (default: on for GPU)")
    ap.add_argument("--profile", action="store_true", help="print a profile of one step at the largest size")
    ap.add_argument("--out", default=str(RESULTS / "train_step.json"))
    ap.add_argument("--save-batches", metavar="RECIPE:STEPS", help="write these training steps' batches to --batches")
    ap.add_argument("--batches", help="time the real training batches in this file instead of synthetic ones")
    ap.add_argument("--cudnn-first", action="store_true",
                    help="with --batches: PyTorch's default SDPA order (cuDNN first on Hopper), not the trainer's")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.save_batches:
        return save_batches(args.save_batches, args.batches)
    if args.batches:
        return measure_batches(args.batches, args, device)
    gpu = device.type == "cuda"
    cfg = DecoderConfig(**(SMOLLM2 if gpu else SMALL))
    dtype = torch.bfloat16 if gpu else torch.float32
    dense_max = args.dense_max or (65536 if gpu else 32768)
    torch.manual_seed(0)
    model = MSAForCausalLM(cfg, {"pooling_kernel_size": 64, "top_k_docs": 16}).to(device, dtype).train()
    model.gradient_checkpointing = gpu if args.checkpointing is None else args.checkpointing == "on"
    params = sum(p.numel() for p in model.parameters())

    points = []
    for size in (int(s) for s in args.sizes.split(",")):
        point = measure(model, size, args, device, dense=size <= dense_max)
        if gpu:  # 6 x params FLOPs per token for forward + backward (checkpoint recompute not counted)
            point["model_tflops"] = round(6 * params * point["total_tokens"] / point["train_step_ms"] / 1e9, 1)
        points.append(point)
        print(json.dumps(point), flush=True)

    if args.profile:
        profile_step(model, points[-1]["memory_tokens"], args, device)
    base = points[0]
    for p in points:
        p["step_ratio_vs_smallest"] = round(p["train_step_ms"] / base["train_step_ms"], 2)
        p["size_ratio_vs_smallest"] = round(p["memory_tokens"] / base["memory_tokens"], 2)
    run = {
        **run_header(device), "dtype": str(dtype), "params_m": round(params / 1e6, 1),
        "config": "SmolLM2-135M geometry" if gpu else "small (4 layers, hidden 128)",
        "doc_len": args.doc_len, "gradient_checkpointing": model.gradient_checkpointing, "points": points,
        "peak_mem_note": "GPU: torch.cuda.max_memory_allocated per size; CPU: process RSS high-water mark",
    }
    save_run(Path(args.out), device.type + ("-checkpointing" if model.gradient_checkpointing else ""), run)
    print(f"{'memory':>8} {'step ms':>10} {'ratio':>6} {'msa fwd ms':>11} {'dense fwd ms':>13} {'peak MB':>9}")
    for p in points:
        dense = f"{p['dense_forward_ms']:.1f}" if p["dense_forward_ms"] is not None else "-"
        print(f"{p['memory_tokens']:>8} {p['train_step_ms']:>10.1f} {p['step_ratio_vs_smallest']:>6} "
              f"{p['msa_forward_ms']:>11.1f} {dense:>13} {p['peak_mem_mb']:>9.0f}")


if __name__ == "__main__":
    main()
