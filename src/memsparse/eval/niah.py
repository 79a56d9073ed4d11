"""`memsparse eval niah`: RULER NIAH (tasks/niah.py) answered from a memory bank.

Each sample's haystack becomes a bank (documents split by the generator's published rule); the question goes
through the engine in the official protocol (Memory Interleave on by default) and the answer is scored with
RULER's `string_match_all`. Also recorded per point: how many of the needle documents the router layers
selected (routing recall), how many the model named (named recall) and the standard error of the accuracy.

`data`: "ruler" (RULER as published: essays, RULER's wording and words) or "heldout" (the same 8 subtask shapes from
tasks/needles.py's `HELDOUT` grammar: the unseen Debian fortunes haystack, held-out templates, key kinds and
value formats, none of which training sees). `split`: "dev" or "test", disjoint seed ranges (`SPLIT_SEEDS`): a
`seed` below SPLIT_SEEDS draws the dev stream `seed`, the test stream `seed + SPLIT_SEEDS`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..engine import MSAEngine, RetrievalConfig
from ..engine.config import REMOVED, key_of, setting_fields
from ..memory import MemoryBank
from ..model.tokenizer import TokenCounter
from ..tasks import needles
from ..tasks.niah import SUBTASKS, make_sample, string_match_all
from .meta import answer_lines, answers_file, load_model, pyplot, run_meta, save_figure

SETTING_KEYS = tuple(key_of(f) for f in setting_fields())  # what results record of RetrievalConfig (its labels)
_ABSENT = RetrievalConfig.from_settings({}).flat()  # a key a result does not record: the value it ran with
# removed options as older results record them, with the value the engine now always has: a result that records
# another value measured a setting of its own
_LEGACY = {"fusion": "rrf", "refine_depth": 0, "widen": 0}
DATA = ("ruler", "heldout")
SPLITS = ("dev", "test")
SPLIT_SEEDS = 1_000_000  # dev: seeds [0, SPLIT_SEEDS); test: [SPLIT_SEEDS, 2 * SPLIT_SEEDS)


def stream_seed(seed: int, split: str | None) -> int:
    """The seed of the sample streams: `seed` itself without a split, else its place in the split's range."""
    if split is None:
        return seed
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if not 0 <= seed < SPLIT_SEEDS:
        raise ValueError(f"seed {seed}: with a dev/test split it must be in [0, {SPLIT_SEEDS})")
    return seed + SPLIT_SEEDS * SPLITS.index(split)


def stderr(accuracy: float, samples: int) -> float:
    """Standard error (in points) of an accuracy in % over `samples` samples: 100 * sqrt(p (1 - p) / n)."""
    p = accuracy / 100
    return round(100 * math.sqrt(max(p * (1 - p), 0.0) / samples), 2) if samples else 0.0


def average(points: list[dict]) -> tuple[float, float]:
    """(mean accuracy, its standard error) over points (subtasks) of one memory size: the points' standard errors
    combined as independent, sqrt(sum se^2) / k."""
    errs = [p.get("stderr", stderr(p["accuracy"], p["samples"])) for p in points]
    return (round(statistics.mean(p["accuracy"] for p in points), 2),
            round(math.sqrt(sum(e * e for e in errs)) / len(errs), 2))


def setting_of(point: dict) -> dict:
    """The setting a point (or answer line) was measured with: RetrievalConfig.settings (a key it does not record
    took the value of the results written before it existed), then any removed option it records with a value the
    engine no longer has ("fusion": "max", "widen": 8 and its "widen_margin")."""
    setting = RetrievalConfig.from_settings({k: point[k] for k in SETTING_KEYS if k in point}).settings()
    legacy = {k: point[k] for k, v in _LEGACY.items() if point.get(k, v) != v}
    return {**setting, **legacy, **({"widen_margin": point["widen_margin"]} if "widen" in legacy else {})}


