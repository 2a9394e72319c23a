"""Batched autoregressive decoding with a KV cache, inside one jitted loop.

    new_tokens = generate(cfg, params, [[1, 45, 9], [1, 7]], max_new_tokens=32,
                          temperature=0.7, top_p=0.9, seed=0, eos_ids=(2,))

    # Traceable: inside a caller's own jax.jit (e.g. an RL step under a mesh and axis rules).
    out = sample_tokens(cfg, params, tokens, segment_ids, key, max_new_tokens=64,
                        temperature=1.0, top_p=0.95, eos_ids=(2,), pad_id=0)
    out["tokens"], out["mask"], out["lengths"]   # int32[b, n], int32[b, n], int32[b]

Prompts are left-padded into one batch (padding is segment 0, never attended to), prefilled in
one forward pass (`Transformer.decode(last_only=True)`), then extended one token per iteration
of a `jax.lax.while_loop` that samples, writes the token and feeds it back through the cache;
the loop ends early once every row has emitted an eos id. Nothing returns to the host per
token. The loop keeps its cache as one k/v[b, kv_heads, slots, head_dim] per layer (written
in place, attended without transposes or slicing), runs the layers unrolled on parameters
sliced once before the loop, and projects onto a tied vocabulary with the embedding transposed
once: XLA:CPU would otherwise copy every weight, the table and the cache per token. Greedy decoding with the cache produces the same logits as recomputing the
full forward pass (tests/test_decode.py).

Sampling (`sample`): greedy when the temperature is 0, else softmax(logits / T) restricted to the
top_k tokens and the top_p nucleus, drawn with one key for the whole [b, v] logits, so the
result does not depend on how the batch is sharded. The key chain is `key, sub = split(key)` once
per generated token, the same in `generate` (jitted loop) and `generate_host` (the reference
host-side loop, one device round trip per token), so both give the same tokens for one seed
(up to float rounding of the logits, which different fusion can change in the last bits).

`generate(..., stop=fn)`: `stop` is a host callback on each row's decoded tokens, so the jitted
loop then runs in chunks of a few tokens (`advance_decode`), the host checks `stop` between
chunks and ends those rows; tokens a row made after `stop` first returned True are dropped, so
the result equals the host loop's.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hibari.base.errors import UsageError
from hibari.base.segments import positions_from_segments
from hibari.model.config import ModelConfig
from hibari.model.transformer import Block, Transformer, attention_mask

# Chunk sizes (tokens) of the jitted loop between host `stop` checks: they grow from the first
# to the last, so short completions waste little and long ones sync rarely.
STOP_CHUNKS = (4, 8, 16, 32)


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


def sample_logits(logits, key, temperature, top_k: int = 0, top_p=1.0):
    """tokens[b] from logits[b, v]: greedy when temperature == 0, else softmax(logits / T)
    restricted to the top_k tokens (0 = all) and the smallest nucleus of mass >= top_p (the
    tokens whose logit reaches the nucleus' smallest one; ties at that edge are kept).

    Traceable; temperature and top_p may be traced scalars, top_k is static. A temperature
    that is a Python number 0 skips the sampling computation, and a top_p that is a Python
    number >= 1 skips the vocabulary sort (plain temperature sampling, as RL rollouts use)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return greedy
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if not (isinstance(top_p, (int, float)) and top_p >= 1):
        ordered = -jnp.sort(-scaled, axis=-1)  # descending values (no argsort, no gather)
        probs = jax.nn.softmax(ordered, axis=-1)
        kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # a prefix of the ordered tokens
        edge = jnp.take_along_axis(ordered, jnp.maximum(kept.sum(-1) - 1, 0)[:, None], -1)
        scaled = jnp.where(scaled >= edge, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy)


# Jitted; the temperature is traced (one compilation for every temperature, 0 included).
sample = jax.jit(sample_logits, static_argnames=("top_k",))


# ---------------------------------------------------------------------------------------------
# The traceable sampler
# ---------------------------------------------------------------------------------------------

# The loop's cache keeps k/v as one array per layer, [b, kv_heads, slots, head_dim]: each is
# written in place and attended without transposes or slicing. (One [n_layers, ...] array read
# with a traced layer index made XLA:CPU copy each layer's cache per token, and with
# init_cache's [L, b, slots, kv, hd] layout the whole cache was transposed per token.)
# The layers are unrolled in the token loop over parameters sliced once before it
# (`_layer_params`): slicing stacked [n_layers, ...] parameters inside the loop copied every
# weight of the model per token on XLA:CPU (measured with bench/peers_eval.py).
_KV_AXES = ("batch", "kv_heads", "length", "head_dim")


def _constrain_cache(cache: dict) -> dict:
    """Logical axes of the loop's cache (a no-op unless the caller set a mesh and axis rules)."""
    kv = lambda xs: tuple(nn.with_logical_constraint(x, _KV_AXES) for x in xs)
    return {**cache, "k": kv(cache["k"]), "v": kv(cache["v"]),
            "segment_ids": nn.with_logical_constraint(cache["segment_ids"], ("batch", "length")),
            "positions": nn.with_logical_constraint(cache["positions"], ("batch", "length"))}


def _layer_params(cfg: ModelConfig, params) -> list:
    """Each layer's parameter tree, sliced out of the stacked ones once (scan_layers)."""
    if cfg.scan_layers:
        return [jax.tree.map(lambda a, i=i: a[i], params["layers"])
                for i in range(cfg.n_layers)]
    return [params[f"layers_{i}"] for i in range(cfg.n_layers)]


def _unembed_weight(cfg: ModelConfig, params):
    """The tied embedding transposed to [d, vocab] once, outside the token loop (inside it
    XLA:CPU transposed the [vocab, d] table per token), or None for an untied lm_head."""
    if not cfg.tie_embeddings:
        return None
    return params["embed"]["embedding"].astype(jnp.dtype(cfg.compute_dtype)).T


def _attend_cached(q, k, v, mask):
    """`attend` (impl "xla") of q[b, t, h, d] over the loop cache k/v[b, kv, slots, d] with
    mask[b, 1, t, slots] -> [b, t, h, d]."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(d)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _block_step(block: Block, x, mask, positions, k_cache, v_cache, index):
    """`Block` on x[b, t, d] at slots [index, index + t) of one layer's loop cache
    k/v[b, kv, slots, hd] -> (x, k_cache, v_cache)."""
    attn = block.attn
    q, k, v = attn.project(block.attn_norm(x), positions)
    slot = (0, 0, index, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype),
                                           slot)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype),
                                           slot)
    out = _attend_cached(q, k_cache, v_cache, mask)
    h = x + attn.o(out)
    out = h + block.mlp(block.mlp_norm(h))
    return nn.with_logical_constraint(out, ("batch", "length", "embed")), k_cache, v_cache


def _step_logits(cfg: ModelConfig, params, tokens, segment_ids, positions, cache, *,
                 layers: list | None = None, unembed_weight=None):
    """tokens[b, t] through the model at the loop cache's index -> (logits[b, v] of the last
    position, cache): `Transformer.decode` on the loop's cache layout, the blocks' own modules
    (norms, projections, RoPE, MLP) applied layer by layer. `layers` (`_layer_params`) and
    `unembed_weight` (`_unembed_weight`): computed once by a caller that steps many times."""
    model = Transformer(cfg)
    index = cache["index"]
    seg_all = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, index, 1)
    pos_all = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, index, 1)
    mask = attention_mask(segment_ids, seg_all, positions, pos_all)
    x = model.apply({"params": params}, tokens, positions, method=Transformer.embed_tokens)
    block = Block(cfg)
    layers = _layer_params(cfg, params) if layers is None else layers
    ks, vs = list(cache["k"]), list(cache["v"])
    for i, layer_params in enumerate(layers):
        x, ks[i], vs[i] = block.apply({"params": layer_params}, x, mask, positions, ks[i], vs[i],
                                      index, method=_block_step)
    h = model.apply({"params": params}, x[:, -1], method=lambda m, h: m.final_norm(h))
    if cfg.tie_embeddings:
        w = _unembed_weight(cfg, params) if unembed_weight is None else unembed_weight
        logits = jnp.dot(h.astype(w.dtype), w).astype(jnp.float32)
    else:
        logits = model.apply({"params": params}, h, method=Transformer.logits)
    cache = {"k": tuple(ks), "v": tuple(vs), "segment_ids": seg_all, "positions": pos_all,
             "index": index + tokens.shape[1]}
    return logits, _constrain_cache(cache)


def start_decode(cfg: ModelConfig, params, tokens, segment_ids, key, *,
                 max_new_tokens: int, pad_id: int = 0) -> dict:
    """Prefill left-padded prompts tokens[b, w] (segment_ids 1 on prompt tokens, 0 on the left
    padding; every row needs a prompt token) -> the decode state `advance_decode` extends:
    cache (w + max_new_tokens slots), last logits[b, v], key, output tokens/mask[b, n], done[b],
    step, and each row's next position and segment id. Traceable."""
    b, w = tokens.shape
    tokens = jnp.asarray(tokens, jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    positions = positions_from_segments(segment_ids, jnp)
    logits, cache = Transformer(cfg).apply({"params": params}, tokens, segment_ids, positions,
                                           init_cache(cfg, b, w), last_only=True,
                                           method=Transformer.decode)
    last = logits[:, -1]
    grow = lambda x, axis: jnp.pad(x, [(0, max_new_tokens if a == axis else 0)
                                       for a in range(x.ndim)])
    per_layer = lambda x: tuple(grow(x[i].transpose(0, 2, 1, 3), 2) for i in range(x.shape[0]))
    cache = {"k": per_layer(cache["k"]), "v": per_layer(cache["v"]),
             "segment_ids": grow(cache["segment_ids"], 1),
             "positions": grow(cache["positions"], 1), "index": cache["index"]}
    batch = lambda x: nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
    return {"cache": _constrain_cache(cache), "last": batch(last), "key": key,
            "tokens": batch(jnp.full((b, max_new_tokens), pad_id, jnp.int32)),
            "mask": batch(jnp.zeros((b, max_new_tokens), jnp.int32)),
            "done": batch(jnp.zeros((b,), bool)), "step": jnp.zeros((), jnp.int32),
            "next_pos": positions[:, -1] + 1, "segment": segment_ids[:, -1]}


def advance_decode(cfg: ModelConfig, params, state: dict, n_steps, *, temperature=1.0,
                   top_k: int = 0, top_p=1.0, eos_ids: Sequence[int] = (),
                   pad_id: int = 0) -> dict:
    """Generate up to `n_steps` (may be traced) more tokens, stopping early once every row is
    done or the output is full. Per token: `key, sub = split(key)`, sample from the last
    logits, write the token (pad_id for rows already done) and its mask, mark rows that emitted
    an eos id done, feed the token through the cache. Traceable."""
    total = state["tokens"].shape[1]
    limit = jnp.minimum(state["step"] + n_steps, total)
    eos_ids = tuple(int(e) for e in eos_ids)
    layers, unembed_weight = _layer_params(cfg, params), _unembed_weight(cfg, params)

    def cond(s):
        return (s["step"] < limit) & ~jnp.all(s["done"])

    def body(s):
        key, sub = jax.random.split(s["key"])
        tok = sample_logits(s["last"], sub, temperature, top_k, top_p).astype(jnp.int32)
        live = ~s["done"]
        tok = jnp.where(live, tok, pad_id)
        col = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None], s["step"], 1)
        ended = functools.reduce(jnp.logical_or, [tok == e for e in eos_ids],
                                 jnp.zeros_like(live))
        pos = s["next_pos"]
        last, cache = _step_logits(cfg, params, tok[:, None], s["segment"][:, None],
                                   pos[:, None], s["cache"], layers=layers,
                                   unembed_weight=unembed_weight)
        return {**s, "cache": cache, "last": last, "key": key,
                "tokens": col(s["tokens"], tok), "mask": col(s["mask"], live.astype(jnp.int32)),
                "done": s["done"] | (live & ended), "step": s["step"] + 1, "next_pos": pos + 1}

    return jax.lax.while_loop(cond, body, state)


