"""RL from rewards: PPO and GRPO formulas over response tokens.

PPO as used for RLHF: Schulman et al. 2017 (clipped surrogate), Schulman et al. 2016 (GAE),
Ziegler et al. 2019 (per-token KL penalty, adaptive KL coefficient), Ouyang et al. 2022
(InstructGPT), Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"). GRPO:
Shao et al. 2024 (DeepSeekMath), group-normalised outcome rewards and no value model.

Conventions. Every per-token array is `[b, t]` over response positions; `mask[b, t]` is 1 on
response tokens (one contiguous run from the first response token) and 0 elsewhere (bool or
0/1 numbers). "Mean" is the mean over the masked tokens of the whole batch unless said otherwise,
sum(x * mask) / max(sum(mask), 1), so an all-zero mask gives 0, never NaN. Entries outside the
mask are ignored (NaN and inf included) and per-token outputs are 0 there. logp, old_logp and
ref_logp are the per-token log-probs of the sampled tokens under the policy being trained, the
policy that sampled them and the frozen reference; rho = exp(logp - old_logp). Everything is
computed in fp32, takes numpy or jax arrays and is jittable (the hyper-parameters may be traced,
except `group_size`, which sets a shape).

- GAE: delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t; A_t = delta_t + gamma lam m_{t+1} A_{t+1}
  (V and A are 0 past the last column); returns = A + V; both 0 where m_t = 0: no bootstrap after
  a row's last response token.
- PPO policy loss: mean of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)).
- PPO value loss: 0.5 mean of max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2).
- KL-penalised rewards: -beta (logp - ref_logp) on each response token, plus the sequence score
  at the row's last response token.
- GRPO: A_i = (s_i - mean_g) / (std_g + eps) within each prompt's group (sample std, ddof 1);
  per token -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta (exp(ref - logp) - (ref - logp)
  - 1) (the k3 KL estimator); averaged over each row's tokens, then over non-empty rows.
- Adaptive KL coefficient (Ziegler et al. 2019): coef * (1 + clip(kl / target - 1, -0.2, 0.2)
  n_steps / horizon). A fixed coefficient is simply never updated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hibari.base.errors import UsageError


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


def _count(mask, axis=None):
    return jnp.maximum(mask.sum(axis), 1.0)


def _zero_outside(x, mask):
    """x on the mask, 0 elsewhere; unlike x * mask, a NaN or inf outside the mask stays out."""
    return jnp.where(mask > 0, x, 0.0)


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------

def masked_mean(x, mask, axis=None) -> jax.Array:
    """sum(x * mask) / max(sum(mask), 1) over `axis` (all axes by default)."""
    x, mask = _f32(x, mask)
    return _zero_outside(x * mask, mask).sum(axis) / _count(mask, axis)


def masked_var(x, mask, unbiased: bool = True) -> jax.Array:
    """Variance of the masked entries; unbiased: times n / (n - 1) (TRL's masked_var; no
    correction when n <= 1, where the variance is 0 anyway)."""
    x, mask = _f32(x, mask)
    var = masked_mean(jnp.square(x - masked_mean(x, mask)), mask)
    if unbiased:
        n = mask.sum()
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased var, as TRL's
    masked_whiten); shift_mean=False adds the mean back (rescale only, as for rewards).
    Unlike TRL, entries outside the mask are set to 0."""
    x, mask = _f32(x, mask)
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return _zero_outside(out, mask)


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------

def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """(advantages[b, t], returns[b, t]) by generalised advantage estimation (module docstring),
    a reverse `lax.scan` over t."""
    rewards, values, mask = _f32(rewards, values, mask)
    rewards, values = _zero_outside(rewards, mask), _zero_outside(values, mask)
    pad = jnp.zeros_like(mask[:, :1])
    next_mask = jnp.concatenate([mask[:, 1:], pad], axis=1)
    next_values = jnp.concatenate([values[:, 1:], pad], axis=1) * next_mask
    deltas = rewards + gamma * next_values - values

    def step(next_adv, xs):
        delta, m_next = xs
        adv = delta + gamma * lam * m_next * next_adv
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros_like(mask[:, 0]), (deltas.T, next_mask.T),
                          reverse=True)
    adv = adv.T * mask
    return adv, adv + values


def _ratio(logp, old_logp):
    logp, old_logp = _f32(logp, old_logp)
    return jnp.exp(logp - old_logp)


def _ppo_terms(logp, old_logp, advantages, clip_eps):
    """(-A rho, -A clip(rho)): the two candidates of the clipped surrogate's loss."""
    rho = _ratio(logp, old_logp)
    adv = jnp.asarray(advantages, jnp.float32)
    return -adv * rho, -adv * jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps)


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps: float) -> jax.Array:
    """mean of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) (scalar)."""
    unclipped, clipped = _ppo_terms(logp, old_logp, advantages, clip_eps)
    return masked_mean(jnp.maximum(unclipped, clipped), mask)


