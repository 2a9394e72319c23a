"""Numeric-score probe: does a judge's score distribution collapse onto few values?

A "numeric" task asks a judge prompt for a score on each configured range (1-5, 0-9, 1-100)
about graded items (question, answer, optional gold grade) and reads the score either

- from the logits (`read: logits`): the probability that the model writes each number of the
  range next, renormalised over the range (`number_logprobs`); the item's score is the
  argmax, its expected score the mean of that distribution; or
- from a greedy generation (`read: generation`): the first number written, a failure when
  there is none or it lies outside the range.

Per range (metric names "<low>-<high>/<name>", flat, as results.json keeps metrics):
  mean_score        mean per-item score (argmax or parsed), with its standard error
  mean_expected     logits: mean expected score, with its standard error
  kurtosis          excess (Fisher) kurtosis of the per-item scores (0 for a normal shape;
                    large when the scores pile onto one value with a few far away)
  kurtosis_expected logits: the same of the expected scores
  entropy_bits      entropy (bits) of the histogram of per-item scores over the range: how
                    many values the judge really uses (log2 of their number at most)
  item_entropy_bits logits: mean entropy (bits) of the per-item distributions (s.e.)
  modal_share       share of scored items on the most frequent score (s.e.)
  kendall_tau_b     Kendall's tau-b of the per-item scores against the gold grades (items with
                    both), with `kendall_p` its two-sided p-value; `kendall_tau_b_expected`
                    (logits) uses the expected scores
  parse_failure_rate  generation: share of items with no score in range (s.e.)
  n_scored          items with a score

The task file (`kind: numeric`, data format `graded_jsonl`) carries a `numeric:` section:

    numeric:
      ranges: [[1, 5], [0, 9], [1, 100]]
      read: logits              # logits | generation
      max_new_tokens: 8         # generation
      wrap: "{instruction}\\n\\n" # the judge model's turn format around the rendered prompt
      primer: "Score:"          # appended after the wrap; the score is the next thing written

The prompt template may use {low} and {high} besides the example's fields.
"""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from hibari.base.stats import mean_stderr
from hibari.evaluation.judge import excess_kurtosis, score_labels, softmax
from hibari.evaluation.tasks import NumericSpec, TaskError, build_context


# ------------------------------------------------------------------------------ prompts
def numeric_context(task, template, example: dict, low: int, high: int) -> str:
    """The judge prompt for one item and range: the template rendered with the example's
    fields and {low}/{high} (after the task's description), inside `numeric.wrap`, then the
    primer."""
    spec = task_numeric(task)
    inner = build_context(task, template, {**example, "low": low, "high": high}, [])
    return spec.wrap.format(instruction=inner) + spec.primer


def task_numeric(task) -> NumericSpec:
    spec = getattr(task, "numeric", None)
    if not isinstance(spec, NumericSpec):
        raise TaskError(f"{task.source}: task {task.name!r} has no numeric: section "
                        "(a numeric task needs one; see hibari.evaluation.numeric)")
    return spec


# ------------------------------------------------------------------------------ logits
@functools.lru_cache(maxsize=None)
def _next_token_scorer():
    """A jitted (cfg, params, inputs[b, t], segments[b, t], reads[b, m]) -> log p(next
    token)[b, m, v] at positions `reads` of each row (only those positions are unembedded)."""
    import jax
    import jax.numpy as jnp

    from hibari.model import hidden, unembed

    @functools.partial(jax.jit, static_argnums=0)
    def run(cfg, params, inputs, segments, reads):
        h = hidden(cfg, params, inputs, segments)
        hs = jnp.take_along_axis(h, reads[:, :, None], axis=1)
        return jax.nn.log_softmax(unembed(cfg, params, hs).astype(jnp.float32), axis=-1)
    return run


def _hosts(rows: Sequence[tuple[int, ...]], max_len: int) -> dict[tuple[int, ...], tuple]:
    """Each row -> a row to compute it in: the longest row of at most `max_len` tokens that has it
    as a prefix (a causal model's next-token distribution after a prefix is read at the
    prefix's last position), else itself."""
    host: dict = {}
    kept: list[tuple[int, ...]] = []
    for r in sorted(rows, key=len, reverse=True):
        h = next((k for k in kept if len(k) <= max_len and k[:len(r)] == r), None)
        if h is None:
            kept.append(r)
            h = r
        host[r] = h
    return host


