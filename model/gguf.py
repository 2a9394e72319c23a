"""Llama-architecture GGUF files (llama.cpp) -> (ModelConfig, params), dequantized.

    cfg, params = import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

Needs the `gguf` package (`pip install gguf`; not a hibari dependency). Quantized tensors
(Q4_1, Q8_0, K-quants, ...) are dequantized to float32 by `gguf.quants.dequantize`.

llama.cpp's converter reorders the rows of each q/k head from the rotate-half RoPE layout
(HF, hibari: pairs (i, i + d/2)) to the interleaved one (pairs (2i, 2i + 1)); this importer
reorders them back, then maps names onto the HF layout and reuses `model.hf` for the rest.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hibari.model.config import ConfigError, ModelConfig
from hibari.model.hf import HFFormatError, params_from_tensors

LAYER_NAMES = {  # GGUF blk.{i}.<name>.weight -> HF model.layers.{i}.<name>.weight
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _field(reader, key: str, where: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise HFFormatError(f"{where}: metadata key {key!r} is missing")
        return default
    return field.contents()


def gguf_config(reader, where: str, *, scan_layers: bool, dtype: str) -> ModelConfig:
    """ModelConfig from GGUF metadata (architecture "llama" only)."""
    arch = _field(reader, "general.architecture", where)
    if arch != "llama":
        raise ConfigError(f"{where}: general.architecture={arch!r} is not supported; "
                          "hibari imports 'llama' GGUF files only")
    scaling = _field(reader, "llama.rope.scaling.type", where, "none")
    if scaling != "none" or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise ConfigError(f"{where}: RoPE scaling ({scaling!r} / rope_freqs.weight) in GGUF "
                          "is not supported; import the HF checkpoint instead")
    n_heads = int(_field(reader, "llama.attention.head_count", where))
    d_model = int(_field(reader, "llama.embedding_length", where))
    head_dim = int(_field(reader, "llama.attention.key_length", where, d_model // n_heads))
    rot = int(_field(reader, "llama.rope.dimension_count", where, head_dim))
    if rot != head_dim:
        raise ConfigError(f"{where}: llama.rope.dimension_count={rot} != head_dim={head_dim}; "
                          "partial rotary embeddings are not supported")
    vocab = _field(reader, "llama.vocab_size", where, 0) or len(
        _field(reader, "tokenizer.ggml.tokens", where))
    return ModelConfig(
        vocab_size=int(vocab), d_model=d_model,
        n_layers=int(_field(reader, "llama.block_count", where)),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", where, n_heads)),
        head_dim=head_dim,
        d_ff=int(_field(reader, "llama.feed_forward_length", where)),
        max_seq_len=int(_field(reader, "llama.context_length", where)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", where, 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", where)),
        tie_embeddings="output.weight" not in {t.name for t in reader.tensors},
        param_dtype=dtype, compute_dtype=dtype, scan_layers=scan_layers)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """w[heads * hd, in] with each head's rows interleaved (0, d/2, 1, d/2+1, ...) -> rows in
    rotate-half order (0, 1, ..., d/2 - 1, d/2, ...)."""
    out, n_in = w.shape
    half = out // n_heads // 2
    return w.reshape(n_heads, half, 2, n_in).transpose(0, 2, 1, 3).reshape(out, n_in)


def _hf_name(name: str, where: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    raise HFFormatError(f"{where}: tensor {name!r} has no hibari counterpart "
                        "(unsupported GGUF variant)")


def import_gguf(path: str | Path, *, scan_layers: bool = True, dtype: str = "float32"):
    """(cfg, params) from a llama GGUF file, every tensor dequantized to float32 first."""
    import gguf  # optional dependency

    path = Path(path)
    if not path.is_file():
        raise HFFormatError(f"{path}: no such GGUF file")
    reader = gguf.GGUFReader(str(path))
    cfg = gguf_config(reader, str(path), scan_layers=scan_layers, dtype=dtype)
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name, str(path))
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.n_heads if "q_proj" in name else cfg.n_kv_heads
            w = unpermute_rope_rows(w, heads)
        tensors[name] = (w, path)
    params = params_from_tensors(cfg, tensors, str(path))
    return cfg, jax.tree.map(jnp.asarray, params)
