"""The decoder family, the Memory Sparse Attention layer, losses, and checkpoint loading / conversion."""

from .config import DecoderConfig, MSAConfig
from .decoder import MSAForCausalLM, MSAOutput

__all__ = ["DecoderConfig", "MSAConfig", "MSAForCausalLM", "MSAOutput"]
