"""Language-specific MLP neurons by language activation probability entropy (LAPE), and their
ablation.

    probs, tokens = activation_probabilities(cfg, params, {"en": batches_en, "ja": batches_ja})
    sel = select_neurons(probs, ("en", "ja"), Thresholds())   # sel.assigned[layer, neuron, lang]
    params_ja_off = ablate_neurons(cfg, params, sel.assigned[..., 1])

Definitions (Tang et al. 2024, "Language-Specific Neurons: The Key to Multilingual Capabilities
in Large Language Models", section 2 and their released `identify.py`):
- activation probability p[i, j, l]: the share of language l's real tokens (segment id > 0) on
  which neuron j of layer i is active, act(gate(x))_j > 0 (SwiGLU/GeGLU: the gate projection; an
  ungated MLP: the up projection; SiLU, GELU and ReLU are > 0 exactly when their input is).
  Counted by `hibari.model.activations.dense_statistics(..., positive_counts)`.
- LAPE[i, j] = -sum_l q_l log q_l with q_l = p[i, j, l] / sum_l p[i, j, l] (natural log; 0 log 0
  = 0; a neuron never active has LAPE 0). With L languages LAPE lies in [0, ln L].
- eligible: max_l p[i, j, l] > the `filter_percentile`-th percentile of all p (every layer,
  neuron and language pooled; default 95: the paper's 0.95 "filter rate"). Neurons that are
  rarely active in every language would otherwise look language-specific by accident.
- selected: the `top_percent` % of all MLP neurons of the model (pooled over layers; default 1,
  the paper's) with the lowest LAPE among the eligible ones (fewer if fewer are eligible; ties
  by (layer, neuron) order).
- assigned to language l: selected and p[i, j, l] > the `assign_percentile`-th percentile of all
  p (default 95, the paper's "activation bar"). A selected neuron can belong to several
  languages; with the default thresholds (assign = filter) it belongs to at least one.
A percentile here is the paper's `kthvalue`: the k-th smallest of the N pooled values with
k = round(N * percentile / 100), clamped to [1, N]; comparisons are strict (>).

Ablation: a neuron is switched off by zeroing its row of the down projection (kernel[j, :] of
`mlp/down`, [d_ff, d_model]). The MLP's output is sum_j h_j * down[j, :] (+ down's bias, which
no neuron owns), so this removes neuron j's contribution exactly: the same as forcing its
activation h_j = act(gate_j) * up_j to 0, for every token; the gate and up columns are left as
they are (they no longer matter). The random control zeroes, in every layer, as many neurons as
the language's set has there, drawn uniformly (seeded) from that layer's neurons that are not
language-specific for any language.

Held-out perplexity and bits per byte come from the evaluation harness's own scoring
(`LanguageModel.rolling_loglikelihood`, `loglikelihood.perplexity_stats`); the standard error of a
pooled bits-per-byte (and of its change against the dense model, paired by document) is that of
a ratio of sums over documents (`ratio_stderr`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from hibari.model.activations import dense_statistics, positive_counts
from hibari.model.config import ModelConfig
from hibari.model.prune import apply_masks


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Selection settings (percent values in [0, 100]); the defaults are the paper's."""

    top_percent: float = 1.0
    filter_percentile: float = 95.0
    assign_percentile: float = 95.0

    def __post_init__(self):
        for name in ("top_percent", "filter_percentile", "assign_percentile"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name} must be a percent in [0, 100], got {value}")


# ---------------------------------------------------------------------------------------------
# Activation probabilities
# ---------------------------------------------------------------------------------------------

def mlp_activation_module(cfg: ModelConfig) -> str:
    """The Dense module whose output is > 0 exactly when an MLP neuron is active."""
    return "gate" if cfg.gated_mlp else "up"


