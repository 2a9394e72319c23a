"""Statistics of the model's linear layers over calibration tokens, computed functionally.

    sums = dense_statistics(cfg, params, batches, input_square_sums)
    # {"layers_0/attn/q": sum over real tokens of x_i^2 [d_model], ..., "tokens": n}

Every projection of the Transformer is a `transformer.Dense` module (q, k, v, o, up, gate,
down, lm_head). A reduction `reduce(x, y, valid)` sees one Dense call's input x[b, t, *in], its
output y[b, t, *out] and valid[b, t] (the real tokens: segment id > 0) and returns an array that
is summed over batches. The model runs unscanned and without remat here, so the names are those
of an unscanned parameter tree: "layers_3/mlp/gate" is the module whose kernel is
params["layers"]["mlp"]["gate"]["kernel"][3] in a scanned tree. The unembedding (lm_head) is
not run: the pass stops at the final norm.

The forward pass is the model's own (`Transformer.hidden`, no logits), intercepted with
`flax.linen.intercept_methods`: nothing is re-implemented, so the statistics are of exactly the
activations the model computes, sharded like the model when the parameters are.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hibari.model.config import ModelConfig
from hibari.model.transformer import Dense, Transformer

Reduce = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def input_square_sums(x, y, valid):
    """sum over real tokens of x[..., i]^2 per input feature (shape: the kernel's input dims):
    sqrt of it is Wanda's ||X_i||_2."""
    del y
    xf = x.astype(jnp.float32) * valid.reshape(valid.shape + (1,) * (x.ndim - 2))
    return jnp.sum(xf * xf, axis=(0, 1))


def positive_counts(x, y, valid):
    """How many real tokens have y[..., j] > 0, per output feature: for a gate (or an ungated
    up) projection, how often each MLP neuron is active (SiLU, GELU and ReLU are > 0 exactly
    when their input is)."""
    del x
    on = (y > 0) & valid.reshape(valid.shape + (1,) * (y.ndim - 2))
    return jnp.sum(on.astype(jnp.int32), axis=(0, 1))


def unscanned(cfg: ModelConfig, params):
    """(config, parameters) with layers as layers_0..layers_{n-1} and no remat."""
    plain = cfg.replace(scan_layers=False, remat="none")
    if not cfg.scan_layers:
        return plain, params
    tree = dict(params)
    layers = tree.pop("layers")
    for i in range(cfg.n_layers):
        tree[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
    return plain, tree


@functools.partial(jax.jit, static_argnums=(0, 4))
def _batch_statistics(cfg: ModelConfig, params, tokens, segment_ids, reduce: Reduce):
    valid = segment_ids > 0

    def tap(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if isinstance(context.module, Dense) and context.method_name == "__call__":
            context.module.sow("intermediates", "stat", reduce(args[0], y, valid))
        return y

    with nn.intercept_methods(tap):
        _, state = Transformer(cfg).apply({"params": params}, tokens, segment_ids,
                                          method=Transformer.hidden, mutable=["intermediates"])
    flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    out = {}
    for path, value in flat:
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        out["/".join(keys[:-1])] = value  # [..., "stat"] -> the module's path
    out["tokens"] = jnp.sum(valid.astype(jnp.int32))
    return out


def dense_statistics(cfg: ModelConfig, params,
                     batches: Iterable[tuple[np.ndarray, np.ndarray]],
                     reduce: Reduce = input_square_sums) -> dict[str, np.ndarray]:
    """{module path: reduce(...) summed over every batch, "tokens": real tokens seen} over
    `batches` of (tokens[b, t], segment_ids[b, t]) (segment 0 = padding, not counted).

    `reduce` must be a module-level function (it is a static argument of the jitted pass:
    one compilation per batch shape). Sums are accumulated in float64 on the host."""
    plain, tree = unscanned(cfg, params)
    totals: dict[str, np.ndarray] = {}
    for tokens, segment_ids in batches:
        stats = _batch_statistics(plain, tree, jnp.asarray(tokens, jnp.int32),
                                  jnp.asarray(segment_ids, jnp.int32), reduce)
        for name, value in jax.device_get(stats).items():
            value = np.asarray(value, np.float64)
            totals[name] = totals[name] + value if name in totals else value
    if not totals:
        raise ValueError("dense_statistics: no batches given")
    return totals
