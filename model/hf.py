"""Hugging Face Llama-family checkpoints <-> (ModelConfig, params).

    cfg, params = import_hf("path/to/hf_dir")          # config.json + safetensors (sharded too)
    export_hf(cfg, params, "path/to/out_dir")          # transformers.AutoModelForCausalLM loads it

Supported: LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (q/k/v biases); RoPE with
Llama-3 frequency scaling; tied embeddings; `head_dim` differing from hidden_size / heads; Llama
with `attention_bias` and `mlp_bias` both set (hibari's `use_bias`). Weights are read and
written with the safetensors numpy API (bf16 through ml_dtypes), so torch is not needed here.

Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) equals full causal
attention for sequences no longer than the window. Such a checkpoint imports only when the
window covers `max_seq_len`; pass `max_seq_len=<window>` to import it for shorter sequences.

Layout: an HF Linear weight is W[out, in]; the hibari kernel is W.T reshaped to its named axes
(q: [d_model, heads, head_dim]; o: [heads, head_dim, d_model]). Transposes and reshapes are
exact, so export -> import is bitwise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hibari.base.errors import UserError
from hibari.model.config import ConfigError, ModelConfig, RopeScaling
from hibari.model.transformer import param_shapes

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class HFFormatError(UserError, ValueError):
    """A Hugging Face checkpoint can't be converted; the message names the file and tensor."""


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------

def _require(hf: dict, key: str, where: str):
    if hf.get(key) is None:
        raise ConfigError(f"{where}: required field {key!r} is missing; is this a causal-LM "
                          "config.json saved by transformers?")
    return hf[key]


