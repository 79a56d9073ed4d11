"""`memsparse eval`: RULER NIAH (one process, or --jobs worker processes), open-memory QA against RAG baselines,
NIAH and QA at scale, and multi-hop questions."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path

from .. import cli
from ..model.load import SHIPPED
from . import _config, _config_args, _model_args, _priors_arg, results_path


def _count(samples: str) -> int:
    """--samples for the tasks that take a single count."""
    if not samples.isdigit():
        raise ValueError(f"--samples: expected one count for this task, got {samples!r}")
    return int(samples)


def cmd_eval(args: argparse.Namespace) -> None:
    args.samples = args.samples or (None if args.task == "qa" else "100")
    if args.jobs < 1 or (args.jobs > 1 and args.task != "niah"):
        raise ValueError(f"--jobs {args.jobs}: expected a count >= 1, above 1 for niah only")
    if args.heldout and args.task != "niah":
        raise ValueError("--heldout is for eval niah only")
    if args.split is not None and args.task not in ("niah", "qa", "scale"):
        raise ValueError("--split is for eval niah, qa and scale")
    if args.task in ("qa", "scale"):
        args.split = args.split or "test"
    if args.task == "qa":
        return _eval_qa(args)
    if args.task == "scale":
        return _eval_scale(args)
    if args.task == "multihop":
        return _eval_multihop(args)
    if args.worker:  # a --jobs worker: its settings from the parent's file, not from flags
        return _eval_niah(NiahRun.load(args.worker))
    if args.pool:
        return _pool_niah(args.pool.split(","), results_path(args.out, "niah.json"))
    if args.from_answers:
        return _niah_from_answers(args.from_answers.split(","), results_path(args.out, "niah.json"))
    run = _niah_run(args)
    if args.jobs > 1:
        return _niah_jobs(run, args.jobs)
    _eval_niah(run)


@dataclasses.dataclass
class NiahRun:
    """One `eval niah` measurement's settings: what the command line parsed, and what a `--jobs` worker receives as
    a JSON file (`eval niah --worker FILE`) rather than a command line. `config`: RetrievalConfig.flat();
    `compare`: more settings (parse_settings); `units`: the (memory size, subtask) pairs to answer (None: all);
    `sample_ids`: the samples of each stream to answer (None: all)."""

    tokens: list[int]
    samples: list[int]  # per memory size
    subtasks: list[str]
    out: str
    seed: int = 42
    split: str | None = None
    heldout: bool = False
    priors: int = 0
    config: dict = dataclasses.field(default_factory=dict)
    compare: list[dict] = dataclasses.field(default_factory=list)
    sample_ids: list[int] | None = None
    units: list[tuple[int, str]] | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    answers: str | None = None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> NiahRun:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: not an eval niah worker file (unknown keys {sorted(unknown)})")
        run = cls(**data)
        if run.units is not None:
            run.units = [(int(n), s) for n, s in run.units]
        return run


def _niah_run(args: argparse.Namespace) -> NiahRun:
    """The NiahRun of `eval niah`'s flags, checked before any work."""
    from ..eval.niah import parse_settings, stream_seed
    from ..tasks.niah import SUBTASKS

    subtasks = args.subtasks.split(",") if args.subtasks else list(SUBTASKS)
    unknown = set(subtasks) - set(SUBTASKS)
    if unknown:
        raise ValueError(f"unknown subtasks {sorted(unknown)}; choose from {', '.join(SUBTASKS)}")
    stream_seed(args.seed, args.split)  # a seed outside the split's range: the error before any work
    sizes = [int(t) for t in args.tokens.split(",")]
    counts = [int(n) for n in args.samples.split(",")]
    counts = counts * len(sizes) if len(counts) == 1 else counts  # per size (evaluate refuses a count mismatch)
    compare = parse_settings(args.compare or "")
    only = sorted({int(i) for i in args.sample_ids.split(",")}) if args.sample_ids else None
    if only and max(only) >= max(counts):
        raise ValueError(f"--sample-ids {args.sample_ids}: every id must be below --samples {args.samples}")
    return NiahRun(tokens=sizes, samples=counts, subtasks=subtasks, out=str(results_path(args.out, "niah.json")),
                   seed=args.seed, split=args.split, heldout=args.heldout, priors=args.priors,
                   config=_config(args).flat(), compare=compare, sample_ids=only,
                   model=args.model, device=args.device, dtype=args.dtype, answers=args.answers)


