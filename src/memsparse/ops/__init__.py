"""Pure tensor functions: RoPE, chunk pooling, routing scores and top-k, document-masked attention; Triton kernels
for the GPU paths (`*_triton.py`, imported where used: Triton is optional)."""

import functools
import importlib.util


@functools.cache
def has_triton() -> bool:
    """Whether Triton is installed (looked up once: routing asks in every router layer)."""
    return importlib.util.find_spec("triton") is not None