def _rope_from_hf(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 5 `rope_parameters` or legacy `rope_scaling`."""
    spec = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(spec.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = spec.get("rope_type") or spec.get("type") or "default"
    if spec.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor={spec['partial_rotary_factor']} is "
                          "not supported (hibari rotates the whole head_dim)")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"{where}: rope_scaling rope_type={rope_type!r} is not supported; "
                          "hibari implements 'default' and 'llama3' RoPE only")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in spec]
    if missing:
        raise ConfigError(f"{where}: llama3 rope scaling lacks {missing}")
    return theta, RopeScaling(factor=float(spec["factor"]),
                              low_freq_factor=float(spec["low_freq_factor"]),
                              high_freq_factor=float(spec["high_freq_factor"]),
                              original_max_position_embeddings=int(
                                  spec["original_max_position_embeddings"]))


def _sliding_window(hf: dict, family: str) -> int | None:
    """The attention window that applies to at least one layer, else None."""
    window = hf.get("sliding_window")
    if family == "llama" or window is None:
        return None
    if family == "qwen2":
        layer_types = hf.get("layer_types")
        if not hf.get("use_sliding_window", False):
            return None
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        if layer_types is None and hf.get("max_window_layers", 0) >= hf["num_hidden_layers"]:
            return None
    return int(window)


def _biases(hf: dict, family: str, where: str) -> dict[str, bool]:
    if family == "qwen2":
        return {"qkv_bias": True, "use_bias": False}
    attn, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn != mlp:
        raise ConfigError(f"{where}: attention_bias={attn} with mlp_bias={mlp} is not supported; "
                          "hibari's use_bias puts biases on all projections or none")
    return {"qkv_bias": False, "use_bias": attn}


def config_from_hf(hf: dict, where: str = "config.json", *, scan_layers: bool = True,
                   dtype: str = "float32", compute_dtype: str | None = None,
                   max_seq_len: int | None = None) -> ModelConfig:
    """ModelConfig from a parsed HF config.json; unsupported features raise ConfigError."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConfigError(f"{where}: architectures={archs} is not supported; hibari imports "
                          f"exactly one of {sorted(ARCHITECTURES)}")
    family = ARCHITECTURES[archs[0]]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported (only 'silu' = SwiGLU)")
    theta, scaling = _rope_from_hf(hf, where)
    n_heads = int(_require(hf, "num_attention_heads", where))
    d_model = int(_require(hf, "hidden_size", where))
    max_pos = int(hf.get("max_position_embeddings", 2048))
    seq_len = max_pos if max_seq_len is None else int(max_seq_len)
    window = _sliding_window(hf, family)
    if window is not None and window < seq_len:
        raise ConfigError(
            f"{where}: sliding_window={window} is shorter than max_seq_len={seq_len}; hibari has "
            f"full causal attention only, which differs beyond the window. Import with "
            f"max_seq_len={window} (or less) to use the model on sequences within the window")
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size", where)),
        d_model=d_model,
        n_layers=int(_require(hf, "num_hidden_layers", where)),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        d_ff=int(_require(hf, "intermediate_size", where)),
        max_seq_len=seq_len,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        param_dtype=dtype,
        compute_dtype=compute_dtype or dtype,
        scan_layers=scan_layers,
        **_biases(hf, family, where),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for a ModelConfig that HF Llama (or Qwen2, for qkv_bias) can express."""
    required = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "qk_norm": False}
    for name, value in required.items():
        if getattr(cfg, name) != value:
            raise ConfigError(f"model.{name}={getattr(cfg, name)!r} can't be expressed by HF "
                              f"Llama/Qwen2; export needs model.{name}={value!r}")
    qwen2 = cfg.qkv_bias and not cfg.use_bias
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **vars(cfg.rope_scaling)}
    hf = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "dtype": cfg.param_dtype,
    }
    if qwen2:
        hf.update(use_sliding_window=False, sliding_window=None)
    else:
        hf.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
    return hf


# ---------------------------------------------------------------------------------------------
# Tensor names and layouts
# ---------------------------------------------------------------------------------------------

class Entry(NamedTuple):
    """One HF tensor: its name, hibari path (unscanned layers), layout and HF shape.

    kind "linear": hibari = W.T reshaped; kind "copy": hibari = W reshaped.
    """

    name: str
    path: tuple[str, ...]
    kind: str
    hf_shape: tuple[int, ...]


def _layer_entries(cfg: ModelConfig, i: int) -> list[Entry]:
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    p, layer = f"model.layers.{i}.", f"layers_{i}"
    linears = [("self_attn.q_proj", ("attn", "q"), (q, d)),
               ("self_attn.k_proj", ("attn", "k"), (kv, d)),
               ("self_attn.v_proj", ("attn", "v"), (kv, d)),
               ("self_attn.o_proj", ("attn", "o"), (d, q)),
               ("mlp.gate_proj", ("mlp", "gate"), (f, d)),
               ("mlp.up_proj", ("mlp", "up"), (f, d)),
               ("mlp.down_proj", ("mlp", "down"), (d, f))]
    out = [Entry(p + "input_layernorm.weight", (layer, "attn_norm", "scale"), "copy", (d,)),
           Entry(p + "post_attention_layernorm.weight", (layer, "mlp_norm", "scale"), "copy",
                 (d,))]
    for hf_name, path, shape in linears:
        out.append(Entry(p + hf_name + ".weight", (layer, *path, "kernel"), "linear", shape))
        qkv = hf_name.split(".")[1] in ("q_proj", "k_proj", "v_proj")
        if cfg.use_bias or (cfg.qkv_bias and qkv):
            out.append(Entry(p + hf_name + ".bias", (layer, *path, "bias"), "copy", shape[:1]))
    return out


def tensor_entries(cfg: ModelConfig) -> list[Entry]:
    """Every HF tensor of `cfg`, in file order."""
    v, d = cfg.vocab_size, cfg.d_model
    out = [Entry("model.embed_tokens.weight", ("embed", "embedding"), "copy", (v, d))]
    for i in range(cfg.n_layers):
        out += _layer_entries(cfg, i)
    out.append(Entry("model.norm.weight", ("final_norm", "scale"), "copy", (d,)))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), "linear", (v, d)))
    return out


def _to_hibari(entry: Entry, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (w.T if entry.kind == "linear" else w).reshape(shape)


def _to_hf(entry: Entry, x: np.ndarray) -> np.ndarray:
    if entry.kind == "linear":
        return np.ascontiguousarray(x.reshape(entry.hf_shape[::-1]).T)
    return np.ascontiguousarray(x.reshape(entry.hf_shape))


def _flat_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = param_shapes(cfg.replace(scan_layers=False))
    return {tuple(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _scan(cfg: ModelConfig, tree: dict) -> dict:
    """Stack layers_0..layers_{n-1} into one `layers` subtree with a leading [n_layers] axis."""
    layers = [tree.pop(f"layers_{i}") for i in range(cfg.n_layers)]
    tree["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return tree


def _unscan(cfg: ModelConfig, tree: dict) -> dict:
    tree = dict(tree)
    layers = tree.pop("layers")
    for i in range(cfg.n_layers):
        tree[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    return tree


# ---------------------------------------------------------------------------------------------
# Reading and writing safetensors
# ---------------------------------------------------------------------------------------------

def _weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / WEIGHTS).exists():
        return [hf_dir / WEIGHTS]
    index = hf_dir / INDEX
    if not index.exists():
        raise HFFormatError(
            f"{hf_dir}: neither {WEIGHTS} nor {INDEX} found; hibari reads safetensors only "
            "(re-save with transformers `save_pretrained(dir, safe_serialization=True)`)")
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise HFFormatError(f"{index}: no 'weight_map' object; is the index file complete?")
    files = [hf_dir / name for name in dict.fromkeys(weight_map.values())]
    for file in files:
        if not file.exists():
            raise HFFormatError(f"{index} names shard {file.name}, which is missing from "
                                f"{hf_dir}; download every shard of the checkpoint")
    return files


def read_tensors(hf_dir: str | Path) -> dict[str, tuple[np.ndarray, Path]]:
    """name -> (array, file) for every tensor of a checkpoint (single file or sharded)."""
    tensors: dict[str, tuple[np.ndarray, Path]] = {}
    for file in _weight_files(Path(hf_dir)):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                if name in tensors:
                    raise HFFormatError(f"tensor {name!r} appears in both {tensors[name][1]} "
                                        f"and {file}; the checkpoint is inconsistent")
                tensors[name] = (f.get_tensor(name), file)
    return tensors


def _ignorable(name: str, tensors: dict, cfg: ModelConfig) -> bool:
    """Buffers some checkpoints carry: RoPE inv_freq; lm_head equal to the tied embedding."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if name == "lm_head.weight" and cfg.tie_embeddings:
        if not np.array_equal(tensors[name][0], tensors["model.embed_tokens.weight"][0]):
            raise HFFormatError(
                f"{tensors[name][1]}: lm_head.weight differs from model.embed_tokens.weight but "
                "config.json has tie_word_embeddings=true; fix the flag in config.json")
        return True
    return False


