"""Parameter and FLOP counts from the config alone (used by MFU and scaling laws)."""
from __future__ import annotations

from typing import NamedTuple

from hibari.model.config import ModelConfig


class ParamCount(NamedTuple):
    total: int
    non_embedding: int  # total minus token/position embeddings and an untied output projection


def _layer_params(cfg: ModelConfig) -> int:
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if cfg.use_bias or cfg.qkv_bias:
        attn += h * hd + 2 * kv * hd
    if cfg.use_bias:
        attn += d
    mlp = (3 if cfg.gated_mlp else 2) * d * f
    if cfg.use_bias:
        mlp += (2 if cfg.gated_mlp else 1) * f + d
    norm = 2 if cfg.norm == "layernorm" else 1  # scale (+ bias)
    norms = 2 * d * norm + (2 * hd * norm if cfg.qk_norm else 0)
    return attn + mlp + norms


def count_params(cfg: ModelConfig) -> ParamCount:
    """Exact parameter count of `init(cfg, key)`, with and without embeddings."""
    norm = 2 if cfg.norm == "layernorm" else 1
    embedding = cfg.vocab_size * cfg.d_model
    if not cfg.tie_embeddings:
        embedding += cfg.d_model * cfg.vocab_size
    if cfg.position == "learned":
        embedding += cfg.max_seq_len * cfg.d_model
    non_embedding = cfg.n_layers * _layer_params(cfg) + cfg.d_model * norm
    return ParamCount(total=non_embedding + embedding, non_embedding=non_embedding)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: all layers' projections plus the output
    projection (an embedding lookup is not a matmul)."""
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + (3 if cfg.gated_mlp else 2) * d * f
    return cfg.n_layers * per_layer + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * matmul params + attention.

    The attention term is PaLM's 12 * n_layers * n_heads * head_dim * seq_len (QK^T and AV,
    each 2 FLOPs per multiply-add, x3 for forward + backward), counting the full T x T score
    matrix as hardware does without causal skipping.
    """
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params(cfg) + attention
