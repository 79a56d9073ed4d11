"""A trained delta over a base checkpoint: new special tokens, LoRA adapters and the router projectors.

Training attaches LoRA adapters (forward hooks adding `scale * B(A(x))` to chosen projections, the base
weights frozen) and learns the routers and the new tokens' embedding rows. `save_delta` writes only those
(`delta.safetensors`, bfloat16) plus `delta.json` (base, MSA settings, added tokens, LoRA shape); `load_delta`
rebuilds base + delta in one call, with the adapters merged into the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .decoder import MSAForCausalLM

DELTA_CONFIG = "delta.json"
DELTA_WEIGHTS = "delta.safetensors"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the default: attention projections
LORA_PROJECTIONS = LORA_TARGETS + ("gate_proj", "up_proj", "down_proj")  # every projection that can take one


def projection(layer, name: str) -> nn.Linear:
    """The decoder layer's projection `name` (attention: q/k/v/o_proj; MLP: gate/up/down_proj)."""
    if name not in LORA_PROJECTIONS:
        raise ValueError(f"no projection {name!r}: LoRA targets are {', '.join(LORA_PROJECTIONS)}")
    return getattr(layer.self_attn if name in LORA_TARGETS else layer.mlp, name)


def add_special_tokens(model: MSAForCausalLM, tok, tokens: list[str]) -> list[int]:
    """Add special tokens missing from `tok` and grow the embeddings (new rows = the mean embedding).
    Returns the ids of the added tokens."""
    new = [t for t in tokens if t not in tok.get_vocab()]
    if not new:
        return []
    tok.add_tokens(new, special_tokens=True)
    old = model.model.embed_tokens.weight
    n = len(tok)
    if n > old.shape[0]:
        emb = nn.Embedding(n, old.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            emb.weight[: old.shape[0]] = old
            emb.weight[old.shape[0]:] = old.mean(0)
        model.model.embed_tokens = emb
        if model.config.tie_word_embeddings:
            model.lm_head = nn.Linear(old.shape[1], n, bias=False, device=old.device, dtype=old.dtype)
            model.lm_head.weight = emb.weight
        else:
            head = nn.Linear(old.shape[1], n, bias=False, device=old.device, dtype=old.dtype)
            with torch.no_grad():
                head.weight[: old.shape[0]] = model.lm_head.weight
                head.weight[old.shape[0]:] = 0
            model.lm_head = head
        model.config.vocab_size = n
    return tok.convert_tokens_to_ids(new)


class LoRA(nn.Module):
    """Low-rank update of one linear layer: out += scale * B(A(x)); B starts at zero."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, linear.in_features, device=linear.weight.device,
                                          dtype=linear.weight.dtype) / linear.in_features**0.5)
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device,
                                          dtype=linear.weight.dtype))
        self.scale = alpha / rank

    def hook(self, module, inputs, out):
        low = inputs[0].reshape(-1, self.A.shape[1]) @ self.A.t()  # (N, rank)
        return torch.addmm(out.reshape(-1, out.shape[-1]), low, self.B.t(), alpha=self.scale).view(out.shape)

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B.float() @ self.A.float() * self.scale).to(weight.dtype)


def attach_lora(model: MSAForCausalLM, rank: int, alpha: float | None = None,
                targets: tuple[str, ...] = LORA_TARGETS) -> nn.ModuleDict:
    """LoRA adapters on `targets` (names of LORA_PROJECTIONS) of every layer, as `model.lora["{layer}_{name}"]`
    (hooked, not merged)."""
    alpha = alpha if alpha is not None else 2.0 * rank
    model.lora = nn.ModuleDict()
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    for i, layer in enumerate(model.model.layers):
        for name in targets:
            linear = projection(layer, name)
            adapter = LoRA(linear, rank, alpha)
            model.lora[f"{i}_{name}"] = adapter
            linear.register_forward_hook(adapter.hook)
    return model.lora


def trainable_parameters(model: MSAForCausalLM) -> list[nn.Parameter]:
    """Freeze the base; return the routers and LoRA adapters, now trainable (new tokens' rows: see
    `train_rows`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if ".router_" in n or n.startswith("lora.")]
    for p in params:
        p.requires_grad_(True)
    return params


def train_rows(model: MSAForCausalLM, row_ids: list[int]) -> None:
    """Let the embedding rows `row_ids` learn: the embedding gets gradients, masked to those rows."""
    emb = model.model.embed_tokens.weight
    keep = torch.zeros(emb.shape[0], 1, device=emb.device, dtype=emb.dtype)
    keep[row_ids] = 1
    emb.requires_grad_(True)
    emb.register_hook(lambda g: g * keep)


def delta_sha256(path) -> str:
    """sha256 of a delta's weights file: its identity, by which a recipe pins the delta it starts from."""
    import hashlib

    h = hashlib.sha256()
    with open(Path(path) / DELTA_WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_delta(model: MSAForCausalLM, path, base: str, added_tokens: list[str], new_token_ids: list[int],
               parent: dict | None = None) -> int:
    """Write delta.safetensors (bfloat16) and delta.json (with `parent`, the delta it was trained from: its path
    and sha256); returns the weights file's size in bytes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {n: p for n, p in model.named_parameters() if ".router_" in n or n.startswith("lora.")}
    if new_token_ids:
        state["new_token_embeddings"] = model.model.embed_tokens.weight[new_token_ids]
    save_file({n: t.detach().to(torch.bfloat16).contiguous().cpu() for n, t in state.items()},
              str(path / DELTA_WEIGHTS))
    cfg = {"base": base, "msa_config": model.msa_config.to_dict(model.config.num_hidden_layers),
           "added_tokens": added_tokens, "lora": getattr(model, "lora_config", None), "parent": parent}
    (path / DELTA_CONFIG).write_text(json.dumps(cfg, indent=1))
    return (path / DELTA_WEIGHTS).stat().st_size


@torch.no_grad()
def apply_delta_weights(model: MSAForCausalLM, path, new_ids: list[int], merge_lora: float | None = None) -> None:
    """Copy a delta's weights into `model`: the new tokens' rows, the routers, and the LoRA adapters, either into
    the model's own adapters (`merge_lora=None`, to train on) or merged into the weights with that scale."""
    params = dict(model.named_parameters())
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in load_file(str(Path(path) / DELTA_WEIGHTS), device=str(model.device)).items():
        if name == "new_token_embeddings":
            model.model.embed_tokens.weight[new_ids] = t.to(model.dtype)
        elif merge_lora is not None and name.startswith("lora."):
            key, part = name[len("lora."):].rsplit(".", 1)
            lora.setdefault(key, {})[part] = t
        elif name in params:
            params[name].copy_(t)
        else:
            raise ValueError(f"{path}: delta weight {name} matches nothing in the model")
    for key, ab in lora.items():
        layer, proj = key.split("_", 1)
        w = projection(model.model.layers[int(layer)], proj).weight
        w += (ab["B"].float() @ ab["A"].float() * merge_lora).to(w.dtype)


def is_delta(path) -> bool:
    return (Path(path) / DELTA_CONFIG).is_file()


def load_delta(path, base_path, dtype=None, device=None):
    """Base checkpoint `base_path` + the delta in `path`: (model, tokenizer), LoRA merged into the weights."""
    from .checkpoint import load_pretrained
    from .tokenizer import load_tokenizer

    path = Path(path)
    cfg = json.loads((path / DELTA_CONFIG).read_text())
    model = load_pretrained(base_path, dtype=dtype, device=device, msa_config=cfg["msa_config"])
    tok = load_tokenizer(base_path)
    ids = add_special_tokens(model, tok, cfg["added_tokens"])
    lora = cfg["lora"]
    apply_delta_weights(model, path, ids, merge_lora=lora["alpha"] / lora["rank"] if lora else None)
    model.fresh_routers = False
    return model.eval(), tok
