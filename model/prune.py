"""Unstructured pruning of the Transformer blocks' linear layers: Wanda, magnitude, random.

    stats = dense_statistics(cfg, params, batches)              # hibari.model.activations
    pruned, report = prune_params(cfg, params, method="wanda", sparsity=0.5, statistics=stats)

Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs") scores weight
W_ij of `y = x @ W` (kernel[in, out]) by |W_ij| * ||X_i||_2, the norm of input feature i over
the calibration tokens, and removes the lowest-scoring weights of each output unit (column):
exactly floor(sparsity * in) of every column. `magnitude` scores |W_ij|, `random` a seeded
uniform number; both are compared within the same groups:

  per="output"   each column of the [in, out] matrix on its own (Wanda's default):
                 floor(sparsity * in) weights removed from every column.
  per="layer"    one threshold for the whole matrix: floor(sparsity * in * out) removed.

floor(sparsity * n) is taken of the sparsity's decimal value (0.29 * 100 -> 29, not the 28 of
float arithmetic). Ties are broken by position (a stable sort: the lower input index goes first),
so masks are deterministic; weights that are already zero score 0 and go first.

What is pruned: every `Dense` of every block (attn q, k, v, o; mlp gate, up, down). The
embeddings and the unembedding (lm_head) are not (as in Wanda), nor biases or norms. Kernels keep
their true shapes (q: [d_model, heads, head_dim], o: [heads, head_dim, d_model]); a mask is
computed on the [in, out] matrix (o: in = heads * head_dim) and reshaped back. Parameter trees
with scanned layers (params["layers"][...]["kernel"][i]) and unscanned ones (params["layers_i"])
are both handled; module names are those of the unscanned tree ("layers_3/attn/q"), as
`hibari.model.activations.dense_statistics` returns them. Everything is jitted jnp on the arrays
as given, so sharded parameters stay sharded.
"""
from __future__ import annotations

import functools
import math
import zlib
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from hibari.base.errors import UsageError
from hibari.model.config import ModelConfig

METHODS = ("wanda", "magnitude", "random")
GROUPS = ("output", "layer")
# input dims of a block kernel (the others: 1): o reads [heads, head_dim]
_N_IN = {"attn/o": 2}


def removed_count(sparsity: float, n: int) -> int:
    """floor(sparsity * n), exact for the decimal sparsity given."""
    return math.floor(Fraction(repr(float(sparsity))) * n)


def check_sparsity(sparsity: float) -> float:
    try:
        ok = 0 <= float(sparsity) < 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"sparsity={sparsity!r}: give a fraction in [0, 1) (0.5 = half the "
                         "weights of every matrix removed)")
    return float(sparsity)


def _check_per(per: str) -> None:
    if per not in GROUPS:
        raise UsageError(f"per={per!r}: choose one of {GROUPS}")


def keep_from_scores(scores, sparsity: float, per: str = "output"):
    """Boolean keep-mask of scores[in, out]: False on the floor(sparsity * in) lowest scores of
    each column (per="output") or the floor(sparsity * in * out) lowest of the matrix
    (per="layer"); ties to the lower (flattened) index."""
    _check_per(per)
    check_sparsity(sparsity)
    n_in, n_out = scores.shape
    if per == "output":
        return _keep_columns(scores, removed_count(sparsity, n_in))
    flat = _keep_columns(scores.reshape(-1, 1), removed_count(sparsity, n_in * n_out))
    return flat.reshape(scores.shape)


@jax.jit
def _ranks(scores):
    order = jnp.argsort(scores, axis=0, stable=True)
    return jnp.argsort(order, axis=0, stable=True)  # rank of each entry within its column


def _keep_columns(scores, k: int):
    return _ranks(jnp.asarray(scores, jnp.float32)) >= k


def _matrix(kernel, n_in: int):
    """kernel[*in, *out] as [prod(in), prod(out)]."""
    return kernel.reshape(math.prod(kernel.shape[:n_in]), -1)


