"""Model configuration: decoder geometry (Llama / Qwen2 / Qwen3) and the Memory Sparse Attention settings.

`DecoderConfig` reads HF `config.json` dicts written by transformers 4.x (top-level `rope_theta`,
`rope_scaling`) and 5.x (`rope_parameters`). `MSAConfig` holds the official `msa_config` keys
(spec/official-msa.md §1.2), validated, with the defaults of the shipped MSA-4B conversion script.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3")

HEAD_REDUCE = ("mean", "max")
QUERY_REDUCE = ("max", "mean", "last")
CHUNK_REDUCE = ("max", "mean")
AUX_LOSS_METHODS = ("INFONCE_DECOUPLE", "INFONCE", "INFONCE_FOCAL", "INFONCE_DECOUPLE_FOCAL", "BCE")
QUERY_POSITION_OFFSETS = ("template+k", "k")
DOC_POSITIONS = ("document", "global")


@dataclass
class DecoderConfig:
    """Geometry of a Llama / Qwen2 / Qwen3 decoder (HF field meanings)."""

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; expected one of {FAMILIES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], family: str | None = None) -> DecoderConfig:
        """Build from an HF config.json dict (llama, qwen2, qwen3, or the official `msa` type)."""
        family = family or d.get("model_type")
        if family == "msa":  # the official MSA config subclasses Qwen3; our own saves name their backbone
            family = d.get("msa_backbone", "qwen3")
        if family not in FAMILIES:
            raise ValueError(f"unsupported model_type {d.get('model_type')!r}; expected llama, qwen2, qwen3 or msa")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        heads = d["num_attention_heads"]
        if family == "qwen2":
            attention_bias = True  # Qwen2 always has q/k/v biases
        else:
            attention_bias = bool(d.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(d),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", family != "llama")),
            attention_bias=attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            dtype=d.get("dtype") or d.get("torch_dtype"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """HF config.json fields (transformers 4.x style rope keys, which 5.x also reads)."""
        rope = dict(self.rope)
        theta = rope.pop("rope_theta")
        d: dict[str, Any] = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": theta,
            "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.family == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.dtype:
            d["torch_dtype"] = self.dtype
        return d


def _rope_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """Normalise rope settings to one dict {rope_type, rope_theta, scaling fields...}."""
    params = d.get("rope_parameters")
    if params:  # transformers 5.x
        rope = dict(params)
    else:  # transformers 4.x
        rope = dict(d.get("rope_scaling") or {})
        rope["rope_theta"] = d.get("rope_theta", 10000.0)
    rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type") or "default"
    if "rope_theta" not in rope:
        rope["rope_theta"] = d.get("rope_theta", 10000.0)
    if rope["rope_type"] in ("yarn", "llama3") and "original_max_position_embeddings" not in rope:
        rope["original_max_position_embeddings"] = d.get("max_position_embeddings")
    return rope


@dataclass
class MSAConfig:
    """The official `msa_config` keys (spelling kept, `lmloss_weigth` included) plus our explicit options.

    Defaults are those of the shipped MSA-4B conversion script, except `router_layer_idx`, which defaults to
    the upper half of the layers (the paper's choice) when the key is absent.
    """

    router_layer_idx: str | list[int] | None = None
    top_k_docs: int = 16
    pooling_kernel_size: int = 64
    head_reduce_method: str = "mean"
    query_reduce_method: str = "max"
    chunk_reduce_method: str = "max"
    decouple_router: bool = True
    aux_loss: bool = True
    aux_loss_method: str = "INFONCE_DECOUPLE"
    infonce_loss_temp: float = 0.1
    lmloss_weigth: float = 1.0
    auxloss_weight: float = 0.1
    doc_top_k: int | None = None
    # ours: where active tokens start after the template prefix p: p + k (official engine) or k (paper)
    query_position_offset: str = "template+k"
    # ours: RoPE positions of memory tokens: each document from 0 (the paper's document-wise RoPE), or "global":
    # the memory as one sequence after the template prefix, active tokens after all of it (an ablation)
    doc_positions: str = "document"
    # ours: the router layers whose ranked lists the engine fuses to choose the documents it injects (router
    # injection, refinement's shortlist); absent = every router layer. Router fitting chooses it (train/router_fit.py)
    fuse_layer_idx: str | list[int] | None = None
    extra: dict = field(default_factory=dict)  # official keys we keep but do not use (recloss_weight, ...)

    _KNOWN_UNUSED = (
        "recloss_weight", "ansloss_weight", "rewrite_position", "decouple_pooling_mode", "pad_free",
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | MSAConfig | None) -> MSAConfig:
        if isinstance(d, MSAConfig):
            return dataclasses.replace(d)
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        extra = {k: v for k, v in d.items() if k not in names}
        unknown = sorted(set(extra) - set(cls._KNOWN_UNUSED))
        if unknown:
            warnings.warn(f"msa_config: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**kwargs, extra=extra)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("head_reduce_method", HEAD_REDUCE),
            ("query_reduce_method", QUERY_REDUCE),
            ("chunk_reduce_method", CHUNK_REDUCE),
            ("aux_loss_method", AUX_LOSS_METHODS),
            ("query_position_offset", QUERY_POSITION_OFFSETS),
            ("doc_positions", DOC_POSITIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"msa_config.{name}={value!r} is not supported; expected one of {allowed}")
        for name in ("top_k_docs", "pooling_kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"msa_config.{name} must be a positive integer, got {value!r}")
        if self.doc_top_k is not None and (not isinstance(self.doc_top_k, int) or self.doc_top_k < 1):
            raise ValueError(f"msa_config.doc_top_k must be a positive integer, got {self.doc_top_k!r}")
        if not 0 < float(self.infonce_loss_temp):
            raise ValueError(f"msa_config.infonce_loss_temp must be positive, got {self.infonce_loss_temp!r}")
        for name in ("decouple_router", "aux_loss"):
            value = getattr(self, name)
            if isinstance(value, str):  # configs written from env vars carry "true"/"false"
                if value.lower() not in ("true", "false"):
                    raise ValueError(f"msa_config.{name}={value!r} is not a boolean")
                setattr(self, name, value.lower() == "true")

    @property
    def engine_top_k(self) -> int:
        """k used at inference: `doc_top_k` where present, else `top_k_docs` (as the official engine)."""
        return self.doc_top_k or self.top_k_docs

    @property
    def uses_cosine(self) -> bool:
        """Training routing similarity: cosine for every InfoNCE-family loss, as the official training code."""
        return "INFONCE" in self.aux_loss_method

    def score_scale(self, head_dim: int) -> float:
        """Official training scale: 1 for decoupled InfoNCE-family routing, else 1/sqrt(D)."""
        return 1.0 if (self.decouple_router and self.uses_cosine) else head_dim**-0.5

    def router_layers(self, num_layers: int) -> list[int]:
        """Resolve `router_layer_idx` ("all", "18,19,...", a list, or absent = upper half) to sorted indices."""
        spec = self.router_layer_idx
        if spec is None:
            return list(range(num_layers // 2, num_layers))
        return _layers("router_layer_idx", spec, list(range(num_layers)), f"0..{num_layers - 1}")

    def fuse_layers(self, num_layers: int) -> list[int]:
        """Resolve `fuse_layer_idx` (a subset of the router layers; absent or "all" = all of them)."""
        routers = self.router_layers(num_layers)
        return routers if self.fuse_layer_idx is None else _layers("fuse_layer_idx", self.fuse_layer_idx, routers,
                                                                   f"the router layers {routers}")

    def to_dict(self, num_layers: int) -> dict[str, Any]:
        """The `msa_config` JSON as the official layout stores it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["router_layer_idx"] = ",".join(str(i) for i in self.router_layers(num_layers))
        if d["doc_top_k"] is None:
            del d["doc_top_k"]
        if self.fuse_layer_idx is None:
            del d["fuse_layer_idx"]
        else:
            d["fuse_layer_idx"] = ",".join(str(i) for i in self.fuse_layers(num_layers))
        d.update(self.extra)
        return d


def _layers(name: str, spec: str | list[int], allowed: list[int], where: str) -> list[int]:
    """Sorted layer indices from "all" (= `allowed`), "18,19,..." or a list; each must be in `allowed` (`where`
    says what they are, for the error)."""
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return list(allowed)
    try:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        layers = sorted({int(str(x).strip()) for x in items if str(x).strip()})
    except ValueError as e:
        raise ValueError(f"msa_config.{name}={spec!r} is not 'all' or a list of ints") from e
    bad = [i for i in layers if i not in allowed]
    if bad:
        raise ValueError(f"msa_config.{name} has layers {bad} outside {where}")
    if not layers:
        raise ValueError(f"msa_config.{name} selects no layer")
    return layers
