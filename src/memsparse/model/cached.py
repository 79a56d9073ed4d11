"""Inference forward with a preallocated KV cache (stages 2 and 3).

A batch of active token rows (left-padded to a common length) runs through the decoder. In every layer a caller
supplied `memory` gives each row the keys/values that precede its active tokens (the template prefix, and in
router layers the chunks its routing selected); the prefill writes them and the active tokens' own keys/values
into a per-layer cache sized for the whole generation, so each decode step writes one column in place.

Per layer the cache columns are [memory (padded to the batch max) | active tokens | generated tokens]; the
active tokens of every row end at the same column, so one decode step writes the same column for all rows.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ops import has_triton
from ..ops.attention import sdpa
from .decoder import MSAAttention, MSAForCausalLM

# memory(layer index, attention module, normed hidden (B, S, hidden), queries (B, S, H, D)) ->
#   keys, values (B, M, Hkv, D) and validity (B, M) bool
Memory = Callable[[int, MSAAttention, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def no_memory(i: int, attn: MSAAttention, h: torch.Tensor, q: torch.Tensor):
    """A `Memory` with nothing before the active tokens."""
    empty = q.new_zeros(q.shape[0], 0, attn.cfg.num_key_value_heads, q.shape[3])  # (B, 0, Hkv, D)
    return empty, empty, torch.zeros(q.shape[0], 0, dtype=torch.bool, device=q.device)


@dataclass
class LayerCache:
    k: torch.Tensor  # (B, L, Hkv, D)
    v: torch.Tensor  # (B, L, Hkv, D)
    valid: torch.Tensor  # (B, L) bool: key columns a row may attend to
    start: int  # column of the first active token


@dataclass
class KVCache:
    layers: list[LayerCache]
    active: int  # active tokens written by the prefill
    length: int  # active + generated tokens written (same for every row)
    positions: torch.Tensor  # (B,) position of the next token of each row
    step: torch.Tensor  # (1,) generated tokens written, on the device (decode reads it there: graph-safe)
    capacity: int  # the most tokens the cache can take (active + generated)


def next_column(cache: KVCache, layer: int) -> int:
    """The column of layer `layer` that the next decode step writes (the same step for every row)."""
    return cache.layers[layer].start + cache.length


def shortfall(cache: KVCache, src: KVCache) -> list[int]:
    """Per layer, the columns `cache` lacks before its next write column to `place` a row of `src` there."""
    return [max(0, sc.start + src.active - next_column(cache, i)) for i, sc in enumerate(src.layers)]


def regrow(cache: KVCache, batch: int, left: list[int], right: int) -> KVCache:
    """A copy of `cache` with `batch` rows (new rows empty: no valid column), `left[i]` more columns before layer
    i's active tokens and room for `right` more generated tokens. Decode steps go on writing the same columns of
    the copied rows (continuous batching: room for rows that join a running batch)."""
    layers = []
    for lc, more in zip(cache.layers, left):
        B, L = lc.valid.shape
        n = L + more + right
        k, v = (t.new_zeros(batch, n, *t.shape[2:]) for t in (lc.k, lc.v))
        valid = lc.valid.new_zeros(batch, n)
        k[:B, more:more + L], v[:B, more:more + L], valid[:B, more:more + L] = lc.k, lc.v, lc.valid
        layers.append(LayerCache(k=k, v=v, valid=valid, start=lc.start + more))
    positions = cache.positions.new_zeros(batch)
    positions[:cache.positions.shape[0]] = cache.positions
    return KVCache(layers=layers, active=cache.active, length=cache.length, positions=positions,
                   step=cache.step.clone(), capacity=cache.capacity + right)


def place(cache: KVCache, slot: int, src: KVCache, row: int) -> None:
    """Row `row` of a fresh prefill's cache `src` (its memory and active tokens) into row `slot` of `cache`, in
    place: its columns end just before the next write column of each layer (attention reads columns by validity,
    not by place; keys carry their positions), the rest of the row is cleared. Needs no `shortfall`."""
    if any(shortfall(cache, src)):
        raise ValueError("place: the cache lacks columns before its write column (regrow it first)")
    for i, (lc, sc) in enumerate(zip(cache.layers, src.layers)):
        n, end = sc.start + src.active, next_column(cache, i)
        lc.valid[slot] = False
        lc.k[slot, end - n:end], lc.v[slot, end - n:end] = sc.k[row, :n], sc.v[row, :n]
        lc.valid[slot, end - n:end] = sc.valid[row, :n]
    cache.positions[slot] = src.positions[row]


def _embed_rope(model: MSAForCausalLM, ids: torch.Tensor, positions: torch.Tensor):
    x = model.model.embed_tokens(ids)
    cos, sin = model.rope(positions, x.dtype)
    return x, cos, sin


def prefill(
    model: MSAForCausalLM,
    ids: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    memory: Memory,
    extra: int = 0,
    logits: str = "last",
    last_layer: int | None = None,
) -> tuple[torch.Tensor | None, KVCache]:
    """Run active tokens `ids` (B, S) at `positions` (B, S); `valid` (B, S) marks real (not padding) tokens,
    padding on the left. Allocates room for `extra` generated tokens. `logits`: 'last' (B, V), 'all'
    (B, S, V) or 'none'; `last_layer` stops after that layer (routing only; no usable cache)."""
    B, S = ids.shape
    x, cos, sin = _embed_rope(model, ids, positions)
    causal = torch.ones(S, S, dtype=torch.bool, device=ids.device).tril()
    eye = torch.eye(S, dtype=torch.bool, device=ids.device)
    layers = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.project(h, cos, sin)  # (B, S, H|Hkv, D)
        mk, mv, mvalid = memory(i, attn, h, q)  # (B, M, Hkv, D), (B, M)
        M = mk.shape[1]
        cache = LayerCache(
            k=k.new_zeros(B, M + S + extra, *k.shape[2:]), v=v.new_zeros(B, M + S + extra, *v.shape[2:]),
            valid=torch.zeros(B, M + S + extra, dtype=torch.bool, device=ids.device), start=M,
        )
        cache.k[:, :M], cache.v[:, :M], cache.valid[:, :M] = mk, mv, mvalid
        cache.k[:, M:M + S], cache.v[:, M:M + S], cache.valid[:, M:M + S] = k, v, valid
        # a query sees the memory and earlier real active tokens; a padding query also sees itself (no empty rows)
        own = causal & (valid[:, None, :] | eye)  # (B, S, S)
        mask = torch.cat([mvalid[:, None, :].expand(B, S, M), own], 2)  # (B, S, M + S)
        o = sdpa(q, cache.k[:, :M + S], cache.v[:, :M + S], mask=mask)  # (B, S, H, D)
        x = x + attn.o_proj(o.flatten(2))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        layers.append(cache)
        if last_layer is not None and i == last_layer:
            break
    kv = KVCache(layers=layers, active=S, length=S, positions=positions[:, -1] + 1,
                 step=torch.zeros(1, dtype=torch.long, device=ids.device), capacity=S + extra)
    if logits == "none" or last_layer is not None:
        return None, kv
    h = x[:, -1] if logits == "last" else x
    return model.lm_head(model.model.norm(h)), kv


def _pre_attention(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Normed, projected, rotated q (B, 1, H, D) and k, v (B, 1, Hkv, D) of one decode step in one layer."""
    return layer.self_attn.project(layer.input_layernorm(x), cos, sin)