def params_from_tensors(cfg: ModelConfig, tensors: dict[str, tuple[np.ndarray, Path]],
                        where: str) -> dict:
    """The hibari parameter tree of `cfg` from HF tensors; every tensor is checked."""
    shapes, flat = _flat_shapes(cfg), {}
    dtype = NP_DTYPES[cfg.param_dtype]
    for entry in tensor_entries(cfg):
        if entry.name not in tensors:
            raise HFFormatError(
                f"{where}: tensor {entry.name!r} is missing; config.json describes a model "
                "that needs it (check the config, or that every shard is present)")
        w, file = tensors[entry.name]
        if tuple(w.shape) != entry.hf_shape:
            raise HFFormatError(
                f"{file}: tensor {entry.name!r} has shape {tuple(w.shape)}, but config.json "
                f"implies {entry.hf_shape}; the config and the weights disagree")
        flat[entry.path] = _to_hibari(entry, w, shapes[entry.path]).astype(dtype)
    used = {e.name for e in tensor_entries(cfg)}
    extra = sorted(n for n in tensors if n not in used and not _ignorable(n, tensors, cfg))
    if extra:
        files = ", ".join(sorted({str(tensors[n][1]) for n in extra}))
        more = " ..." if len(extra) > 8 else ""
        raise HFFormatError(f"{files}: unexpected tensor(s) {extra[:8]}{more}; the checkpoint "
                            "has parts hibari's model lacks (unsupported variant?)")
    missing = sorted(set(shapes) - set(flat))
    if missing:  # a ModelConfig feature without an HF tensor mapping
        raise HFFormatError(f"{where}: no HF tensor maps to hibari params {missing}")
    tree = _nest(flat)
    return _scan(cfg, tree) if cfg.scan_layers else tree


def import_hf(hf_dir: str | Path, *, scan_layers: bool = True, dtype: str = "float32",
              compute_dtype: str | None = None, max_seq_len: int | None = None):
    """(cfg, params) from an HF checkpoint directory (config.json + safetensors).

    `dtype` is the parameter dtype (weights are cast to it; bf16 files upcast exactly);
    `compute_dtype` defaults to `dtype`. `max_seq_len` overrides max_position_embeddings
    (see the module docstring for sliding-window checkpoints).
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise HFFormatError(f"{hf_dir}: no config.json; pass a directory written by "
                            "transformers `save_pretrained` or `export_hf`")
    hf = json.loads(config_path.read_text())
    cfg = config_from_hf(hf, str(config_path), scan_layers=scan_layers, dtype=dtype,
                         compute_dtype=compute_dtype, max_seq_len=max_seq_len)
    flat = params_from_tensors(cfg, read_tensors(hf_dir), str(hf_dir))
    return cfg, jax.tree.map(jnp.asarray, flat)


def _flat_params(cfg: ModelConfig, params) -> dict[tuple[str, ...], np.ndarray]:
    """Unscanned flat {path: array} of `params`, checked against `cfg`'s shapes."""
    tree = _unscan(cfg, params) if cfg.scan_layers else params
    flat = {tuple(k.key for k in path): np.asarray(jax.device_get(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    expected = _flat_shapes(cfg)
    if set(flat) != set(expected):
        diff = sorted(set(flat) ^ set(expected))
        raise ConfigError(f"export_hf: params and cfg disagree at {diff[:6]}; pass the config "
                          "the params were created with")
    for path, shape in expected.items():
        if flat[path].shape != shape:
            raise ConfigError(f"export_hf: param {'.'.join(path)} has shape {flat[path].shape}, "
                              f"cfg implies {shape}")
    return flat


def export_hf(cfg: ModelConfig, params, out_dir: str | Path, *,
              extra_config: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors to `out_dir` (loadable by transformers).

    Tensors keep the parameters' dtype. `extra_config` is merged into config.json
    (e.g. bos_token_id / eos_token_id from the tokenizer). Validates before writing.
    """
    hf = {**config_to_hf(cfg), **(extra_config or {})}
    flat = _flat_params(cfg, params)
    tensors = {e.name: _to_hf(e, flat[e.path]) for e in tensor_entries(cfg)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out

