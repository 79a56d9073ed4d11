"""Loading and saving checkpoints: official MSA-format directories, plain Llama / Qwen2 / Qwen3 HF directories
(routers freshly initialised), GGUF files; saving writes the official-compatible layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import DecoderConfig
from .decoder import MSAForCausalLM

ROUTER_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.router_[qk]_proj\.0\.weight")
IGNORED_KEY = re.compile(r".*rotary_emb\.inv_freq$")
SHARD_BYTES = 5 * 1024**3

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _as_dtype(d) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    name = str(d).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {d!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def default_dtype(device: str | torch.device) -> str:
    """The serving dtype for a device: bfloat16 on GPUs and on CPUs that multiply bfloat16 natively (AMX or
    AVX512-BF16: about 3x faster encoding than float32 on 2 cores, same answers on the demo), else float32."""
    if torch.device(device).type == "cuda":
        return "bfloat16"
    cpu = torch.cpu
    native = any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bfloat16" if native else "float32"


def _find_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def read_hf_config(path) -> dict:
    """The HF-style config dict of a checkpoint directory or GGUF file, without reading weights."""
    path = Path(path)
    gguf = _find_gguf(path)
    if gguf is not None:
        from .gguf import read_gguf_config

        return read_gguf_config(gguf)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json) or .gguf file")
    return json.loads((path / "config.json").read_text())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors, safetensors index or pytorch_model.bin")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(path / f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / f}: cannot read weights (truncated or corrupt file?): {e}") from e
    return state


def load_pretrained(path, dtype=None, device=None, msa_config=None) -> MSAForCausalLM:
    """Load an MSA model. `msa_config` (dict) overrides or supplies the Memory Sparse Attention settings."""
    path = Path(path)
    gguf = _find_gguf(path)
    if gguf is not None:
        from .gguf import read_gguf

        hf, state = read_gguf(gguf)
    else:
        hf = read_hf_config(path)
        state = read_state_dict(path)
    official = hf.get("model_type") == "msa"
    msa = dict(hf.get("msa_config") or {}) if official else {}
    msa.update(msa_config or {})
    cfg = DecoderConfig.from_hf_dict(hf)
    dtype = _as_dtype(dtype) or _as_dtype(cfg.dtype) or state["model.embed_tokens.weight"].dtype
    device = torch.device(device) if device is not None else torch.device("cpu")

    with torch.device("meta"):
        model = MSAForCausalLM(cfg, msa)
    model = model.to(dtype).to_empty(device=device)
    _load_weights(model, state, official=official, source=str(path))
    model.config.dtype = str(dtype).replace("torch.", "")
    return model.eval()


def _load_weights(model: MSAForCausalLM, state: dict[str, torch.Tensor], official: bool, source: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {k: v for k, v in state.items() if not IGNORED_KEY.match(k)}
    tied = model.config.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)

    expected_routers = {k for k in params if ROUTER_KEY.match(k)}
    found_routers = {k for k in state if ROUTER_KEY.match(k)}
    if official or found_routers:
        have = sorted({int(ROUTER_KEY.match(k).group(1)) for k in found_routers})
        if found_routers != expected_routers:
            want = model.router_layers if model.msa_config.decouple_router else []
            raise ValueError(
                f"{source}: router weights exist for layers {have} but router_layer_idx / decouple_router "
                f"call for router projectors on layers {want}"
            )
    fresh = set(expected_routers - found_routers) | ({"temperature", "b"} & set(params))
    missing = [k for k in params if k not in state and k not in fresh and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in params]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the model config; missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, p in params.items():
            if name in state:
                src = state[name]
                if src.shape != p.shape:
                    raise ValueError(f"{source}: {name} has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
                p.copy_(src)
        if "temperature" in params and "temperature" not in state:
            params["temperature"].fill_(float(model.msa_config.infonce_loss_temp))
        if "b" in params and "b" not in state:
            params["b"].fill_(-20.0)
    model.fresh_routers = bool(expected_routers - found_routers)  # untrained: routing is random
    if model.fresh_routers:
        model.init_router_weights()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def save_pretrained(model: MSAForCausalLM, path) -> None:
    """Write config.json (model_type "msa", msa_config) and safetensors shards in the official layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf = cfg.to_hf_dict()
    hf.update(
        model_type="msa",
        architectures=["MSAForCausalLM"],
        torch_dtype=str(model.dtype).replace("torch.", ""),
        msa_config=model.msa_config.to_dict(cfg.num_hidden_layers),
    )
    if cfg.family != "qwen3":
        hf["msa_backbone"] = cfg.family  # the official format assumes a Qwen3 backbone
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(hf, indent=2))
