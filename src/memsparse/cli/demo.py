"""`memsparse demo`: the shipped MSA-SmolLM2 answering questions from a memory."""

from __future__ import annotations

import argparse

from . import _dtype_arg, _priors_arg


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import FAQ_DOCS, run

    run(corpus=args.corpus, questions=args.question, n_docs=FAQ_DOCS if args.docs is None else args.docs,
        device=args.device, dtype=args.dtype, priors=args.priors, inject_k=args.inject_k)


def register(sub) -> None:
    from ..demo import DEMO_PRIORS

    m = sub.add_parser("demo", help="the shipped MSA-SmolLM2 answering questions from a memory (CPU, minutes)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--corpus", help="your own corpus (JSONL, a directory of .txt/.md, or one document per line)")
    m.add_argument("--question", action="append", help="a question (repeatable)")
    m.add_argument("--docs", type=int, help="documents in the default FAQ memory (default 300)")
    m.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    m.add_argument("--inject-k", type=int,
                   help="documents injected per question (default: 4; 1 in the FAQ memory, where one reads best)")
    _dtype_arg(m)
    _priors_arg(m, default=DEMO_PRIORS)  # deliberately unlike encode / eval (see _priors_arg)
    m.set_defaults(func=cmd_demo)