def _eval_niah(run: NiahRun) -> None:
    """Measure `run` in this process: load the model, answer, write --out (after each point) and print the table."""
    from ..engine import RetrievalConfig
    from ..eval.niah import evaluate, setting_label, setting_of

    out = Path(run.out)
    model, tok = cli._load_model(run.model, run.device, run.dtype)
    name = "MSA-SmolLM2 (shipped)" if run.model in (None, SHIPPED) else str(run.model)
    with _answers_file(run.answers) as answers:
        points = evaluate(model, tok, run.tokens, run.subtasks, run.samples, seed=run.seed,
                          config=RetrievalConfig().replace(**run.config), priors=run.priors,
                          compare=run.compare, on_point=lambda pts: _write_niah(pts, name, out), answers=answers,
                          name=name, only=set(run.sample_ids) if run.sample_ids else None,
                          units=set(map(tuple, run.units)) if run.units is not None else None,
                          data="heldout" if run.heldout else "ruler", split=run.split)
    print(f"{'tokens':>8} {'subtask':<16} {'setting':<24} {'accuracy':>14} {'routing recall':>14} {'named recall':>12}")
    base = setting_of(points[0])
    for p in points:
        print(f"{p['tokens']:>8} {p['subtask']:<16} {setting_label(setting_of(p), base):<24} "
              f"{p['accuracy']:>7} ± {p['stderr']:<4} {p['routing_recall']:>14} {p['named_recall']:>12}")
    _print_averages(points)
    print("wrote " + ", ".join(map(str, _write_niah(points, name, out))))


def _print_averages(points: list[dict]) -> None:
    """Per memory size and setting: the mean accuracy over the subtasks, ± its standard error."""
    from ..eval.niah import average, setting_label, setting_of

    base = setting_of(points[0])
    for n, setting in dict.fromkeys((p["tokens"], tuple(setting_of(p).items())) for p in points):
        group = [p for p in points if p["tokens"] == n and tuple(setting_of(p).items()) == setting]
        print(f"{n:>8} {'average':<16} {setting_label(dict(setting), base):<24} "
              "{:>7} ± {:<4}".format(*average(group)))


def _niah_jobs(run: NiahRun, jobs: int) -> None:
    """`eval niah --jobs N`: the (memory size, subtask) units of `run` dealt round robin to N worker processes
    (`eval niah --worker FILE`, FILE: `run` with its share of the units, its own --answers and --out, as JSON; one
    GPU each, round robin, unless --device names one), then their answer lines merged into --answers and rebuilt
    into --out as `--from-answers` does. If a worker fails, every worker's answers so far stay in the work folder
    (named in the error) for `--from-answers`."""
    import shutil
    import tempfile

    from ..eval.jobs import run_workers, visible_gpus

    out = Path(run.out)
    units = [(n, s) for n in sorted(run.tokens, reverse=True) for s in run.subtasks]
    per_sample = 1 + len(run.compare)
    answers_per = {n: (len(run.sample_ids) if run.sample_ids else c) * per_sample
                   for n, c in zip(run.tokens, run.samples)}
    n = min(jobs, len(units))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{out.stem}-jobs-", dir=out.parent))
    answers = [work / f"answers{i}.jsonl" for i in range(n)]
    commands = []
    for i in range(n):
        settings = work / f"worker{i}.json"
        dataclasses.replace(run, units=units[i::n], answers=str(answers[i]), out=str(work / f"niah{i}.json")).save(
            settings)
        commands.append(["eval", "niah", "--worker", str(settings)])
    gpus = visible_gpus() if run.device in (None, "cuda") else []  # --device cpu / cuda:1: every worker there
    print(f"{len(units)} (size, subtask) units over {n} workers "
          f"({'GPUs ' + ', '.join(gpus) if gpus else 'CPU'}); logs in {work}")
    try:
        run_workers(commands, answers, [work / f"worker{i}.log" for i in range(n)],
                    sum(answers_per[t] for t, _ in units), gpus)
    except RuntimeError as e:
        raise ValueError(f"{e}\nanswers so far: {work} (rebuild with --from-answers)") from e
    if run.answers:
        Path(run.answers).parent.mkdir(parents=True, exist_ok=True)
        with open(run.answers, "w") as f:
            for a in answers:
                f.write(a.read_text())
    _niah_from_answers([str(a) for a in answers], out)
    shutil.rmtree(work)


