"""`memsparse eval TASK`: RULER NIAH (one process, or --jobs worker processes), open-memory QA against RAG baselines,
NIAH and QA at scale, and multi-hop questions; one subcommand per task, each with only its own flags."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .. import cli
from . import RESULTS, _config, _config_args, _model_args, _priors_arg, examples, results_path

if TYPE_CHECKING:
    from ..eval.multihop import MultihopRun
    from ..eval.niah import NiahRun
    from ..eval.qa import QaRun
    from ..eval.scale import ScaleRun


def cmd_eval(args: argparse.Namespace) -> None:
    """Run `eval TASK` with the settings its flags give (`args.settings`: the task's `_*_run`)."""
    from ..eval import multihop, niah, qa, scale

    run = {"niah": niah.run, "qa": qa.run, "scale": scale.run, "multihop": multihop.run}[args.task]
    run(args.settings(args), cli._load_model)


def _niah_run(args: argparse.Namespace) -> NiahRun:
    """The NiahRun of `eval niah`'s flags, checked before any work (a --jobs worker's: the parent's, from its file)."""
    from ..eval.niah import NiahRun, parse_settings, stream_seed
    from ..tasks.niah import SUBTASKS

    if args.worker:
        return NiahRun.load(args.worker)
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: expected a count >= 1")
    out = _out(args)
    if args.pool or args.from_answers:  # no measuring: only the files and --out
        return NiahRun(tokens=[], samples=[], subtasks=[], out=out, pool=args.pool.split(",") if args.pool else None,
                       from_answers=None if args.pool else args.from_answers.split(","))
    subtasks = args.subtasks.split(",") if args.subtasks else list(SUBTASKS)
    unknown = set(subtasks) - set(SUBTASKS)
    if unknown:
        raise ValueError(f"unknown subtasks {sorted(unknown)}; choose from {', '.join(SUBTASKS)}")
    stream_seed(args.seed, args.split)  # a seed outside the split's range: the error before any work
    sizes = _ints(args.tokens)
    counts = _ints(args.samples)
    counts = counts * len(sizes) if len(counts) == 1 else counts  # per size (evaluate refuses a count mismatch)
    compare = parse_settings(args.compare or "")
    only = sorted(set(_ints(args.sample_ids))) if args.sample_ids else None
    if only and max(only) >= max(counts):
        raise ValueError(f"--sample-ids {args.sample_ids}: every id must be below --samples {args.samples}")
    return NiahRun(tokens=sizes, samples=counts, subtasks=subtasks, out=out, seed=args.seed, split=args.split,
                   heldout=args.heldout, priors=args.priors, config=_config(args).flat(), compare=compare,
                   sample_ids=only, model=args.model, device=args.device, dtype=args.dtype, answers=args.answers,
                   jobs=args.jobs)


def _qa_run(args: argparse.Namespace) -> QaRun:
    from ..eval.qa import QaRun

    return QaRun(out=_out(args), split=args.split, samples=args.samples, skip=args.skip,
                 systems=tuple(args.systems.split(",")),
                 retrieval=_config(args), priors=args.priors, answers=args.answers, model=args.model,
                 device=args.device, dtype=args.dtype)


def _scale_run(args: argparse.Namespace) -> ScaleRun:
    from ..eval.scale import ScaleRun

    return ScaleRun(tokens=tuple(_ints(args.tokens)), out=_out(args), samples=args.samples, questions=args.questions,
                    split=args.split, bank_cache=args.bank_cache, fp8_at=args.fp8_at,
                    tasks=tuple(t for t in args.scale_tasks.split(",") if t),
                    key_dtypes=tuple(args.key_dtypes.split(",")), model=args.model, device=args.device,
                    dtype=args.dtype)


def _multihop_run(args: argparse.Namespace) -> MultihopRun:
    from ..eval.multihop import MultihopRun

    return MultihopRun(tokens=tuple(_ints(args.tokens)), out=_out(args), samples=args.samples,
                       router_rounds=tuple(_ints(args.router_rounds)), retrieval=_config(args), model=args.model,
                       device=args.device, dtype=args.dtype)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _count(text: str) -> int:
    """A --samples count (argparse refuses anything else)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected one count, got {text!r}")
    return int(text)


def _out(args: argparse.Namespace) -> str:
    """--out, else RESULTS/the task's file name ('qa_{split}.json': --split's)."""
    return str(results_path(args.out, args.out_name.format(**vars(args))))


def _common_args(p: argparse.ArgumentParser, name: str) -> None:
    """Every task's --out (default RESULTS/name, '{split}': --split's) and model flags."""
    p.add_argument("--out", help=f"the results file (default: {RESULTS / name.format(split='<split>')} under the "
                                 "working directory)")
    p.set_defaults(out_name=name)
    _model_args(p, "the shipped MSA-SmolLM2")


def _tokens_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="32768",
                   help="memory sizes, comma separated (e.g. 32768,131072,1048576; default: %(default)s)")


def _split_arg(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    p.add_argument("--split", choices=["dev", "test"], default=default,
                   help=f"choose settings on dev, report on test: {help}")


def _answering_args(p: argparse.ArgumentParser, name: str) -> None:
    """The flags of a task that answers through the engine (niah, qa): --answers, retrieval, priors, --out, model."""
    p.add_argument("--answers", metavar="FILE",
                   help="write every sample (question, expected and given answer, score, the gold and the named or "
                        "injected documents) to FILE as JSON lines (.gz: gzip)")
    _config_args(p)
    _priors_arg(p)
    _common_args(p, name)


class _TaskParser(argparse.ArgumentParser):
    """A task's parser: a flag it does not take (another task's) is refused with its usage, not the top level's."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace, extra


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    v = sub.add_parser("eval", help="evaluate a model: RULER NIAH, open-memory QA against RAG baselines, both at "
                                    "scale, multi-hop questions", formatter_class=fmt)
    tasks = v.add_subparsers(dest="task", required=True, metavar="TASK", parser_class=_TaskParser)

    def task(name: str, summary: str, settings) -> argparse.ArgumentParser:
        t = tasks.add_parser(name, help=summary, description=summary, epilog=examples(f"eval {name}"),
                             formatter_class=fmt)
        t.set_defaults(func=cmd_eval, settings=settings)
        return t

    n = task("niah", "RULER needle-in-a-haystack: the 8 subtasks at each memory size (or held-out ones)", _niah_run)
    _tokens_arg(n)
    n.add_argument("--samples", default="100",
                   help="samples per subtask: one count, or one per --tokens size (100,50,10; default: %(default)s)")
    n.add_argument("--subtasks", help="comma list (default: all 8)")
    n.add_argument("--seed", type=int, default=42,
                   help="seed of the sample streams (runs with different seeds draw disjoint samples to pool; "
                        "default: %(default)s)")
    _split_arg(n, None, "the development or test range of seeds (disjoint: --seed S draws stream S or 1000000 + S; "
                        "default: --seed as is)")
    n.add_argument("--heldout", action="store_true",
                   help="the 8 subtasks on the unseen haystack (Debian fortunes) with held-out needle, question and "
                        "key/value wording that training never sees (tasks/heldout.py), instead of RULER as published")
    n.add_argument("--sample-ids", metavar="I,J,...",
                   help="answer only these samples of each subtask's stream (0-based, below --samples), to re-run "
                        "chosen samples of an earlier run with another setting")
    n.add_argument("--compare", metavar="SETTINGS",
                   help="also answer every sample with these settings, on the same banks ('refine=0;"
                        "refine_margin=1,inject_k=8': ';' between settings, ',' between keys); their results go into "
                        "--out too, under \"compared\", each labelled by what it changes ('refine-0')")
    n.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="spread the (memory size, subtask) pairs over N worker processes, one GPU each (round robin "
                        "over the visible GPUs; several per GPU overlap sample drawing with the GPU's work; on a CPU "
                        "they share its cores)")
    n.add_argument("--worker", metavar="FILE", help=argparse.SUPPRESS)  # a --jobs worker's settings (NiahRun JSON)
    n.add_argument("--pool", metavar="FILES", help="pool these result files (comma list) into --out instead of "
                                                   "measuring")
    n.add_argument("--from-answers", metavar="FILES",
                   help="rebuild results from --answers files (comma list, .gz too; runs cut short, seeds pooled) "
                        "into --out instead of measuring")
    _answering_args(n, "niah.json")

    q = task("qa", "open-memory QA over the Debian documentation FAQs against RAG baselines and 8K context", _qa_run)
    _split_arg(q, "test", "the questions' split (default: %(default)s)")
    q.add_argument("--samples", type=_count, help="questions (default: all of --split)")
    q.add_argument("--skip", type=_count, default=0,
                   help="questions of the split's fixed order passed over first, to answer a split in parts: "
                        "--skip 190 --samples 192 are the questions after the first 190 (default: %(default)s)")
    q.add_argument("--systems", default="memsparse,rag1-msa,rag1,rag4,full",
                   help="memsparse, ragK (MiniLM + FAISS top-K into plain SmolLM2), ragK-msa (the same K passages "
                        "injected into the MSA model), full (8K context) (default: %(default)s)")
    _answering_args(q, "qa_{split}.json")

    s = task("scale", "NIAH and the FAQ QA with 1M-100M tokens of distractors in one shared bank", _scale_run)
    _tokens_arg(s)
    s.add_argument("--samples", type=_count, default=100, help="NIAH samples per subtask (default: %(default)s)")
    s.add_argument("--questions", type=int, default=200, help="QA questions of --split (default: %(default)s)")
    _split_arg(s, "test", "the QA questions' split (default: %(default)s)")
    s.add_argument("--bank-cache", metavar="DIR", help="directory to save / reuse the distractor bank")
    s.add_argument("--fp8-at", type=int, metavar="TOKENS", help="also measure fp8 routing keys at this size")
    s.add_argument("--scale-tasks", default="niah,qa",
                   help="tasks ('' only builds the distractor bank; default: %(default)s)")
    s.add_argument("--key-dtypes", default="bf16,fp8",
                   help="routing-key dtypes to measure (fp8: at --fp8-at; default: %(default)s)")
    _common_args(s, "scale_quality.json")  # no retrieval flags: scale's settings are its own

    m = task("multihop", "two-hop chains answered with 1, 2, ... rounds of router injection", _multihop_run)
    _tokens_arg(m)
    m.add_argument("--samples", type=_count, default=100, help="samples per memory size (default: %(default)s)")
    m.add_argument("--router-rounds", default="1,2",
                   help="rounds of router injection to compare, comma separated (default: %(default)s)")
    _config_args(m, skip=("router_rounds",))  # the other retrieval settings
    _common_args(m, "multihop.json")
