"""Routing over a memory bank and prefill of the active tokens (stage 2)."""

from .engine import MSAEngine
from .prefill import PrefillResult, prefill

__all__ = ["MSAEngine", "PrefillResult", "prefill"]