def _post_attention(layer, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The residual stream after one layer, given its attention output o (B, 1, H, D)."""
    x = x + layer.self_attn.o_proj(o.flatten(2))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _head(model: MSAForCausalLM, x: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) from the last layer's output x (B, 1, hidden)."""
    return model.lm_head(model.model.norm(x[:, 0]))


def _pre_fused(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The input norm and the q/k/v projections as one Triton kernel (`fused_linear`): q (B, H, D), k, v
    (B, Hkv, D), views of one output, not yet normed per head nor rotated (`_attend_rotating` does that)."""
    from ..ops.linear_triton import CONCAT, fused_linear

    attn, norm = layer.self_attn, layer.input_layernorm
    qkv = fused_linear(x[:, 0], [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], CONCAT,
                       (norm.weight, norm.eps))  # (B, (H + 2 Hkv) * D)
    hd = attn.cfg.num_key_value_heads * attn.cfg.head_dim
    q, k, v = qkv.split([qkv.shape[1] - 2 * hd, hd, hd], -1)  # (B, H*D | Hkv*D)
    D = attn.cfg.head_dim
    return q.unflatten(-1, (-1, D)), k.unflatten(-1, (-1, D)), v.unflatten(-1, (-1, D))  # (B, heads, D)


def _post_fused(layer, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """`_post_attention` in three Triton kernels: o_proj + residual, norm + gate/up + SiLU, down_proj + residual.
    o: (B, [1,] H, D)."""
    from ..ops.linear_triton import GLU, RESIDUAL, fused_linear

    mlp, norm = layer.mlp, layer.post_attention_layernorm
    x = fused_linear(o.flatten(1), [layer.self_attn.o_proj.weight], RESIDUAL, residual=x[:, 0])  # (B, hidden)
    h = fused_linear(x, [mlp.gate_proj.weight, mlp.up_proj.weight], GLU, (norm.weight, norm.eps))  # (B, inter)
    return fused_linear(h, [mlp.down_proj.weight], RESIDUAL, residual=x)[:, None]  # (B, 1, hidden)


def _head_fused(model: MSAForCausalLM, x: torch.Tensor) -> torch.Tensor:
    """`_head` with the final norm and the LM head as one Triton kernel."""
    from ..ops.linear_triton import CONCAT, fused_linear

    norm = model.model.norm
    return fused_linear(x[:, 0], [model.lm_head.weight], CONCAT, (norm.weight, norm.eps))


def _attend(layer, lc: LayerCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope, step: torch.Tensor,
            offset: int) -> torch.Tensor:
    """Write k, v (B, 1, Hkv, D) into cache column step + offset, mark it valid, attend q (B, 1, H, D) over the
    valid columns: (B, 1, H, D). Op by op; `_attend_fused` is the same in one Triton kernel. `layer` and `rope`
    ((cos, sin) of the step) are for `_attend_rotating`; every `attend` takes them."""
    col = step + offset  # (1,)
    lc.k.index_copy_(1, col, k)
    lc.v.index_copy_(1, col, v)
    lc.valid.index_fill_(1, col, True)
    return sdpa(q, lc.k, lc.v, mask=lc.valid[:, None, :])


def _attend_fused(layer, lc: LayerCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope,
                  step: torch.Tensor, offset: int) -> torch.Tensor:
    """`_attend` as one Triton kernel."""
    from ..ops.decode_attention_triton import decode_attention

    return decode_attention(q[:, 0], k[:, 0], v[:, 0], lc.k, lc.v, lc.valid, step, offset)[:, None]


def _attend_rotating(layer, lc: LayerCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope,
                     step: torch.Tensor, offset: int) -> torch.Tensor:
    """`_attend_fused` for the raw q (B, H, D), k, v (B, Hkv, D) of `_pre_fused`: the kernel also norms q and k
    per head (qk_norm) and rotates them (rope = (cos, sin)). Returns (B, H, D)."""
    from ..ops.decode_attention_triton import decode_attention

    attn = layer.self_attn
    norm = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.cfg.qk_norm else None
    return decode_attention(q, k, v, lc.k, lc.v, lc.valid, step, offset, rope=rope, qk_norm=norm)


@dataclass
class DecodeStep:
    """A decoder layer's decode step in three parts: the half before attention, the cache write + attention, the
    half after; and the LM head after the last layer. Eager by default; `compiled_step` compiles the halves,
    `fused_attention` makes the middle one Triton kernel, `fused_linears` makes all four Triton kernels (then `pre`
    leaves q and k unrotated and `attend` rotates them)."""

    pre: Callable = _pre_attention
    attend: Callable = _attend
    post: Callable = _post_attention
    head: Callable = _head


@functools.cache
def compiled_step() -> DecodeStep:
    """`DecodeStep` with both halves compiled by torch.compile (elementwise work fused into few kernels; the same
    code for every layer, weights as inputs). Compiled once per process, on first use."""
    return DecodeStep(torch.compile(_pre_attention, dynamic=False), _attend,
                      torch.compile(_post_attention, dynamic=False))


def fused_attention(step: DecodeStep, model: MSAForCausalLM) -> DecodeStep:
    """`step` with the cache write and attention as one Triton kernel, where Triton runs and the shapes allow."""
    if not has_triton():  # the op-by-op step
        return step
    from ..ops.decode_attention_triton import supported

    cfg = model.config
    if not supported(cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads):
        return step
    return dataclasses.replace(step, attend=_attend_fused)


def fused_linears(step: DecodeStep, model: MSAForCausalLM, batch: int) -> DecodeStep:
    """The decode step as Triton kernels around the weight reads (`ops/linear_triton.py`): norm + q/k/v; q/k norm,
    RoPE, cache write and attention (`_attend_rotating`); o_proj + residual; norm + gate/up + SiLU; down_proj +
    residual; norm + LM head. Where Triton runs (`linear_triton.runs_on`), the model has no biases, the attention
    kernel takes its shapes and the batch is one row (at batch 8 cuBLAS reads the weights faster than these
    kernels: H100, 2026-11-27); else `step` unchanged."""
    cfg = model.config
    if not has_triton() or batch != 1 or cfg.attention_bias or cfg.mlp_bias:
        return step
    from ..ops.decode_attention_triton import supported
    from ..ops.linear_triton import runs_on

    if not runs_on(model.device) or not supported(cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads):
        return step
    return DecodeStep(_pre_fused, _attend_rotating, _post_fused, _head_fused)


def decode(model: MSAForCausalLM, ids: torch.Tensor, cache: KVCache, step: DecodeStep | None = None) -> torch.Tensor:
    """One token per row: `ids` (B,) -> next-token logits (B, V); the cache advances by one column.
    Shapes and indices never depend on the step (attention spans the whole cache under its validity mask),
    so a step can be captured once in a CUDA graph and replayed (`GraphedDecode`)."""
    if cache.length >= cache.capacity:
        raise RuntimeError("KV cache is full: prefill with a larger `extra`")
    step = step or DecodeStep()
    x, cos, sin = _embed_rope(model, ids[:, None], cache.positions[:, None])  # (B, 1, hidden)
    for i, layer in enumerate(model.model.layers):
        lc = cache.layers[i]
        q, k, v = step.pre(layer, x, cos, sin)  # (B, 1, H|Hkv, D)
        # this token's column: step + offset
        o = step.attend(layer, lc, q, k, v, (cos, sin), cache.step, lc.start + cache.active)
        x = step.post(layer, x, o)  # attention out o (B, 1, H, D)
    cache.step += 1
    cache.positions += 1
    cache.length += 1
    return step.head(model, x)


class GraphedDecode:
    """`decode` captured in a CUDA graph for one cache: the first call runs a real step (warming up on a side
    stream) and captures the step; later calls copy the ids in and replay it (no per-op launch cost).
    `compile`: the layers' elementwise work fused by torch.compile (`compiled_step`) inside the graph; `fused`:
    each layer's cache write and attention as one Triton kernel (`fused_attention`), and at batch 1 the whole
    layer as five Triton kernels (`fused_linears`; then `compile` has nothing left to do). Both on by default unless
    the environment sets MEMSPARSE_COMPILE=0 / MEMSPARSE_FUSED_DECODE=0."""

    def __init__(self, model: MSAForCausalLM, cache: KVCache, compile: bool | None = None,
                 fused: bool | None = None):
        self.model, self.cache = model, cache
        if compile is None:
            compile = os.environ.get("MEMSPARSE_COMPILE", "1") != "0"
        if fused is None:
            fused = os.environ.get("MEMSPARSE_FUSED_DECODE", "1") != "0"
        self.step = compiled_step() if compile else DecodeStep()
        if fused:
            self.step = fused_linears(fused_attention(self.step, model), model, cache.positions.shape[0])
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if self.graph is None:
            self.ids = ids.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = decode(self.model, self.ids, cache, self.step)  # a real step, also the warm-up
            torch.cuda.current_stream().wait_stream(stream)
            if cache.length < cache.capacity:
                self.graph = torch.cuda.CUDAGraph()
                length = cache.length
                with torch.cuda.graph(self.graph):  # records, does not run: the cache is unchanged
                    self.logits = decode(self.model, self.ids, cache, self.step)
                cache.length = length
            return logits
        if cache.length >= cache.capacity:
            raise RuntimeError("KV cache is full: prefill with a larger `extra`")
        self.ids.copy_(ids)
        self.graph.replay()
        cache.length += 1
        return self.logits
