"""Debiasing objectives for a k-class classifier, and the bias models that feed them.

Shapes: logits[n, k], labels[n] (int), probabilities [n, k] (rows sum to 1). With
CE_i = -log_softmax(logits)[i, y_i] and the bias model's probability of the gold label
b_i = bias_probs[i, y_i]:

    cross_entropy                  mean_i CE_i
    example_reweighting_loss       Σ_i w_i CE_i / Σ_i w_i,   w_i = 1 - b_i
                                   (Σ_i w_i = 0: every example is fully explained by the
                                   bias; the loss is 0 with zero gradients)
    product_of_experts_loss        mean_i -log softmax(log_softmax(logits) + log bias)[i, y_i]
    confidence_regularization_loss mean_i -Σ_j s_ij log_softmax(logits)[i, j],
                                   s_ij ∝ teacher[i, j]^(1 - b_i)   (Utama et al. 2020)

Reweighting and product of experts: Clark et al. 2019 ("Don't Take the Easy Way Out"),
He et al. 2019; confidence regularisation: Utama et al. 2020 ("Mind the Trade-off"). The
scaled teacher is a fixed target (no gradient flows into it); at b_i = 1 it is uniform (t^0 = 1,
also where t = 0). Bias log-probabilities must be finite where the label is: callers clip
probabilities to >= PROB_FLOOR before taking logs (`bias_log_probs`).

Bias models (numpy, fitted on the training split only):
- `fit_bow` / `bow_probs`: L2-regularised multinomial logistic regression on binary
  bag-of-words features (`words(text)`: lower-cased word and `[[marker]]` tokens), over the
  training split's words seen at least `min_count` times, or over a given word list (e.g. the
  planted markers alone); `cross_fitted_bow_probs` gives training rows out-of-fold
  probabilities (k folds) so a bias model that memorises its training rows does not claim
  certainty on all of them;
- `read_probs_file`: a JSONL of `{"id": ..., "probs": [p_0, ..., p_{k-1}]}` per example.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hibari.base.errors import UserError
from hibari.model.logprobs import token_log_probs

PROB_FLOOR = 1e-6


class BiasModelError(UserError, ValueError):
    """A bias or teacher probability source is unusable; the message names the file/field."""


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def _gold(x: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, labels[:, None].astype(jnp.int32), axis=1)[:, 0]


def per_example_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """CE_i[n] = -log_softmax(logits)[i, labels[i]] (fp32)."""
    return -token_log_probs(logits, labels.astype(jnp.int32))[0]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return per_example_ce(logits, labels).mean()


def product_of_experts_loss(logits: jax.Array, bias_log_probs: jax.Array,
                            labels: jax.Array) -> jax.Array:
    """Mean CE of softmax(log_softmax(logits) + bias_log_probs) at the label."""
    combined = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) + bias_log_probs
    return per_example_ce(combined, labels).mean()


def example_reweighting_loss(logits: jax.Array, bias_probs: jax.Array,
                             labels: jax.Array) -> jax.Array:
    """Σ w_i CE_i / Σ w_i with w_i = 1 - bias_probs[i, labels[i]]; 0 when Σ w_i = 0."""
    w = 1.0 - _gold(bias_probs.astype(jnp.float32), labels)
    total = w.sum()
    weighted = (w * per_example_ce(logits, labels)).sum()
    return jnp.where(total > 0, weighted / jnp.where(total > 0, total, 1.0), 0.0)


def scaled_teacher(teacher_probs: jax.Array, bias_probs: jax.Array,
                   labels: jax.Array) -> jax.Array:
    """s[n, k] ∝ teacher^(1 - β_i), β_i = bias_probs[i, labels[i]] (no gradient)."""
    beta = _gold(bias_probs.astype(jnp.float32), labels)
    log_t = jnp.log(jnp.maximum(teacher_probs.astype(jnp.float32), 1e-30))
    return jax.lax.stop_gradient(jax.nn.softmax((1.0 - beta)[:, None] * log_t, axis=-1))


def confidence_regularization_loss(logits: jax.Array, teacher_probs: jax.Array,
                                   bias_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over examples of -Σ_j s_ij log_softmax(logits)[i, j] (Utama et al. 2020)."""
    s = scaled_teacher(teacher_probs, bias_probs, labels)
    return -(s * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)).sum(-1).mean()


def bias_log_probs(bias_probs: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(bias_probs.astype(jnp.float32), PROB_FLOOR))


LOSS_KINDS = ("ce", "reweight", "poe", "conf_reg")


def debias_loss(kind: str, logits, labels, bias_probs=None, teacher_probs=None) -> jax.Array:
    """The loss of `kind` (LOSS_KINDS) for a batch."""
    if kind == "ce":
        return cross_entropy(logits, labels)
    if kind == "reweight":
        return example_reweighting_loss(logits, bias_probs, labels)
    if kind == "poe":
        return product_of_experts_loss(logits, bias_log_probs(bias_probs), labels)
    if kind == "conf_reg":
        return confidence_regularization_loss(logits, teacher_probs, bias_probs, labels)
    raise ValueError(f"unknown debiasing loss {kind!r}; choose from {LOSS_KINDS}")