def parse_settings(text: str) -> list[dict]:
    """`--compare` text: settings separated by ';', each a comma list of key=value over SETTING_KEYS
    ("refine=0;refine_margin=1,inject_k=8"); a removed option is refused, saying why."""
    out = []
    types = {key_of(f): type(f.default) for f in setting_fields()}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        setting = {}
        for item in part.split(","):
            key, eq, value = item.strip().partition("=")
            key = key.strip().replace("-", "_")
            if key in REMOVED:
                raise ValueError(f"--compare: {key} was removed: {REMOVED[key]}")
            if not eq or key not in SETTING_KEYS:
                raise ValueError(f"--compare {part!r}: expected key=value with keys from {', '.join(SETTING_KEYS)}")
            value = value.strip()
            setting[key] = value.lower() in ("1", "true", "yes") if types[key] is bool else types[key](value)
        out.append(setting)
    return out


def setting_label(setting: dict, base: dict) -> str:
    """The label of a setting: what differs from `base` ("refine-0", "inject_k-8"); a key of `base` the
    setting lacks with its value in results that do not record it ("refine-0", "refine_fuse-False"; an option's
    sub-keys left out where the option itself is off)."""
    off = [f"{k}-{_ABSENT.get(k, _LEGACY.get(k))}" for k in base
           if k not in setting and (k in ("refine", "widen") or k.split("_")[0] in setting)]
    return "_".join([f"{k}-{v}" for k, v in setting.items() if base.get(k) != v] + off) or "same"


def evaluate(model, tok, tokens: list[int], subtasks=SUBTASKS, samples: int | list[int] = 100, seed: int = 42,
             doc_tokens: int = 512, max_new_tokens: int = 64, config: RetrievalConfig | None = None,
             priors: int = 0, compare: list[dict] = (),
             on_point=None, answers=None, name: str = "", only: set[int] | None = None,
             units: set[tuple[int, str]] | None = None, data: str = "ruler", split: str | None = None) -> list[dict]:
    """One point per (memory size, subtask, setting): accuracy (%), routing and named recall, seconds per sample
    (`summarize`). `samples`: per subtask, one count for every size or one per size; `priors`: document priors from
    that many pseudo-queries per sample's memory (`MSAEngine.calibrate_priors`; 0: none); `config`: how the engine
    retrieves (default: RetrievalConfig's); `compare`: more settings (RetrievalConfig's flat keys, over `config`'s)
    answered on the same samples and banks, a paired comparison at little more cost
    (building a sample's bank is most of its time); points carry their setting (`setting_of`).
    `on_point(points so far)` runs after each point (the command line writes the results file there, so an
    interrupted run keeps what it measured). `answers`: a text file to which every answer is written as it is scored,
    one JSON line (the model `name`, machine, commit, setting, question, expected and given answer, score, the needle
    documents, the documents named or injected in each round, every router layer's first-round top-k with scores and
    the seconds it took), to see what failed and to rebuild the points of a run cut short (`summarize`). `only`:
    answer just these samples (indices into each subtask's stream of `samples`; the others are drawn, not answered).
    `units`: measure just these (memory size, subtask) pairs (a worker's share of `--jobs`). `data`, `split`: which
    samples (module docstring); points and answer lines record both, and the stream seed as `seed`."""
    if data not in DATA:
        raise ValueError(f"data {data!r}: expected one of {', '.join(DATA)}")
    seed = stream_seed(seed, split)
    draw = make_sample if data == "ruler" else functools.partial(needles.make_sample, grammar=needles.HELDOUT)
    tags = {"data": data, **({"split": split} if split else {})}
    counts = [samples] * len(tokens) if isinstance(samples, int) else list(samples)
    if len(counts) != len(tokens):
        raise ValueError(f"samples: one count, or one per memory size ({len(tokens)}), not {len(counts)}")
    config = config or RetrievalConfig()
    variants = [config] + [config.replace(**c) for c in compare]
    settings = [v.settings() for v in variants]
    meta = {"model": name, **run_meta()}
    count = TokenCounter.of(tok)
    cache: dict = {}  # per-sentence token counts of the haystacks
    points = []
    for n, per_subtask in zip(tokens, counts):
        for sub in subtasks:
            if units is not None and (n, sub) not in units:
                continue
            rng = random.Random(f"{seed}-{sub}-{n}")
            records = []
            for i in tqdm(range(per_subtask), desc=f"{sub} @ {n}", leave=False):
                t0 = time.perf_counter()
                s = draw(sub, n, count, rng, doc_tokens=doc_tokens, haystack_cache=cache)
                if only is not None and i not in only:
                    continue
                # a bar for banks that take minutes (128K tokens and up on a CPU)
                bank = MemoryBank.build(model, tok, s.documents, tier="auto",
                                        progress=model.device.type == "cpu" and n >= 1 << 17)
                shared = time.perf_counter() - t0
                for variant, setting in zip(variants, settings):
                    t0 = time.perf_counter()
                    eng = MSAEngine(model, tok, bank, variant)
                    if priors:
                        eng.calibrate_priors(n=priors)
                    ans = eng.ask(s.question, max_new_tokens=max_new_tokens)
                    records.append({
                        **meta, "tokens": n, "subtask": sub, "interleave": variant.interleave, "seed": seed, **tags,
                        "sample": i, **setting, "question": s.question, "expected": s.answers, "answer": ans.text,
                        "score": string_match_all(ans.text, s.answers), "gold": sorted(s.gold), "rounds": ans.rounds,
                        "routing": {str(layer): [[d, round(float(x), 4)] for d, x in top]
                                    for layer, top in ans.routing.items()},
                        "seconds": round(shared + time.perf_counter() - t0, 3)})
                    if answers is not None:
                        answers.write(json.dumps(records[-1]) + "\n")
                        answers.flush()
            for p in summarize(records):
                points.append({k: v for k, v in p.items() if k not in ("commit", "date")})
                print(json.dumps(points[-1]), flush=True)
            if on_point:
                on_point(points)
    return points