def _write_niah(points: list[dict], name: str, out: Path, meta_of=None) -> list[Path]:
    """The first setting's points to `out`, each other setting's beside it (niah.refine-0.json); `meta_of(setting)`:
    that file's machine / date / commit (default: this run's)."""
    from ..eval.niah import by_setting, setting_label, write_results

    sets = by_setting(points)
    files = [out] + [out.with_name(f"{out.stem}.{setting_label(s, sets[0][0])}{out.suffix}") for s, _ in sets[1:]]
    for f, (setting, pts) in zip(files, sets):
        write_results(pts, name, f, meta_of(setting) if meta_of else None)
    return files


def _niah_from_answers(files: list[str], out: Path) -> None:
    """Results files rebuilt from `eval niah --answers` files (plain or .gz) of one model: the points of runs cut
    short, several seeds pooled (`pool`), one file per setting, machine / date / commit as the lines record them."""
    import gzip

    from ..eval.niah import by_setting, pool, setting_label, setting_of, summarize

    records = []
    for f in files:
        with (gzip.open if f.endswith(".gz") else open)(f, "rt") as fh:
            records += [json.loads(line) for line in fh if line.strip()]
    if not records:
        raise ValueError(f"--from-answers: no answers in {', '.join(files)}")
    models = {r.get("model") for r in records}
    if len(models) != 1 or None in models:
        raise ValueError(f"--from-answers: lines of one recorded model only, got {sorted(map(str, models))}")
    def meta_of(setting: dict) -> dict:  # machine / date / commit of the lines of that setting only
        rs = [r for r in records if setting_of(r) == setting]
        return {k: ",".join(sorted({str(r.get(k, "unrecorded")) for r in rs})) for k in ("gpu", "date", "commit")}

    points = [p for _, pts in by_setting(summarize(records)) for p in pool(pts)]
    for p in points:
        print(f"{p['tokens']:>8} {p['subtask']:<16} {setting_label(setting_of(p), setting_of(points[0])):<24} "
              f"{p['accuracy']:>7} ± {p['stderr']:<4} {p['samples']:>4} samples")
    _print_averages(points)
    print("wrote " + ", ".join(map(str, _write_niah(points, models.pop(), out, meta_of))))


def _pool_niah(files: list[str], out: Path) -> None:
    """Pool `eval niah` result files of one model (runs with different seeds, machines or sizes) into one file."""
    from ..eval.niah import pool, write_results

    runs = [json.loads(Path(f).read_text()) for f in files]
    models = {r["model"] for r in runs}
    if len(models) != 1:
        raise ValueError(f"--pool: results of one model only, got {sorted(models)}")
    points = [{"commit": r["commit"], "date": r["date"], **p} for r in runs for p in r["points"]]
    meta = {k: ",".join(sorted({r[k] for r in runs})) for k in ("gpu", "date", "commit")}
    pooled = pool(points)
    write_results(pooled, models.pop(), out, meta)
    for p in pooled:
        print(f"{p['tokens']:>8} {p['subtask']:<16} {p['accuracy']:>7} ± {p['stderr']:<4} {p['samples']:>4} samples")
    _print_averages(pooled)
    print(f"wrote {out}")