def activation_counts(cfg: ModelConfig, params, batches: Iterable[tuple[np.ndarray, np.ndarray]]
                      ) -> tuple[np.ndarray, int]:
    """(counts[layer, neuron]: real tokens on which the neuron is active, real tokens seen) over
    batches of (tokens[b, t], segment_ids[b, t])."""
    stats = dense_statistics(cfg, params, batches, positive_counts)
    module = mlp_activation_module(cfg)
    counts = np.stack([stats[f"layers_{i}/mlp/{module}"] for i in range(cfg.n_layers)])
    return counts.astype(np.int64), int(stats["tokens"])


def activation_probabilities(cfg: ModelConfig, params,
                             batches_by_language: Mapping[str, Iterable]
                             ) -> tuple[np.ndarray, dict[str, int]]:
    """(p[layer, neuron, language] in the mapping's order, {language: real tokens})."""
    probs, tokens = [], {}
    for lang, batches in batches_by_language.items():
        counts, n = activation_counts(cfg, params, batches)
        if n == 0:
            raise ValueError(f"language {lang!r}: no tokens to count activations on")
        probs.append(counts / n)
        tokens[lang] = n
    return np.stack(probs, axis=-1), tokens


# ---------------------------------------------------------------------------------------------
# LAPE and selection
# ---------------------------------------------------------------------------------------------

def lape(probs: np.ndarray) -> np.ndarray:
    """Entropy of the activation probabilities normalised over the last (language) axis."""
    p = np.asarray(probs, np.float64)
    total = p.sum(-1, keepdims=True)
    q = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    logq = np.log(q, out=np.zeros_like(q), where=q > 0)
    return -(q * logq).sum(-1)


def kth_percentile(values: np.ndarray, percent: float) -> float:
    """The k-th smallest value, k = round(N * percent / 100) clamped to [1, N] (torch's
    kthvalue as the paper's code uses it)."""
    flat = np.asarray(values, np.float64).ravel()
    if flat.size == 0:
        raise ValueError("kth_percentile of no values")
    k = min(max(int(round(flat.size * percent / 100.0)), 1), flat.size)
    return float(np.partition(flat, k - 1)[k - 1])


@dataclasses.dataclass
class Selection:
    languages: tuple[str, ...]
    probs: np.ndarray       # p[layer, neuron, language]
    lape: np.ndarray        # [layer, neuron]
    eligible: np.ndarray    # bool [layer, neuron]: max_l p > filter threshold
    selected: np.ndarray    # bool [layer, neuron]: among the lowest-LAPE eligible neurons
    assigned: np.ndarray    # bool [layer, neuron, language]
    thresholds: Thresholds
    filter_threshold: float
    assign_threshold: float
    n_requested: int        # round(top_percent% of all neurons)

    def mask(self, language: str) -> np.ndarray:
        """bool [layer, neuron]: the neurons assigned to `language`."""
        return self.assigned[..., self.languages.index(language)]

    def counts(self) -> dict[str, list[int]]:
        """{language: neurons assigned per layer}, plus "selected" (any language or none)."""
        out = {lang: self.mask(lang).sum(-1).astype(int).tolist() for lang in self.languages}
        out["selected"] = self.selected.sum(-1).astype(int).tolist()
        return out