def summarize(records: list[dict]) -> list[dict]:
    """Points from answer records (evaluate's `answers` lines), one per (memory size, subtask, interleave, seed,
    setting), in order of first appearance, with the commit and date of their run when recorded. A sample some of a
    run's settings did not answer (a run cut short between them) is left out of all, so the settings stay paired."""
    runs: dict[tuple, dict[tuple, dict[int, dict]]] = {}
    for r in records:
        run = (r["tokens"], r["subtask"], _mode(r), r["seed"], r.get("data", "ruler"), r.get("split"))
        runs.setdefault(run, {}).setdefault(tuple(setting_of(r).items()), {})[r["sample"]] = r
    points = []
    for (n, sub, mode, seed, data, split), sets in runs.items():
        common = sorted(set.intersection(*(set(by_sample) for by_sample in sets.values())))
        for setting, by_sample in sets.items():
            rs = [by_sample[i] for i in common]
            golds = [set(r["gold"]) for r in rs]
            routed = [{d for top in r["routing"].values() for d, _ in top} for r in rs]
            named = [{d for ids in r["rounds"] for d in ids} for r in rs]
            seconds = [r.get("seconds") for r in rs]
            accuracy = 100 * sum(r["score"] for r in rs) / len(rs)
            points.append({
                "tokens": n, "subtask": sub, "interleave": mode, "seed": seed, "data": data,
                **({"split": split} if split else {}), **dict(setting),
                "accuracy": round(accuracy, 2), "stderr": stderr(accuracy, len(rs)), "samples": len(rs),
                "routing_recall": round(sum(len(g & x) / len(g) for g, x in zip(golds, routed)) / len(rs), 4),
                "named_recall": round(sum(len(g & x) / len(g) for g, x in zip(golds, named)) / len(rs), 4),
                **({"seconds_per_sample": round(sum(seconds) / len(rs), 3)} if None not in seconds else {}),
                **{k: rs[0][k] for k in ("commit", "date") if k in rs[0]}})
    return points


