"""LoRA (Hu et al. 2021): low-rank adapters on the Transformer blocks' linear layers.

    lora_cfg = LoraConfig(rank=8, alpha=16, targets=("attn/q", "attn/v"))
    adapters = lora_params(cfg, lora_cfg, key)      # {"layers": {"attn": {"q": {"a", "b"}}}}
    logits = lora_apply(cfg, params, adapters, lora_cfg, tokens)   # adapter forward (unmerged)
    merged = apply_lora(params, adapters, lora_cfg)                # W + scale * A @ B, same logits

A targeted `Dense` computes y = x @ W (+ bias) + (dropout(x) @ A @ B) * scale, scale = alpha /
rank (PEFT's default), with A[*in, r] (PEFT's kaiming-uniform init: U(-1/sqrt(in), 1/sqrt(in)))
and B[r, *out] = 0, so a fresh adapter leaves the model unchanged. Kernels keep their true
shapes (q: [d_model, heads, head_dim] -> a [d_model, r], b [r, heads, head_dim]; o: [heads,
head_dim, d_model] -> a [heads, head_dim, r], b [r, d_model]).

Targets are fnmatch patterns over block module paths: "attn/q", "attn/k", "attn/v", "attn/o",
"mlp/gate", "mlp/up", "mlp/down" (a pattern also matches the last component alone, so "q" and
"attn/*" and "*" work). Every layer gets the same targets. The embedding and the unembedding
(lm_head) are not targets.

The adapter tree mirrors the parameter tree: scanned parameters (params["layers"], a leading
[n_layers] axis) give scanned adapters, unscanned (params["layers_i"]) give layers_i. Each leaf's
logical axes follow its base kernel's (`lora_axes`): a: (*in_axes, "lora_rank"), b: ("lora_rank",
*out_axes), with "layers" in front when scanned. "lora_rank" is in no axis-rule table, so flax
maps it to no mesh axis (replicated): A shards like the kernel's input, B like its output.

The adapter forward is the model's own (`Transformer.__call__` / `.hidden`): `attach` adds the
adapters to the parameter tree as extra leaves of each targeted Dense ("lora_a", "lora_b" and,
with dropout, a per-layer "lora_key" and "lora_dropout"), nn.scan slices them per layer like
the kernels, and a Dense that carries them adds the low-rank term (`Dense._lora`). So any code
that runs the model on a parameter tree (every task's loss, decoding, scoring) runs the
adapter forward on an attached tree; remat and scan apply unchanged. Training with LoRA
(`config.lora`) is `hibari.train.lora`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hibari.base.errors import UsageError, UserError
from hibari.model.config import ModelConfig
from hibari.model.transformer import Transformer, param_axes, param_shapes

LORA_RANK = "lora_rank"  # the logical axis name of the rank dimension (no mesh axis)
BLOCK_MODULES = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")
N_IN = {"attn/o": 2}  # input dims of a block kernel (the others: 1)
INITS = ("kaiming", "gaussian")
LORA_CONFIG = "lora_config.json"  # files of a hibari adapter export (`save_adapters`)
BASE_CONFIG = "base_model_config.json"
ADAPTERS = "adapters"


class LoraConfigError(UserError, ValueError):
    """A LoRA config field is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Hashable (a static jit argument). `targets`: fnmatch patterns over block module paths
    (see the module docstring); `init`: A's initialisation, "kaiming" (PEFT's default) or
    "gaussian" (normal with std 1/rank, PEFT's init_lora_weights="gaussian")."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn/q", "attn/v")  # PEFT's Llama default: q_proj, v_proj
    init: str = "kaiming"

    def __post_init__(self):
        if isinstance(self.targets, (list, str)):
            targets = (self.targets,) if isinstance(self.targets, str) else self.targets
            object.__setattr__(self, "targets", tuple(targets))
        self.validate()

    def validate(self, where: str = "lora"):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise LoraConfigError(f"{where}.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not self.alpha > 0:
            raise LoraConfigError(f"{where}.alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise LoraConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise LoraConfigError(f"{where}.targets must be a non-empty list of module patterns "
                                  f"such as {list(BLOCK_MODULES)}, got {self.targets!r}")
        for t in self.targets:
            if not any(_matches(m, t) for m in BLOCK_MODULES):
                raise LoraConfigError(f"{where}.targets: pattern {t!r} matches no module; the "
                                      f"modules are {list(BLOCK_MODULES)} (fnmatch patterns)")
        if self.init not in INITS:
            raise LoraConfigError(f"{where}.init={self.init!r} is unknown; choose one of {INITS}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def modules(self) -> tuple[str, ...]:
        """The block modules targeted, in BLOCK_MODULES order."""
        return tuple(m for m in BLOCK_MODULES if any(_matches(m, t) for t in self.targets))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


def _matches(module: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(module.split("/")[-1],
                                                                       pattern)


def lora_config_from_dict(d: dict[str, Any], where: str = "lora") -> LoraConfig:
    """LoraConfig from a plain dict (a config file, JSON); unknown or bad fields raise
    LoraConfigError naming `where.field`."""
    if not isinstance(d, dict):
        raise LoraConfigError(f"{where} must be a mapping with fields "
                              f"{[f.name for f in dataclasses.fields(LoraConfig)]}, got {d!r}")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise LoraConfigError(f"{where}: unknown field(s) {unknown}; known fields: "
                              f"{sorted(known)}")
    d = dict(d)
    if "targets" in d and isinstance(d["targets"], (list, tuple)):
        d["targets"] = tuple(d["targets"])
    if isinstance(d.get("alpha"), int) and not isinstance(d.get("alpha"), bool):
        d["alpha"] = float(d["alpha"])
    try:
        cfg = LoraConfig(**{k: v for k, v in d.items() if k != "targets"},
                         targets=d.get("targets", LoraConfig.targets))
    except LoraConfigError as e:
        msg = str(e)
        raise LoraConfigError(msg.replace("lora.", f"{where}.", 1)
                              if where != "lora" else msg) from None
    return cfg


# ---------------------------------------------------------------------------------------------
# The adapter tree
# ---------------------------------------------------------------------------------------------

def _node(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _layer_roots(cfg: ModelConfig) -> list[str]:
    return ["layers"] if cfg.scan_layers else [f"layers_{i}" for i in range(cfg.n_layers)]


def _check_modules(cfg: ModelConfig, lora_cfg: LoraConfig) -> tuple[str, ...]:
    modules = lora_cfg.modules
    if not cfg.gated_mlp and "mlp/gate" in modules:
        modules = tuple(m for m in modules if m != "mlp/gate")
        if not modules:
            raise LoraConfigError(f"lora.targets={list(lora_cfg.targets)}: model.mlp="
                                  f"{cfg.mlp!r} has no gate projection; target other modules")
    return modules


def lora_shapes(cfg: ModelConfig, lora_cfg: LoraConfig):
    """{root: {module path: {"a": shape, "b": shape}}} nested like the params tree."""
    shapes = param_shapes(cfg)
    tree: dict = {}
    for root in _layer_roots(cfg):
        for module in _check_modules(cfg, lora_cfg):
            kernel = _node(shapes[root], module)["kernel"].shape
            lead = 1 if cfg.scan_layers else 0
            n_in = N_IN.get(module, 1)
            a = kernel[:lead + n_in] + (lora_cfg.rank,)
            b = kernel[:lead] + (lora_cfg.rank,) + kernel[lead + n_in:]
            node = tree.setdefault(root, {})
            for key in module.split("/")[:-1]:
                node = node.setdefault(key, {})
            node[module.split("/")[-1]] = {"a": a, "b": b}
    return tree


@functools.partial(jax.jit, static_argnums=(0, 1))
def lora_params(cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array):
    """Fresh adapters: A from `lora_cfg.init`, B = 0 (the model is unchanged). A plain pytree
    in cfg.param_dtype; jittable with out_shardings (see `lora_axes`)."""
    dtype = jnp.dtype(cfg.param_dtype)
    shapes = lora_shapes(cfg, lora_cfg)
    flat = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, dict) and "a" in x)[0]
    out = []
    for path, leaf in flat:
        name = "/".join(p.key for p in path)
        k = jax.random.fold_in(key, zlib.crc32(name.encode()))
        lead = 1 if cfg.scan_layers else 0
        fan_in = math.prod(leaf["a"][lead:-1])
        if lora_cfg.init == "kaiming":
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(k, leaf["a"], jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, leaf["a"], jnp.float32) / lora_cfg.rank
        out.append({"a": a.astype(dtype), "b": jnp.zeros(leaf["b"], dtype)})
    treedef = jax.tree_util.tree_structure(
        shapes, is_leaf=lambda x: isinstance(x, dict) and "a" in x)
    return jax.tree_util.tree_unflatten(treedef, out)


def lora_axes(cfg: ModelConfig, lora_cfg: LoraConfig):
    """Logical PartitionSpecs of the adapters (like transformer.param_axes): a: (*kernel in
    axes, "lora_rank"), b: ("lora_rank", *kernel out axes), "layers" in front when scanned."""
    axes = param_axes(cfg)
    tree: dict = {}
    for root in _layer_roots(cfg):
        for module in _check_modules(cfg, lora_cfg):
            spec = tuple(_node(axes[root], module)["kernel"])
            lead = 1 if cfg.scan_layers else 0
            n_in = N_IN.get(module, 1)
            node = tree.setdefault(root, {})
            for key in module.split("/")[:-1]:
                node = node.setdefault(key, {})
            node[module.split("/")[-1]] = {
                "a": P(*spec[:lead + n_in], LORA_RANK),
                "b": P(*spec[:lead], LORA_RANK, *spec[lead + n_in:])}
    return tree


def _adapter_modules(adapters, prefix: tuple[str, ...] = ()):
    """(path, {"a", "b"}) of every adapted module of an adapter tree."""
    for key in sorted(adapters):
        node = adapters[key]
        if isinstance(node, dict) and "a" in node and "b" in node:
            yield prefix + (key,), node
        elif isinstance(node, dict):
            yield from _adapter_modules(node, prefix + (key,))


def _set(tree: dict, path: tuple[str, ...], value: dict) -> dict:
    """A copy of `tree` with tree[path] updated by `value` (dicts copied along the path)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = {**tree[path[0]], **value}
    else:
        out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def _check_paths(params, adapters) -> None:
    for path, _ in _adapter_modules(adapters):
        node = params
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise UsageError(f"adapter {'/'.join(path)} has no module in the parameter "
                                 "tree; were the adapters made for this model (scanned vs "
                                 "unscanned layers too)?")
            node = node[key]


def delta_kernel(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
    """A @ B reshaped to the kernel's shape [lead..., *in, *out] (fp32): a[lead..., *in, r],
    b[lead..., r, *out]; the leading (layer) dims are inferred from the kernel's rank."""
    lead = a.ndim + b.ndim - 2 - kernel_ndim
    lead_shape, r = a.shape[:lead], a.shape[-1]
    in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
    a2 = a.astype(jnp.float32).reshape(lead_shape + (math.prod(in_shape), r))
    b2 = b.astype(jnp.float32).reshape(lead_shape + (r, math.prod(out_shape)))
    return jnp.matmul(a2, b2).reshape(lead_shape + in_shape + out_shape)


@functools.partial(jax.jit, static_argnums=2)
def apply_lora(params, adapters, lora_cfg: LoraConfig):
    """The merged parameter tree: each adapted kernel W + scale * A @ B (computed in fp32,
    stored in W's dtype). Sharded parameters stay sharded."""
    _check_paths(params, adapters)
    for path, ab in _adapter_modules(adapters):
        kernel = _node(params, "/".join(path))["kernel"]
        delta = delta_kernel(ab["a"], ab["b"], kernel.ndim) * lora_cfg.scale
        merged = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        params = _set(params, path, {"kernel": merged})
    return params


# ---------------------------------------------------------------------------------------------
# The adapter forward
# ---------------------------------------------------------------------------------------------

def attach(params, adapters, lora_cfg: LoraConfig, rng: jax.Array | None = None):
    """`params` with each adapted Dense also holding "lora_a", "lora_b" (B times the scale)
    and, when `lora_cfg.dropout` > 0 and `rng` is given, "lora_key" (one dropout key per
    layer) and "lora_dropout" (the rate): a tree every forward of the model (`apply`,
    `hidden`, a task's loss) runs as the adapter forward (`Dense._lora`). Differentiable in
    `adapters`; no kernel is copied or changed."""
    _check_paths(params, adapters)
    use_dropout = rng is not None and lora_cfg.dropout > 0
    if use_dropout and not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # a raw uint32 PRNGKey
    for i, (path, ab) in enumerate(_adapter_modules(adapters)):
        extra = {"lora_a": ab["a"], "lora_b": ab["b"] * jnp.asarray(lora_cfg.scale,
                                                                    ab["b"].dtype)}
        if use_dropout:
            kernel = _node(params, "/".join(path))["kernel"]
            lead = ab["a"].shape[:ab["a"].ndim + ab["b"].ndim - 2 - kernel.ndim]
            k = jax.random.fold_in(rng, i)
            keys = jax.random.split(k, lead[0]) if lead else k
            extra["lora_key"] = jax.random.key_data(keys)
            extra["lora_dropout"] = jnp.full(lead, lora_cfg.dropout, jnp.float32)
        params = _set(params, path, extra)
    return params


def _forward(cfg, params, adapters, lora_cfg, rng, method, *args):
    tree = attach(params, adapters, lora_cfg, rng)
    return Transformer(cfg).apply({"params": tree}, *args, method=method)


@functools.partial(jax.jit, static_argnums=(0, 3))
def lora_apply(cfg: ModelConfig, params, adapters, lora_cfg: LoraConfig, tokens,
               segment_ids=None, positions=None, rng: jax.Array | None = None):
    """logits[b, t, v] (fp32) of the adapter forward: the base `params` frozen (differentiate
    in `adapters` only), dropout on the adapters' input when `rng` is given (training)."""
    return _forward(cfg, params, adapters, lora_cfg, rng, Transformer.__call__, tokens,
                    segment_ids, positions)


@functools.partial(jax.jit, static_argnums=(0, 3))
def lora_hidden(cfg: ModelConfig, params, adapters, lora_cfg: LoraConfig, tokens,
                segment_ids=None, positions=None, rng: jax.Array | None = None):
    """Final hidden states h[b, t, d] of the adapter forward; pair with
    `hibari.model.unembed(cfg, params, h)` (the unembedding is never adapted)."""
    return _forward(cfg, params, adapters, lora_cfg, rng, Transformer.hidden, tokens,
                    segment_ids, positions)


def count_lora_params(adapters) -> int:
    return sum(x.size for x in jax.tree.leaves(adapters))


# ---------------------------------------------------------------------------------------------
# A hibari adapter export: lora_config.json + base_model_config.json + adapters/ (orbax)
# ---------------------------------------------------------------------------------------------

def save_adapters(directory: str | os.PathLike, cfg: ModelConfig, lora_cfg: LoraConfig,
                  adapters) -> Path:
    """Write `directory/{lora_config.json, base_model_config.json, adapters/, checksums.json}`
    (refuses to overwrite). The base model's config is recorded to check shapes on load."""
    import orbax.checkpoint as ocp

    from hibari.model.params_io import CHECKSUMS, CheckpointError, tree_checksums
    directory = Path(directory).absolute()
    if (directory / ADAPTERS).exists():
        raise CheckpointError(f"{directory}/{ADAPTERS} already exists; choose a new --out "
                              "directory or delete the old one")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / ADAPTERS, adapters)
    (directory / CHECKSUMS).write_text(json.dumps({"params": tree_checksums(adapters)}))
    (directory / LORA_CONFIG).write_text(json.dumps(lora_cfg.to_dict(), indent=2) + "\n")
    (directory / BASE_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return directory


def load_adapters(directory: str | os.PathLike, cfg: ModelConfig, shardings=None):
    """(lora_cfg, adapters) of a `save_adapters` directory, for the base model `cfg` (the
    recorded base config must agree on shapes; scanned/unscanned may differ)."""
    from hibari.base.errors import InputNotFound
    from hibari.model.params_io import CheckpointError, restore_verified
    directory = Path(directory).absolute()
    if not (directory / LORA_CONFIG).is_file():
        raise InputNotFound(f"{directory}: no {LORA_CONFIG}; pass a directory written by "
                            "save_adapters / `hibari lora import`")
    try:
        lora_cfg = lora_config_from_dict(json.loads((directory / LORA_CONFIG).read_text()),
                                         where=str(directory / LORA_CONFIG))
        base = ModelConfig.from_dict(json.loads((directory / BASE_CONFIG).read_text()),
                                     where=str(directory / BASE_CONFIG))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}: cannot read the adapter configs ({e})") from e
    shape_fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "d_ff", "mlp")
    differ = [f for f in shape_fields if getattr(base, f) != getattr(cfg, f)]
    if differ:
        raise CheckpointError(
            f"{directory / BASE_CONFIG}: the adapters were made for a different model ("
            + ", ".join(f"{f}={getattr(base, f)} vs {getattr(cfg, f)}" for f in differ)
            + "); pass the base checkpoint they were trained on")
    shapes = jax.eval_shape(lambda k: lora_params(base, lora_cfg, k), jax.random.key(0))
    adapters = relayout(restore_verified(directory / ADAPTERS, shapes), base, cfg)
    if shardings is not None:
        adapters = jax.device_put(adapters, shardings)
    return lora_cfg, adapters


def relayout(adapters, saved: ModelConfig, cfg: ModelConfig):
    """Adapters of a `saved`-layout model (scanned or not) in `cfg`'s layout."""
    if saved.scan_layers == cfg.scan_layers:
        return adapters
    if saved.scan_layers:
        return {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], adapters["layers"])
                for i in range(cfg.n_layers)}
    layers = [adapters[f"layers_{i}"] for i in range(cfg.n_layers)]
    return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


