"""Optimizer and learning-rate schedules from config (optax).

    optim: {lr: 3e-4, b1: 0.9, b2: 0.95, eps: 1e-8, weight_decay: 0.1, clip_norm: 1.0,
            schedule: cosine | wsd | constant, warmup_steps: 100, min_lr_ratio: 0.1,
            decay_fraction: 0.2, decay_embeddings: False}

`validate_optim` checks every field before anything is built (`make_optimizer` calls it):
lr in (0, 10] (AdamW moves each weight by about lr per step, so a larger one only diverges,
and 1e39 is inf in float32), warmup_steps an integer in [0, steps], b1 and b2 in [0, 1),
eps finite and >= 1e-30 (0, or a value that underflows in float32, makes 0/0 = NaN updates),
weight_decay finite and >= 0, clip_norm finite and > 0 (0 or None: no clipping),
min_lr_ratio and decay_fraction in [0, 1], decay_embeddings a bool.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import optax

from hibari.base.errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")
LR_MAX = 10.0  # see the module docstring
EPS_MIN = 1e-30
_MISSING = object()


class OptimConfigError(UserError, ValueError):
    """An optimizer setting is invalid."""


def _field(optim: Any, name: str) -> Any:
    try:
        return optim[name] if isinstance(optim, dict) else getattr(optim, name)
    except (KeyError, AttributeError):
        return _MISSING


def _real(name: str, value: Any, allowed: str) -> float:
    """`value` as a finite float, or an OptimConfigError naming config.optim.<name>."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptimConfigError(f"config.optim.{name}={value!r} must be a number {allowed}")
    x = float(value)
    if not math.isfinite(x):
        raise OptimConfigError(f"config.optim.{name}={value!r} must be a finite number {allowed}")
    return x


def _check(name: str, value: Any, ok, allowed: str, hint: str = "") -> None:
    if not ok(_real(name, value, allowed)):
        raise OptimConfigError(f"config.optim.{name}={value!r} must be {allowed}{hint}")


def validate_optim(optim: Any, total_steps: int) -> None:
    """Raise OptimConfigError (one line: config.optim.<field>, its value, the allowed range) for
    the first invalid field; fields absent from `optim` are left to the code that reads them."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) \
            or total_steps <= 0:
        raise OptimConfigError(f"optimizer total steps={total_steps!r} must be a positive "
                               "integer (config.steps)")
    schedule = _field(optim, "schedule")
    if schedule is not _MISSING and schedule not in SCHEDULES:
        raise OptimConfigError(f"config.optim.schedule={schedule!r}; choose from {SCHEDULES}")
    checks = [
        ("lr", lambda x: 0 < x <= LR_MAX, f"in (0, {LR_MAX:g}]",
         " (AdamW moves each weight by about lr per step; typical: 1e-4 to 3e-3)"),
        ("b1", lambda x: 0 <= x < 1, "in [0, 1)", ""),
        ("b2", lambda x: 0 <= x < 1, "in [0, 1)", ""),
        ("eps", lambda x: x >= EPS_MIN, f"finite and >= {EPS_MIN:g}",
         " (0 or a float32 underflow makes NaN updates; typical: 1e-8)"),
        ("weight_decay", lambda x: x >= 0, "finite and >= 0", ""),
        ("min_lr_ratio", lambda x: 0 <= x <= 1, "in [0, 1]", " (the decay's floor, a share of lr)"),
        ("decay_fraction", lambda x: 0 <= x <= 1, "in [0, 1]", " (wsd's share of the steps)"),
    ]
    for name, ok, allowed, hint in checks:
        value = _field(optim, name)
        if value is not _MISSING:
            _check(name, value, ok, allowed, hint)
    warmup = _field(optim, "warmup_steps")
    if warmup is not _MISSING:
        allowed = f"an integer in [0, steps={total_steps}]"
        x = _real("warmup_steps", warmup, allowed)
        if not x.is_integer() or not 0 <= x <= total_steps:
            raise OptimConfigError(
                f"config.optim.warmup_steps={warmup!r} must be {allowed}; set "
                f"--config.optim.warmup_steps=N (e.g. {max(total_steps // 20, 0)}) when "
                "shortening a run")
    clip = _field(optim, "clip_norm")
    if clip is not _MISSING and clip is not None and clip is not False and clip != 0:
        _check("clip_norm", clip, lambda x: x > 0, "finite and > 0, or 0 / None for no clipping")
    decay_embeddings = _field(optim, "decay_embeddings")
    if decay_embeddings is not _MISSING and decay_embeddings not in (True, False):
        raise OptimConfigError(f"config.optim.decay_embeddings={decay_embeddings!r} must be "
                               "True or False")


def make_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`
    (cosine); or warmup, a constant stage, and a linear cooldown over the last `decay_fraction`
    of training (WSD, Hu et al. 2024); or warmup then constant."""
    validate_optim(optim, total_steps)
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    floor = lr * float(optim.min_lr_ratio)
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
    """True for weights that get weight decay: dense kernels and LoRA's A/B matrices (as
    transformers' Trainer decays them) (and embeddings if asked); never norm scales or
    biases."""
    def wants_decay(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel" or (name in ("a", "b") and len(path) > 1):
            return True
        return decay_embeddings and name in ("embedding", "pos_embed")
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                          optax.Schedule]:
    """AdamW with global-norm clipping; returns (optimizer, schedule). Every field is checked
    first (`validate_optim`)."""
    validate_optim(optim, total_steps)
    schedule = make_schedule(optim, total_steps)
    parts = []
    if optim.clip_norm and optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    parts.append(optax.adamw(
        schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
        weight_decay=float(optim.weight_decay),
        mask=lambda p: decay_mask(p, bool(optim.decay_embeddings))))
    return optax.chain(*parts), schedule

