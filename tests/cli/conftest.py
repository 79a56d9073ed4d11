"""What the command-line tests share: a tiny model and tokenizer saved as a checkpoint directory."""

import pytest

from ..conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2}, vocab_size=300).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d
