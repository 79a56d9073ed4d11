"""RetrievalConfig: the engine's retrieval settings, the one source of their defaults. The command line's flags, the
server's request fields and the labels results carry are derived from its fields (name, type, default and the
metadata: help, choices, minimum, the value results that do not record a setting ran with)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .routing import SIMILARITIES

INTERLEAVE = ("model", "router", "off")  # who picks the documents to read: the model, the router, nobody
# Options the project's measurements rejected (docs/msa-smollm2.md; research/results/fusion.json, widen_replay.json)
REMOVED = {
    "fusion": "router layers are always fused by reciprocal rank (score and max fusion measured worse)",
    "widen": "widened injection measured no better than inject_k (research/results/widen_replay.json)",
    "widen_margin": "widened injection measured no better than inject_k (research/results/widen_replay.json)",
    "refine_depth": "the refined shortlist is always drawn from the layers' top-k (deeper draws measured no better)",
}


def _opt(default, help: str, *, key: str | None = None, choices=None, minimum=None, absent=None, metavar=None,
         request: bool = False, setting: bool = False):
    """A config field. `key`: its flat name (flags, results); `absent`: the value a result that does not record it
    ran with; `request`: a server request may set it; `setting`: results record it (their labels)."""
    meta = {"help": help, "key": key, "choices": choices, "minimum": minimum, "absent": absent, "metavar": metavar,
            "request": request, "setting": setting}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RefineConfig:
    """Router mode's refined routing: when the router layers cut no clear head, the `top` best documents are
    re-ranked with routing keys pooled over `chunk` tokens (docs/msa-smollm2.md, 'Refined routing')."""

    top: int = _opt(64, "router mode: re-rank the N best documents with finer routing keys before injecting "
                        "(0: off)", key="refine", minimum=0, absent=0, metavar="N", setting=True)
    chunk: int = _opt(4, "with --refine: tokens per routing key of the re-ranked documents (the bank's: 64)",
                      key="refine_chunk", minimum=1, metavar="P", setting=True)
    margin: float = _opt(0.5, "with --refine: re-rank only when the router layers cut no clear head (their agreement "
                              "drops by less than M within the top --inject-k; 1: always)", key="refine_margin",
                         absent=1.0, metavar="M", setting=True)
    fuse: bool = _opt(True, "with --refine: fuse the refined routing with the first pass (both passes' router "
                            "layers vote) instead of replacing it", key="refine_fuse", absent=False, setting=True)

    def __post_init__(self):
        if not 0 < self.margin <= 1:
            raise ValueError(f"refine_margin={self.margin}: expected 0 < refine_margin <= 1")


@dataclass(frozen=True)
class RetrievalConfig:
    """How MSAEngine retrieves: the routing score, who picks the documents to read, how many, and router mode's
    refinement. Defaults: the shipped engine's (chosen on the 1M-token NIAH samples of seeds 42-57, confirmed on
    800 fresh ones per size; docs/msa-smollm2.md)."""

    similarity: str = _opt("train", "routing score: as in training (default), 'official' as the authors' released "
                                    "engine (cosine only for INFONCE), or plain cosine / dot", choices=SIMILARITIES)
    interleave: str = _opt("router", "who picks the documents to read: the model (Memory Interleave as published), "
                                     "the router (default: what the shipped model does well), or nobody (answer in "
                                     "one round)", choices=INTERLEAVE, request=True)
    refine: RefineConfig = field(default_factory=RefineConfig)
    inject_k: int = _opt(4, "router mode: documents injected", minimum=1, absent=4, request=True, setting=True)
    router_rounds: int = _opt(1, "router mode: rounds of injection (each later round routes from the text injected "
                                 "last)", minimum=1, request=True)
    max_rounds: int = _opt(4, "model mode: retrieval rounds at most, then the model answers", minimum=1)

    def __post_init__(self):
        for f, value in _leaves(self):
            m = f.metadata
            if m["choices"] and value not in m["choices"]:
                raise ValueError(f"{m['key'] or f.name}={value!r}: expected one of {', '.join(m['choices'])}")
            if m["minimum"] is not None and value < m["minimum"]:
                raise ValueError(f"{m['key'] or f.name}={value}: expected at least {m['minimum']}")

    def flat(self) -> dict[str, Any]:
        """{flat key: value}, nested settings by their own keys ('refine', 'refine_chunk', ...)."""
        return {key_of(f): value for f, value in _leaves(self)}

    def replace(self, **flat) -> RetrievalConfig:
        """A copy with these flat keys changed; a removed or unknown key is refused in one line."""
        check_keys(flat)
        top = {f.name: flat[f.name] for f in dataclasses.fields(self) if f.name in flat and f.name != "refine"}
        fine = {f.name: flat[key_of(f)] for f in dataclasses.fields(RefineConfig) if key_of(f) in flat}
        return dataclasses.replace(self, **top, refine=dataclasses.replace(self.refine, **fine))

    def settings(self) -> dict[str, Any]:
        """The settings results record (and label files by): inject_k always, the refinement only when on and its
        options only where they differ from what a result without them ran with."""
        out = {}
        for f, value in _leaves(self):
            absent, nested = f.metadata["absent"], f.name in _REFINE_NAMES
            if not f.metadata["setting"] or (nested and self.refine.top == 0):
                continue
            if nested and f.name != "top" and absent is not None and value == absent:
                continue
            out[key_of(f)] = round(value, 4) if isinstance(value, float) else value
        return out

    @classmethod
    def from_settings(cls, recorded: dict) -> RetrievalConfig:
        """The config of a result's recorded settings (`settings`); a setting it does not record takes the value
        results without it ran with (its `absent`), not today's default."""
        flat = {key_of(f): f.metadata["absent"] if f.metadata["absent"] is not None else f.default
                for f in setting_fields()}
        return cls().replace(**{**flat, **{k: v for k, v in recorded.items() if k in flat}})


_REFINE_NAMES = {f.name for f in dataclasses.fields(RefineConfig)}


def key_of(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _leaves(config) -> list[tuple[dataclasses.Field, Any]]:
    """(field, value) of every setting, nested ones included, in declaration order."""
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out += _leaves(value) if dataclasses.is_dataclass(value) else [(f, value)]
    return out


def fields() -> list[dataclasses.Field]:
    """Every setting's field, nested ones included (flat keys: `key_of`)."""
    return [f for f, _ in _leaves(RetrievalConfig())]


def defaults() -> dict[str, Any]:
    return RetrievalConfig().flat()


def setting_fields() -> list[dataclasses.Field]:
    return [f for f in fields() if f.metadata["setting"]]


def check_keys(flat: dict) -> None:
    """Refuse removed and unknown keys, in one line."""
    for k in flat:
        if k in REMOVED:
            raise ValueError(f"{k} was removed: {REMOVED[k]}")
    unknown = sorted(set(flat) - {key_of(f) for f in fields()})
    if unknown:
        raise ValueError(f"unknown retrieval settings {unknown}; expected some of "
                         f"{', '.join(key_of(f) for f in fields())}")
