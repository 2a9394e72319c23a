"""Log-likelihood requests: continuations given contexts, and rolling windows over long text.

    scores = loglikelihood_tokens(cfg, params, [(context_ids, continuation_ids), ...])
    # -> [(sum log p(continuation | context), continuation is the greedy decode), ...]

Each request becomes one row `context + continuation` (the context truncated from the left to
fit `max_len + 1` tokens). Rows are sorted by length (longest first) and cut into batches of
`batch_size`; a batch is right-padded to a multiple of 16 of its longest row and, the last one,
to a power of two of rows with empty (segment 0) rows, so the padding stays small and the
compiled shapes few. Only the continuation positions go through the vocabulary projection and
the log-softmax (a multiple-choice answer of a few tokens after a long prompt never
materialises [b, t, vocab] logits). Padding is never attended to by real tokens (segment ids),
so a request's score does not depend on its neighbours: batch size changes it only by float32
rounding of the batched matmuls (~1e-7 relative), never a decision
(tests/test_eval_loglikelihood.py).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hibari.model import ModelConfig, hidden, unembed
from hibari.model.logprobs import token_log_probs

Request = tuple[Sequence[int], Sequence[int]]
WIDTH_MULTIPLE = 16
MIN_SCORED = 8  # positions scored per row: a power of two >= this (fewer compiled shapes)


@functools.partial(jax.jit, static_argnums=0)
def _score_rows(cfg: ModelConfig, params, inputs, segment_ids, where, targets):
    """(log p(targets)[b, k] fp32, targets == argmax[b, k]) for right-padded rows
    inputs/segment_ids[b, w], scoring the next token after positions where[b, k] only: the
    vocabulary projection and log-softmax run on [b, k] rows, never on all [b, w]."""
    h = hidden(cfg, params, inputs, segment_ids)
    h = jnp.take_along_axis(h, where[..., None], axis=1)
    logits = unembed(cfg, params, h)
    log_p, _ = token_log_probs(logits, targets)
    return log_p, jnp.argmax(logits, axis=-1) == targets


def _width(n: int) -> int:
    return -(-n // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def batch_plan(lengths: Sequence[int], batch_size: int) -> list[tuple[list[int], int, int]]:
    """How `token_scores` batches rows of these input lengths: (row indices, rows, width) per
    batch. Rows sorted by length (longest first, stable), cut into batches of `batch_size`;
    width = the longest row's length rounded up to a multiple of 16, rows = the batch's rows
    rounded up to a power of two (at most batch_size)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    plan = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        plan.append((chunk, min(batch_size, _pow2(len(chunk))), _width(lengths[chunk[0]])))
    return plan


def token_scores(cfg: ModelConfig, params, requests: Sequence[Request], batch_size: int = 8,
                 max_len: int | None = None, pad_id: int = 0, *,
                 on_batch: Callable[[int], None] | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per request: (log-probabilities[n_cont] float64, greedy flags[n_cont]) of the
    continuation tokens. `on_batch(n)` after each batch of n requests (progress)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_len = max_len or cfg.max_seq_len
    rows = []
    for i, (context, continuation) in enumerate(requests):
        if not context:
            raise ValueError(f"request {i}: empty context; start it with the tokenizer's "
                             "start token (EvalTokenizer.encode gives [start_id] for '')")
        if not continuation:
            raise ValueError(f"request {i}: empty continuation; nothing to score")
        if len(continuation) > max_len:
            raise ValueError(f"request {i}: continuation of {len(continuation)} tokens exceeds "
                             f"the model's max_len={max_len}; use rolling windows instead")
        seq = (list(context) + list(continuation))[-(max_len + 1):]
        rows.append((np.asarray(seq, np.int32), len(continuation)))
    pending = []
    for chunk, n_rows, width in batch_plan([len(seq) - 1 for seq, _ in rows], batch_size):
        k = min(width, max(MIN_SCORED, _pow2(max(rows[i][1] for i in chunk))))
        inputs = np.full((n_rows, width), pad_id, np.int32)
        segments = np.zeros((n_rows, width), np.int32)
        where = np.zeros((n_rows, k), np.int32)
        targets = np.zeros((n_rows, k), np.int32)
        for r, i in enumerate(chunk):
            seq, n_cont = rows[i]
            n = len(seq) - 1
            inputs[r, :n], segments[r, :n] = seq[:-1], 1
            where[r, :n_cont] = np.arange(n - n_cont, n)
            targets[r, :n_cont] = seq[n + 1 - n_cont:]
        # dispatched without waiting: the host builds the next batch while this one runs
        pending.append((chunk, _score_rows(cfg, params, inputs, segments, where, targets)))
    out: list = [None] * len(rows)
    for chunk, result in pending:
        log_p, greedy = jax.device_get(result)
        for r, i in enumerate(chunk):
            n_cont = rows[i][1]
            out[i] = (np.asarray(log_p[r, :n_cont], np.float64), np.asarray(greedy[r, :n_cont]))
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def loglikelihood_tokens(cfg: ModelConfig, params, requests: Sequence[Request],
                         batch_size: int = 8, max_len: int | None = None, pad_id: int = 0
                         ) -> list[tuple[float, bool]]:
    """[(sum log p(continuation | context), every continuation token is the argmax), ...]."""
    return [(float(lp.sum()), bool(g.all()))
            for lp, g in token_scores(cfg, params, requests, batch_size, max_len, pad_id)]


def rolling_windows(ids: Sequence[int], prefix_id: int, max_len: int, stride: int | None = None
                    ) -> list[Request]:
    """Requests that predict every token of `ids` exactly once (the first from `prefix_id`).

    Each window holds at most `max_len` input tokens; after the first window, each predicts
    the next `stride` tokens (default max_len) with up to `max_len - stride` tokens of the
    preceding text as context (the overlap)."""
    stride = stride or max_len
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    seq = [prefix_id] + list(ids)
    requests: list[Request] = []
    first = min(max_len, len(ids))
    if first:
        requests.append((seq[:1], seq[1:first + 1]))
    predicted = first
    while predicted < len(ids):
        n = min(stride, len(ids) - predicted)
        end = predicted + 1 + n  # exclusive index into seq
        start = max(0, end - 1 - max_len)
        requests.append((seq[start:predicted + 1], seq[predicted + 1:end]))
        predicted += n
    return requests


def rolling_loglikelihood(cfg: ModelConfig, params, ids: Sequence[int], prefix_id: int,
                          max_len: int | None = None, stride: int | None = None,
                          batch_size: int = 8) -> float:
    """Total log p(ids) over overlapping windows (see `rolling_windows`)."""
    max_len = max_len or cfg.max_seq_len
    requests = rolling_windows(ids, prefix_id, max_len, stride)
    return sum(lp for lp, _ in loglikelihood_tokens(cfg, params, requests, batch_size, max_len))


def perplexity_stats(total_logprob: float, n_tokens: int, n_bytes: int, n_words: int) -> dict:
    """Token perplexity, word perplexity and bits per byte (tokenizer-independent)."""
    nll = -total_logprob
    return {"token_perplexity": math.exp(nll / max(n_tokens, 1)),
            "word_perplexity": math.exp(nll / max(n_words, 1)),
            "bits_per_byte": nll / (math.log(2) * max(n_bytes, 1)),
            "tokens": n_tokens, "bytes": n_bytes}