# ---------------------------------------------------------------------------------------------
# A training run with config.lora: its checkpoints hold the trainable tree (adapters in place of
# each adapted Transformer); lora.json names the frozen base of each
# ---------------------------------------------------------------------------------------------

LORA_RUN = "lora.json"


def subtree(tree, path: str):
    """tree at `path` ("a/b"; "" is the whole tree)."""
    return _node(tree, path) if path else tree


def replace_subtree(tree, path: str, value):
    """A copy of `tree` with the node at `path` replaced by `value` ("" replaces the tree)."""
    if not path:
        return value
    head, _, rest = path.partition("/")
    return {**tree, head: replace_subtree(tree[head], rest, value)}


def write_lora_record(run_dir: str | os.PathLike, lora_cfg: LoraConfig,
                      bases: dict[str, tuple[str, ModelConfig]]) -> None:
    """Record in `run_dir/lora.json` which subtrees of the run's parameters are adapters, the
    LoRA config, and each one's base checkpoint and model config (`bases`: path -> (checkpoint,
    cfg)), so `load_params` / `restore_run_params` can rebuild the merged model."""
    from hibari.base.files import write_atomic
    record = {"lora": lora_cfg.to_dict(),
              "bases": {path: {"checkpoint": str(Path(ckpt).absolute()), "model": cfg.to_dict()}
                        for path, (ckpt, cfg) in bases.items()}}
    write_atomic(Path(run_dir) / LORA_RUN, json.dumps(record, indent=2) + "\n")


