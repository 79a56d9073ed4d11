"""The `memsparse` command line: `main`, `build_parser` (each command group in a module of its own:
bank, serve, demo, eval, train, bench, convert, registering its subcommands) and the helpers they share."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from .. import ranks
from ..model.load import SHIPPED

_EXAMPLES = """
  memsparse demo
  memsparse demo --corpus notes.txt --question "Who wrote the design memo?"
  memsparse encode notes.jsonl --out ./notes.bank                      # the shipped MSA-SmolLM2
  memsparse encode ./docs/ --model runs/smollm2/delta --out ./docs.bank --device cuda
  memsparse ask ./notes.bank "Who wrote the design memo?" --json
  torchrun --nproc_per_node 4 -m memsparse.cli encode notes.jsonl --out ./notes.4.bank   # one memory over 4 ranks
  torchrun --nproc_per_node 4 -m memsparse.cli ask ./notes.4.bank "Who wrote the design memo?"
  memsparse docs add ./notes.bank more.jsonl
  memsparse docs delete ./notes.bank 3 17
  memsparse docs list ./notes.bank
  memsparse docs compact ./notes.bank                                  # drop deleted documents' data
  memsparse docs verify ./notes.bank                                   # checksums, shapes, values, texts
  memsparse info ./notes.bank
  memsparse serve ./notes.bank --port 8080
  curl localhost:8080/v1/completions -H 'Content-Type: application/json' -d '{"model": "memsparse", "prompt": "Who?"}'
  memsparse train recipes/smollm2-msa.toml --out runs/smollm2
  memsparse bench speed --world-size 2 --tiny --tokens 65536                  # Memory Parallel, 2 ranks
  memsparse eval niah --model runs/smollm2/delta --tokens 32768,131072 --samples 100
  memsparse eval niah --pool a.json,b.json --out niah.json          # runs with different --seed, pooled
  memsparse eval niah --tokens 1048576 --jobs 8                     # 8 worker processes over the visible GPUs
  memsparse eval niah --heldout --split test --tokens 131072        # unseen haystack and wording, test seeds
  memsparse eval qa --split test --systems memsparse,rag1,rag1-msa,rag4,full   # the Debian FAQs, test split
  memsparse eval scale --tokens 1048576,10485760,104857600 --bank-cache /tmp/distr --fp8-at 104857600
  memsparse eval multihop --model runs/x/delta --tokens 16384 --router-rounds 1,2   # two-hop chains
  memsparse bench serve --tokens 104857600                          # an H100: batch 1 vs 8, 1 vs 8 clients at 100M
  memsparse bench serve --tiny --tokens 65536 --out /tmp/serve.json # a CPU smoke test (timings mean nothing)
  memsparse convert ~/models/Qwen3-4B ./msa-qwen3-4b --router-layers upper --top-k 16 --chunk-size 64
  memsparse convert SmolLM2-135M-Instruct.Q4_1.gguf ./msa-smollm2 --router-layers 15-29 --dtype bfloat16
  memsparse convert ./plain-llama ./msa-llama --msa head_reduce_method=max --msa aux_loss_method=INFONCE
