"""Optimizer and learning-rate schedules from config (optax).

    optim: {lr: 3e-4, b1: 0.9, b2: 0.95, eps: 1e-8, weight_decay: 0.1, clip_norm: 1.0,
            schedule: cosine | wsd | constant, warmup_steps: 100, min_lr_ratio: 0.1,
            decay_fraction: 0.2, decay_embeddings: False}
"""
from __future__ import annotations

from typing import Any

import jax
import optax

from hibari.base.errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")


class OptimConfigError(UserError, ValueError):
    """An optimizer setting is invalid."""


def make_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`
    (cosine); or warmup, a constant stage, and a linear cooldown over the last `decay_fraction`
    of training (WSD, Hu et al. 2024); or warmup then constant."""
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    floor = lr * float(optim.min_lr_ratio)
    if optim.schedule not in SCHEDULES:
        raise OptimConfigError(f"config.optim.schedule={optim.schedule!r}; choose from {SCHEDULES}")
    if warmup < 0 or warmup > total_steps:
        raise OptimConfigError(f"config.optim.warmup_steps={warmup} must be in [0, steps="
                               f"{total_steps}]; set --config.optim.warmup_steps=N (e.g. "
                               f"{max(total_steps // 20, 0)}) when shortening a run")
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
    rest = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=floor / lr if lr else 0.0)
    elif optim.schedule == "wsd":
        decay = max(int(round(rest * float(optim.decay_fraction))), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, floor, decay)],
            [rest - decay])
    else:
        after = optax.constant_schedule(lr)
    if warmup == 0:
        return after
    return optax.join_schedules([warm, after], [warmup])


def decay_mask(params, decay_embeddings: bool = False):
    """True for weights that get weight decay: dense kernels (and embeddings if asked); never
    norm scales or biases."""
    def wants_decay(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            return True
        return decay_embeddings and name in ("embedding", "pos_embed")
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                          optax.Schedule]:
    """AdamW with global-norm clipping; returns (optimizer, schedule)."""
    schedule = make_schedule(optim, total_steps)
    parts = []
    if optim.clip_norm and optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    parts.append(optax.adamw(
        schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
        weight_decay=float(optim.weight_decay),
        mask=lambda p: decay_mask(p, bool(optim.decay_embeddings))))
    return optax.chain(*parts), schedule

