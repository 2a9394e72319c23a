"""Reward model: the transformer plus a scalar head, trained with the Bradley-Terry loss.

Parameters: {"transformer": <model params>, "head": {"kernel": [d, 1], "bias": [1]}}; their
logical axes (`reward_param_axes`) go to the loop through Task.param_axes. The reward of a
sequence is the head applied to the final-norm hidden state of its last token (the [eos] after
the response). Batches are the pair rows of align/preference (chosen = segment 1, rejected =
segment 2), so one forward pass scores both.

    cfg, params = load_reward_model("runs/rm")
    r = score(params, ["Name a colour."], ["Blue."], cfg=cfg, tokenizer=sp)  # r[n]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hibari.align.data import SegmentEncoder
from hibari.align.losses import bradley_terry_loss
from hibari.align.preference import Item, encode_sequence, item_rows, prompt_segments
from hibari.align.templates import get_template
from hibari.model import ModelConfig, hidden, init, param_axes, param_shapes


def init_head(cfg: ModelConfig, key: jax.Array, std: float | None = None) -> dict:
    std = cfg.init_std if std is None else std
    return {"kernel": std * jax.random.normal(key, (cfg.d_model, 1), jnp.float32),
            "bias": jnp.zeros((1,), jnp.float32)}


def init_reward_params(cfg: ModelConfig, key: jax.Array, transformer=None) -> dict:
    """Fresh head on `transformer` params (fresh ones too when None)."""
    k_model, k_head = jax.random.split(key)
    transformer = init(cfg, k_model) if transformer is None else transformer
    return {"transformer": transformer, "head": init_head(cfg, k_head)}


def reward_param_axes(cfg: ModelConfig) -> dict:
    return {"transformer": param_axes(cfg), "head": {"kernel": P("embed", None),
                                                     "bias": P(None)}}


def segment_rewards(cfg: ModelConfig, params, batch) -> jax.Array:
    """rewards[b, 2]: head(h at the last token of segment 1 / 2); 0 where a segment is absent."""
    h = hidden(cfg, params["transformer"], batch["tokens"], batch["segment_ids"],
               batch.get("positions")).astype(jnp.float32)
    seg = batch["segment_ids"]
    t = jnp.arange(seg.shape[1])
    out = []
    for k in (1, 2):
        last = jnp.max(jnp.where(seg == k, t, -1), axis=1)  # [b]
        h_last = jnp.take_along_axis(h, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
        r = (h_last @ params["head"]["kernel"])[:, 0] + params["head"]["bias"][0]
        out.append(jnp.where(last >= 0, r, 0.0))
    return jnp.stack(out, axis=-1)


def reward_loss_fn(cfg: ModelConfig):
    """loss_fn(params, batch, rng) -> (mean Bradley-Terry loss over pairs, aux with accuracy
    (ties 1/2), mean rewards, margin; weight = number of pairs)."""
    def loss_fn(params, batch, rng):
        del rng
        r = segment_rewards(cfg, params, batch)
        valid = (batch["segment_ids"][:, 0] > 0).astype(jnp.float32)
        n = jnp.maximum(valid.sum(), 1.0)
        mean = lambda x: (x * valid).sum() / n
        margin = r[:, 0] - r[:, 1]
        accuracy = (margin > 0).astype(jnp.float32) + 0.5 * (margin == 0).astype(jnp.float32)
        aux = {"accuracy": mean(accuracy), "reward_chosen": mean(r[:, 0]),
               "reward_rejected": mean(r[:, 1]), "reward_margin": mean(margin),
               "weight": valid.sum()}
        return mean(bradley_terry_loss(r[:, 0], r[:, 1])), aux
    return loss_fn


def score(params, prompts: Sequence[Any], responses: Sequence[str], *, cfg: ModelConfig,
          tokenizer, template: Any = "alpaca_en", batch_size: int = 8) -> np.ndarray:
    """Rewards r[n] of (prompt, response) pairs, on the default device (jit).

    `prompts[i]`: a string, {instruction, input} or chat messages (as in preference data);
    `tokenizer`: a SentencePiece processor or the path of its model file; `template`: the one
    the reward model was trained with. Sequences longer than cfg.max_seq_len are rejected."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if isinstance(tokenizer, (str, Path)):
        from hibari.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(str(tokenizer))
    encoder, tpl = SegmentEncoder(tokenizer), get_template(template)
    items = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not isinstance(r, str):
            raise ValueError(f"responses[{i}] must be a string, got {type(r).__name__}")
        segments, chat = prompt_segments(p, tpl)
        seq = encode_sequence(encoder, segments, r, chat)
        if len(seq[0]) > cfg.max_seq_len:
            raise ValueError(f"pair {i}: {len(seq[0])} tokens > max_seq_len {cfg.max_seq_len}")
        items.append(Item(str(i), seq, (np.zeros(0, np.int32), np.zeros(0, np.int32))))
    rows = item_rows(items, max(len(it.first[0]) for it in items))
    fn = jax.jit(lambda p, b: segment_rewards(cfg, p, b)[:, 0])
    out = [np.asarray(fn(params, {k: rows[k][s:s + batch_size]
                                  for k in ("tokens", "segment_ids")}))
           for s in range(0, len(items), batch_size)]
    return np.concatenate(out)


def load_reward_model(run_dir: str | Path, step: int | None = None) -> tuple[ModelConfig, dict]:
    """(cfg, params) of a `hibari reward` run directory (latest checkpoint by default)."""
    from hibari.model.params_io import restore_run_params
    return restore_run_params(run_dir, lambda cfg: {
        "transformer": param_shapes(cfg),
        "head": jax.eval_shape(lambda: init_head(cfg, jax.random.key(0)))}, step)
