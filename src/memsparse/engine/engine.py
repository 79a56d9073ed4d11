"""MSAEngine: questions over a memory bank in the official prompt protocol (routing for now; generation and
Memory Interleave: issue 3)."""

from __future__ import annotations

from ..memory.bank import MemoryBank
from .prefill import prefill

QUESTION_HEAD = "\nPlease answer the question based on the above historical document information\n\n"
QUESTION_TAIL = "\nPlease return all documents related to the question\n"
TEMPLATE_TAIL = "<|im_end|>\n"
RESPONSE_HEAD = "<|im_start|>"


class MSAEngine:
    """`similarity`: 'official' (the release's engine: cosine only for INFONCE), 'train' (as trained:
    cosine for every InfoNCE-family loss), 'cosine' or 'dot'."""

    def __init__(self, model, tok, bank: MemoryBank, similarity: str = "official"):
        if bank.model is not model:
            raise ValueError("the memory bank was encoded by another model instance")
        self.model, self.tok, self.bank, self.similarity = model, tok, bank, similarity

    def encode_question(self, question: str) -> tuple[list[int], list[bool]]:
        """Active tokens after the template prefix and their routing mask: the question block (routing
        tokens; its text is plain text, never control tokens), the template tail, the response head."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question must be a non-empty string")
        tok = self.tok
        body = tok(QUESTION_HEAD + question + QUESTION_TAIL, add_special_tokens=False,
                   split_special_tokens=True)["input_ids"]
        tail = tok(TEMPLATE_TAIL + RESPONSE_HEAD, add_special_tokens=False)["input_ids"]
        return body + tail, [True] * len(body) + [False] * len(tail)

    def route(self, question: str) -> dict[int, list[tuple[int, float]]]:
        """Per router layer the selected (doc id, score) list, best first."""
        ids, mask = self.encode_question(question)
        return prefill(self.bank, ids, mask, similarity=self.similarity).routing
