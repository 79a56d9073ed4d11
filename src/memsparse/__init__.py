"""memsparse: Memory Sparse Attention (MSA), a trainable sparse memory over very large corpora."""

from .engine import MSAEngine, RefineConfig, RetrievalConfig
from .memory import MemoryBank
from .model import DecoderConfig, MSAConfig, MSAForCausalLM, MSAOutput

__version__ = "0.1.0"


def load_tokenizer(path):
    """A HF tokenizer from a tokenizer directory or a .gguf file."""
    from .model.tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["DecoderConfig", "MSAConfig", "MSAEngine", "MSAForCausalLM", "MSAOutput", "MemoryBank", "RefineConfig",
           "RetrievalConfig", "load_tokenizer"]
