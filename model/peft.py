"""PEFT LoRA adapter files <-> hibari adapters (`hibari.model.lora`), for Llama-family models.

    export_peft(cfg, lora_cfg, adapters, "out/")   # adapter_config.json + adapter_model.safetensors
    lora_cfg, adapters = import_peft("out/", cfg)  # the reverse (cfg: the base model's config)

`peft.PeftModel.from_pretrained(model, "out/")` loads the export onto the HF model that
`hibari.model.hf.export_hf` (`hibari convert --to-hf`) writes for the base, and computes the
same function: PEFT's LoRA is y = x W^T + (lora_B(lora_A(dropout(x)))) * lora_alpha / r with
lora_A.weight[r, in], lora_B.weight[out, r]; hibari's is x @ W + (x @ A @ B) * alpha / rank with
a[*in, r], b[r, *out]. So lora_A.weight = a flattened to [in, r] and transposed, lora_B.weight =
b flattened to [r, out] and transposed, with the same in/out flattening as the kernels' (the
`linear` layout of hibari.model.hf; o_proj's input is heads x head_dim). Exact both ways.

Tensor names: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight (PEFT's
saved names, without the adapter name), likewise k/v/o_proj and mlp.gate/up/down_proj.

Import accepts plain LoRA only: every layer adapted the same way, no biases, no
fan_in_fan_out, no modules_to_save, no rank/alpha patterns, no DoRA; anything else raises
PeftFormatError naming the field or tensor. rsLoRA (scale alpha / sqrt(r)) imports exactly as
alpha' = alpha * sqrt(r) (scale alpha' / r); `lora_dropout` is kept, `target_modules` is
replaced by the modules whose tensors are present.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hibari.base.errors import InputNotFound, UserError
from hibari.model.config import ModelConfig
from hibari.model.hf import (
    NP_DTYPES,
    Entry,
    _layer_entries,
    _nest,
    _scan,
    _to_hf,
    _to_hibari,
    _unscan,
)
from hibari.model.lora import LoraConfig, LoraConfigError, lora_shapes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)"
                  r"\.lora_([AB])\.weight")


class PeftFormatError(UserError, ValueError):
    """A PEFT adapter directory can't be converted; the message names the file and field."""


def module_names(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, int]]]:
    """{hibari block module ("attn/q"): (HF module name "self_attn.q_proj", HF W[out, in])}."""
    out = {}
    for e in _layer_entries(cfg, 0):
        if e.kind == "linear" and e.name.endswith(".weight"):
            hf = e.name.removeprefix("model.layers.0.").removesuffix(".weight")
            out["/".join(e.path[1:-1])] = (hf, e.hf_shape)
    return out


def _a_b_entries(cfg: ModelConfig, rank: int, module: str, i: int) -> tuple[Entry, Entry]:
    hf, (n_out, n_in) = module_names(cfg)[module]
    stem = f"{PREFIX}model.layers.{i}.{hf}"
    path = (f"layers_{i}", *module.split("/"))
    return (Entry(stem + ".lora_A.weight", path + ("a",), "linear", (rank, n_in)),
            Entry(stem + ".lora_B.weight", path + ("b",), "linear", (n_out, rank)))


def peft_config(cfg: ModelConfig, lora_cfg: LoraConfig,
                base_model_name_or_path: str = "") -> dict[str, Any]:
    """adapter_config.json for PEFT's LoraConfig."""
    names = module_names(cfg)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": sorted(names[m][0].split(".")[-1] for m in lora_cfg.modules
                                 if m in names),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def peft_tensors(cfg: ModelConfig, lora_cfg: LoraConfig, adapters) -> dict[str, np.ndarray]:
    """{PEFT tensor name: array} of hibari `adapters` (scanned or not, per `cfg`)."""
    tree = _unscan(cfg, adapters) if cfg.scan_layers else dict(adapters)
    out = {}
    for i in range(cfg.n_layers):
        for module in lora_cfg.modules:
            node = tree[f"layers_{i}"]
            for key in module.split("/"):
                if key not in node:
                    break
                node = node[key]
            else:
                for entry, leaf in zip(_a_b_entries(cfg, lora_cfg.rank, module, i), ("a", "b")):
                    out[entry.name] = _to_hf(entry, np.asarray(jax.device_get(node[leaf])))
    return out


def export_peft(cfg: ModelConfig, lora_cfg: LoraConfig, adapters, out_dir: str | Path,
                base_model_name_or_path: str = "") -> Path:
    """Write adapter_config.json + adapter_model.safetensors (the adapters' dtype)."""
    tensors = peft_tensors(cfg, lora_cfg, adapters)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(cfg, lora_cfg, base_model_name_or_path)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------