def ppo_policy_stats(logp, old_logp, advantages, mask, clip_eps: float) -> dict:
    """clip_fraction: share of tokens where the clipped term is the larger (so its gradient is
    0); approx_kl: mean 0.5 (logp - old_logp)^2 (Huang et al. 2024); approx_kl_k3: mean
    (rho - 1) - log rho (Schulman's k3, >= 0)."""
    unclipped, clipped = _ppo_terms(logp, old_logp, advantages, clip_eps)
    logp, old_logp = _f32(logp, old_logp)
    log_rho = logp - old_logp
    return {"clip_fraction": masked_mean(clipped > unclipped, mask),
            "approx_kl": masked_mean(0.5 * jnp.square(log_rho), mask),
            "approx_kl_k3": masked_mean(jnp.expm1(log_rho) - log_rho, mask)}


def _value_terms(values, old_values, returns, clip_eps):
    values, old_values, returns = _f32(values, old_values, returns)
    clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    return jnp.square(values - returns), jnp.square(clipped - returns)


def ppo_value_loss(values, old_values, returns, mask, clip_eps: float) -> jax.Array:
    """0.5 mean of max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) (scalar)."""
    unclipped, clipped = _value_terms(values, old_values, returns, clip_eps)
    return 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)


def ppo_value_stats(values, old_values, returns, mask, clip_eps: float) -> dict:
    """value_clip_fraction: share of tokens where the clipped squared error is the larger."""
    unclipped, clipped = _value_terms(values, old_values, returns, clip_eps)
    return {"value_clip_fraction": masked_mean(clipped > unclipped, mask)}


def kl_penalized_rewards(scores, logp, ref_logp, mask, beta: float) -> jax.Array:
    """rewards[b, t] = -beta (logp - ref_logp) m_t, plus scores[b] at the row's last masked
    token (rows with an empty mask get no score). Pass rollout-time log-probs: the rewards are
    data for GAE, not something to differentiate."""
    scores, logp, ref_logp, mask = _f32(scores, logp, ref_logp, mask)
    t = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, t, -1), axis=1)  # -1: empty row
    at_last = (t[None, :] == last[:, None]).astype(jnp.float32)
    return _zero_outside(-beta * (logp - ref_logp), mask) + scores[:, None] * at_last


def adaptive_kl_update(coef, current_kl, target: float, horizon: float, n_steps) -> jax.Array:
    """Ziegler et al. 2019's adaptive KL coefficient: coef * (1 + e * n_steps / horizon),
    e = clip(current_kl / target - 1, -0.2, 0.2); n_steps = samples (or steps) since the last
    update, in the unit of `horizon`."""
    coef, current_kl = _f32(coef, current_kl)
    error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / horizon)


# ---------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------

def grpo_advantages(scores, group_size: int, eps: float = 1e-4) -> jax.Array:
    """advantages[n G] = (s - mean_g) / (std_g + eps), std with ddof 1; rows g G ... g G + G - 1
    are one prompt's group. `group_size` is static."""
    scores = jnp.asarray(scores, jnp.float32)
    n = scores.shape[0]
    if group_size < 2:
        raise UsageError(f"grpo_advantages: group_size={group_size}; GRPO needs at least 2 "
                         "responses per prompt (the group's std uses ddof 1)")
    if n % group_size:
        raise UsageError(f"grpo_advantages: len(scores)={n} is not a multiple of "
                         f"group_size={group_size} (one group of consecutive rows per prompt)")
    groups = scores.reshape(n // group_size, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
    return ((groups - mean) / (std + eps)).reshape(n)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float,
              beta: float) -> jax.Array:
    """Per token -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta k3(ref, logp), k3 =
    exp(ref - logp) - (ref - logp) - 1; mean over each row's masked tokens, then over the rows
    with a non-empty mask. `advantages` is [b] (one per response, broadcast over the row) or
    [b, t]."""
    logp, ref_logp, mask = _f32(logp, ref_logp, mask)
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]
    rho = _ratio(logp, old_logp)
    surrogate = jnp.minimum(rho * adv, jnp.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    log_ref_ratio = ref_logp - logp
    kl = jnp.expm1(log_ref_ratio) - log_ref_ratio
    per_row = masked_mean(-surrogate + beta * kl, mask, axis=1)
    nonempty = (mask.sum(1) > 0).astype(jnp.float32)
    return masked_mean(per_row, nonempty)


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------

def entropy_from_logits(logits) -> jax.Array:
    """Entropy -sum p log p of softmax(logits) over the last axis, fp32: [..., v] -> [...].
    Entries with p = 0 (logits -inf) contribute 0, with finite gradients."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)


def explained_variance(values, returns, mask) -> jax.Array:
    """1 - Var[R - V] / Var[R] over the masked tokens (1: perfect value predictions, 0: no
    better than the mean return, < 0: worse). 0 when the returns have no variance to explain:
    Var[R] <= 1e-12 mean(R^2) (constant up to fp32 rounding) or an empty mask."""
    values, returns, mask = _f32(values, returns, mask)
    var_r = masked_var(returns, mask, unbiased=False)
    var_err = masked_var(returns - values, mask, unbiased=False)
    explainable = var_r > 1e-12 * masked_mean(jnp.square(returns), mask)
    return jnp.where(explainable, 1.0 - var_err / jnp.where(explainable, var_r, 1.0), 0.0)
