"""`ModelConfig`: every shape and ablation switch of the Transformer, validated on construction.

The defaults describe the Llama-style "Transformer++" (RMSNorm, SwiGLU, RoPE, no biases); the
original Transformer is `norm="layernorm", mlp="relu", position="sinusoidal", use_bias=True`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from hibari.base.errors import UserError

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "geglu", "gelu", "relu")
POSITIONS = ("rope", "learned", "sinusoidal", "none")
# the last three are segment-id kernels (model/attention.py): no dense mask for packed rows
ATTENTIONS = ("xla", "dot_product", "cudnn", "cudnn_segments", "pallas_gpu", "splash")
REMATS = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and what to do."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (rope_type "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000  # embedding rows (>= the tokenizer's pieces)
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; else GQA
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int = 1408  # MLP hidden width
    max_seq_len: int = 2048  # longest sequence (learned positions, KV cache)
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # output projection = embedding transposed
    param_dtype: str = "float32"  # float32 | bfloat16 | float16 (stored parameters)
    compute_dtype: str = "float32"  # matmul dtype; softmax, norms and losses stay fp32
    init_std: float = 0.02  # std of the normal initialisation of every matrix
    # Ablation switches.
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "swiglu"  # swiglu | geglu | gelu | relu
    position: str = "rope"  # rope | learned | sinusoidal | none
    use_bias: bool = False  # biases on every dense layer (original Transformer)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys
    # Implementation choices (no effect on the function computed).
    attention: str = "xla"  # xla | dot_product | cudnn (GPU flash attention, dense mask) | cudnn_segments | pallas_gpu | splash (segment-id kernels: docs/attention.md)
    scan_layers: bool = True  # one nn.scan over layers (fast compiles)
    remat: str = "none"  # none | full | dots | dots_no_batch | save_attn_out

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # from JSON / ml_collections
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"model.d_model={self.d_model} is not divisible by model.n_heads="
                    f"{self.n_heads}; change one of them or set model.head_dim explicitly")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        self._validate()

    def _validate(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads="
                f"{self.n_kv_heads} (grouped-query attention shares each KV head among a group)")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for position='rope'")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"model.d_model={self.d_model} must be even for 'sinusoidal'")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS),
                              ("attention", ATTENTIONS), ("remat", REMATS),
                              ("param_dtype", DTYPES), ("compute_dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"model.{name}={getattr(self, name)!r} is unknown; choose one of {allowed}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError("model.rope_scaling must be None or a dict with keys "
                              f"{[f.name for f in dataclasses.fields(RopeScaling)]}")

    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> ModelConfig:
        """Build from a plain dict (config.json, ml_collections); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)
