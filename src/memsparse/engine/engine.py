"""MSAEngine: questions over a memory bank in the official prompt protocol (protocol.py), with Memory
Interleave. Only ids in the model's own output are parsed; document and question text is plain text."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from ..memory.bank import MemoryBank
from ..memory.encode import render_documents
from .calibrate import PRIOR_SENTENCES
from .config import RetrievalConfig
from .generate import Entry, Sampling, generate, generate_continuous
from .prefill import prefill_batch
from .protocol import ANSWER_MARKER, END_OF_RETRIEVE, ROUND_END, Protocol
from .routing import Routing, cut_drop, fused_top, fusing, joint_routing

_ID = re.compile(r"\[(\d+)\]")


def refine_routing(bank: MemoryBank, tok, tokens: list[int], route: list[bool], docs: list[int], texts: list[str],
                   chunk: int, similarity: str, depth: int = 0) -> Routing:
    """The routing of one question (active `tokens`, routing mask `route`) over `docs` only, their `texts`
    re-encoded in a fresh bank like `bank` with keys pooled over `chunk` tokens instead of the bank's P: a needle
    sentence is a small part of a P-token chunk mean, a larger part of a finer one. `depth`: per layer, that many
    documents (0: the bank's top-k)."""
    if not docs:
        return {}
    fine = bank.like(chunk_size=chunk, key_dtype="model", content_dtype="model")
    fine.add_tokens(render_documents(tok, docs, texts), texts=texts)  # ids 0..n-1 = docs' positions
    res = prefill_batch(fine, [tokens], [route], similarity=similarity, route_only=True, depth=depth)
    return {layer: [(docs[i], score) for i, score in picked] for layer, picked in res.memory.routing[0].items()}


class Cancelled(RuntimeError):
    """An answer stopped part-way because its `cancel` event was set."""


@dataclass
class Answer:
    question: str
    text: str  # the answer (after the answer marker when the model wrote one)
    rounds: list[list[int]]  # document ids named (and injected) in each retrieval round
    routing: Routing  # the first round's routing, as route()
    round_routing: list[Routing]  # the routing of every round
    transcript: str  # everything after the prompt: generated and injected text
    finish: str  # 'stop' (a stop token), 'length' (max_new_tokens reached) or 'cancelled' (its `cancel` event)
    # seconds per stage (of the batch), decode_tokens. "route" (scoring and top-k) and "gather" are parts of
    # "prefill"; "refine" (router mode: re-encoding the shortlist with finer keys) is a stage of its own, outside both
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["routing"] = {str(k): v for k, v in self.routing.items()}
        d["round_routing"] = [{str(k): v for k, v in r.items()} for r in self.round_routing]
        return d


@dataclass
class Question:
    """A question for `MSAEngine.ask_continuous`: `done(answer)` receives its answer, `on_text(text)` (optional)
    each new piece of its answer text as it is decoded; a set `cancel` ends it at its next token."""

    question: str
    done: Callable[[Answer], None]
    budget: int = 256  # max_new_tokens
    cancel: threading.Event | None = None
    on_text: Callable[[str], None] | None = None


@dataclass
class _Row:
    """One question's state across rounds."""

    question: str
    tokens: list[int]  # active tokens so far (prompt, generated, injected)
    route: list[bool]  # routing tokens of the next round
    block: int  # length of the question block (always routing tokens)
    phase: str = "retrieve"  # 'retrieve' | 'answer'
    rounds: list[list[int]] = field(default_factory=list)
    routing: list[Routing] = field(default_factory=list)
    start: int = 0  # where the transcript starts in `tokens`
    used: int = 0  # tokens generated so far
    finish: str | None = None
    final: list[int] = field(default_factory=list)  # the last round's generated ids
    index: int = 0  # position in its batch
    budget: int = 256  # max_new_tokens
    cancel: threading.Event | None = None  # set: this question stops at its next token
    shown: str = ""  # answer text passed to on_text so far


class MSAEngine:
    """Questions over `bank`, retrieving as `config` says (RetrievalConfig's defaults: the shipped engine's);
    keyword `settings` are RetrievalConfig's flat keys (similarity, inject_k, refine, refine_chunk, ...) over it."""

    def __init__(self, model, tok, bank: MemoryBank, config: RetrievalConfig | None = None, **settings):
        if bank.model is not model:
            raise ValueError("the memory bank was encoded by another model instance")
        self.model, self.tok, self.bank = model, tok, bank
        self.config = (config or RetrievalConfig()).replace(**settings)
        self.protocol = Protocol(tok)
        self.stop_ids, self.round_end = self.protocol.stop_ids, self.protocol.round_end

    @property
    def config(self) -> RetrievalConfig:
        return self._config

    @config.setter
    def config(self, config: RetrievalConfig) -> None:
        if not config.refine.chunk <= self.bank.pool_size:
            raise ValueError(f"refine_chunk={config.refine.chunk}: expected at most the bank's chunk size "
                             f"{self.bank.pool_size}")
        self._config = config

    @property
    def similarity(self) -> str:
        return self.config.similarity

    def encode_question(self, question: str) -> tuple[list[int], list[bool]]:
        """Active tokens after the template prefix and their routing mask (see protocol.py)."""
        return self.protocol.question(question)

    def injection(self, doc_ids: list[int]) -> list[int]:
        """`[n]. {text}\\n` for each document (plain text), then the round-end token."""
        return self.protocol.injection([(d, self.bank.text(d) or "") for d in doc_ids])

    def calibrate_keys(self, kind: str = "fp8", questions: list[str] | None = None, n: int = 1024,
                       seed: int = 0) -> dict:
        """Store the bank's routing keys in 8 bits (`kind` 'fp8' or 'int8') rounded for the routing queries of
        `questions` (default: `n` pseudo-queries, sentences of the bank's own documents); documents added later
        are rounded the same way. Returns the moments ({router layer: (Hkv, D, D)})."""
        if kind not in ("fp8", "int8"):
            raise ValueError(f"calibrate_keys: kind {kind!r}, expected 'fp8' or 'int8'")
        moments = self.query_moments(self._calibration_questions(questions, n, seed))
        self.bank.set_key_dtype(kind, moments)
        return moments

    def calibrate_priors(self, questions: list[str] | None = None, n: int = PRIOR_SENTENCES, seed: int = 0) -> dict:
        """Give every document a prior per router layer, its mean routing score over `questions` (default: `n`
        pseudo-queries, sentences of the bank's own documents), subtracted from its score before top-k: documents
        that score high whatever the question (hubs) stop crowding out the others. Documents added later get the
        mean prior; saved with the bank; `bank.set_doc_priors(None)` drops them. Returns the priors."""
        from .calibrate import document_priors

        rows, masks = self._question_rows(self._calibration_questions(questions, n, seed))
        priors = document_priors(self.bank, rows, masks, self.similarity)
        self.bank.set_doc_priors(priors)
        return priors

    def _calibration_questions(self, questions: list[str] | None, n: int, seed: int) -> list[str]:
        """`questions`, or by default `n` pseudo-queries (sentences of the bank's own documents)."""
        from .calibrate import pseudo_queries

        return questions if questions is not None else pseudo_queries(self.bank, n, seed)

    def _question_rows(self, questions: list[str]) -> tuple[list[list[int]], list[list[bool]]]:
        """Active tokens and routing masks of calibration questions, as the engine asks them."""
        if not questions:
            raise ValueError("no calibration questions (and no document text to draw them from)")
        rows = [self.encode_question(q) for q in questions]
        return [r for r, _ in rows], [m for _, m in rows]

    def query_moments(self, questions: list[str]) -> dict:
        """{router layer: (Hkv, D, D)} second moments of the routing queries of `questions` over this bank."""
        from .calibrate import routing_query_moments

        return routing_query_moments(self.bank, *self._question_rows(questions), self.similarity)

    # ------------------------------------------------------------------------------------- queries
    def route(self, question: str) -> Routing:
        """Per router layer the selected (doc id, score) list, best first."""
        return self.route_batch([question])[0]

    def route_batch(self, questions: list[str]) -> list[Routing]:
        """`route` of several questions in one routing pass: every router layer reads its routing keys once for the
        whole batch (ops/routing_triton.py), not once per question."""
        rows = [self.encode_question(q) for q in questions]
        res = prefill_batch(self.bank, [r for r, _ in rows], [m for _, m in rows], similarity=self.similarity,
                            route_only=True)
        return res.memory.routing

    def ask(self, question: str | list[str], max_new_tokens: int = 256, **kw) -> Answer | list[Answer]:
        """Answer a question (or a list of them, as one batch); keyword arguments as `ask_batch`."""
        if isinstance(question, list):
            return self.ask_batch(question, max_new_tokens=max_new_tokens, **kw)
        return self.ask_batch([question], max_new_tokens=max_new_tokens, **kw)[0]

    def ask_batch(self, questions: list[str], max_new_tokens: int | list[int] = 256,
                  interleave: bool | str | None = None, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, stop: list[str] | None = None, max_rounds: int | None = None,
                  inject_k: int | None = None, router_rounds: int | None = None, batch_size: int = 16,
                  documents: list[list[int]] | None = None, progress: str | None = None,
                  cancel: threading.Event | list[threading.Event] | None = None,
                  on_text: Callable[[int, str], None] | None = None) -> list[Answer]:
        """Answer questions in batches of `batch_size`; every round of a batch is one prefill + decode.

        `interleave`, `inject_k`, `router_rounds`, `max_rounds`: for this call, over the engine's config.
        `interleave`: "model" (or True) = Memory Interleave as published, the model names the documents to
        inject; "router" = the engine injects the `inject_k` documents the router layers rank highest, then the
        model answers; "off" (or False) = answer in one round.
        `documents` (router mode): per question, the documents to inject instead (one round; another retriever's
        pick, read as the model reads routed ones). `progress`: a progress bar with this label. `cancel`: once set
        (by another thread), the next decoded token raises Cancelled (the server's timeouts and departed clients);
        a list, one event per question: a set one ends that question at its next token (finish 'cancelled') while
        the others go on. `max_new_tokens`: for every question, or a list, one per question. `on_text(i, text)`:
        called from the decode loop with each new piece of question i's answer text as it is decoded (the pieces
        join to its `Answer.text`, save in the rare answer that writes the answer marker after other text)."""
        c = self._call_config(interleave, inject_k, router_rounds, max_rounds)
        if documents is not None:
            if c.interleave != "router" or len(documents) != len(questions):
                raise ValueError("documents: one list per question, with interleave='router'")
            unknown = sorted({d for docs in documents for d in docs if d not in self.bank or self.bank.text(d) is None})
            if unknown:
                raise ValueError(f"documents: ids {unknown[:10]} are not in the bank or have no stored text")
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(questions)
        cancels = cancel if isinstance(cancel, list) else [None] * len(questions)
        if len(budgets) != len(questions) or len(cancels) != len(questions):
            raise ValueError("max_new_tokens and cancel: one per question when given as lists")
        sampling = Sampling(temperature, top_p, seed)
        out = []
        with tqdm(total=len(questions), desc=progress, unit="question", disable=progress is None) as bar:
            for i in range(0, len(questions), batch_size):
                part = slice(i, i + batch_size)
                shown = on_text and (lambda b, text, i=i: on_text(i + b, text))
                out += self._answer(questions[part], budgets[part], c, sampling, stop or [],
                                    documents and documents[part],
                                    cancel if isinstance(cancel, threading.Event) else cancels[part], shown)
                bar.update(len(questions[i:i + batch_size]))
        return out

    def ask_continuous(self, admit: Callable[[int], list[Question]], slots: int = 16,
                       interleave: bool | str | None = None, temperature: float = 0.0, top_p: float = 1.0,
                       stop: list[str] | None = None, inject_k: int | None = None,
                       router_rounds: int | None = None) -> int:
        """Continuous batching: answer the questions that `admit(n)` hands over (up to n `Question`s at a time; []
        when none waits), each joining the running decode batch (up to `slots` questions) at its next step and leaving
        it when its answer ends, which goes to its `done`. In router mode each group that joins is routed and its
        documents injected first (one routing pass). Greedy answers are those of `ask_batch`. Answers in one
        round: `interleave` 'router' or 'off' (Memory Interleave as published, 'model', needs `ask_batch`); no
        seed. Returns when no question is left and `admit` gives none; returns the number of groups that joined."""
        c = self._call_config(interleave, inject_k, router_rounds, None)
        if c.interleave == "model":
            raise ValueError("continuous batching answers in one round: interleave 'router' or 'off'")
        sampling, stop_strings = Sampling(temperature, top_p), stop or []

        def entries(n: int) -> list[Entry]:
            queries = admit(n)
            if not queries:
                return []
            rows = self._rows([q.question for q in queries], [q.budget for q in queries], c,
                              [q.cancel for q in queries])
            timings = {"route": 0.0, "prefill": 0.0, "refine": 0.0}
            if c.interleave == "router":
                self._router_injection(rows, c.inject_k, c.router_rounds, timings)
            return [self._entry(row, q, timings, stop_strings) for row, q in zip(rows, queries)]

        return generate_continuous(self.bank, entries, slots, sampling, self.similarity)

    def _entry(self, row: _Row, query: Question, timings: dict, stop_strings: list[str]) -> Entry:
        """`row` (answering) as a row of a continuous batch: `query` gets its text as decoded and its answer."""
        on_text = query.on_text and (lambda i, text: query.on_text(text))

        def stop(ids: list[int]) -> str | None:
            if row.cancel is not None and row.cancel.is_set():
                return "cancelled"
            ended = self._event(row, ids, stop_strings, row.budget)
            if on_text is not None:
                self._stream(row, ids, ended is not None, on_text)
            return ended

        def done(ids: list[int], event: str, routing: Routing, times: dict) -> None:
            row.routing.append(routing)
            self._advance(row, ids, event, 1)
            total = {k: timings.get(k, 0.0) + times.get(k, 0.0) for k in {*timings, *times}}
            query.done(self._result(row, total))

        return Entry(row.tokens, row.route, row.budget, stop, done)

    def _call_config(self, interleave, inject_k, router_rounds, max_rounds) -> RetrievalConfig:
        """The engine's config with one call's settings over it (None: the engine's)."""
        mode = {True: "model", False: "off"}.get(interleave, interleave) if isinstance(interleave, bool) else interleave
        c = self.config.replace(**{k: v for k, v in (("interleave", mode), ("inject_k", inject_k),
                                                     ("router_rounds", router_rounds), ("max_rounds", max_rounds))
                                   if v is not None})
        if c.interleave != "off" and self.round_end is None:
            raise ValueError(f"Memory Interleave needs the {ROUND_END} token, which this tokenizer lacks; "
                             "pass interleave='off'")
        return c

    def _rows(self, questions: list[str], budgets: list[int], c: RetrievalConfig, cancels: list) -> list[_Row]:
        rows = []
        for n, (q, budget, cancel) in enumerate(zip(questions, budgets, cancels)):
            ids, mask = self.encode_question(q)
            rows.append(_Row(q, ids, mask, block=mask.index(False), start=len(ids),
                             phase="retrieve" if c.interleave == "model" else "answer", index=n, budget=budget,
                             cancel=cancel))
        return rows

    def _answer(self, questions, budgets, c: RetrievalConfig, sampling, stop_strings, documents=None, cancel=None,
                on_text=None) -> list[Answer]:
        rows = self._rows(questions, budgets, c,
                          [None] * len(questions) if isinstance(cancel, threading.Event) else cancel)
        timings = {"route": 0.0, "gather": 0.0, "prefill": 0.0, "refine": 0.0, "decode": 0.0, "decode_tokens": 0}
        if c.interleave == "router":
            self._router_injection(rows, c.inject_k, c.router_rounds, timings, documents)
        while live := [r for r in rows if r.finish is None]:

            def event(b: int, ids: list[int], live=live) -> str | None:
                if isinstance(cancel, threading.Event) and cancel.is_set():
                    raise Cancelled("the request was cancelled")
                row = live[b]
                if row.cancel is not None and row.cancel.is_set():
                    return "cancelled"
                ended = self._event(row, ids, stop_strings, row.budget)
                if on_text is not None and row.phase == "answer":
                    self._stream(row, ids, ended is not None, on_text)
                return ended

            g = generate(self.bank, [r.tokens for r in live], [r.route for r in live],
                         max(r.budget - r.used for r in live), event, sampling, self.similarity)
            for k in timings:
                timings[k] += g.timings.get(k, 0)
            for row, ids, event, routing in zip(live, g.tokens, g.events, g.routing):
                row.routing.append(routing)
                self._advance(row, ids, event, c.max_rounds)
        return [self._result(r, timings) for r in rows]

    def _router_injection(self, rows: list[_Row], k: int, rounds: int, timings: dict,
                          given: list[list[int]] | None = None) -> None:
        """`rounds` routing passes; in each, every row gets its top-k fused documents not injected yet appended
        (named, then their text) and the pass's routing recorded; then the rows answer. `given`: per row, the
        documents to inject instead (one round, no routing)."""
        for row, docs in zip(rows, map(sorted, given or [])):
            row.tokens = row.tokens + self.protocol.naming(docs)
            self._inject(row, docs)
        for _ in range(0 if given else rounds):
            t0 = time.perf_counter()
            res = prefill_batch(self.bank, [r.tokens for r in rows], [r.route for r in rows],
                                similarity=self.similarity, route_only=True)
            timings["route"] += res.memory.route_seconds
            timings["prefill"] += time.perf_counter() - t0
            fine, fuse = self.config.refine, self.model.fuse_layers
            for row, routing in zip(rows, res.memory.routing):
                row.routing.append(routing)  # the routing that picked the injected documents
                done = {d for r in row.rounds for d in r}
                votes = fusing(routing, fuse)
                if fine.top and (fine.margin >= 1 or cut_drop(votes, fused_top(votes, k + 1, done), k) < fine.margin):
                    t0 = time.perf_counter()
                    refined = fusing(self.refined(row.tokens, row.route, fused_top(votes, fine.top, done)), fuse)
                    votes = joint_routing(votes, refined) if fine.fuse else refined
                    timings["refine"] += time.perf_counter() - t0  # outside the prefill it is not part of
                top = sorted(fused_top(votes, k, exclude=done))
                row.tokens = row.tokens + self.protocol.naming(top)
                self._inject(row, top)
        for row in rows:
            self._to_answer(row, self.protocol.end_of_retrieve())
            row.route += [False] * (len(row.tokens) - len(row.route))

    def refined(self, tokens: list[int], route: list[bool], shortlist: list[int]) -> Routing:
        """The routing of one question over `shortlist` only, re-encoded with keys pooled over the config's
        refine_chunk tokens (`refine_routing`). Documents without stored text are left out."""
        docs = [d for d in shortlist if self.bank.text(d) is not None]
        return refine_routing(self.bank, self.tok, tokens, route, docs, [self.bank.text(d) for d in docs],
                              self.config.refine.chunk, self.similarity)

    def _inject(self, row: _Row, doc_ids: list[int]) -> None:
        """Append the documents' text; the question block and this text route the next round."""
        row.rounds.append(doc_ids)
        inject = self.injection(doc_ids)
        row.route = self.protocol.injected_route(row.block, len(row.tokens), len(inject))
        row.tokens = row.tokens + inject

    def _stream(self, row: _Row, ids: list[int], last: bool, on_text) -> None:
        """Pass on_text the answer text decoded since the last call: the text after the answer marker (while the
        text could still be the start of the marker, nothing), without the whitespace `_result` strips and
        without a trailing half-decoded character, unless the round has ended."""
        text = self._answer_text(ids).lstrip()
        if not last:
            if ANSWER_MARKER.startswith(text):
                return
            text = text.rstrip().removesuffix("\ufffd")
        if text.startswith(row.shown) and len(text) > len(row.shown):
            on_text(row.index, text[len(row.shown):])
            row.shown = text

    def _answer_text(self, ids: list[int]) -> str:
        """The answer in generated ids: the text after the answer marker when the model wrote one, unstripped."""
        text = self.tok.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)
        return text.rsplit(ANSWER_MARKER, 1)[1] if ANSWER_MARKER in text else text

    def _event(self, row: _Row, ids: list[int], stop_strings: list[str], budget: int) -> str | None:
        """Why a round ends after generating `ids`, or None to go on."""
        last = ids[-1]
        if last in self.stop_ids:
            return "stop"
        if row.used + len(ids) >= budget:
            return "length"
        tail = self.tok.decode(ids[-24:])
        if any(s in tail for s in stop_strings):
            return "stop"
        if row.phase == "retrieve":
            if last == self.round_end:
                return "ids"
            if END_OF_RETRIEVE in tail:
                return "retrieved"
        return None

    def _advance(self, row: _Row, ids: list[int], event: str, max_rounds: int) -> None:
        """Apply one round's outcome: inject documents, switch to answering, or finish."""
        row.tokens = row.tokens + ids
        row.used += len(ids)
        if event == "ids":
            named = sorted({int(n) for n in _ID.findall(self.tok.decode(ids))})
            self._inject(row, [d for d in named if d in self.bank])
            if len(row.rounds) >= max_rounds:  # cap reached: stop retrieving and answer
                self._to_answer(row, self.protocol.end_of_retrieve())
        elif event == "retrieved":
            self._to_answer(row, [])
        else:
            row.finish = event if event in ("stop", "cancelled") else "length"
            row.final = ids
            return
        row.route += [False] * (len(row.tokens) - len(row.route))

    def _to_answer(self, row: _Row, prefix: list[int]) -> None:
        row.phase = "answer"
        row.tokens = row.tokens + prefix + self.protocol.restatement(row.question)

    def _result(self, row: _Row, timings: dict) -> Answer:
        return Answer(
            question=row.question, text=self._answer_text(row.final).strip(), rounds=row.rounds,
            routing=row.routing[0] if row.routing else {}, round_routing=row.routing,
            transcript=self.tok.decode(row.tokens[row.start:]), finish=row.finish,
            timings=dict(timings),
        )
