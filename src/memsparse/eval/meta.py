"""Run metadata for results files: the code's commit and the accelerator."""

from __future__ import annotations

import datetime
import os
import subprocess

import torch


def commit() -> str:
    """$MEMSPARSE_COMMIT (set where the tree travels without .git), else git's short HEAD."""
    if os.environ.get("MEMSPARSE_COMMIT"):
        return os.environ["MEMSPARSE_COMMIT"]
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
