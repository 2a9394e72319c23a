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
import math
import zlib
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
# Paths into parameter trees
# ---------------------------------------------------------------------------------------------

def subtree(tree, path: str):
    """tree at `path` ("a/b"; "" is the whole tree)."""
    return _node(tree, path) if path else tree


def replace_subtree(tree, path: str, value):
    """A copy of `tree` with the node at `path` replaced by `value` ("" replaces the tree)."""
    if not path:
        return value
    head, _, rest = path.partition("/")
    return {**tree, head: replace_subtree(tree[head], rest, value)}