def sample_tokens(cfg: ModelConfig, params, tokens, segment_ids, key, *, max_new_tokens: int,
                  temperature=1.0, top_k: int = 0, top_p=1.0, eos_ids: Sequence[int] = (),
                  pad_id: int = 0) -> dict:
    """Sample continuations of left-padded prompts, all on the device; traceable (use it inside
    your own jax.jit; under a mesh and axis rules the cache follows the batch's sharding).

    tokens[b, w] int32, prompts left-padded to width w; segment_ids[b, w]: 1 on prompt tokens,
    0 on the padding (prompt positions are 0..len-1; with learned positions, len +
    max_new_tokens must fit cfg.max_seq_len). temperature (0 = greedy) and top_p may be
    traced scalars; top_k, max_new_tokens, eos_ids and pad_id are static. A row is done after it
    emits any id in eos_ids. Returns {"tokens": int32[b, max_new_tokens] (pad_id after a row
    ends), "mask": int32[b, max_new_tokens] (1 on every generated token, the ending eos
    included), "lengths": int32[b] (= mask.sum(1))}."""
    state = start_decode(cfg, params, tokens, segment_ids, key, max_new_tokens=max_new_tokens,
                         pad_id=pad_id)
    if max_new_tokens:
        state = advance_decode(cfg, params, state, max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id)
    return {"tokens": state["tokens"], "mask": state["mask"],
            "lengths": state["mask"].sum(axis=1, dtype=jnp.int32)}


