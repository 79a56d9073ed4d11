"""Throughput of `memsparse train`: tokens/s and model FLOPs utilisation of the trainer's own step (routers, LoRA
adapters and the new token row training over a frozen base, fp32 master weights, AdamW) on real training batches.

    # on the CPU (needs the tokenizer): draw the recipe's batches at fixed memory sizes
    python benchmarks/train_throughput.py --make-batches batches.pt --sizes 16384,32768,65536 --batch-sizes 1,2
    # on a GPU: time them (SmolLM2-135M geometry, random weights: the speed is the weights')
    python benchmarks/train_throughput.py --batches batches.pt --label today

MFU counts 6 x (non-embedding parameters) FLOPs per token (the usual convention for a full training step)
against the GPU's dense bf16 peak; with the base frozen the step needs only about 4 x params (no weight
gradients), so `mfu_6n` overstates the work done by that much and is reported as the field does. Results merge into
benchmarks/results/train_throughput.json under --label.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import RESULTS, SMOLLM2, sync

from memsparse import DecoderConfig, MSAForCausalLM
from memsparse.eval.meta import run_header, save_run
from memsparse.model.delta import add_special_tokens, attach_lora
from memsparse.train import trainer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM


def make_batches(args) -> None:
    from memsparse.engine.protocol import Protocol
    from memsparse.model.load import base_path
    from memsparse.model.tokenizer import load_tokenizer

    recipe = trainer.Recipe.load(args.recipe)
    tok = load_tokenizer(base_path(recipe.base))
    tok.add_tokens(trainer.ADDED_TOKENS, special_tokens=True)
    mixer, proto = trainer.make_mixer(recipe, tok), Protocol(tok)
    out = []
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        for size in (int(x) for x in args.sizes.split(",")):
            recipe.phases = [trainer.Phase("bench", args.n, 1e-4, 1.0, 0.1, [size], bs)]
            for step in range(args.n):
                t0 = time.perf_counter()
                *_, b = trainer.step_batch(recipe, mixer, proto, tok, 0, step)
                secs = time.perf_counter() - t0
                out.append({"memory_tokens": size, "batch_size": bs, "draw_s": round(secs, 3),
                            **{k: v.to(torch.int32) if v.dtype == torch.long else v for k, v in b.items()}})
                print(f"memory {size} batch {bs} step {step}: {tuple(b['input_ids'].shape)} drawn in {secs:.2f} s",
                      flush=True)
    torch.save({"recipe": args.recipe, "vocab": len(tok), "lora_rank": recipe.lora_rank, "batches": out},
               args.make_batches)


def time_batches(args) -> None:
    device = torch.device("cuda")
    saved = torch.load(args.batches)
    cfg = DecoderConfig(**{**SMOLLM2, "vocab_size": saved["vocab"] - 1})
    torch.manual_seed(0)
    model = MSAForCausalLM(cfg, {"pooling_kernel_size": 64, "top_k_docs": 16,
                                 "router_layer_idx": list(range(15, 30))}).to(device, torch.bfloat16)
    tok = _VocabStub(saved["vocab"] - 1)
    new_ids = add_special_tokens(model, tok, ["<new>"])
    attach_lora(model, saved["lora_rank"])
    state = trainer.TrainState(model, new_ids, 1e-4)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lora." not in n)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
    groups: dict[tuple[int, int], list[dict]] = {}
    for b in saved["batches"]:
        groups.setdefault((b["memory_tokens"], b["batch_size"]), []).append(b)
    points = []
    for (size, bs), batches in groups.items():
        ckpt = {"on": True, "off": False}.get(args.checkpointing, _trainer_checkpoints(model, batches, device))
        phase = trainer.Phase("bench", 1, 1e-4, 1.0, 0.1, [size], bs)
        dev = [{k: v.to(device).long() if v.dtype == torch.int32 else v.to(device) for k, v in b.items()
                if torch.is_tensor(v)} for b in batches]
        torch.cuda.reset_peak_memory_stats()
        try:
            for b in dev:  # warm-up: first sight of each shape
                state.step(b, phase, 1e-5, checkpointing=ckpt)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                for b in dev:
                    state.step(b, phase, 1e-5, checkpointing=ckpt)
            sync(device)
        except torch.cuda.OutOfMemoryError:
            print(f"memory {size} batch {bs}: out of GPU memory", flush=True)
            state.opt.zero_grad(set_to_none=True)
            del dev
            torch.cuda.empty_cache()
            continue
        secs = (time.perf_counter() - t0) / (args.repeats * len(dev))
        tokens = sum(int(b["attention_mask"].sum()) for b in dev) / len(dev)
        tps = tokens / secs
        point = {"memory_tokens": size, "batch_size": bs, "tokens_per_step": round(tokens),
                 "step_ms": round(secs * 1e3, 1), "tokens_per_s": round(tps), "checkpointing": ckpt,
                 "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
                 "mfu_6n": round(6 * n_params * tps / (peak * 1e12), 4) if peak else None,
                 "draw_s_per_batch_cpu": round(sum(b["draw_s"] for b in batches) / len(batches), 2)}
        points.append(point)
        print(json.dumps(point), flush=True)
    if args.profile:
        size, bs = (int(x) for x in args.profile.split("x"))
        b = {k: v.to(device).long() if v.dtype == torch.int32 else v.to(device) for k, v in
             groups[(size, bs)][0].items() if torch.is_tensor(v)}
        ckpt = {"on": True, "off": False}.get(args.checkpointing, _trainer_checkpoints(model, [b], device))
        phase = trainer.Phase("bench", 1, 1e-4, 1.0, 0.1, [size], bs)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            state.step(b, phase, 1e-5, checkpointing=ckpt)
            sync(device)
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=50))
    run = {**run_header(device), "config": "SmolLM2-135M geometry, bf16, LoRA over a frozen base (trainer step)",
           "batches": saved["recipe"], "non_embedding_params": n_params, "peak_bf16_tflops": peak,
           "points": points}
    save_run(Path(args.out), args.label, run)
    print(f"{'memory':>8} {'batch':>5} {'tokens':>7} {'step ms':>8} {'tok/s':>8} {'MFU(6N)':>8} {'ckpt':>5} {'GB':>5}")
    for p in points:
        print(f"{p['memory_tokens']:>8} {p['batch_size']:>5} {p['tokens_per_step']:>7} {p['step_ms']:>8} "
              f"{p['tokens_per_s']:>8} {p['mfu_6n']:>8} {p['checkpointing']!s:>5} {p['peak_mem_gb']:>5}")


def _trainer_checkpoints(model, batches: list[dict], device) -> bool:
    """The trainer's checkpointing choice for these batches (before `needs_checkpointing`, 2026-12-06: from 32K
    memory tokens on)."""
    if hasattr(trainer, "needs_checkpointing"):
        return trainer.needs_checkpointing(model, max(b["input_ids"].numel() for b in batches), device)
    return batches[0]["memory_tokens"] >= 32768


class _VocabStub:
    """The two tokenizer calls `add_special_tokens` makes, over a vocabulary of `n` plain ids."""

    def __init__(self, n: int):
        self.vocab = {f"t{i}": i for i in range(n)}

    def get_vocab(self):
        return self.vocab

    def add_tokens(self, tokens, special_tokens=True):
        for t in tokens:
            self.vocab.setdefault(t, len(self.vocab))

    def __len__(self):
        return len(self.vocab)

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab[t] for t in tokens]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-batches", metavar="FILE", help="draw batches (CPU) and write them here")
    ap.add_argument("--recipe", default="recipes/history/smollm2-msa-v8.toml")
    ap.add_argument("--sizes", default="16384,32768,65536")
    ap.add_argument("--batch-sizes", default="1,2")
    ap.add_argument("--n", type=int, default=3, help="batches per (size, batch size)")
    ap.add_argument("--batches", metavar="FILE", help="time the batches in this file (GPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                    help="auto: as the trainer decides from the memory size")
    ap.add_argument("--profile", metavar="SIZExBATCH", help="print a profile of one step, e.g. 32768x1")
    ap.add_argument("--label", default="cuda")
    ap.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = ap.parse_args()
    if args.make_batches:
        return make_batches(args)
    if not torch.cuda.is_available():
        raise SystemExit("--batches times a GPU step; no CUDA device here")
    time_batches(args)


if __name__ == "__main__":
    main()
