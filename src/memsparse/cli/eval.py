"""`memsparse eval`: RULER NIAH (one process, or --jobs worker processes), open-memory QA against RAG baselines,
NIAH and QA at scale, and multi-hop questions."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .. import cli
from . import _config, _config_args, _model_args, _priors_arg, results_path

if TYPE_CHECKING:
    from ..eval.multihop import MultihopRun
    from ..eval.niah import NiahRun
    from ..eval.qa import QaRun
    from ..eval.scale import ScaleRun


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
    from ..eval import multihop, niah, qa, scale

    if args.task == "qa":
        qa.run(_qa_run(args), cli._load_model)
    elif args.task == "scale":
        scale.run(_scale_run(args), cli._load_model)
    elif args.task == "multihop":
        multihop.run(_multihop_run(args), cli._load_model)
    elif args.worker:  # a --jobs worker: its settings from the parent's file, not from flags
        niah.run(niah.NiahRun.load(args.worker), cli._load_model)
    else:
        niah.run(_niah_run(args), cli._load_model)


def _niah_run(args: argparse.Namespace) -> NiahRun:
    """The NiahRun of `eval niah`'s flags, checked before any work."""
    from ..eval.niah import NiahRun, parse_settings, stream_seed
    from ..tasks.niah import SUBTASKS

    out = str(results_path(args.out, "niah.json"))
    if args.pool or args.from_answers:  # no measuring: only the files and --out
        return NiahRun(tokens=[], samples=[], subtasks=[], out=out, pool=args.pool.split(",") if args.pool else None,
                       from_answers=None if args.pool else args.from_answers.split(","))
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
    return NiahRun(tokens=sizes, samples=counts, subtasks=subtasks, out=out, seed=args.seed, split=args.split,
                   heldout=args.heldout, priors=args.priors, config=_config(args).flat(), compare=compare,
                   sample_ids=only, model=args.model, device=args.device, dtype=args.dtype, answers=args.answers,
                   jobs=args.jobs)


def _multihop_run(args: argparse.Namespace) -> MultihopRun:
    from ..eval.multihop import MultihopRun

    return MultihopRun(tokens=tuple(int(t) for t in args.tokens.split(",")), out=str(results_path(args.out,
                       "multihop.json")), samples=_count(args.samples),
                       router_rounds=tuple(int(r) for r in args.router_rounds.split(",")), retrieval=_config(args),
                       model=args.model, device=args.device, dtype=args.dtype)


def _scale_run(args: argparse.Namespace) -> ScaleRun:
    from ..eval.scale import ScaleRun

    return ScaleRun(tokens=tuple(int(t) for t in args.tokens.split(",")),
                    out=str(results_path(args.out, "scale_quality.json")), samples=_count(args.samples),
                    questions=args.questions, split=args.split, bank_cache=args.bank_cache, fp8_at=args.fp8_at,
                    tasks=tuple(t for t in args.scale_tasks.split(",") if t),
                    key_dtypes=tuple(args.key_dtypes.split(",")), model=args.model, device=args.device,
                    dtype=args.dtype)


def _qa_run(args: argparse.Namespace) -> QaRun:
    from ..eval.qa import QaRun

    return QaRun(out=str(results_path(args.out, f"qa_{args.split}.json")), split=args.split,
                 samples=_count(args.samples) if args.samples else None, systems=tuple(args.systems.split(",")),
                 retrieval=_config(args), priors=args.priors, answers=args.answers, model=args.model,
                 device=args.device, dtype=args.dtype)


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
                        "refine_margin=1,inject_k=8': ';' between settings, ',' between keys); their results go "
                        "into --out too, under \"compared\", each labelled by what it changes ('refine-0')")
    v.add_argument("--answers", metavar="FILE",
                   help="niah / qa: write every sample (question, expected and given answer, score, the gold and the "
                        "named or injected documents) to FILE as JSON lines")
    _config_args(v, skip=("router_rounds",))  # eval's --router-rounds: multihop's list of counts
    _priors_arg(v)
    v.add_argument("--out", help="default: memsparse-results/niah.json (multihop.json, scale_quality.json, "
                                 "qa_<split>.json) under the working directory")
    _model_args(v, "the shipped MSA-SmolLM2")
    v.set_defaults(func=cmd_eval)