# ---------------------------------------------------------------------------------------------
# Host API
# ---------------------------------------------------------------------------------------------

_GEN_STATIC = ("cfg", "max_new_tokens", "top_k", "eos_ids", "pad_id", "greedy", "nucleus")


def _temperature(temperature, greedy: bool):
    return 0.0 if greedy else temperature  # a Python 0 compiles the argmax alone


def _top_p(top_p, nucleus: bool):
    return top_p if nucleus else 1.0  # a Python 1 compiles no vocabulary sort


@functools.partial(jax.jit, static_argnames=_GEN_STATIC)
def _sample_jit(params, tokens, segment_ids, key, temperature, top_p, *, cfg, max_new_tokens,
                top_k, eos_ids, pad_id, greedy, nucleus):
    return sample_tokens(cfg, params, tokens, segment_ids, key, max_new_tokens=max_new_tokens,
                         temperature=_temperature(temperature, greedy), top_k=top_k,
                         top_p=_top_p(top_p, nucleus), eos_ids=eos_ids, pad_id=pad_id)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "pad_id"))
def _start_jit(params, tokens, segment_ids, key, *, cfg, max_new_tokens, pad_id):
    return start_decode(cfg, params, tokens, segment_ids, key, max_new_tokens=max_new_tokens,
                        pad_id=pad_id)


