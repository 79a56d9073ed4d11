"""Run metadata for results files: the code's commit and the accelerator."""

from __future__ import annotations

import contextlib
import datetime
import functools
import gzip
import json
import os
import platform
import subprocess
import zlib
from pathlib import Path

import torch


def commit() -> str:
    """$MEMSPARSE_COMMIT (set where the tree travels without .git), else git's short HEAD as this process first read
    it (the CLI reads it at start): a run that outlasts a commit names the code it started with."""
    return os.environ.get("MEMSPARSE_COMMIT") or _git_head()


@functools.cache
def _git_head() -> str:
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        return subprocess.check_output(cmd, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path) -> None:
    """Lay out, write (PNG, 120 dpi) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_meta() -> dict:
    """{gpu, date, commit} of a results file."""
    return {"gpu": gpu_name(), "date": datetime.date.today().isoformat(), "commit": commit()}


def run_header(device: torch.device) -> dict:
    """Machine, device, date, commit and torch version of a benchmark run."""
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)")
    return {"machine": machine, "device": device.type, "date": datetime.date.today().isoformat(),
            "commit": commit(), "torch": torch.__version__}


def save_run(out: Path, key: str, run: dict) -> None:
    """Merge `run` into the JSON file's "runs" under `key`."""
    runs = json.loads(out.read_text()).get("runs", {}) if out.exists() else {}
    runs[key] = run
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


def load_model(path: str | None, device: str | None, dtype: str | None):
    """The (model, tokenizer) of an eval run's --model / --device / --dtype: `model.load.load_model` on cuda when
    available and the device's default dtype; what the eval modules' `run(config)` load with unless given a loader
    (the command line passes its own, with a status line)."""
    from ..model.checkpoint import default_dtype
    from ..model.load import load_model as load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(path, device, dtype or default_dtype(device))


def answers_file(path: str | None):
    """`--answers FILE` opened for writing text (its folder made; gzip-compressed if FILE ends in .gz, each flush
    readable at once), or a null context."""
    if not path:
        return contextlib.nullcontext()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return gzip.open(path, "wt") if str(path).endswith(".gz") else open(path, "w")


def answer_lines(path: str | Path) -> list[dict]:
    """The JSON lines of an answers file (plain or gzip, whatever its name), up to where a run cut short stopped."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip; a stream cut short decompresses as far as it goes
        raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw)
    lines = [line for line in raw.decode("utf-8", errors="replace").split("\n") if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:  # only the last line may be cut short
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return out
