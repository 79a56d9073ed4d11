"""The Memory Sparse Attention decoder: Llama / Qwen2 / Qwen3 from one config, with HF parameter names.

Every layer: document tokens attend causally within their own document (document-wise RoPE); active tokens
(doc_ids <= 0) attend causally among themselves. Router layers also pool each document into chunks of P
tokens (K̄, V̄ and router keys K̄r), score documents with the router queries, pick the top-k per sample, and
let the active tokens attend to the selected chunks too. Selection is hard: the LM loss reaches the selected
documents through K̄/V̄, the router projectors learn from the aux loss only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops.attention import packed_document_attention, sdpa
from ..ops.indexing import take
from ..ops.pooling import chunk_mean_pool
from ..ops.rope import apply_rope, rope_cos_sin, rope_inv_freq
from ..ops.routing import chunk_scores, document_scores, select_top_k
from .config import DecoderConfig, MSAConfig
from .layout import SequenceLayout
from .losses import aux_loss as compute_aux_loss


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()  # float32 statistics, as HF
        return self.weight * F.rms_norm(xf, (xf.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MSAAttention(nn.Module):
    """Self-attention with document-wise processing; in router layers also memory routing."""

    def __init__(self, cfg: DecoderConfig, msa: MSAConfig, is_router: bool):
        super().__init__()
        self.cfg, self.msa, self.is_router = cfg, msa, is_router
        H, Hkv, D, hid = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(hid, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(hid, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(hid, Hkv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, hid, bias=cfg.attention_bias and cfg.family != "qwen2")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        if is_router and msa.decouple_router:
            # one-element Sequential: official parameter names `router_q_proj.0.weight`
            self.router_q_proj = nn.Sequential(nn.Linear(hid, H * D, bias=False))
            self.router_k_proj = nn.Sequential(nn.Linear(hid, Hkv * D, bias=False))

    def project(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (..., H, D) and k, v (..., Hkv, D) for hidden states h (..., hidden); q/k normed and rotated."""
        D = self.cfg.head_dim
        q = self.q_proj(h).unflatten(-1, (-1, D))  # (..., H, D)
        k = self.k_proj(h).unflatten(-1, (-1, D))  # (..., Hkv, D)
        v = self.v_proj(h).unflatten(-1, (-1, D))  # (..., Hkv, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def router_keys(self, h_doc: torch.Tensor, k_doc: torch.Tensor) -> torch.Tensor:
        """Per-token routing keys (..., Hkv, D): router_k_proj(x) (no norm, no RoPE), or the content keys."""
        if self.msa.decouple_router:
            return self.router_k_proj(h_doc).unflatten(-1, (-1, self.cfg.head_dim))
        return k_doc

    def router_queries(self, h_act: torch.Tensor, q_act: torch.Tensor) -> torch.Tensor:
        """Routing queries (..., H, D): router_q_proj(x) (no norm, no RoPE), or the content queries."""
        if self.msa.decouple_router:
            return self.router_q_proj(h_act).unflatten(-1, (-1, self.cfg.head_dim))
        return q_act

    def forward(self, h: torch.Tensor, lay: SequenceLayout, cos: torch.Tensor, sin: torch.Tensor,
                memory: list | None = None):
        """h (N, hidden): the layout's packed rows (`lay.packed_index`: document tokens, then the (B, A) active
        slots). Returns the attention output (N, hidden) and document scores (B, M) in router layers (else None).
        With `memory` given, a router layer appends its pooled (K̄, V̄, K̄r) to it (memory encoding)."""
        B, A = lay.active_index.shape
        nd = lay.num_doc_tokens
        q, k, v = self.project(h, cos, sin)  # (N, H|Hkv, D)
        outs, pooled = [], None
        if nd:
            k_doc, v_doc = k[:nd], v[:nd]  # (Nd, Hkv, D)
            outs.append(packed_document_attention(q[:nd], k_doc, v_doc, lay.buckets, lay.doc_cu_seqlens,
                                                  lay.max_doc_length))  # (Nd, H, D)
            if self.is_router:
                pooled = self.pool(h[:nd], k_doc, v_doc, lay)
                if memory is not None:
                    memory.append(pooled)
        scores = None
        q_act, k_act, v_act = q[nd:].unflatten(0, (B, A)), k[nd:].unflatten(0, (B, A)), v[nd:].unflatten(0, (B, A))
        if not lay.active_rows.numel():  # documents only (memory encoding): nothing reads the active slots
            o_act = torch.zeros_like(q_act)
        elif pooled is not None:
            r_queries = self.router_queries(h[nd:].unflatten(0, (B, A)), q_act)  # (B, A, H, D)
            scores = self.score(r_queries, lay.route_mask, pooled[2], lay)  # (B, M)
            selected = select_top_k(scores, self.msa.top_k_docs)  # (B, M)
            o_act = self.memory_attention(q_act, k_act, v_act, pooled[0], pooled[1], selected, lay)
        else:
            o_act = sdpa(q_act, k_act, v_act, causal=True)  # (B, A, H, D); padding is at the end
        outs.append(o_act.flatten(0, 1))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]  # (N, H, D)
        return self.o_proj(out.flatten(1)), scores

    def pool(self, h_doc, k_doc, v_doc, lay: SequenceLayout):
        """Chunk means (C, Hkv, D) of content keys (post-norm, post-RoPE), values and routing keys."""
        k_bar = chunk_mean_pool(k_doc, lay.chunk_of_token, lay.chunk_counts)
        v_bar = chunk_mean_pool(v_doc, lay.chunk_of_token, lay.chunk_counts)
        kr_bar = chunk_mean_pool(self.router_keys(h_doc, k_doc), lay.chunk_of_token, lay.chunk_counts)
        return k_bar, v_bar, kr_bar

    def score(self, r_queries, route_mask, kr_bar, lay: SequenceLayout) -> torch.Tensor:
        """Document scores (B, M) with -inf for documents absent from a sample."""
        msa = self.msa
        keys = take(kr_bar, lay.chunk_index)  # (B, Cmax, Hkv, D)
        cs = chunk_scores(
            r_queries, route_mask, keys, lay.chunk_valid,
            head_reduce=msa.head_reduce_method, query_reduce=msa.query_reduce_method,
            cosine=msa.uses_cosine, scale=msa.score_scale(self.cfg.head_dim),
        )  # (B, Cmax)
        return document_scores(cs, lay.chunk_column, lay.num_doc_columns, msa.chunk_reduce_method)

    def memory_attention(self, q_act, k_act, v_act, k_bar, v_bar, selected, lay: SequenceLayout):
        """Active tokens over [selected chunks that precede them; earlier active tokens]."""
        B, A = lay.active_index.shape
        slot_sel = lay.chunk_valid & selected.gather(1, lay.chunk_column.clamp(min=0))  # (B, Cmax)
        n_sel = slot_sel.sum(1)
        Cs = min(lay.max_selected_chunks, slot_sel.shape[1])  # static: no device -> host sync
        order = torch.sort((~slot_sel).to(torch.int8), dim=1, stable=True).indices[:, :Cs]  # selected first
        chunk = lay.chunk_index.gather(1, order)  # (B, Cs)
        c_valid = torch.arange(Cs, device=chunk.device).unsqueeze(0) < n_sel.unsqueeze(1)  # (B, Cs)
        keys = torch.cat([take(k_bar, chunk), k_act], 1)  # (B, Cs + A, Hkv, D)
        values = torch.cat([take(v_bar, chunk), v_act], 1)
        q_seq = lay.active_index.unsqueeze(2)  # (B, A, 1)
        see_chunk = c_valid.unsqueeze(1) & (lay.chunk_seq[chunk].unsqueeze(1) < q_seq)  # (B, A, Cs)
        ar = torch.arange(A, device=chunk.device)
        see_active = (ar.view(1, A) <= ar.view(A, 1)).unsqueeze(0) & lay.active_valid.unsqueeze(1)  # (B, A, A)
        see_active = see_active | torch.eye(A, dtype=torch.bool, device=chunk.device)  # pad rows see themselves
        # grouped K/V heads expanded: with a mask only cuDNN takes grouped heads, and cuDNN goes last where shapes
        # vary (shape_varying_attention); memory-efficient attention needs equal head counts (else: math fallback)
        G = q_act.shape[2] // keys.shape[2]
        keys, values = keys.repeat_interleave(G, 2), values.repeat_interleave(G, 2)  # (B, Cs + A, H, D)
        return sdpa(q_act, keys, values, mask=torch.cat([see_chunk, see_active], 2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, msa: MSAConfig, is_router: bool):
        super().__init__()
        self.self_attn = MSAAttention(cfg, msa, is_router)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, lay, cos, sin, memory=None):
        a, scores = self.self_attn(self.input_layernorm(x), lay, cos, sin, memory)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), scores


class MSAModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, msa: MSAConfig):
        super().__init__()
        routers = set(msa.router_layers(cfg.num_hidden_layers))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, msa, i in routers) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class MSAOutput:
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, A, V): active tokens only (documents have no targets)
    logits_index: torch.Tensor | None = None  # (B, A) sequence index of each logits row, -1 for padding
    doc_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, max doc id)


class MSAForCausalLM(nn.Module):
    """Decoder + LM head + the official scalar parameters (`temperature`, and `b` for BCE)."""

    def __init__(self, config: DecoderConfig, msa_config: MSAConfig | dict | None = None):
        super().__init__()
        self.config = config
        self.msa_config = MSAConfig.from_dict(msa_config)
        self.router_layers = self.msa_config.router_layers(config.num_hidden_layers)
        self.fresh_routers = False  # set by from_pretrained when the checkpoint had no router weights
        self.model = MSAModel(config, self.msa_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        method = self.msa_config.aux_loss_method
        if "INFONCE" in method:
            self.temperature = nn.Parameter(torch.tensor(float(self.msa_config.infonce_loss_temp)), requires_grad=False)
        if method == "BCE":
            self.b = nn.Parameter(torch.tensor(-20.0))
        # float64 on the host, not a buffer: `.to(bfloat16)` must never round the frequencies
        self.inv_freq, self.rope_scaling = rope_inv_freq(config.rope, config.head_dim)
        self._inv_freq_dev: torch.Tensor | None = None
        self.gradient_checkpointing = False

    @property
    def fuse_layers(self) -> list[int]:
        """The router layers whose lists the engine fuses to choose documents (msa_config.fuse_layer_idx)."""
        return self.msa_config.fuse_layers(self.config.num_hidden_layers)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (..., D) for integer positions."""
        if self._inv_freq_dev is None or self._inv_freq_dev.device != positions.device:
            self._inv_freq_dev = self.inv_freq.to(positions.device)  # once per device, not per call
        return rope_cos_sin(positions, self._inv_freq_dev, self.rope_scaling, dtype)

    # loading / saving live in checkpoint.py; bound here for the public contract
    def _packed_inputs(self, input_ids: torch.Tensor, lay: SequenceLayout):
        """Embeddings (N, hidden) and cos, sin (N, D) of the layout's packed rows (`lay.packed_index`)."""
        x = self.model.embed_tokens(lay.pack(input_ids))
        return (x, *self.rope(lay.pack(lay.positions), x.dtype))

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, msa_config=None) -> MSAForCausalLM:
        from .checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, msa_config=msa_config)

    def save_pretrained(self, path) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def init_router_weights(self) -> None:
        """HF-default init (normal, std = initializer_range) for the router projectors."""
        for name, p in self.named_parameters():
            if ".router_" in name:
                nn.init.normal_(p, std=self.config.initializer_range)

    @torch.no_grad()
    def encode_documents(self, input_ids: torch.Tensor, doc_ids: torch.Tensor,
                         position_ids: torch.Tensor | None = None, chunk_size: int | None = None) -> dict[int, tuple]:
        """Memory encoding (stage 1): documents only (doc_ids > 0 everywhere), each processed independently
        with document-wise positions (or the given `position_ids`). Returns {router layer: (K̄, V̄, K̄r)}, each
        (chunks, Hkv, D), chunks in document order (documents in (sample, position) order), pooled over
        `chunk_size` tokens (default: the model's P)."""
        if (doc_ids <= 0).any():
            raise ValueError("encode_documents takes document tokens only (doc_ids > 0)")
        lay = SequenceLayout.build(doc_ids, self.msa_config, position_ids=position_ids, chunk_size=chunk_size)
        x, cos, sin = self._packed_inputs(input_ids, lay)
        memory: list = []
        last = max(self.router_layers)
        for layer in self.model.layers[: last + 1]:
            x, _ = layer(x, lay, cos, sin, memory)
        return dict(zip(self.router_layers, memory))

    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        aux_labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> MSAOutput:
        """Training forward. input_ids, doc_ids, position_ids, attention_mask, labels: (B, T); aux_labels:
        (B, max doc id), column j = document id j + 1. Without doc_ids every token is active (a plain LM)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if doc_ids is None:
            doc_ids = torch.full_like(input_ids, -1)
        if doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
        lay = SequenceLayout.build(doc_ids, self.msa_config, attention_mask, position_ids)
        x, cos, sin = self._packed_inputs(input_ids, lay)  # (N, hidden), (N, D)
        doc_scores: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x, scores = checkpoint(layer, x, lay, cos, sin, use_reentrant=False)
            else:
                x, scores = layer(x, lay, cos, sin)
            if scores is not None:
                doc_scores[i] = scores
        x = self.model.norm(x[lay.num_doc_tokens:])  # (B * A, hidden): the active slots
        a_valid = lay.active_valid
        logits = self.lm_head(x.unflatten(0, lay.active_index.shape))  # (B, A, V)
        out = MSAOutput(logits=logits, logits_index=lay.active_index.masked_fill(~a_valid, -1), doc_scores=doc_scores)

        msa = self.msa_config
        if labels is not None:
            out.lm_loss = self._lm_loss(logits, labels, lay)
        if aux_labels is not None:
            if not msa.aux_loss:
                raise ValueError("aux_labels given but msa_config.aux_loss is false")
            if aux_labels.shape[0] != lay.batch or aux_labels.shape[1] < lay.num_doc_columns:
                raise ValueError(
                    f"aux_labels shape {tuple(aux_labels.shape)} must be (batch, >= {lay.num_doc_columns}): "
                    "column j is document id j + 1"
                )
            out.aux_loss = compute_aux_loss(
                doc_scores, aux_labels, msa.aux_loss_method, getattr(self, "temperature", torch.tensor(1.0)),
                getattr(self, "b", None), self.config.num_hidden_layers,
            )
        parts = []
        if out.lm_loss is not None:
            parts.append(msa.lmloss_weigth * out.lm_loss)
        if out.aux_loss is not None:
            parts.append(msa.auxloss_weight * out.aux_loss)
        if parts:
            out.loss = sum(parts)
        return out

    @staticmethod
    def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, lay: SequenceLayout) -> torch.Tensor:
        """Next-token cross-entropy along the active stream (documents removed): the row of an active token
        predicts the label of the next active token (-100 = ignore)."""
        if labels.shape != (lay.batch, lay.length):
            raise ValueError(f"labels shape {tuple(labels.shape)} != input shape {(lay.batch, lay.length)}")
        if lay.has_documents and (labels.flatten()[lay.doc_token_flat] != -100).any():
            raise ValueError(
                "labels set on document tokens; documents are memory and have no LM targets: set them to -100"
            )
        target = labels.gather(1, lay.active_index).masked_fill(~lay.active_valid, -100)  # (B, A)
        target = torch.cat([target[:, 1:], target.new_full((lay.batch, 1), -100)], 1)  # next active token
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