@functools.partial(jax.jit, static_argnames=_GEN_STATIC, donate_argnums=1)
def _advance_jit(params, state, n_steps, temperature, top_p, *, cfg, max_new_tokens, top_k,
                 eos_ids, pad_id, greedy, nucleus):
    del max_new_tokens  # the state's buffers carry it
    return advance_decode(cfg, params, state, n_steps,
                          temperature=_temperature(temperature, greedy), top_k=top_k,
                          top_p=_top_p(top_p, nucleus), eos_ids=eos_ids, pad_id=pad_id)


def _bucket(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


def _left_pad(cfg: ModelConfig, prompts, max_new_tokens: int, pad_id: int):
    """(tokens[b, w], segment_ids[b, w], lengths[b]) with w the bucketed longest prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("generate: every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 0:
        raise UsageError(f"generate: max_new_tokens={max_new_tokens} is negative")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if cfg.position == "learned" and int(lengths.max()) + max_new_tokens > cfg.max_seq_len:
        raise UsageError(f"generate: prompt + max_new_tokens exceeds max_seq_len={cfg.max_seq_len}")
    width = _bucket(int(lengths.max()))  # bucketed prompt width limits recompilation
    return (*left_pad(prompts, width, pad_id), lengths)


def left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens[b, width], segment_ids[b, width]) of prompts right-aligned in `width` columns:
    the batch layout `sample_tokens` takes (segment 1 on prompt tokens, 0 on the padding)."""
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        segments[i, width - len(p):] = 1
    return tokens, segments


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0,
             stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """New tokens for each prompt (ending before the first eos; `stop(row, tokens)` returning
    True ends a row early, e.g. when a stop string appears in its decoded text).

    Runs the jitted sampler (`sample_tokens`): one call without `stop`; with it, chunks of a few
    tokens with `stop` checked on the host in between. Same tokens as `generate_host`."""
    tokens, segments, _ = _left_pad(cfg, prompts, max_new_tokens, pad_id)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    eos = tuple(sorted({int(e) for e in eos_ids}))
    greedy = float(temperature) == 0.0
    static = dict(cfg=cfg, max_new_tokens=max_new_tokens, pad_id=pad_id)
    loop = dict(top_k=int(top_k), eos_ids=eos, greedy=greedy, nucleus=float(top_p) < 1.0)
    traced = (np.float32(temperature), np.float32(top_p))
    key = jax.random.key(seed)
    if stop is None:
        out = _sample_jit(params, tokens, segments, key, *traced, **static, **loop)
        toks, mask = np.asarray(out["tokens"]), np.asarray(out["mask"])
        rows = [toks[i, :int(mask[i].sum())].tolist() for i in range(len(prompts))]
        return [r[:-1] if r and r[-1] in eos else r for r in rows]

    state = _start_jit(params, tokens, segments, key, **static)
    out: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), bool)  # eos, stop or full, as the host sees it
    step, chunk = 0, 0
    while step < max_new_tokens and not finished.all():
        n = STOP_CHUNKS[min(chunk, len(STOP_CHUNKS) - 1)]
        state = _advance_jit(params, state, np.int32(n), *traced, **static, **loop)
        toks, mask = np.asarray(state["tokens"]), np.asarray(state["mask"])
        new_step = int(state["step"])
        stopped = []
        for i in np.flatnonzero(~finished):
            for t in range(step, new_step):
                tok = int(toks[i, t])
                if not mask[i, t] or tok in eos:
                    finished[i] = True
                    break
                out[i].append(tok)
                if stop(i, out[i]):
                    finished[i] = True
                    stopped.append(i)
                    break
        if stopped:  # the device ends these rows too (its later tokens for them are dropped)
            done = np.asarray(state["done"]).copy()
            done[stopped] = True
            state = {**state, "done": jnp.asarray(done)}
        step, chunk = new_step, chunk + 1
    return out


def generate_host(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                  max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0, eos_ids: Sequence[int] = (),
                  pad_id: int = 0,
                  stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """`generate` as a host-side loop around the jitted `decode_step` and `sample`, one device
    round trip per token: the reference the jitted sampler is tested and benchmarked against."""
    tokens, segments, lengths = _left_pad(cfg, prompts, max_new_tokens, pad_id)
    b, width = tokens.shape
    positions = positions_from_segments(segments)
    cache = init_cache(cfg, b, width + max_new_tokens)
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
