"""The official prompt protocol in tokens, shared by the engine and by training-sample builders.

Prompt (after the template prefix `<|im_start|>user\\n` and the memory): the question block (routing tokens)
`\\nPlease answer the question based on the above historical document information\\n\\n{q}\\nPlease return all
documents related to the question\\n`, then `<|im_end|>\\n<|im_start|>`. In a retrieval round the model names
documents (`[4][7]<|object_ref_end|>`); the engine injects `[4]. {text}\\n[7]. {text}\\n<|object_ref_end|>` and
runs a new round whose routing tokens are the question block and the injected block. When the model writes
`<End-of-Retrieve>` the engine injects `<|im_start|>The user's question is: {q}\\n<|object_ref_end|>` and the
model answers; the answer is the text after `The answer to the question is:`. Question and document text is
always tokenized as plain text (special-token strings inside it are ordinary text).
"""

from __future__ import annotations

QUESTION_HEAD = "\nPlease answer the question based on the above historical document information\n\n"
QUESTION_TAIL = "\nPlease return all documents related to the question\n"
TEMPLATE_TAIL = "<|im_end|>\n"
RESPONSE_HEAD = "<|im_start|>"
ROUND_END = "<|object_ref_end|>"
END_OF_RETRIEVE = "<End-of-Retrieve>"
RESTATEMENT = "The user's question is: {question}\n"
ANSWER_MARKER = "The answer to the question is:"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


class Protocol:
    """Token ids of the protocol's pieces for one tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        vocab = tok.get_vocab()
        self.stop_ids = {vocab[t] for t in STOP_TOKENS if t in vocab}
        if tok.eos_token_id is not None:
            self.stop_ids.add(tok.eos_token_id)
        self.round_end = vocab.get(ROUND_END)  # None: the tokenizer cannot run Memory Interleave

    def text(self, s: str) -> list[int]:
        """Plain text: special-token strings inside it are ordinary text."""
        return self.tok(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def special(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False)["input_ids"]

    def question(self, question: str) -> tuple[list[int], list[bool]]:
        """Active tokens after the template prefix and their routing mask: the question block (routing
        tokens), the template tail, the response head."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question must be a non-empty string")
        body = self.text(QUESTION_HEAD + question + QUESTION_TAIL)
        tail = self.special(TEMPLATE_TAIL + RESPONSE_HEAD)
        return body + tail, [True] * len(body) + [False] * len(tail)

    def naming(self, doc_ids: list[int]) -> list[int]:
        """What the model writes to ask for documents: `[4][7]<|object_ref_end|>`."""
        return self.text("".join(f"[{d}]" for d in doc_ids)) + [self.round_end]

    def injection(self, docs: list[tuple[int, str]]) -> list[int]:
        """`[n]. {text}\\n` for each (id, text), then the round-end token."""
        text = "".join(f"[{d}]. {t}\n" for d, t in docs)
        return (self.text(text) if text else []) + [self.round_end]

    @staticmethod
    def injected_route(block: int, length: int, inject: int) -> list[bool]:
        """Routing mask of `length` active tokens followed by an injection of `inject` tokens: the question
        block (its first `block` tokens) and the injected text route; its closing round-end token does not."""
        return [True] * block + [False] * (length - block) + [True] * (inject - 1) + [False]

    def end_of_retrieve(self) -> list[int]:
        return self.text(END_OF_RETRIEVE)

    def restatement(self, question: str) -> list[int]:
        return self.special(RESPONSE_HEAD) + self.text(RESTATEMENT.format(question=question)) + [self.round_end]

    def answer(self, answer: str) -> list[int]:
        """The final response: `The answer to the question is: {answer}<|im_end|>`."""
        return self.text(f"{ANSWER_MARKER} {answer}") + self.special("<|im_end|>")