def _next_token_logprobs(lm, rows: Sequence[tuple[int, ...]], wanted: Sequence[set[int]],
                         host: dict | None = None, width_multiple: int = 64
                         ) -> list[dict[int, float]]:
    """{token: log p(token | row)} for the `wanted` tokens after each token row, each read from
    the forward pass of `host[row]` (a row it is a prefix of, of at most `lm.max_len` tokens;
    default `_hosts(rows)`); a row longer than `lm.max_len` is its own host, cut from the left.
    Batched by padded width."""
    run = _next_token_scorer()
    tok = lm.tokenizer
    host = host if host is not None else _hosts(rows, lm.max_len)
    reads: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        reads.setdefault(host[r], []).append(i)
    m = max(len(v) for v in reads.values())
    out: list = [None] * len(rows)
    groups: dict[int, list[tuple]] = {}
    for h in reads:
        n = min(len(h), lm.max_len)
        groups.setdefault(-(-n // width_multiple) * width_multiple, []).append(h)
    b = lm.batch_size
    for width, members in sorted(groups.items()):
        for start in range(0, len(members), b):
            chunk = members[start:start + b]
            inputs = np.full((b, width), tok.pad_id, np.int32)
            segments = np.zeros((b, width), np.int32)
            positions = np.zeros((b, m), np.int32)
            for r, h in enumerate(chunk):
                ids = h[-lm.max_len:]
                inputs[r, :len(ids)], segments[r, :len(ids)] = ids, 1
                cut = len(h) - len(ids)  # 0 unless h is its own, over-long host
                for j, i in enumerate(reads[h]):
                    positions[r, j] = len(rows[i]) - 1 - cut
            logp = np.asarray(run(lm.cfg, lm.params, inputs, segments, positions))
            for r, h in enumerate(chunk):
                for j, i in enumerate(reads[h]):
                    out[i] = {t: float(logp[r, j, t]) for t in wanted[i]}
    return out


def number_logprobs(lm, contexts: Sequence[str], labels: Sequence[str]) -> list[list[float]]:
    """log p(the model writes label, and the number ends there | context) per context and
    label (" 1" ... " 100"), from the next-token distributions along the labels' tokens.

    A label's log-probability is the sum of its tokens' log-probabilities (as
    `lm.loglikelihood` scores the pair), plus, when its tokens are a proper prefix of another
    label's (" 1" of " 10"), the log-probability that no token continuing it into a longer label
    follows (1 - p(continuation tokens)): so " 1" is not counted twice inside " 10" ... " 19".
    Whatever else follows counts as the end of the number: " 4.5" counts for 4 here (the
    generation read calls it a parse failure, "not an integer").
    Labels that are nobody's prefix (each a single token, the usual 1-5 and 0-9 case) need one
    forward row per context; 1-100 with single-digit tokens needs 9 when " 10" is "▁", "1", "0"
    (each distribution along a label's tokens is read at its position in the longest label
    path through it, so " 10" serves the positions before "▁", "1" and "0"); a row longer than
    `lm.max_len` is cut from the left, so each token is conditioned on at most the max_len
    tokens before it (for a context that long, `lm.loglikelihood` instead cuts the whole
    request once)."""
    tok = lm.tokenizer
    per_context, per_context_rows = [], []
    wanted: dict[tuple[int, ...], set[int]] = {}
    for c in contexts:
        seqs = []
        for label in labels:
            ctx, cont = tok.encode_pair(c, label)
            if not cont:
                raise TaskError(f"label {label!r} has no tokens after the context")
            seqs.append((tuple(ctx), tuple(cont)))
        plan, rows = [], set()
        for ctx, cont in seqs:
            steps = [(ctx + cont[:j], cont[j]) for j in range(len(cont))]
            whole = ctx + cont
            # tokens that continue this label into a longer label of the range
            longer = {c2[len(cont)] for x2, c2 in seqs if len(c2) > len(cont)
                      and c2[:len(cont)] == cont and x2 == ctx}
            for row, t in steps:
                wanted.setdefault(row, set()).add(t)
                rows.add(row)
            if longer:
                wanted.setdefault(whole, set()).update(longer)
                rows.add(whole)
            plan.append((steps, whole, longer))
        per_context.append(plan)
        per_context_rows.append(rows)
    keys = list(wanted)
    host: dict = {}
    for rows in per_context_rows:  # prefixes are looked for within a context's rows only
        host.update(_hosts(rows, lm.max_len))
    scores = dict(zip(keys, _next_token_logprobs(lm, keys, [wanted[k] for k in keys], host)))
    out = []
    for plan in per_context:
        row = []
        for steps, whole, longer in plan:
            lp = sum(scores[r][t] for r, t in steps)
            if longer:
                p_more = sum(math.exp(scores[whole][t]) for t in longer)
                lp += math.log(max(1.0 - p_more, 1e-300))
            row.append(lp)
        out.append(row)
    return out


# ------------------------------------------------------------------------------ generation
_INTEGER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def parse_score(text: str, low: int, high: int) -> tuple[int | None, str | None]:
    """(score, None) for the first number written in `text` when it is an integer in
    [low, high]; else (None, why): "no number", "not an integer" or "out of range"."""
    m = _INTEGER.search(text)
    if m is None:
        return None, "no number"
    value = float(m.group())
    if value != int(value) or "." in m.group():
        return None, "not an integer"
    value = int(value)
    if not low <= value <= high:
        return None, "out of range"
    return value, None


# ------------------------------------------------------------------------------ statistics
def histogram(scores: Sequence[int], low: int, high: int) -> list[int]:
    """Counts of low..high among the scores."""
    counts = [0] * (high - low + 1)
    for s in scores:
        counts[int(s) - low] += 1
    return counts


def entropy_bits(probs: Sequence[float]) -> float:
    """Shannon entropy in bits of a distribution (counts are normalised; 0 log 0 = 0)."""
    p = np.asarray(probs, float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """(tau-b, two-sided p-value) by scipy.stats.kendalltau(variant="b"); (None, None) for
    fewer than 2 pairs or when either side is constant."""
    from scipy.stats import kendalltau
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, None
    res = kendalltau(x, y, variant="b")
    tau, p = float(res.statistic), float(res.pvalue)
    return (None if math.isnan(tau) else tau), (None if math.isnan(p) else p)


def score_metrics(scores: Sequence[int | None], golds: Sequence[float | None], low: int,
                  high: int) -> tuple[dict, dict]:
    """(metrics, standard errors) of per-item scores (None = no score) on low..high, against
    the gold grades where both exist. Names as in the module docstring, without the range."""
    scored = [s for s in scores if s is not None]
    counts = histogram(scored, low, high)
    mode = int(np.argmax(counts)) + low if scored else None
    on_mode = [float(s == mode) for s in scored]
    pairs = [(s, g) for s, g in zip(scores, golds) if s is not None and g is not None]
    tau, p = kendall_tau_b([g for _, g in pairs], [s for s, _ in pairs])
    failed = [float(s is None) for s in scores]
    metrics = {"mean_score": float(np.mean(scored)) if scored else None,
               "kurtosis": excess_kurtosis(scored),
               "entropy_bits": entropy_bits(counts) if scored else None,
               "modal_share": float(np.mean(on_mode)) if scored else None,
               "modal_score": mode,
               "kendall_tau_b": tau, "kendall_p": p, "kendall_n": len(pairs),
               "parse_failure_rate": float(np.mean(failed)) if scores else None,
               "n_scored": len(scored)}
    stderr = {"mean_score": mean_stderr(scored), "modal_share": mean_stderr(on_mode),
              "parse_failure_rate": mean_stderr(failed)}
    return metrics, stderr


# ------------------------------------------------------------------------------ the task
def _range_name(low: int, high: int) -> str:
    return f"{low}-{high}"


def run_numeric(lm, task, template, examples, pool, k, progress=None):
    """(metrics, stderr, records) of one template of a numeric task (`task.numeric`, a
    NumericSpec): per range, every item judged once; records hold per item and range the
    prompt, the distribution (logits) or the generation, and the score."""
    spec = task_numeric(task)
    if k:
        raise TaskError(f"{task.source}: numeric tasks run zero-shot (the prompt states the "
                        f"scale); got {k} few-shot examples: pass --fewshot 0")
    metrics, stderr, records = {}, {}, []
    golds = [e.get("gold") for e in examples]
    extra = {} if progress is None else {"progress": progress}
    for low, high in spec.ranges:
        name = _range_name(low, high)
        contexts = [numeric_context(task, template, e, low, high) for e in examples]
        base = [{"id": e["id"], "range": name, "low": low, "high": high, "prompt": ctx,
                 "gold": e.get("gold"), **({"lang": e["lang"]} if "lang" in e else {}),
                 **({"meta": e["meta"]} if "meta" in e else {})}
                for e, ctx in zip(examples, contexts)]
        if spec.read == "logits":
            if progress is not None:
                progress.add_total(len(contexts))
            labels = score_labels(low, high)
            dists = [softmax(lp) for lp in number_logprobs(lm, contexts, labels)]
            if progress is not None:
                progress.advance(len(contexts))
            values = np.arange(low, high + 1)
            scores = [int(values[int(np.argmax(d))]) for d in dists]
            expected = [float(np.dot(d, values)) for d in dists]
            item_h = [entropy_bits(d) for d in dists]
            for r, d, s, x, h in zip(base, dists, scores, expected, item_h):
                r.update(distribution=[float(v) for v in d], score=s, expected=x,
                         entropy_bits=h)
            m, se = score_metrics(scores, golds, low, high)
            del m["parse_failure_rate"], se["parse_failure_rate"]
            graded = [(g, x) for g, x in zip(golds, expected) if g is not None]
            tau_x, p_x = kendall_tau_b([g for g, _ in graded], [x for _, x in graded])
            m.update(mean_expected=float(np.mean(expected)),
                     kurtosis_expected=excess_kurtosis(expected),
                     item_entropy_bits=float(np.mean(item_h)),
                     kendall_tau_b_expected=tau_x, kendall_p_expected=p_x)
            se.update(mean_expected=mean_stderr(expected), item_entropy_bits=mean_stderr(item_h))
        else:
            outputs = lm.generate(contexts, max_new_tokens=spec.max_new_tokens, stop=task.stop,
                                  **extra)
            scores = []
            for r, out in zip(base, outputs):
                s, why = parse_score(out, low, high)
                scores.append(s)
                r.update(output=out, score=s, failure=why)
            m, se = score_metrics(scores, golds, low, high)
        metrics.update({f"{name}/{key}": v for key, v in m.items()})
        stderr.update({f"{name}/{key}": v for key, v in se.items()})
        records += base
    return metrics, stderr, records


# ------------------------------------------------------------------------------ the plot
def _bins(low: int, high: int, max_bins: int = 20) -> list[tuple[int, int]]:
    """low..high in consecutive bins of equal width (the last may be shorter)."""
    width = -(-(high - low + 1) // max_bins)
    return [(a, min(a + width - 1, high)) for a in range(low, high + 1, width)]


def plot_histograms(results: Sequence[dict], out_png) -> Path:
    """One column per range, one bar series per result ({"name": model name, "records":
    run_numeric's records}), side by side: top, the share of items given each score (argmax or
    parsed); below, when the records carry logit distributions, the mean probability of each
    score over items. Ranges of more than 20 values are shown in bins of equal width (1-100:
    1-5, 6-10, ...). Returns the PNG's path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranges = []
    for res in results:
        for r in res["records"]:
            if (r["low"], r["high"]) not in ranges:
                ranges.append((r["low"], r["high"]))
    if not ranges:
        raise ValueError("plot_histograms: no records to plot")
    with_dist = any("distribution" in r for res in results for r in res["records"])
    n_rows = 2 if with_dist else 1
    fig, axes = plt.subplots(n_rows, len(ranges), figsize=(5.2 * len(ranges), 3.4 * n_rows),
                             squeeze=False)
    width = 0.8 / max(len(results), 1)
    for col, (low, high) in enumerate(ranges):
        bins = _bins(low, high)
        x = np.arange(len(bins))
        for j, res in enumerate(results):
            recs = [r for r in res["records"] if (r["low"], r["high"]) == (low, high)]
            scores = [r["score"] for r in recs if r["score"] is not None]
            if scores:
                counts = histogram(scores, low, high)
                share = [sum(counts[a - low:b - low + 1]) / len(scores) for a, b in bins]
                axes[0][col].bar(x - 0.4 + width * (j + 0.5), share, width, label=res["name"])
            dists = [r["distribution"] for r in recs if "distribution" in r]
            if with_dist and dists:
                mean = np.mean(dists, axis=0)
                mass = [float(mean[a - low:b - low + 1].sum()) for a, b in bins]
                axes[1][col].bar(x - 0.4 + width * (j + 0.5), mass, width, label=res["name"])
        labels = [str(a) if a == b else f"{a}-{b}" for a, b in bins]
        for row in range(n_rows):
            ax = axes[row][col]
            ax.set_xticks(x, labels, rotation=0 if len(bins) <= 11 else 90, fontsize=8)
            ax.set_xlabel("score")
        axes[0][col].set_title(f"scores {low}-{high}: share of items")
        axes[0][col].set_ylabel("share of items")
        if with_dist:
            axes[1][col].set_title(f"scores {low}-{high}: mean probability")
            axes[1][col].set_ylabel("mean probability")
    axes[0][0].legend(fontsize=8)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.12, top=0.93, wspace=0.22,
                        hspace=0.55)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