def select_neurons(probs: np.ndarray, languages: Sequence[str],
                   thresholds: Thresholds = Thresholds()) -> Selection:
    """Language-specific neurons of p[layer, neuron, language] (see the module docstring)."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 3 or probs.shape[-1] != len(languages):
        raise ValueError(f"probs must be [layer, neuron, {len(languages)} languages], "
                         f"got shape {probs.shape}")
    if len(languages) < 2:
        raise ValueError("LAPE needs at least two languages")
    entropy = lape(probs)
    filter_threshold = kth_percentile(probs, thresholds.filter_percentile)
    assign_threshold = kth_percentile(probs, thresholds.assign_percentile)
    eligible = (probs > filter_threshold).any(-1)
    n_requested = int(round(entropy.size * thresholds.top_percent / 100.0))
    ranked = np.where(eligible, entropy, np.inf).ravel()
    order = np.argsort(ranked, kind="stable")[:n_requested]
    order = order[np.isfinite(ranked[order])]
    selected = np.zeros(entropy.size, bool)
    selected[order] = True
    selected = selected.reshape(entropy.shape)
    assigned = selected[..., None] & (probs > assign_threshold)
    return Selection(tuple(languages), probs, entropy, eligible, selected, assigned, thresholds,
                     filter_threshold, assign_threshold, n_requested)


# ---------------------------------------------------------------------------------------------
# Ablation
# ---------------------------------------------------------------------------------------------

def ablate_neurons(cfg: ModelConfig, params, mask: np.ndarray):
    """`params` with the down-projection row of every neuron in mask[layer, neuron] zeroed
    (scanned or unscanned layers; `hibari.model.prune.apply_masks`: other arrays are shared,
    not copied)."""
    mask = np.asarray(mask, bool)
    if mask.shape != (cfg.n_layers, cfg.d_ff):
        raise ValueError(f"mask must be [n_layers={cfg.n_layers}, d_ff={cfg.d_ff}], "
                         f"got {mask.shape}")
    keep = np.broadcast_to(~mask[:, :, None], (cfg.n_layers, cfg.d_ff, cfg.d_model))
    return apply_masks(params, {f"layers_{i}/mlp/down": keep[i] for i in range(cfg.n_layers)})


def random_control(mask: np.ndarray, exclude: np.ndarray, seed: int = 0) -> np.ndarray:
    """bool [layer, neuron]: per layer, as many neurons as `mask` has there, drawn uniformly
    without replacement from the layer's neurons outside `exclude`."""
    mask, exclude = np.asarray(mask, bool), np.asarray(exclude, bool)
    rng = np.random.default_rng(seed)
    out = np.zeros_like(mask)
    for i, (row, banned) in enumerate(zip(mask, exclude)):
        pool = np.flatnonzero(~banned)
        n = int(row.sum())
        if n > len(pool):
            raise ValueError(f"layer {i}: {n} random neurons wanted, only {len(pool)} "
                             "outside the excluded set")
        out[i, rng.choice(pool, size=n, replace=False)] = True
    return out


# ---------------------------------------------------------------------------------------------
# Held-out text and scoring
# ---------------------------------------------------------------------------------------------

def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document goes to the held-out side: the first 8 bytes of sha256(text) as a
    number in [0, 1) below `fraction`. Depends on the text only (not its position), so equal
    documents always land on the same side."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