def wanda_masks(kernel, input_norms, sparsity: float, per: str = "output"):
    """Keep-mask of kernel's shape for `x @ kernel` (kernel[in, out], or kernel[*in, *out] with
    input_norms[*in]) and input_norms[in] = ||X_i||_2 over the calibration tokens: for each
    output unit (column), the floor(sparsity * in) inputs with the smallest |W_ij| * ||X_i||_2
    are removed (False). per="layer": the smallest floor(sparsity * in * out) of the matrix."""
    norms = jnp.asarray(input_norms, jnp.float32)
    if tuple(kernel.shape[:norms.ndim]) != tuple(norms.shape):
        raise ValueError(f"wanda_masks: input_norms{list(norms.shape)} do not match the input "
                         f"dims of kernel{list(kernel.shape)}")
    scores = jnp.abs(_matrix(kernel, norms.ndim).astype(jnp.float32)) * norms.reshape(-1, 1)
    return keep_from_scores(scores, sparsity, per).reshape(kernel.shape)


def magnitude_masks(kernel, sparsity: float, per: str = "output", n_in: int = 1):
    """Keep-mask removing the smallest |W_ij| (per column, or per matrix with per="layer")."""
    scores = jnp.abs(_matrix(kernel, n_in).astype(jnp.float32))
    return keep_from_scores(scores, sparsity, per).reshape(kernel.shape)


def random_masks(kernel, sparsity: float, key, per: str = "output", n_in: int = 1):
    """Keep-mask removing weights chosen uniformly at random (by `key`), in the same groups."""
    scores = jax.random.uniform(key, _matrix(kernel, n_in).shape)
    return keep_from_scores(scores, sparsity, per).reshape(kernel.shape)


# ------------------------------------------------------------------------ parameter trees
def _scanned(params) -> bool:
    return "layers" in params


def linear_modules(cfg: ModelConfig, params) -> list[str]:
    """Names ("layers_0/attn/k", ...) of every block Dense with a kernel, layer by layer."""
    def walk(tree, prefix):
        for key in sorted(tree):
            if isinstance(tree[key], dict):
                if "kernel" in tree[key]:
                    yield f"{prefix}{key}"
                else:
                    yield from walk(tree[key], f"{prefix}{key}/")
    if _scanned(params):
        inner = list(walk(params["layers"], ""))
        return [f"layers_{i}/{m}" for i in range(cfg.n_layers) for m in inner]
    return [n for i in range(cfg.n_layers) for n in walk(params[f"layers_{i}"], f"layers_{i}/")]


def _split_name(name: str) -> tuple[int, list[str]]:
    layer, *path = name.split("/")
    return int(layer.removeprefix("layers_")), path


