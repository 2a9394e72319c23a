"""Language-model losses. All log-softmax and reductions in fp32.

Batch convention: `tokens[b, t]`, `segment_ids[b, t]` (0 = padding), optional `positions[b, t]`
and `loss_mask[b, t]` (token t counts as a prediction target; SFT sets it on response tokens).
The logits at t predict tokens[t + 1] when t + 1 is in the same non-padding segment.
"""
from __future__ import annotations

import fractions
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hibari.model import ModelConfig, hidden
from hibari.model.logprobs import chunked_log_probs, next_token_targets, token_log_probs  # noqa: F401

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def lm_loss_fn(cfg: ModelConfig, z_loss: float = 0.0, logits_chunk: int = 0) -> LossFn:
    """Next-token cross entropy averaged over counted tokens, plus z_loss * mean(log Z ** 2).

    aux["weight"] is the number of counted tokens: gradient accumulation uses it to weight
    microbatches so that their combination equals one large batch."""
    def loss_fn(params, batch, rng):
        del rng
        h = hidden(cfg, params, batch["tokens"], batch.get("segment_ids"),
                   batch.get("positions"))
        targets, weights = next_token_targets(batch)
        log_p, log_z = chunked_log_probs(cfg, params, h, targets, logits_chunk)
        n = jnp.maximum(weights.sum(), 1.0)
        nll = -(log_p * weights).sum() / n
        loss = nll
        if z_loss:
            loss = loss + z_loss * (jnp.square(log_z) * weights).sum() / n
        return loss, {"nll": nll, "weight": weights.sum()}
    return loss_fn


def keep_fraction(keep_ratio: float, max_denominator: int = 10_000) -> tuple[int, int]:
    """keep_ratio (0 < r <= 1) as the fraction p / q nearest to it with q <= `max_denominator`:
    exact for ratios of up to four decimals (0.6 = 3/5) and for 1/3, 2/7, ...; so ⌈r·n⌉ is
    computed in integers, free of float rounding (0.7 * 10 is 7.000000000000001 in floats)."""
    if isinstance(keep_ratio, bool) or not 0 < float(keep_ratio) <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    f = fractions.Fraction(float(keep_ratio)).limit_denominator(max_denominator)
    return f.numerator, f.denominator


def selective_token_weights(token_loss: jax.Array, ref_token_loss: jax.Array,
                            weights: jax.Array, keep_ratio: float) -> jax.Array:
    """Rho-1's selection (Lin et al. 2024): 0/1 weights[...] keeping, among the tokens of weight
    1 in the whole batch (n of them), the k = ⌈keep_ratio·n⌉ with the largest excess loss
    token_loss − ref_token_loss. Ties are broken by position: the token first in row-major order
    of the batch (lower row, then lower t) is kept first. `keep_ratio` is a Python number, read
    as the fraction p/q nearest it with q <= 10,000 (`keep_fraction`), so k is exact.

    Jittable; on a sharded global batch inside the jitted step it selects over the whole batch
    (one sort of the b·t excess losses). No gradient flows through the result."""
    p, q = keep_fraction(keep_ratio)
    counted = jax.lax.stop_gradient(weights) > 0
    excess = jax.lax.stop_gradient(token_loss - ref_token_loss).astype(jnp.float32)
    score = jnp.where(counted, excess, -jnp.inf).reshape(-1)
    n = counted.sum(dtype=jnp.int32)
    # ⌈n·p/q⌉ without overflow: n = a·q + b, b·p < q² <= 1e8 fits int32
    a, b = n // q, n % q
    k = a * p + (b * p + q - 1) // q
    order = jnp.argsort(-score, stable=True)  # ties keep index order: the earlier token first
    rank = jnp.zeros(score.shape, jnp.int32).at[order].set(
        jnp.arange(score.size, dtype=jnp.int32))
    keep = (rank.reshape(counted.shape) < k) & counted
    return jax.lax.stop_gradient(keep.astype(jnp.float32))