def _eval_multihop(args: argparse.Namespace) -> None:
    from ..eval.meta import run_meta
    from ..eval.multihop import evaluate

    model, tok = cli._load_model(args.model, args.device, args.dtype)
    rounds = tuple(int(r) for r in args.router_rounds.split(","))
    points = evaluate(model, tok, [int(t) for t in args.tokens.split(",")], _count(args.samples), rounds,
                      _config(args))
    out = results_path(args.out, "multihop.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(args.model or SHIPPED), **run_meta(), "points": points}, indent=1) + "\n")
    print(f"{'tokens':>8} {'rounds':>6} {'accuracy':>8} {'hop 1':>6} {'hop 2':>6}")
    for p in points:
        print(f"{p['tokens']:>8} {p['router_rounds']:>6} {p['accuracy']:>8} {p['hop1_injected']:>6} "
              f"{p['hop2_injected']:>6}")
    print(f"wrote {out}")


def _eval_scale(args: argparse.Namespace) -> None:
    from ..eval.scale import run

    model, tok = cli._load_model(args.model, args.device, args.dtype)
    res = run(model, tok, [int(t) for t in args.tokens.split(",")], results_path(args.out,
              "scale_quality.json"), niah_samples=_count(args.samples),
              qa_questions=args.questions, qa_split=args.split,
              bank_path=Path(args.bank_cache) if args.bank_cache else None, fp8_at=args.fp8_at,
              tasks=tuple(t for t in args.scale_tasks.split(",") if t), key_dtypes=tuple(args.key_dtypes.split(",")))
    for p in res["points"]:
        print(f"{p['task']:<14} {p['tokens']:>10} {p['key_dtype']:>5} {p['score']:>7}")
    for r in res["recall"]:
        print(f"fp8 routing keys at {r['tokens']} tokens: top-k recall vs bf16 {r['top_k_recall_fp8_vs_bf16']}")


def _eval_qa(args: argparse.Namespace) -> None:
    """Open-memory QA over the Debian FAQs: qa_<split>.json = {gpu, date, commit, source, split, memory_passages,
    memory_tokens, questions, systems: [{name, n, em, em_se, f1, f1_se, gold_top1, gold_top4, ...}]}."""
    from ..eval.faqs import load_qa
    from ..eval.qa import check_results_file, readers
    from ..model.checkpoint import load_pretrained
    from ..model.tokenizer import load_tokenizer
    from ..resources import smollm2_gguf

    systems = args.systems.split(",")
    needs_msa, needs_plain = readers(systems)
    data = load_qa(args.split, _count(args.samples) if args.samples else None)
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    msa = cli._load_model(args.model, device, args.dtype) if needs_msa else None
    plain = None
    if needs_plain:
        gguf = smollm2_gguf()
        plain = (load_pretrained(gguf, dtype=args.dtype or "float32", device=device).eval(), load_tokenizer(gguf))
    from ..eval.qa import evaluate_qa, table, write_results

    tok = (msa or plain)[1]
    memory_tokens = sum(len(x) for x in tok(data.paragraphs, add_special_tokens=False)["input_ids"])
    out = results_path(args.out, f"qa_{args.split}.json")
    check_results_file(out, data, memory_tokens)  # before the hours of answering, not after
    with _answers_file(args.answers) as answers:
        results = evaluate_qa(data, systems, msa=msa, plain=plain, device=device, config=_config(args),
                              priors=args.priors, answers=answers)
    write_results(results, data, memory_tokens, out)
    print(f"{data.name}, {data.split} split: {len(data.questions)} questions over {len(data.paragraphs)} passages "
          f"({memory_tokens:,} tokens); F1 / EM of the extracted answer, ± standard error; top1 / top4: gold passage "
          "ranked first / in the top 4 by the router (memsparse) or MiniLM (rag)")
    print(table(results))
    print(f"wrote {out}")


def _answers_file(path: str | None):
    """`--answers FILE` opened for writing (its folder made), or a null context."""
    if not path:
        return contextlib.nullcontext()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w")


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    v = sub.add_parser("eval", help="evaluate a model: RULER NIAH, or open-memory QA (qa) against RAG baselines",
                       formatter_class=fmt)
    v.add_argument("task", choices=["niah", "qa", "scale", "multihop"],
                   help="niah, qa (QA over Debian documentation FAQs vs RAG), scale (NIAH and that QA with 1M-100M "
                        "distractor tokens), "
                        "multihop (two-hop chains answered with 1, 2, ... rounds of router injection)")
    v.add_argument("--router-rounds", default="1,2", help="multihop: rounds of router injection to compare")
    v.add_argument("--questions", type=int, default=200, help="scale: QA questions (of --split)")
    v.add_argument("--bank-cache", help="scale: directory to save / reuse the distractor bank")
    v.add_argument("--fp8-at", type=int, help="scale: also measure fp8 routing keys at this size")
    v.add_argument("--scale-tasks", default="niah,qa", help="scale: tasks ('' only builds the distractor bank)")
    v.add_argument("--key-dtypes", default="bf16,fp8", help="scale: routing-key dtypes to measure (fp8: at --fp8-at)")
    v.add_argument("--systems", default="memsparse,rag1-msa,rag1,rag4,full",
                   help="qa: memsparse, ragK (MiniLM + FAISS top-K into plain SmolLM2), ragK-msa (the same K "
                        "passages injected into the MSA model), full (8K context)")
    v.add_argument("--tokens", default="32768", help="memory sizes, comma separated (e.g. 32768,131072,1048576)")
    v.add_argument("--samples",
                   help="niah: samples per subtask, one count or one per --tokens size (100,50,10; default 100); "
                        "qa: questions (default: all of --split); scale, multihop: samples (default 100)")
    v.add_argument("--subtasks", help="comma list (default: all 8)")
    v.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="niah: spread the (memory size, subtask) pairs over N worker processes, one GPU each (round "
                        "robin over the visible GPUs; several per GPU overlap sample drawing with the GPU's work; "
                        "on a CPU they share its cores)")
    v.add_argument("--worker", metavar="FILE", help=argparse.SUPPRESS)  # a --jobs worker's settings (NiahRun JSON)
    v.add_argument("--sample-ids", metavar="I,J,...",
                   help="niah: answer only these samples of each subtask's stream (0-based, below --samples), to "
                        "re-run chosen samples of an earlier run with another setting")
    v.add_argument("--pool", metavar="FILES",
                   help="niah: pool these result files (comma list) into --out instead of measuring")
    v.add_argument("--seed", type=int, default=42,
                   help="niah: seed of the sample streams (runs with different seeds draw disjoint samples to pool)")
    v.add_argument("--heldout", action="store_true",
                   help="niah: the 8 subtasks on the unseen haystack (Debian fortunes) with held-out needle, question "
                        "and key/value wording that training never sees (tasks/heldout.py), instead of RULER "
                        "as published")
    v.add_argument("--split", choices=["dev", "test"],
                   help="choose settings on dev, report on test. niah: the development or test range of seeds "
                        "(disjoint: --seed S draws stream S or 1000000 + S; default: --seed as is); qa, scale: the "
                        "questions' split (default test)")
    v.add_argument("--from-answers", metavar="FILES",
                   help="niah: rebuild results from --answers files (comma list, .gz too; runs cut short, seeds "
                        "pooled) into --out instead of measuring")
    v.add_argument("--compare", metavar="SETTINGS",
                   help="niah: also answer every sample with these settings, on the same banks ('refine=0;"
                        "refine_margin=1,inject_k=8': ';' between settings, ',' between keys); each writes its "
                        "results beside --out (niah.refine-0.json)")
    v.add_argument("--answers", metavar="FILE",
                   help="niah / qa: write every sample (question, expected and given answer, score, the gold and the "
                        "named or injected documents) to FILE as JSON lines")
    _config_args(v, skip=("router_rounds",))  # eval's --router-rounds: multihop's list of counts
    _priors_arg(v)
    v.add_argument("--out", help="default: memsparse-results/niah.json (multihop.json, scale_quality.json, "
                                 "qa_<split>.json) under the working directory")
    _model_args(v, "the shipped MSA-SmolLM2")
    v.set_defaults(func=cmd_eval)