def _node(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def get_kernel(params, name: str):
    """The kernel of module `name` (unscanned shape) from a scanned or unscanned tree."""
    i, path = _split_name(name)
    if _scanned(params):
        return _node(params["layers"], path)["kernel"][i]
    return _node(params[f"layers_{i}"], path)["kernel"]


def module_n_in(name: str) -> int:
    return _N_IN.get("/".join(_split_name(name)[1]), 1)


def _module_key(seed: int, name: str):
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def _mask(kernel, norms, key, method, sparsity, per, n_in):
    if method == "wanda":
        return wanda_masks(kernel, norms, sparsity, per)
    if method == "magnitude":
        return magnitude_masks(kernel, sparsity, per, n_in)
    return random_masks(kernel, sparsity, key, per, n_in)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _layer_masks(kernels, norms, keys, method, sparsity, per, n_in):
    """The masks of one module in every layer: kernels[L, ...] (norms[L, ...], keys[L]) ->
    masks[L, ...], one compiled call per module instead of one per matrix."""
    return jax.vmap(lambda k, n, key: _mask(k, n, key, method, sparsity, per, n_in))(
        kernels, norms, keys)


def compute_masks(cfg: ModelConfig, params, *, method: str, sparsity: float,
                  per: str = "output", statistics: dict | None = None,
                  seed: int = 0) -> dict[str, jax.Array]:
    """{module name: keep-mask of its kernel (unscanned shape)} for every block linear layer.
    wanda needs `statistics` (dense_statistics with input_square_sums: sqrt gives ||X_i||_2);
    random draws from jax.random.key(seed) folded with the module name."""
    if method not in METHODS:
        raise UsageError(f"method={method!r}: choose one of {METHODS}")
    _check_per(per)
    sparsity = check_sparsity(sparsity)
    if method == "wanda" and statistics is None:
        raise UsageError("method='wanda' needs activation statistics (calibration text)")
    names = linear_modules(cfg, params)
    modules: dict[str, list[str]] = {}
    for name in names:  # layer order within each module
        modules.setdefault("/".join(_split_name(name)[1]), []).append(name)
    found = {}
    for path, members in modules.items():
        if _scanned(params):
            kernels = _node(params["layers"], path.split("/"))["kernel"]
        else:
            kernels = jnp.stack([get_kernel(params, n) for n in members])
        norms = keys = jnp.zeros(len(members))
        if method == "wanda":
            missing = [n for n in members if n not in statistics]
            if missing:
                raise ValueError(f"compute_masks: no statistics for {missing[0]} "
                                 f"(have {sorted(statistics)[:5]}...)")
            norms = jnp.stack([jnp.sqrt(jnp.asarray(statistics[n], jnp.float32))
                               for n in members])
        elif method == "random":
            keys = jnp.stack([_module_key(seed, n) for n in members])
        stacked = _layer_masks(kernels, norms, keys, method, sparsity, per,
                               module_n_in(members[0]))
        found.update((n, stacked[i]) for i, n in enumerate(members))
    return {n: found[n] for n in names}


def apply_masks(params, masks: dict):
    """A new parameter tree with each named kernel multiplied by its mask (scanned: the masks
    of a module's layers stacked); everything else is the same array."""
    def copy(tree):
        return {k: copy(v) if isinstance(v, dict) else v for k, v in tree.items()}
    out = copy(params)
    if _scanned(params):
        by_path: dict[tuple, dict[int, jax.Array]] = {}
        for name, mask in masks.items():
            i, path = _split_name(name)
            by_path.setdefault(tuple(path), {})[i] = mask
        for path, layers in by_path.items():
            node = _node(out["layers"], path)
            kernel = node["kernel"]
            if sorted(layers) != list(range(kernel.shape[0])):
                raise ValueError(f"apply_masks: {'/'.join(path)} has masks for layers "
                                 f"{sorted(layers)} of {kernel.shape[0]}")
            stacked = jnp.stack([layers[i] for i in range(kernel.shape[0])])
            node["kernel"] = _masked(kernel, stacked)
    else:
        for name, mask in masks.items():
            i, path = _split_name(name)
            node = _node(out[f"layers_{i}"], path)
            node["kernel"] = _masked(node["kernel"], mask)
    return out


@jax.jit
def _masked(kernel, mask):
    return jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))


@jax.jit
def _counts(kernel, mask):
    return jnp.stack([jnp.sum(kernel == 0), jnp.sum(~mask), jnp.sum((kernel == 0) | ~mask)])


def sparsity_report(params, masks: dict) -> list[dict]:
    """Per matrix (in `masks` order): name, shape, size, removed (mask False: floor(s * in)
    per column), zeros_before (already zero in `params`), zeros_after (zero once masked,
    = removed + zeros_before not removed), sparsity = zeros_after / size and
    mask_sparsity = removed / size."""
    rows = []
    for name, mask in masks.items():
        kernel = get_kernel(params, name)
        before, removed, after = (int(c) for c in jax.device_get(_counts(kernel, mask)))
        size = int(np.prod(kernel.shape))
        rows.append({"name": name, "shape": list(kernel.shape), "size": size,
                     "removed": removed, "zeros_before": before, "zeros_after": after,
                     "mask_sparsity": removed / size, "sparsity": after / size})
    return rows


def prune_params(cfg: ModelConfig, params, *, method: str, sparsity: float,
                 per: str = "output", statistics: dict | None = None,
                 seed: int = 0) -> tuple[dict, list[dict]]:
    """(pruned params, sparsity_report) — compute_masks then apply_masks."""
    masks = compute_masks(cfg, params, method=method, sparsity=sparsity, per=per,
                          statistics=statistics, seed=seed)
    return apply_masks(params, masks), sparsity_report(params, masks)
