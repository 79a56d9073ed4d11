"""Evaluation spread over worker processes (`memsparse eval niah --jobs N`): each worker runs the parent's settings
for its share of the work (`eval niah --worker FILE`, the settings as JSON: eval/niah.py's NiahRun), on one GPU
(round robin over the visible ones) or the CPU, writing its own answer lines; the parent shows one progress bar over
all of them and reports a worker that failed with the tail of its log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


def visible_gpus() -> list[str]:
    """The GPUs a worker may be pinned to (CUDA_VISIBLE_DEVICES entries, or every device), without initializing CUDA
    in this process (the workers do)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def run_workers(commands: list[list[str]], answers: list[Path], logs: list[Path], total: int,
                gpus: list[str], poll: float = 2.0) -> None:
    """Run `commands` (argument lists after `python -m memsparse.cli`) at once, worker i on gpus[i % len(gpus)] (none:
    as they are), output to logs[i]; the bar counts the lines of `answers` against `total`. Raises RuntimeError naming
    every worker that failed, with the end of its log."""
    procs = []
    for i, (cmd, log) in enumerate(zip(commands, logs)):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "memsparse.cli", *cmd], stdout=out,
                                          stderr=subprocess.STDOUT, env=env))
    bar = tqdm(total=total, unit="answer", desc=f"{len(procs)} workers")
    try:
        while True:
            done = all(p.poll() is not None for p in procs)
            bar.update(sum(map(_lines, answers)) - bar.n)
            if done:
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        bar.close()
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    if failed:
        tails = "\n".join(f"worker {i} (exit {rc}, log {logs[i]}):\n  " + "\n  ".join(
            logs[i].read_text(errors="replace").splitlines()[-8:]) for i, rc in failed)
        raise RuntimeError(f"{len(failed)} of {len(procs)} workers failed:\n{tails}")
