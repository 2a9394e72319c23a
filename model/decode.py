"""Batched autoregressive decoding with a KV cache.

    new_tokens = generate(cfg, params, [[1, 45, 9], [1, 7]], max_new_tokens=32,
                          temperature=0.7, top_p=0.9, seed=0, eos_ids=(2,))

Prompts are left-padded into one batch (padding is segment 0, never attended to), prefilled in
one forward pass, then extended one token per step by `decode_step`, which reuses the cached
keys and values. Greedy decoding with the cache produces the same logits as recomputing the
full forward pass (tests/test_decode.py).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hibari.base.errors import UsageError
from hibari.model.config import ModelConfig
from hibari.model.transformer import Transformer


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> dict:
    """An empty cache: k/v[n_layers, b, max_len, kv_heads, head_dim], slot metadata, index."""
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "positions": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def decode_step(cfg: ModelConfig, params, tokens, segment_ids, positions, cache):
    """Feed tokens[b, t] at the cache's index -> (logits[b, t, v] fp32, updated cache)."""
    return Transformer(cfg).apply({"params": params}, tokens, segment_ids, positions, cache,
                                  method=Transformer.decode)


@functools.partial(jax.jit, static_argnames=("top_k",))
def sample(logits, key, temperature, top_k: int = 0, top_p=1.0):
    """tokens[b] from logits[b, v]: greedy when temperature == 0, else softmax(logits / T)
    restricted to the top_k tokens (0 = all) and the smallest nucleus of mass >= top_p."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy)


def _bucket(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0,
             stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """New tokens for each prompt (ending before the first eos; `stop(row, tokens)` returning
    True ends a row early, e.g. when a stop string appears in its decoded text)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("generate: every prompt needs at least one token (e.g. BOS)")
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = _bucket(int(lengths.max()))  # bucketed prompt width limits recompilation
    total = width + max_new_tokens
    if cfg.position == "learned" and int(lengths.max()) + max_new_tokens > cfg.max_seq_len:
        raise UsageError(f"generate: prompt + max_new_tokens exceeds max_seq_len={cfg.max_seq_len}")
    tokens = np.full((b, width), pad_id, np.int32)
    segments = np.zeros((b, width), np.int32)
    positions = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        segments[i, width - len(p):] = 1
        positions[i, width - len(p):] = np.arange(len(p))
    cache = init_cache(cfg, b, total)
    logits, cache = decode_step(cfg, params, tokens, segments, positions, cache)
    last = logits[:, -1]
    key = jax.random.key(seed)
    eos = np.asarray(list(eos_ids), np.int32)
    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    ones = np.ones((b, 1), np.int32)
    for step in range(max_new_tokens):
        key, sub = jax.random.split(key)
        next_tokens = np.asarray(sample(last, sub, temperature, top_k, top_p))
        for i in np.flatnonzero(~done):
            tok = int(next_tokens[i])
            if tok in eos:
                done[i] = True
                continue
            out[i].append(tok)
            if stop is not None and stop(i, out[i]):
                done[i] = True
        if done.all() or step == max_new_tokens - 1:
            break
        logits, cache = decode_step(cfg, params, next_tokens[:, None].astype(np.int32), ones,
                                    (lengths + step)[:, None], cache)
        last = logits[:, -1]
    return out
