"""`TrainState` and the generic jitted train step.

    step_fn = make_train_step(loss_fn, optimizer, schedule, mesh=mesh, rules=rules,
                              state_shardings=shardings, grad_accum=4)
    state, metrics = step_fn(state, batch)

`loss_fn(params, batch, rng) -> (loss, aux)` is anything: LM cross entropy, SFT, DPO, a reward
model; when the state holds `frozen` parameters it is called as loss_fn(params, batch, rng,
frozen). aux holds scalars; aux["weight"] (optional) is the normaliser of the loss (e.g. counted
tokens) and makes gradient accumulation equal to one large batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hibari.train.sharding import batch_sharding, replicated, sharding_context


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: updates done so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data, split once per step
    frozen: Any = None  # parameters the loss reads but never updates (a reference model)
    extra: Any = None  # small task state carried between steps (RL's adaptive KL coefficient)


def create_state(params, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """Step 0 with fresh optimizer state; `rng` is a PRNG key (stored as raw key data)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.key_data(rng))


def state_shardings(abstract_state: TrainState, param_shardings, optimizer, mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments follow their parameters."""
    rep = replicated(mesh)
    opt = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: rep)
    extra = jax.tree.map(lambda _: rep, abstract_state.extra)
    return TrainState(step=rep, params=param_shardings, opt_state=opt, rng=rep, frozen=None,
                      extra=extra)


def _split_microbatches(batch: dict, n: int, mesh, rules) -> dict:
    """[b, ...] -> [n, b / n, ...] taking rows i, i + n, ... for microbatch i, so every device
    keeps its own rows of each microbatch (no data movement)."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={n}")
        y = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        spec = batch_sharding(mesh, rules, x.ndim).spec
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, *spec)))
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable, params, batch: dict, rng, n: int, mesh, rules):
    """(loss, aux, grads) over `n` microbatches, weighted by aux["weight"] when present."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if n == 1:
        (loss, aux), grads = grad_fn(params, batch, rng)
        return loss, aux, grads
    micro = _split_microbatches(batch, n, mesh, rules)
    rngs = jax.random.split(rng, n)

    def body(carry, xs):
        mb, r = xs
        (loss, aux), grads = grad_fn(params, mb, r)
        w = aux.get("weight", jnp.float32(1.0)).astype(jnp.float32)
        acc = (carry[0] + w * loss,
               jax.tree.map(lambda a, x: a + w * x, carry[1], aux),
               jax.tree.map(lambda a, g: a + w * g.astype(jnp.float32), carry[2], grads),
               carry[3] + w)
        return acc, None

    aux_shape = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                               rngs[0])[0][1])
    zeros = (jnp.float32(0), jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape),
             jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.float32(0))
    (loss, aux, grads, total), _ = jax.lax.scan(body, zeros, (micro, rngs))
    total = jnp.maximum(total, 1e-9)
    aux = {k: (v if k == "weight" else v / total) for k, v in aux.items()}
    grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grads, params)
    return loss / total, aux, grads


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (one fused reduction)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def apply_gradients(optimizer: optax.GradientTransformation, params, opt_state, loss, grads):
    """One optimizer update -> (params, opt_state, grad_norm, finite); when the loss, the
    gradient norm, or any updated parameter or optimizer-state entry is not finite, the update
    is not applied (params and opt_state unchanged), so a finite state stays finite and no
    checkpoint can hold NaN (e.g. eps=0 turns finite gradients into NaN updates)."""
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params)
              & all_finite(new_opt_state))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return keep(new_params, params), keep(new_opt_state, opt_state), grad_norm, finite


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, mesh, rules, state_shardings: TrainState,
                    grad_accum: int = 1, donate: bool = True):
    """The pure, jitted `train_step(state, batch) -> (state, metrics)`.

    A step whose loss, gradient norm or updated state is not finite leaves params and optimizer
    state unchanged (metrics["finite"] = 0); the loop decides whether to stop or go on.
    """
    def train_step(state: TrainState, batch: dict):
        with sharding_context(mesh, rules):
            rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
            fn = loss_fn if state.frozen is None else functools.partial(loss_fn,
                                                                        frozen=state.frozen)
            loss, aux, grads = accumulate_gradients(fn, state.params, batch, step_rng,
                                                    grad_accum, mesh, rules)
            params, opt_state, grad_norm, finite = apply_gradients(
                optimizer, state.params, state.opt_state, loss, grads)
            new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                      rng=jax.random.key_data(rng))
            metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                       "finite": finite.astype(jnp.int32), **aux}
        return new_state, metrics

    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh, rules)),
                   out_shardings=(state_shardings, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: Callable, *, mesh, rules, param_shardings, frozen_shardings=None):
    """Jitted `eval_step(params, frozen, batch) -> (loss * weight, weight)` for exact
    averaging (frozen is None unless the loss reads a reference model)."""
    def eval_step(params, frozen, batch):
        with sharding_context(mesh, rules):
            args = (params, batch, jax.random.key(0))
            loss, aux = loss_fn(*args) if frozen is None else loss_fn(*args, frozen=frozen)
        w = aux.get("weight", jnp.float32(1.0)).astype(jnp.float32)
        return loss * w, w

    return jax.jit(eval_step, in_shardings=(param_shardings, frozen_shardings,
                                            batch_sharding(mesh, rules)),
                   out_shardings=replicated(mesh))
