"""The packed-row convention: positions[..., t] from segment_ids[..., t].

Rows hold several documents; `segment_ids` numbers them (0 = padding) and `positions` restart
at 0 in each. One function for numpy (the loaders) and jax.numpy (the model, inside jit)."""
from __future__ import annotations

import numpy as np


def positions_from_segments(segment_ids, xp=np):
    """positions[..., t]: index of token t within its (contiguous) segment; 0 on padding.

    `xp` is the array module: numpy (default) or jax.numpy (traceable under jit)."""
    seg = xp.asarray(segment_ids)
    t = xp.arange(seg.shape[-1], dtype=xp.int32)
    starts = xp.concatenate([xp.ones(seg.shape[:-1] + (1,), dtype=bool),
                             seg[..., 1:] != seg[..., :-1]], axis=-1)
    if xp is np:
        first = np.maximum.accumulate(np.where(starts, t, 0), axis=-1)
    else:  # jax.numpy
        import jax
        first = jax.lax.cummax(xp.where(starts, t, 0), axis=seg.ndim - 1)
    return xp.where(seg != 0, t - first, 0).astype(xp.int32)
