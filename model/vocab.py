"""Vocabulary resizing for continual pretraining with an expanded tokenizer."""
from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp

from hibari.model.config import ConfigError, ModelConfig


def _grow_rows(table, new_rows: int, sources: Mapping[int, Sequence[int]] | None, old: int):
    """Append `new_rows` rows to table[v, d]: each the mean of its source rows, else the mean of
    all existing rows."""
    mean = table.mean(axis=0)
    rows = []
    for new_id in range(old, old + new_rows):
        ids = (sources or {}).get(new_id)
        if ids:
            bad = [i for i in ids if not 0 <= i < old]
            if bad:
                raise ConfigError(f"resize_vocab: source ids {bad} of new token {new_id} are "
                                  f"outside the old vocabulary [0, {old})")
            rows.append(table[jnp.asarray(list(ids))].mean(axis=0))
        else:
            rows.append(mean)
    return jnp.concatenate([table, jnp.stack(rows).astype(table.dtype)], axis=0)


def resize_vocab(cfg: ModelConfig, params, new_vocab_size: int,
                 sources: Mapping[int, Sequence[int]] | None = None):
    """Grow the vocabulary of `params` to `new_vocab_size` -> (new_cfg, new_params).

    New embedding (and untied output) rows are initialised from the mean of the old rows, or,
    for ids in `sources` ({new_id: [old ids]}, e.g. the old tokenizer's pieces of the new piece's
    text), from the mean of those rows. Existing rows are unchanged.
    """
    old = cfg.vocab_size
    if new_vocab_size < old:
        raise ConfigError(f"resize_vocab: new_vocab_size={new_vocab_size} is smaller than the "
                          f"current vocab_size={old}; shrinking would drop trained rows")
    extra = new_vocab_size - old
    params = dict(params)
    embed = dict(params["embed"])
    embed["embedding"] = _grow_rows(embed["embedding"], extra, sources, old)
    params["embed"] = embed
    if not cfg.tie_embeddings:
        head = dict(params["lm_head"])
        head["kernel"] = _grow_rows(head["kernel"].T, extra, sources, old).T
        params["lm_head"] = head
    return cfg.replace(vocab_size=new_vocab_size), params
