import os

if not os.path.exists("/dev/nvidiactl"):  # no GPU: Triton kernels run in Triton's interpreter; set before
    os.environ.setdefault("TRITON_INTERPRET", "1")  # anything imports triton (transformers may, at import)

import pytest
import torch

from memsparse import DecoderConfig, MSAForCausalLM


def tiny_config(family: str = "qwen3", **kw) -> DecoderConfig:
    base = dict(
        family=family, vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
        rope={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        attention_bias=family == "qwen2", qk_norm=family == "qwen3",
    )
    base.update(kw)
    return DecoderConfig(**base)


def tiny_model(family: str = "qwen3", msa: dict | None = None, seed: int = 0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = MSAForCausalLM(tiny_config(family, **kw), msa or {})
    with torch.no_grad():  # small weights keep float64/float32 comparisons well conditioned
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
    return model.to(dtype).eval()


def greedy_decode(model, ids: torch.Tensor, step, n: int) -> torch.Tensor:
    """Prefill `ids` (B, S; 0 = left padding) without memory, then `n` greedy decode steps with `step` (a
    `cached.DecodeStep`): the logits of every step (n, B, V)."""
    from memsparse.model import cached

    valid = ids != 0
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    logits, kv = cached.prefill(model, ids, positions, valid, cached.no_memory, extra=n)
    out = []
    for _ in range(n):
        logits = cached.decode(model, logits.argmax(-1), kv, step)
        out.append(logits)
    return torch.stack(out)


def make_sample(doc_lengths, n_query=5, n_answer=4, prefix=3, vocab=97, gen=None):
    """One sample [template prefix; documents; routing query; answer] -> (input_ids, doc_ids) of shape (T,)."""
    gen = gen or torch.Generator().manual_seed(0)
    doc = [-2] * prefix
    for i, n in enumerate(doc_lengths):
        doc += [i + 1] * n
    doc += [0] * n_query + [-1] * n_answer
    doc = torch.tensor(doc)
    ids = torch.randint(0, vocab, (len(doc),), generator=gen)
    return ids, doc


def batch(samples, pad_id=0):
    """Right-pad samples [(ids, doc)] into (input_ids, doc_ids, attention_mask)."""
    T = max(len(s[0]) for s in samples)
    ids = torch.full((len(samples), T), pad_id)
    doc = torch.full((len(samples), T), -1)
    mask = torch.zeros(len(samples), T, dtype=torch.long)
    for b, (i, d) in enumerate(samples):
        ids[b, : len(i)], doc[b, : len(d)], mask[b, : len(i)] = i, d, 1
    return ids, doc, mask


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def assert_same_routing(a: dict, b: dict, atol: float = 1e-5):
    """Same layers, same documents in the same order, scores within atol."""
    assert sorted(a) == sorted(b)
    for layer in a:
        assert [d for d, _ in a[layer]] == [d for d, _ in b[layer]], layer
        assert torch.allclose(torch.tensor([s for _, s in a[layer]]), torch.tensor([s for _, s in b[layer]]), atol=atol)


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_end|>"]
_TOK_TEXT = [
    "Paris is the capital of France.", "Ottawa is the capital of Canada.", "Bananas are yellow and sweet.",
    "Please answer the question based on the above historical document information",
    "Please return all documents related to the question", "The answer to the question is:",
    "The user's question is: where is it?", "<End-of-Retrieve> [0] [1] [2] [3] [10] [42]. 0123456789",
]


def tiny_tokenizer():
    """A byte-level BPE tokenizer (about 300 tokens) trained here on a few sentences, with the chat and
    Memory Interleave special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_TOK_TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def gloo_rank(rank: int, world: int, init: str, out: str, checks, backend: str = "gloo") -> None:
    """A spawned rank's body: join the gloo group (or `backend` "nccl": rank r on GPU r) at `init`, run
    `checks(rank, world, out)`, leave together; a failure is written to `out/error-<rank>.txt` (what `run_ranks`
    reports) and raised."""
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        gpu = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            gpu = {"device_id": torch.device("cuda", rank)}
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, **gpu)
        checks(rank, world, out)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        import traceback

        with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(target, world: int, args, errors_dir, timeout: float) -> None:
    """Run `target(rank, *args)` in `world` spawned processes; fail with the ranks' error files
    (`errors_dir/error-<rank>.txt`), the ranks that hung past `timeout` seconds (killed), or a non-zero exit."""
    import multiprocessing as mp
    from pathlib import Path

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
    errors = [e.read_text() for e in (Path(errors_dir) / f"error-{r}.txt" for r in range(world)) if e.exists()]
    assert not errors, "\n".join(errors)
    assert not hung, f"ranks {[procs.index(p) for p in hung]} did not finish in {timeout} s"
    assert [p.exitcode for p in procs] == [0] * world
