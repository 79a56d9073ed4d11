"""`memsparse train`: train an MSA model from a recipe."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> None:
    from ..train.trainer import Recipe, train

    recipe = Recipe.load(args.recipe)
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    train(recipe, out, device=args.device, max_steps=args.max_steps,
          max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)


def register(sub) -> None:
    t = sub.add_parser("train", help="train an MSA model from a recipe (recipes/*.toml)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("recipe", help="a recipe TOML file")
    t.add_argument("--out", help="run directory (default: runs/<recipe name>); an existing run resumes")
    t.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    t.add_argument("--max-steps", type=int, help="stop after this many steps (resumable)")
    t.add_argument("--max-minutes", type=float,
                   help="stop after the step that passes this many minutes, with checkpoint and delta (resumable)")
    t.set_defaults(func=cmd_train)