def _mode(point: dict) -> str:
    """A point's interleave mode ("True" / "False": results written when the engine took booleans)."""
    mode = point.get("interleave", "router")
    return {"True": "model", "False": "off"}.get(mode, mode)


def by_setting(points: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Points grouped by setting (`setting_of`), in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault(tuple(setting_of(p).items()), []).append(p)
    return [(dict(k), ps) for k, ps in groups.items()]


def pool(points: list[dict]) -> list[dict]:
    """One point per (memory size, subtask) from runs with different seeds (disjoint sample streams): accuracy and
    recalls averaged over all their samples, each run kept under "runs" (seed, samples, accuracy, commit)."""
    sets = by_setting(points)
    if len(sets) > 1:
        raise ValueError(f"points of one setting (refine, inject_k, ...) only, got {[s for s, _ in sets]}")
    settings = sets[0][0] if sets else {}
    kinds = {(p.get("data", "ruler"), p.get("split")) for p in points}
    if len(kinds) > 1:
        raise ValueError(f"points of one kind of samples (data, split) only, got {sorted(kinds, key=str)}")
    tags = {"data": kinds.pop()[0]} if points else {}
    tags.update({"split": points[0]["split"]} if points and points[0].get("split") else {})
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["tokens"], p["subtask"], _mode(p)), []).append(p)
    pooled = []
    for (n, sub, mode), runs in groups.items():
        seeds = [r.get("seed", 42) for r in runs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{sub} @ {n}: two runs with seed {max(seeds, key=seeds.count)} measure the same samples")
        total = sum(r["samples"] for r in runs)
        mean = {key: sum(r[key] * r["samples"] for r in runs) / total
                for key in ("accuracy", "routing_recall", "named_recall", "seconds_per_sample")
                if all(key in r for r in runs)}
        pooled.append({"tokens": n, "subtask": sub, "interleave": mode, **tags, **settings,
                       "accuracy": round(mean["accuracy"], 2), "stderr": stderr(mean["accuracy"], total),
                       "samples": total, "routing_recall": round(mean["routing_recall"], 4),
                       "named_recall": round(mean["named_recall"], 4),
                       **({"seconds_per_sample": round(mean["seconds_per_sample"], 3)}
                          if "seconds_per_sample" in mean else {}),
                       **({"runs": [{k: r.get(k) for k in ("seed", "samples", "accuracy", "commit", "date")}
                                    for r in runs]}
                          if len(runs) > 1 else {k: runs[0][k] for k in ("seed", "commit", "date") if k in runs[0]})})
    return sorted(pooled, key=lambda p: (p["tokens"], SUBTASKS.index(p["subtask"])))


def _averages(points: list[dict]) -> dict:
    """{"averages", "stderrs"}: per memory size, the mean accuracy over its subtasks and its standard error."""
    avg = {str(n): average([p for p in points if p["tokens"] == n]) for n in sorted({p["tokens"] for p in points})}
    return {"averages": {n: a for n, (a, _) in avg.items()}, "stderrs": {n: e for n, (_, e) in avg.items()}}


def write_results(points: list[dict], model_name: str, out: Path, meta: dict | None = None,
                  compared: list[dict] | None = None) -> None:
    """niah.json = {model, gpu, date, commit, data, split, averages, stderrs, points} and a plot beside it (when
    matplotlib is installed); averages: per memory size, the mean accuracy over its subtasks, stderrs their standard
    errors (`average`). `meta`: gpu / date / commit of where the points were measured (default: this run)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tags = {"data": ",".join(sorted({p.get("data", "ruler") for p in points})),
            "split": ",".join(sorted({p["split"] for p in points if p.get("split")})) or None}
    out.write_text(json.dumps({"model": model_name, **(meta or run_meta()), **tags, **_averages(points),
                               "points": points, **({"compared": compared} if compared else {})}, indent=1) + "\n")
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for sub in sorted({p["subtask"] for p in points}):
        pts = sorted((p["tokens"], p["accuracy"]) for p in points if p["subtask"] == sub)
        ax.plot([t for t, _ in pts], [a for _, a in pts], marker="o", label=sub)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{'RULER NIAH' if tags['data'] == 'ruler' else 'NIAH, held-out haystack and wording'}, "
                 f"{model_name}")
    ax.legend(fontsize=7)
    save_figure(fig, out.with_suffix(".png"))


@dataclasses.dataclass(frozen=True)
class NiahRun:
    """One `eval niah` run's settings: what the command line parsed, and what a `--jobs` worker receives as a JSON
    file (`eval niah --worker FILE`) rather than a command line. `config`: RetrievalConfig.flat(); `compare`: more
    settings (parse_settings); `units`: the (memory size, subtask) pairs to answer (None: all); `sample_ids`: the
    samples of each stream to answer (None: all); `jobs`: worker processes (`run_jobs`); `pool` / `from_answers`:
    result files to pool / answer files to rebuild into `out` instead of measuring."""

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
    jobs: int = 1
    pool: list[str] | None = None
    from_answers: list[str] | None = None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> NiahRun:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: not an eval niah worker file (unknown keys {sorted(unknown)})")
        if data.get("units") is not None:
            data["units"] = [(int(n), s) for n, s in data["units"]]
        return cls(**data)


def run(config: NiahRun, load=load_model) -> None:
    """`eval niah`: pool result files, rebuild results from answer files, spread the run over `config.jobs` worker
    processes, or measure it in this process (`load(model, device, dtype)` -> (model, tokenizer))."""
    if config.pool:
        return pool_files(config.pool, Path(config.out))
    if config.from_answers:
        return from_answers(config.from_answers, Path(config.out))
    if config.jobs > 1:
        return run_jobs(config)
    measure(config, load)


def measure(run: NiahRun, load=load_model) -> None:
    """Measure `run` in this process: load the model, answer, write --out (after each point) and print the table."""
    from ..model.load import SHIPPED

    out = Path(run.out)
    model, tok = load(run.model, run.device, run.dtype)
    name = "MSA-SmolLM2 (shipped)" if run.model in (None, SHIPPED) else str(run.model)
    with answers_file(run.answers) as answers:
        points = evaluate(model, tok, run.tokens, run.subtasks, run.samples, seed=run.seed,
                          config=RetrievalConfig().replace(**run.config), priors=run.priors,
                          compare=run.compare, on_point=lambda pts: write_settings(pts, name, out), answers=answers,
                          name=name, only=set(run.sample_ids) if run.sample_ids else None,
                          units=set(map(tuple, run.units)) if run.units is not None else None,
                          data="heldout" if run.heldout else "ruler", split=run.split)
    print(f"{'tokens':>8} {'subtask':<16} {'setting':<24} {'accuracy':>14} {'routing recall':>14} {'named recall':>12}")
    base = setting_of(points[0])
    for p in points:
        print(f"{p['tokens']:>8} {p['subtask']:<16} {setting_label(setting_of(p), base):<24} "
              f"{p['accuracy']:>7} ± {p['stderr']:<4} {p['routing_recall']:>14} {p['named_recall']:>12}")
    print_averages(points)
    print(f"wrote {write_settings(points, name, out)}")


def print_averages(points: list[dict]) -> None:
    """Per memory size and setting: the mean accuracy over the subtasks, ± its standard error."""
    base = setting_of(points[0])
    for n, setting in dict.fromkeys((p["tokens"], tuple(setting_of(p).items())) for p in points):
        group = [p for p in points if p["tokens"] == n and tuple(setting_of(p).items()) == setting]
        print(f"{n:>8} {'average':<16} {setting_label(dict(setting), base):<24} "
              "{:>7} ± {:<4}".format(*average(group)))


def run_jobs(run: NiahRun) -> None:
    """`eval niah --jobs N`: the (memory size, subtask) units of `run` dealt round robin to N worker processes
    (`eval niah --worker FILE`, FILE: `run` with its share of the units, its own --answers and --out, as JSON; one
    GPU each, round robin, unless --device names one), then their answer lines merged into --answers and rebuilt
    into --out as `--from-answers` does. If a worker fails, every worker's answers so far stay in the work folder
    (named in the error) for `--from-answers`."""
    import shutil
    import tempfile

    from .jobs import run_workers, visible_gpus

    out = Path(run.out)
    units = [(n, s) for n in sorted(run.tokens, reverse=True) for s in run.subtasks]
    per_sample = 1 + len(run.compare)
    answers_per = {n: (len(run.sample_ids) if run.sample_ids else c) * per_sample
                   for n, c in zip(run.tokens, run.samples)}
    n = min(run.jobs, len(units))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{out.stem}-jobs-", dir=out.parent))
    answers = [work / f"answers{i}.jsonl" for i in range(n)]
    commands = []
    for i in range(n):
        settings = work / f"worker{i}.json"
        dataclasses.replace(run, units=units[i::n], answers=str(answers[i]), out=str(work / f"niah{i}.json"),
                            jobs=1).save(settings)
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
        with answers_file(run.answers) as f:
            for a in answers:
                f.write(a.read_text())
    from_answers([str(a) for a in answers], out)
    shutil.rmtree(work)


def write_settings(points: list[dict], name: str, out: Path, meta_of=None) -> Path:
    """One results file for every setting of the points: the first setting's results at its top level (as
    `write_results`), each other's under "compared" with the label of what it changes ("refine-0", "inject_k-8");
    `meta_of(setting)`: the machine / date / commit of that setting's points (default: this run's)."""
    sets = by_setting(points)
    meta = [meta_of(s) if meta_of else run_meta() for s, _ in sets]
    compared = [{"label": setting_label(s, sets[0][0]), **m, **_averages(pts), "points": pts}
                for (s, pts), m in zip(sets[1:], meta[1:])]
    write_results(sets[0][1], name, out, meta[0], compared)
    return out


def from_answers(files: list[str], out: Path) -> None:
    """Results files rebuilt from `eval niah --answers` files (plain or .gz) of one model: the points of runs cut
    short, several seeds pooled (`pool`), one file per setting, machine / date / commit as the lines record them."""
    records = [r for f in files for r in answer_lines(f)]
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
    print_averages(points)
    print(f"wrote {write_settings(points, models.pop(), out, meta_of)}")


def pool_files(files: list[str], out: Path) -> None:
    """Pool `eval niah` result files of one model and setting (runs with different seeds, machines or sizes) into
    one file; their compared settings are pooled too, each apart."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    models = {r["model"] for r in runs}
    if len(models) != 1:
        raise ValueError(f"--pool: results of one model only, got {sorted(models)}")
    def stamped(r: dict, points: list[dict]) -> list[dict]:
        return [{"commit": r["commit"], "date": r["date"], **p} for p in points]

    meta = {k: ",".join(sorted({r[k] for r in runs})) for k in ("gpu", "date", "commit")}
    main = [p for r in runs for p in stamped(r, r["points"])]
    compared = [p for r in runs for c in r.get("compared", []) for p in stamped(r, c["points"])]
    pooled = pool(main) + [p for _, pts in by_setting(compared) for p in pool(pts)]
    write_settings(pooled, models.pop(), out, lambda _: meta)
    for p in pooled:
        print(f"{p['tokens']:>8} {p['subtask']:<16} {p['accuracy']:>7} ± {p['stderr']:<4} {p['samples']:>4} samples")
    print_averages(pooled)
    print(f"wrote {out}")
