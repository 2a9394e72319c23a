"""Log-probabilities of target tokens: the one sequence log-prob function that training losses,
preference objectives and evaluation all use. All log-softmax in fp32.

Batch convention: `tokens[b, t]`, `segment_ids[b, t]` (0 = padding), optional `loss_mask[b, t]`.
The logits at t predict tokens[t + 1] when t + 1 is in the same non-padding segment.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hibari.model.config import ModelConfig
from hibari.model.transformer import unembed


def next_token_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
    """(targets[b, t], weights[b, t]): tokens shifted left and where each prediction counts."""
    tokens = batch["tokens"]
    seg = batch.get("segment_ids")
    if seg is None:
        seg = jnp.ones_like(tokens)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    weights = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    if batch.get("loss_mask") is not None:
        weights = weights & (batch["loss_mask"][:, 1:] > 0)
    weights = jnp.pad(weights, ((0, 0), (0, 1))).astype(jnp.float32)
    return targets, weights


def token_log_probs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(target)[...], log Z[...]) in fp32 from logits[..., v]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - log_z, log_z


def chunked_log_probs(cfg: ModelConfig, params, h, targets, chunk: int = 0):
    """(log p(target)[b, t], log Z[b, t]) from final hidden states h[b, t, d]; with `chunk` > 0
    over sequence chunks of that size, never holding all of logits[b, t, v] (the backward pass
    recomputes each chunk's logits); with 0 in one piece."""
    b, t, d = h.shape
    if chunk <= 0 or chunk >= t:
        return token_log_probs(unembed(cfg, params, h), targets)
    if t % chunk:
        raise ValueError(f"config.logits_chunk={chunk} must divide the sequence length {t}")
    n = t // chunk
    hs = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(h_c, t_c):
        return token_log_probs(unembed(cfg, params, h_c), t_c)

    lp, lz = jax.lax.map(lambda xs: one(*xs), (hs, ts))
    return lp.swapaxes(0, 1).reshape(b, t), lz.swapaxes(0, 1).reshape(b, t)