""".strip("\n").splitlines()


EXAMPLES = "examples:\n" + "\n".join(_EXAMPLES) + "\n"  # the top-level help's: every command's


RESULTS = Path("memsparse-results")  # where eval and bench write without --out: under the working directory


def results_path(out: str | None, name: str) -> Path:
    """--out, else RESULTS/name (the project's own figures go to benchmarks/results/ only when --out names it)."""
    return Path(out) if out else RESULTS / name


def examples(command: str) -> str | None:
    """A (sub)command's help epilog ('eval', 'eval niah'): its own lines of EXAMPLES (the curl line goes with serve),
    or None."""
    own = [line for n, line in enumerate(_EXAMPLES) if _runs(line, command)
           or (command == "serve" and line.startswith("  curl") and _runs(_EXAMPLES[n - 1], "serve"))]
    return "examples:\n" + "\n".join(own) + "\n" if own else None


def _runs(line: str, command: str) -> bool:
    """Whether an example runs `command` ('memsparse CMD ...', 'torchrun ... -m memsparse.cli CMD ...')."""
    words, cmd = line.split(), command.split()
    start = words.index("memsparse.cli") + 1 if "memsparse.cli" in words else 1
    return words[start:start + len(cmd)] == cmd


def version() -> str:
    """The installed distribution's version, else the package's __version__."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("memsparse")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def _load_model(path: str | None, device: str | None, dtype: str | None):
    """`model.load.load_model` (the shipped MSA-SmolLM2 for 'shipped' or None, a trained delta directory, or an MSA
    checkpoint directory / .gguf) with a status line at a terminal."""
    import torch

    from ..model.checkpoint import default_dtype
    from ..model.load import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    with _status(f"loading the model ({path or SHIPPED}, {device}, {dtype})"):
        return load_model(path, device, dtype)


def _tty() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def _status(what: str):
    """'what ...' on stderr, then how long it took, at a terminal only (nothing in logs or pipes)."""
    tty = _tty()
    if tty:
        print(f"{what} ...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if tty:
            print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


class _Removed(argparse.Action):
    """A flag of a removed option: refused in one line, saying why."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..engine.config import REMOVED

        parser.error(f"{option_string} was removed: {REMOVED[self.dest]}")


def _config_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per RetrievalConfig setting (name, type, default, choices and help from its field); the removed
    options' flags are refused with the reason."""
    from ..engine import config

    keys = [config.key_of(f) for f in config.fields() if config.key_of(f) not in skip]
    p.set_defaults(config_keys=keys)
    for f in config.fields():
        key = config.key_of(f)
        if key not in keys:
            continue
        m, flag = f.metadata, "--" + key.replace("_", "-")
        kw = {"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) else \
            {"type": type(f.default), "choices": m["choices"], "metavar": m["metavar"]}
        p.add_argument(flag, dest=key, default=f.default, help=f"{m['help']} (default: %(default)s)", **kw)
    for key in config.REMOVED:
        p.add_argument("--" + key.replace("_", "-"), dest=key, action=_Removed, nargs="?", help=argparse.SUPPRESS)


def _config(args: argparse.Namespace):
    """The RetrievalConfig of _config_args' flags."""
    from ..engine import RetrievalConfig

    return RetrievalConfig().replace(**{k: getattr(args, k) for k in args.config_keys})


def _priors_arg(p: argparse.ArgumentParser, default: int = 0) -> None:
    from ..engine.calibrate import PRIOR_SENTENCES

    why = (f"default {default}: the demo's memories are real text; not for its needle memory" if default else
           f"default 0, as published: priors hurt needle search; for questions over real text try {PRIOR_SENTENCES}, "
           "the demo's setting")
    p.add_argument("--priors", type=int, default=default, metavar="N",
                   help="document priors: subtract from each document's routing score its mean score over N "
                        "sentences of the memory, so hub documents stop crowding out the others; helps open "
                        "questions over real text, hurts needle search (docs/msa-smollm2.md, 'Document priors'). "
                        f"encode saves them with the bank, the others compute them per memory; minutes on a CPU. "
                        f"0: off ({why})")


def _wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=float, default=600.0, metavar="SECONDS",
                   help="how long to wait for another process writing the bank before giving up (default: 600)")


def _model_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--model", help=f"'shipped', a trained delta directory, or an MSA checkpoint directory / .gguf "
                                   f"(default: {default})")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    _dtype_arg(p)


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPUs and on CPUs with native bfloat16 (AMX, AVX512-BF16), else float32")


def build_parser() -> argparse.ArgumentParser:
    """The `memsparse` parser: each command group's module registers its subcommands (in the order of the help)."""
    from . import bank, bench, convert, demo, eval, serve, train

    p = argparse.ArgumentParser(
        prog="memsparse", description="Memory Sparse Attention: models with a sparse memory over large corpora.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for register in (convert.register, bank.register, serve.register, demo.register, eval.register, train.register,
                     bench.register, bank.register_checks):
        register(sub)
    for name, parser in sub.choices.items():  # each command's own examples; all of them in the top-level help
        parser.epilog = examples(name)
    return p


ONE_PROCESS = ("convert", "demo", "eval", "train")  # commands that do not run under a distributed launch


@contextlib.contextmanager
def _quiet():
    """stdout and stderr to /dev/null (the ranks > 0 of a launch)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def main(argv: list[str] | None = None) -> int:
    """Run a command. Under a distributed launch (torchrun: WORLD_SIZE > 1) every rank runs it; only rank 0
    prints, other ranks print their errors only (tagged with their rank)."""
    from ..resources import ResourceUnavailable

    args = build_parser().parse_args(argv)
    rank, err = ranks.rank(), sys.stderr
    who = f"memsparse {args.command}" + (f" (rank {rank})" if rank else "")
    if ranks.launched() and args.command in ONE_PROCESS:
        print(f"{who}: error: runs in one process, not under torchrun", file=err)
        return 2
    from ..eval.meta import commit

    commit()  # the code's commit as the run starts, for the results it writes at its end
    try:
        with _quiet() if rank else contextlib.nullcontext():
            args.func(args)
    except KeyError as e:  # an unknown document id
        print(f"{who}: error: {e.args[0]}", file=err)
        return 2
    except (ValueError, FileNotFoundError, OSError, ResourceUnavailable) as e:
        print(f"{who}: error: {e}", file=err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