_UNSUPPORTED = {  # field: (value meaning "off", why it matters)
    "fan_in_fan_out": (False, "weights stored transposed (GPT-2 Conv1D layers)"),
    "use_dora": (False, "DoRA's magnitude vectors"),
    "modules_to_save": (None, "fully trained extra modules"),
    "layers_to_transform": (None, "adapters on some layers only"),
    "rank_pattern": ({}, "per-module ranks"),
    "alpha_pattern": ({}, "per-module alphas"),
    "lora_bias": (False, "a bias on lora_B"),
    "trainable_token_indices": (None, "trained token embeddings"),
    "target_parameters": (None, "adapters on parameters instead of modules"),
}


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise InputNotFound(f"{path.parent}: no {ADAPTER_CONFIG}; pass a directory written "
                            "by peft's save_pretrained or `hibari lora export`")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PeftFormatError(f"{path}: unreadable JSON ({e})") from e
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(f"{path}: peft_type={config.get('peft_type')!r}; hibari imports "
                              "LoRA adapters only (peft_type 'LORA')")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise PeftFormatError(f"{path}: task_type={config['task_type']!r}; hibari imports "
                              "CAUSAL_LM adapters")
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{path}: bias={config['bias']!r} is not supported (trained "
                              "biases of the base model); only bias 'none' imports")
    for field, (off, what) in _UNSUPPORTED.items():
        value = config.get(field, off)
        if value not in (off, None, {}, [], False):
            raise PeftFormatError(f"{path}: {field}={value!r} ({what}) is not supported; "
                                  f"hibari imports plain LoRA ({field}={off!r})")
    return config


def import_peft(peft_dir: str | Path, cfg: ModelConfig) -> tuple[LoraConfig, Any]:
    """(lora_cfg, adapters) from a PEFT LoRA directory for the base model `cfg` (adapters
    scanned like cfg, in cfg.param_dtype). Targets come from the tensors present."""
    peft_dir = Path(peft_dir)
    config_path = peft_dir / ADAPTER_CONFIG
    config = _read_config(config_path)
    weights = peft_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise InputNotFound(f"{peft_dir}: no {ADAPTER_WEIGHTS} (hibari reads safetensors only; "
                            "re-save with save_pretrained(dir, safe_serialization=True))")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    rslora = bool(config.get("use_rslora", False))
    if rslora and isinstance(rank, int) and isinstance(alpha, (int, float)) and rank > 0:
        alpha = alpha * math.sqrt(rank)  # rsLoRA's alpha / sqrt(r) = (alpha sqrt(r)) / r
    by_hf = {hf: module for module, (hf, _) in module_names(cfg).items()}
    found: dict[str, set] = {}
    tensors = {}
    with safe_open(str(weights), framework="numpy") as f:
        for name in f.keys():
            m = _KEY.fullmatch(name)
            if m is None or m.group(2) not in by_hf or int(m.group(1)) >= cfg.n_layers:
                raise PeftFormatError(
                    f"{weights}: tensor {name!r} is not a LoRA A/B weight of a block projection "
                    f"of this {cfg.n_layers}-layer Llama-family model (e.g. "
                    f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight)")
            found.setdefault(by_hf[m.group(2)], set()).add((int(m.group(1)), m.group(3)))
            tensors[name] = f.get_tensor(name)
    if not found:
        raise PeftFormatError(f"{weights}: no LoRA tensors")
    everywhere = {(i, ab) for i in range(cfg.n_layers) for ab in "AB"}
    for module, seen in found.items():
        if seen != everywhere:
            missing = sorted(everywhere - seen)[:4]
            raise PeftFormatError(f"{weights}: {module_names(cfg)[module][0]} lacks "
                                  f"(layer, A/B) {missing}; hibari adapts every layer alike")
    modules = tuple(m for m in module_names(cfg) if m in found)
    try:
        lora_cfg = LoraConfig(rank=rank, alpha=float(alpha) if isinstance(alpha, (int, float))
                              and not isinstance(alpha, bool) else alpha,
                              dropout=float(config.get("lora_dropout") or 0.0), targets=modules)
    except LoraConfigError as e:
        msg = str(e).replace("lora.rank", "r").replace("lora.alpha", "lora_alpha")
        raise PeftFormatError(f"{config_path}: {msg.replace('lora.dropout', 'lora_dropout')}"
                              ) from None
    plain = cfg.replace(scan_layers=False)
    shapes = lora_shapes(plain, lora_cfg)
    dtype = NP_DTYPES[cfg.param_dtype]
    flat = {}
    for i in range(cfg.n_layers):
        node = shapes[f"layers_{i}"]
        for module in modules:
            leaf_shapes = node
            for key in module.split("/"):
                leaf_shapes = leaf_shapes[key]
            for entry, leaf in zip(_a_b_entries(cfg, rank, module, i), ("a", "b")):
                w = tensors[entry.name]
                if tuple(w.shape) != entry.hf_shape:
                    raise PeftFormatError(
                        f"{weights}: tensor {entry.name!r} has shape {tuple(w.shape)}, but "
                        f"r={rank} and the base model imply {entry.hf_shape}; were the adapters "
                        "trained on this base model?")
                flat[entry.path] = _to_hibari(entry, w, leaf_shapes[leaf]).astype(dtype)
    tree = _nest(flat)
    if cfg.scan_layers:
        tree = _scan(cfg, tree)
    return lora_cfg, jax.tree.map(jnp.asarray, tree)
