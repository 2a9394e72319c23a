"""Language-model losses. All log-softmax and reductions in fp32.

Batch convention: `tokens[b, t]`, `segment_ids[b, t]` (0 = padding), optional `positions[b, t]`
and `loss_mask[b, t]` (token t counts as a prediction target; SFT sets it on response tokens).
The logits at t predict tokens[t + 1] when t + 1 is in the same non-padding segment.
"""
from __future__ import annotations

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