def reference_token_loss(ref_cfg: ModelConfig, ref_params, batch: dict,
                         logits_chunk: int = 0) -> jax.Array:
    """float32 [b, t]: the reference model's next-token loss (nats) at each position t (the
    loss of predicting tokens[t + 1]), 0 where the prediction does not count. What live token
    selection computes each step, and what the cached mode stores per packed row
    (hibari.train.cli.build_token_loss_cache)."""
    ref_params = jax.lax.stop_gradient(ref_params)
    targets, weights = next_token_targets(batch)
    h = hidden(ref_cfg, ref_params, batch["tokens"], batch.get("segment_ids"),
               batch.get("positions"))
    log_p, _ = chunked_log_probs(ref_cfg, ref_params, h, targets, logits_chunk)
    return jax.lax.stop_gradient(-log_p * weights).astype(jnp.float32)


def _selective_loss(token_loss, ref_loss, log_z, weights, keep_ratio, z_loss):
    """(loss, aux) of selective_lm_loss_fn from per-token policy and reference losses."""
    keep = selective_token_weights(token_loss, ref_loss, weights, keep_ratio)
    drop = weights - keep
    n, kept = weights.sum(), keep.sum()
    excess = jax.lax.stop_gradient(token_loss - ref_loss)
    selected_nll = (token_loss * keep).sum() / jnp.maximum(kept, 1.0)
    loss = selected_nll
    if z_loss:
        loss = loss + z_loss * (jnp.square(log_z) * keep).sum() / jnp.maximum(kept, 1.0)
    aux = {"nll": jax.lax.stop_gradient((token_loss * weights).sum() / jnp.maximum(n, 1.0)),
           "selected_nll": selected_nll,
           "kept_share": kept / jnp.maximum(n, 1.0),
           "excess_kept": (excess * keep).sum() / jnp.maximum(kept, 1.0),
           "excess_dropped": (excess * drop).sum() / jnp.maximum(drop.sum(), 1.0),
           "weight": kept}
    return loss, aux


def selective_lm_loss_fn(cfg: ModelConfig, ref_cfg: ModelConfig | None, keep_ratio: float,
                         z_loss: float = 0.0, logits_chunk: int = 0) -> LossFn:
    """Rho-1's selective language modelling: next-token cross entropy averaged over the tokens
    `selective_token_weights` keeps (the top keep_ratio share of the batch's counted tokens by
    excess loss over a reference model), plus z_loss * mean(log Z ** 2) over the same tokens.

    Live (`ref_cfg` a ModelConfig): loss_fn(params, batch, rng, frozen), `frozen` the reference
    model's parameters (of `ref_cfg`, the same vocabulary as `cfg`), the train state's frozen
    parameters; no gradient reaches them. Cached (`ref_cfg` None): loss_fn(params, batch, rng)
    reads the reference's per-token losses from batch["ref_token_loss"] ([b, t] float32, as
    `reference_token_loss` computes them). With grad_accum > 1 the selection is per microbatch.

    aux: "nll" the plain all-token cross entropy (what lm_loss_fn's "nll" is), "selected_nll"
    the policy loss over kept tokens, "kept_share" kept / counted tokens, "excess_kept" and
    "excess_dropped" the mean excess loss (nats) of kept and dropped tokens (0 when none),
    "weight" the number of kept tokens (gradient accumulation weights microbatches by it)."""
    if ref_cfg is not None and ref_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"reference vocab_size={ref_cfg.vocab_size} differs from the model's "
                         f"vocab_size={cfg.vocab_size}")
    keep_fraction(keep_ratio)  # validates

    def policy(params, batch):
        targets, weights = next_token_targets(batch)
        h = hidden(cfg, params, batch["tokens"], batch.get("segment_ids"), batch.get("positions"))
        log_p, log_z = chunked_log_probs(cfg, params, h, targets, logits_chunk)
        return -log_p, log_z, weights

    if ref_cfg is None:
        def cached_loss_fn(params, batch, rng):
            del rng
            token_loss, log_z, weights = policy(params, batch)
            ref_loss = jax.lax.stop_gradient(batch["ref_token_loss"]).astype(jnp.float32)
            return _selective_loss(token_loss, ref_loss, log_z, weights, keep_ratio, z_loss)
        return cached_loss_fn

    def loss_fn(params, batch, rng, frozen):
        del rng
        token_loss, log_z, weights = policy(params, batch)
        ref_loss = reference_token_loss(ref_cfg, frozen, batch, logits_chunk)
        return _selective_loss(token_loss, ref_loss, log_z, weights, keep_ratio, z_loss)
    return loss_fn
