"""Routing, prefill, decoding and Memory Interleave over a memory bank (stages 2 and 3)."""

from .config import RefineConfig, RetrievalConfig
from .engine import Answer, MSAEngine, Question
from .generate import Sampling
from .prefill import prefill, prefill_batch

__all__ = ["Answer", "MSAEngine", "Question", "RefineConfig", "RetrievalConfig", "Sampling", "prefill",
           "prefill_batch"]