# ---------------------------------------------------------------------------------------------
# Bias models: bag-of-words logistic regression, probabilities from a file
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"\[\[\w+\]\]|\w+")


def words(text: str) -> set[str]:
    """Lower-cased word tokens of `text`; a planted `[[X]]` marker is one token."""
    return set(_WORD.findall(text.lower()))


def bow_vocabulary(texts: Iterable[str], min_count: int = 2) -> list[str]:
    counts: dict[str, int] = {}
    for t in texts:
        for w in words(t):
            counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, c in counts.items() if c >= min_count)


def bow_features(texts: Sequence[str], vocab: Sequence[str]) -> np.ndarray:
    """x[n, |vocab|] binary word presence."""
    index = {w.lower(): j for j, w in enumerate(vocab)}
    x = np.zeros((len(texts), len(vocab)), np.float64)
    for i, t in enumerate(texts):
        for w in words(t):
            if w in index:
                x[i, index[w]] = 1.0
    return x


def fit_bow(texts: Sequence[str], labels: Sequence[int], num_classes: int, *,
            vocab: Sequence[str] | None = None, min_count: int = 2, l2: float = 1.0) -> dict:
    """Multinomial logistic regression (weights W[|vocab|, k], bias c[k]) minimising
    Σ_i CE_i + l2/2 ||W||² with L-BFGS; returns {"vocab", "W", "c"}."""
    from scipy.optimize import minimize
    vocab = list(vocab) if vocab else bow_vocabulary(texts, min_count)
    x = bow_features(texts, vocab)
    y = np.asarray(labels, np.int64)
    onehot = np.eye(num_classes)[y]
    d = len(vocab)

    def objective(theta):
        w, c = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
        z = x @ w + c
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss = -(onehot * logp).sum() + 0.5 * l2 * (w ** 2).sum()
        g = np.exp(logp) - onehot
        return loss, np.concatenate([(x.T @ g + l2 * w).ravel(), g.sum(0)])

    theta0 = np.zeros(d * num_classes + num_classes)
    res = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": 500})
    return {"vocab": vocab, "W": res.x[:d * num_classes].reshape(d, num_classes),
            "c": res.x[d * num_classes:]}


def bow_probs(model: dict, texts: Sequence[str]) -> np.ndarray:
    z = bow_features(texts, model["vocab"]) @ model["W"] + model["c"]
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def cross_fitted_bow_probs(texts: Sequence[str], labels: Sequence[int], num_classes: int, *,
                           folds: int, seed: int, **fit_kwargs) -> np.ndarray:
    """probs[n, k] of each text from a model fitted on the other folds (folds <= 1: the model
    fitted on all rows, i.e. in-sample)."""
    n = len(texts)
    if folds <= 1:
        return bow_probs(fit_bow(texts, labels, num_classes, **fit_kwargs), texts)
    fold = np.random.default_rng([seed, 17]).permutation(n) % folds
    out = np.zeros((n, num_classes))
    labels = np.asarray(labels)
    for f in range(folds):
        held = np.flatnonzero(fold == f)
        kept = np.flatnonzero(fold != f)
        model = fit_bow([texts[i] for i in kept], labels[kept], num_classes, **fit_kwargs)
        out[held] = bow_probs(model, [texts[i] for i in held])
    return out


def read_probs_file(path: str | Path, ids: Sequence[str], num_classes: int,
                    field: str = "config.bias.path") -> np.ndarray:
    """probs[len(ids), k] from a JSONL of {"id", "probs"} records (other ids are ignored;
    rows are renormalised to sum to 1)."""
    path = Path(path)
    if not path.is_file():
        raise BiasModelError(f"{field}={str(path)!r}: no such file")
    table: dict[str, list] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                table[str(record["id"])] = record["probs"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BiasModelError(f"{path}:{n}: expected a JSON object with 'id' and "
                                     f"'probs' ({field})") from None
    missing = [i for i in ids if i not in table]
    if missing:
        raise BiasModelError(f"{field}={str(path)!r} has no probabilities for {len(missing)} "
                             f"examples (first: {missing[0]!r})")
    probs = np.asarray([table[i] for i in ids], np.float64)
    if probs.ndim != 2 or probs.shape[1] != num_classes or not np.all(np.isfinite(probs)) \
            or np.any(probs < 0) or np.any(probs.sum(1) <= 0):
        raise BiasModelError(f"{field}={str(path)!r}: 'probs' must be {num_classes} "
                             "non-negative numbers with a positive sum per example")
    return probs / probs.sum(1, keepdims=True)


def write_probs_file(path: str | Path, ids: Sequence[str], probs: np.ndarray, **extra) -> None:
    """The JSONL that `read_probs_file` reads (extra per-example columns as lists)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (example_id, p) in enumerate(zip(ids, np.asarray(probs))):
            record = {"id": example_id, "probs": [round(float(v), 6) for v in p]}
            record.update({k: v[i] for k, v in extra.items()})
            f.write(json.dumps(record) + "\n")