def split_heldout(texts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(texts for the neuron statistics, held-out texts), in their original order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    found, heldout = [], []
    for t in texts:
        (heldout if is_heldout(t, fraction) else found).append(t)
    return found, heldout


def ratio_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Standard error of R = sum(x) / sum(y) over n documents (delta method):
    sqrt(sum((x_i - R y_i)^2) / (n (n - 1))) / mean(y); with equal y_i it is the standard
    error of the mean of x_i / y. 0.0 for fewer than two documents."""
    x, y = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    n = len(x)
    if n < 2:
        return 0.0
    r = x.sum() / y.sum()
    return float(math.sqrt(((x - r * y) ** 2).sum() / (n * (n - 1))) / y.mean())


def score_texts(lm, texts: Sequence[str], window: int | None = None, progress=None) -> dict:
    """Held-out perplexity of `lm` (a `hibari.evaluation.lm.LanguageModel`) on `texts`:
    `perplexity_stats` plus "documents", "words", "bits_per_byte_stderr" and per-document
    "nll" (nats) and "doc_bytes" (for paired comparisons)."""
    from hibari.evaluation.loglikelihood import perplexity_stats
    from hibari.evaluation.tokenizer import utf8_len
    scored = lm.rolling_loglikelihood(texts, window, progress=progress)
    nll = [-lp for lp, _ in scored]
    doc_bytes = [utf8_len(t) for t in texts]
    words = sum(len(t.split()) for t in texts)
    stats = perplexity_stats(-sum(nll), sum(n for _, n in scored), sum(doc_bytes), words)
    stats.update(documents=len(texts), words=words,
                 bits_per_byte_stderr=ratio_stderr([v / math.log(2) for v in nll], doc_bytes),
                 nll=nll, doc_bytes=doc_bytes)
    return stats


def paired_change(scores: dict, base: dict) -> dict:
    """Change in bits per byte against `base` on the same documents, with its paired s.e."""
    diff = [(a - b) / math.log(2) for a, b in zip(scores["nll"], base["nll"])]
    return {"bits_per_byte_change": scores["bits_per_byte"] - base["bits_per_byte"],
            "bits_per_byte_change_stderr": ratio_stderr(diff, base["doc_bytes"])}


def ablation_runs(lm, selection: Selection, heldout: Mapping[str, Sequence[str]],
                  ablate: Sequence[str], *, window: int | None = None, seed: int = 0,
                  log=None) -> list[dict]:
    """Held-out scores per language of the dense model, then for each language in `ablate`:
    with its neurons zeroed, and with as many random non-specific neurons zeroed per layer.
    Each run: {"name", "kind", "language", "zeroed", "zeroed_per_layer", "scores": {lang:
    stats (+ change against dense)}}; per-document lists are left out."""
    from hibari.base.progress import progress_bar

    def score_all(params, name):
        model = dataclasses.replace(lm, params=params)
        out = {}
        for lang, texts in heldout.items():
            progress = progress_bar(f"{name} [{lang}]", 0, unit=" windows",
                                    log=log) if log is not None else None
            out[lang] = score_texts(model, texts, window, progress)
            if progress is not None:
                progress.finish()
        return out

    dense = score_all(lm.params, "dense")
    runs = [{"name": "dense", "kind": "dense", "language": None, "zeroed": 0,
             "zeroed_per_layer": [0] * lm.cfg.n_layers, "scores": dense}]
    for i, lang in enumerate(ablate):
        mask = selection.mask(lang)
        control = random_control(mask, selection.selected, seed + i)
        for kind, m, name in (("language", mask, f"{lang}-specific zeroed"),
                              ("random", control, f"random control for {lang}")):
            scores = score_all(ablate_neurons(lm.cfg, lm.params, m), name)
            for code, s in scores.items():
                s.update(paired_change(s, dense[code]))
            runs.append({"name": name, "kind": kind, "language": lang, "zeroed": int(m.sum()),
                         "zeroed_per_layer": m.sum(-1).astype(int).tolist(), "scores": scores})
    for run in runs:
        for s in run["scores"].values():
            s.pop("nll"), s.pop("doc_bytes")
    return runs


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def neuron_records(selection: Selection) -> list[dict]:
    """The selected neurons, lowest LAPE first: layer, neuron, LAPE, p per language, languages."""
    layer, neuron = np.nonzero(selection.selected)
    order = np.lexsort((neuron, layer, selection.lape[layer, neuron]))
    return [{"layer": int(layer[k]), "neuron": int(neuron[k]),
             "lape": float(selection.lape[layer[k], neuron[k]]),
             "p": {lang: float(selection.probs[layer[k], neuron[k], li])
                   for li, lang in enumerate(selection.languages)},
             "languages": [lang for li, lang in enumerate(selection.languages)
                           if selection.assigned[layer[k], neuron[k], li]]}
            for k in order]


def selection_report(selection: Selection, tokens: Mapping[str, int]) -> dict:
    """The JSON-able summary of a selection (neurons.json without the run's settings)."""
    records = neuron_records(selection)
    n_layers, d_ff = selection.lape.shape
    counts = selection.counts()
    layers = []
    for i in range(n_layers):
        mine = [r for r in records if r["layer"] == i]
        layers.append({"layer": i, "selected": counts["selected"][i],
                       "counts": {lang: counts[lang][i] for lang in selection.languages},
                       "neurons": mine})
    return {
        "languages": list(selection.languages), "tokens": dict(tokens),
        "n_layers": n_layers, "d_ff": d_ff, "neurons_total": n_layers * d_ff,
        "thresholds": {**dataclasses.asdict(selection.thresholds),
                       "filter_threshold_p": selection.filter_threshold,
                       "assign_threshold_p": selection.assign_threshold},
        "eligible": int(selection.eligible.sum()), "requested": selection.n_requested,
        "selected": int(selection.selected.sum()),
        "assigned": {lang: int(selection.mask(lang).sum()) for lang in selection.languages},
        "shared": int((selection.assigned.sum(-1) > 1).sum()),
        "mean_lape_per_layer": selection.lape.mean(-1).tolist(),
        "mean_p_per_layer": {lang: selection.probs[..., li].mean(-1).tolist()
                             for li, lang in enumerate(selection.languages)},
        "layers": layers,
    }


def markdown_report(report: dict, top: int = 5) -> str:
    langs = report["languages"]
    th = report["thresholds"]
    lines = [
        "# Language-specific neurons (LAPE)", "",
        f"Checkpoint: `{report.get('checkpoint', '?')}`; tokens counted: "
        + ", ".join(f"{lang} {report['tokens'][lang]:,}" for lang in langs) + ".", "",
        f"{report['n_layers']} layers × {report['d_ff']} MLP neurons. Eligible (max p > "
        f"{th['filter_threshold_p']:.4f}, the {th['filter_percentile']:g}th percentile of all p): "
        f"{report['eligible']:,}; selected (lowest LAPE, {th['top_percent']:g}% of all neurons): "
        f"{report['selected']}; assigned to a language where p > {th['assign_threshold_p']:.4f} "
        f"(the {th['assign_percentile']:g}th percentile): "
        + ", ".join(f"{lang} {report['assigned'][lang]}" for lang in langs)
        + f" ({report['shared']} in more than one).", "",
        "| layer | " + " | ".join(langs) + " | mean LAPE | lowest-LAPE neurons: id (p "
        + "/".join(langs) + ") |",
        "|---" * (len(langs) + 3) + "|"]
    for layer, mean_lape in zip(report["layers"], report["mean_lape_per_layer"]):
        shown = ", ".join(
            f"{r['neuron']} (" + "/".join(f"{r['p'][lang]:.3f}" for lang in langs) + ")"
            for r in layer["neurons"][:top])
        lines.append(f"| {layer['layer']} | "
                     + " | ".join(str(layer["counts"][lang]) for lang in langs)
                     + f" | {mean_lape:.3f} | {shown} |")
    ablation = report.get("ablation")
    if ablation:
        lines += ["", "## Ablation: held-out bits per byte", "",
                  "Held-out documents: " + ", ".join(
                      f"{lang} {h['documents']} ({h['tokens']:,} tokens, {h['bytes']:,} bytes)"
                      for lang, h in ablation["heldout"].items())
                  + f"; {ablation['heldout_source']}. Window {ablation['window']} tokens. "
                  "± is the standard error over documents; the change is paired by document.",
                  "",
                  "| model | zeroed | " + " | ".join(
                      f"{lang} bits/byte | {lang} change" for lang in ablation["heldout"]) + " |",
                  "|---|---|" + "---|---|" * len(ablation["heldout"])]
        for run in ablation["runs"]:
            cells = []
            for s in run["scores"].values():
                cells.append(f"{s['bits_per_byte']:.4f} ± {s['bits_per_byte_stderr']:.4f}")
                cells.append("" if run["kind"] == "dense" else
                             f"{s['bits_per_byte_change']:+.4f} ± "
                             f"{s['bits_per_byte_change_stderr']:.4f}")
            lines.append(f"| {run['name']} | {run['zeroed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_counts(report: dict, path) -> None:
    """Language-specific neurons per layer, one line per language (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = [row["layer"] for row in report["layers"]]
    for lang in report["languages"]:
        ax.plot(layers, [row["counts"][lang] for row in report["layers"]], marker="o", ms=3,
                label=f"{lang} ({report['assigned'][lang]})")
    ax.set(xlabel="layer", ylabel="language-specific neurons",
           title=f"Lowest-LAPE neurons ({report['thresholds']['top_percent']:g}% of "
                 f"{report['neurons_total']:,}) per layer")
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