def read_lora_record(run_dir: str | os.PathLike
                     ) -> tuple[LoraConfig, dict[str, tuple[str, ModelConfig]]] | None:
    """(lora_cfg, {path: (base checkpoint, base cfg)}) of a LoRA training run; None for others."""
    from hibari.model.params_io import CheckpointError
    path = Path(run_dir) / LORA_RUN
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        lora_cfg = lora_config_from_dict(record["lora"], where=str(path))
        bases = {p: (b["checkpoint"], ModelConfig.from_dict(b["model"], where=str(path)))
                 for p, b in record["bases"].items()}
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the LoRA record ({type(e).__name__}: {e})"
                              ) from e
    return lora_cfg, bases


def trainable_shapes(shapes, lora_cfg: LoraConfig, bases: dict[str, tuple[str, ModelConfig]]):
    """The checkpointed tree of a LoRA run whose full parameter tree is `shapes`."""
    for path, (_, cfg) in bases.items():
        adapters = jax.eval_shape(lambda k, c=cfg: lora_params(c, lora_cfg, k),
                                  jax.random.key(0))
        shapes = replace_subtree(shapes, path, adapters)
    return shapes


def merge_run(trainable, lora_cfg: LoraConfig, bases: dict[str, tuple[str, ModelConfig]]):
    """The full, merged parameter tree of a LoRA run's checkpointed `trainable` tree: each
    base read back (`load_params`, LoRA runs included) and its adapters folded in."""
    from hibari.model.params_io import CheckpointError, load_params
    for path, (checkpoint, cfg) in bases.items():
        base_cfg, base = load_params(checkpoint)
        if param_shapes(base_cfg) != param_shapes(cfg):
            raise CheckpointError(f"{checkpoint}: the LoRA run's base no longer matches the "
                                  "model it was trained on (another model was saved there?)")
        adapters = jax.device_put(subtree(trainable, path), jax.devices()[0])
        trainable = replace_subtree(trainable, path, apply_lora(base, adapters, lora_cfg))
    return trainable
