"""Pure tensor functions: RoPE, chunk pooling, routing scores and top-k, document-masked attention; Triton kernels
for the GPU paths (`*_triton.py`, imported where used: Triton is optional)."""

import functools
import importlib.util
import os

import torch


@functools.cache
def has_triton() -> bool:
    """Whether Triton is installed (looked up once: routing asks in every router layer)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def pdl(device: torch.device) -> bool:
    """Whether Triton kernels on `device` use programmatic dependent launch (Hopper and later, not under the
    interpreter): a kernel starts loading its weights while the one before it finishes, and waits for it only
    before reading what it wrote."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return device.type == "cuda" and not interpret and torch.cuda.get_device_capability(device)[0] >= 9


_COUNTERS: dict[tuple[str, torch.device, int], torch.Tensor] = {}


def counters(user: str, device: torch.device, n: int) -> torch.Tensor:
    """n int32 counts for a kernel whose programs count themselves done (the last one merges the others' work and
    resets its count to zero): one buffer per user, device and size, never freed (CUDA graphs replay the calls
    that captured it). Calls of one user on one device must not run concurrently on several streams."""
    key = (user, device, n)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _COUNTERS[key]
