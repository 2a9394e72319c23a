"""evaluation/neurons.py: LAPE and the selection against a per-neuron transcription of Tang et
al.'s definition; activation probabilities against flax's captured intermediates; the ablation
against the model with those neurons' activations forced to 0; `hibari analyze neurons` end to
end on a tiny model."""
import gzip
import hashlib
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hibari.base.errors import InputNotFound, UsageError
from hibari.base.stats import mean_stderr
from hibari.data import CORPUS_DIR
from hibari.evaluation import neurons as N
from hibari.model import transformer as T
from hibari.model.activations import unscanned
from hibari.model.config import ModelConfig


def _tiny(scan=True, **kw):
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2,
                      head_dim=4, d_ff=24, max_seq_len=32, tie_embeddings=False,
                      scan_layers=scan, **kw)
    return cfg, T.init(cfg, jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# LAPE and selection vs a brute-force transcription
# ---------------------------------------------------------------------------------------------

def _brute_selection(probs, top_percent, filter_pct, assign_pct):
    """Tang et al. 2024 (identify.py), one neuron at a time with Python floats."""
    n_layers, d_ff, n_lang = probs.shape
    pooled = sorted(float(v) for v in probs.ravel())

    def kth(percent):
        k = min(max(round(len(pooled) * percent / 100), 1), len(pooled))
        return pooled[k - 1]

    bar_filter, bar_assign = kth(filter_pct), kth(assign_pct)
    ranked = []
    lape = np.zeros((n_layers, d_ff))
    for i in range(n_layers):
        for j in range(d_ff):
            p = [float(probs[i, j, k]) for k in range(n_lang)]
            total = sum(p)
            h = 0.0
            for v in p:
                if total > 0 and v > 0:
                    h -= (v / total) * math.log(v / total)
            lape[i, j] = h
            if max(p) > bar_filter:
                ranked.append((h, i, j))
    ranked.sort()
    chosen = ranked[:round(n_layers * d_ff * top_percent / 100)]
    assigned = np.zeros(probs.shape, bool)
    for _, i, j in chosen:
        for k in range(n_lang):
            assigned[i, j, k] = probs[i, j, k] > bar_assign
    return lape, {(i, j) for _, i, j in chosen}, assigned, bar_filter, bar_assign


def _planted(seed=0, n_layers=4, d_ff=50):
    """Probabilities on two disjoint grids (no neuron is another's mirror image, so LAPE ties
    are exact duplicates), with planted specific neurons, never-active ones and duplicates."""
    rng = np.random.default_rng(seed)
    en = rng.integers(0, 20, (n_layers, d_ff)) * 0.05
    ja = rng.integers(0, 20, (n_layers, d_ff)) * 0.05 + 0.025
    en[0, :5], ja[0, :5] = 0.95, 0.025        # English-specific, identical (ties)
    en[3, :3], ja[3, :3] = 0.0, 0.975        # Japanese-specific
    en[2, 7], ja[2, 7] = 0.0, 0.025          # rare in both: LAPE 0 but not eligible
    en[1, :4], ja[1, :4] = 0.0, 0.0          # never active
    return np.stack([en, ja], -1)


@pytest.mark.parametrize("setting", [(1.0, 95.0, 95.0), (10.0, 80.0, 90.0), (30.0, 50.0, 40.0),
                                     (100.0, 0.0, 0.0)])
def test_selection_matches_brute_force(setting):
    top, filt, assign = setting
    for seed in range(3):
        probs = _planted(seed)
        sel = N.select_neurons(probs, ("en", "ja"), N.Thresholds(top, filt, assign))
        lape, chosen, assigned, bar_filter, bar_assign = _brute_selection(probs, top, filt, assign)
        np.testing.assert_allclose(sel.lape, lape, rtol=1e-12, atol=1e-15)
        assert {tuple(x) for x in np.argwhere(sel.selected)} == chosen
        np.testing.assert_array_equal(sel.assigned, assigned)
        assert (sel.filter_threshold, sel.assign_threshold) == (bar_filter, bar_assign)
        assert sel.counts()["en"] == assigned[..., 0].sum(-1).tolist()


def test_lape_values_and_planted_neurons():
    assert N.lape(np.array([0.3, 0.0])) == 0.0
    assert N.lape(np.array([0.0, 0.0])) == 0.0
    assert N.lape(np.array([0.4, 0.4])) == pytest.approx(math.log(2))
    assert N.lape(np.array([0.2, 0.2, 0.2])) == pytest.approx(math.log(3))
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.2, 0.6, (4, 50, 2))  # background: LAPE > 0.5
    probs[0, :5] = 0.9, 0.01          # English-specific
    probs[3, :3] = 0.02, 0.95         # Japanese-specific
    probs[2, 7] = 0.0, 0.05           # rare in both: LAPE 0 but not eligible
    probs[1, :4] = 0.0, 0.0           # never active
    sel = N.select_neurons(probs, ("en", "ja"), N.Thresholds(top_percent=4.0))  # 8 neurons
    assert sel.selected.sum() == 8 == sel.n_requested
    assert sel.mask("en")[0, :5].all() and sel.mask("ja")[3, :3].all()
    assert not sel.selected[2, 7] and not sel.selected[1, :4].any()  # not eligible
    assert not (sel.mask("en") & sel.mask("ja")).any()


def test_kth_percentile_is_torch_kthvalue():
    values = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0, 8.0, 6.0, 0.0])
    assert N.kth_percentile(values, 95) == 9.0   # k = round(9.5) = 10 (banker's: 10)
    assert N.kth_percentile(values, 50) == 4.0   # k = 5
    assert N.kth_percentile(values, 0) == 0.0    # k clamped to 1


# ---------------------------------------------------------------------------------------------
# Activation probabilities vs captured intermediates
# ---------------------------------------------------------------------------------------------

def _batches(seed, rows=3, length=10):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (rows, length))
    segments = np.ones((rows, length), int)
    segments[1, 5:] = 2
    segments[2, 7:] = 0
    return tokens, segments


@pytest.mark.parametrize("scan,mlp", [(True, "swiglu"), (False, "gelu")])
def test_probabilities_match_captured_intermediates(scan, mlp):
    cfg, params = _tiny(scan, mlp=mlp)
    module = "gate" if mlp == "swiglu" else "up"
    plain, tree = unscanned(cfg, params)
    captured = jax.jit(lambda tree, tok, seg: T.Transformer(plain).apply(
        {"params": tree}, tok, seg, capture_intermediates=True, mutable=["intermediates"]))
    langs = {"en": [_batches(0), _batches(1)], "ja": [_batches(2)]}
    probs, tokens = N.activation_probabilities(cfg, params, langs)
    assert probs.shape == (cfg.n_layers, cfg.d_ff, 2)
    for k, (lang, batches) in enumerate(langs.items()):
        on, n = np.zeros((cfg.n_layers, cfg.d_ff)), 0
        for tok, seg in batches:
            _, state = captured(tree, jnp.asarray(tok), jnp.asarray(seg))
            valid = seg > 0
            n += valid.sum()
            for i in range(cfg.n_layers):
                pre = np.asarray(state["intermediates"][f"layers_{i}"]["mlp"][module]
                                 ["__call__"][0])
                act = np.asarray(nn.silu(pre) if mlp == "swiglu" else nn.gelu(pre, False))
                on[i] += (act[valid] > 0).sum(0)
        assert tokens[lang] == n
        np.testing.assert_array_equal(probs[..., k], on / n)


# ---------------------------------------------------------------------------------------------
# Ablation
# ---------------------------------------------------------------------------------------------

def _masked_logits(cfg, params, tokens, mask):
    """Logits with the input h of layer i's down projection multiplied by (1 - mask[i]): the
    neurons' activations forced to 0 inside the forward pass."""
    plain, tree = unscanned(cfg, params)

    def force(next_fun, args, kwargs, context):
        path = context.module.path
        if isinstance(context.module, T.Dense) and path[-1] == "down":
            layer = int(path[-3].split("_")[1])
            args = (args[0] * jnp.asarray(~mask[layer], args[0].dtype),) + args[1:]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(force):
        return T.Transformer(plain).apply({"params": tree}, tokens)


@pytest.mark.parametrize("scan,bias", [(True, False), (False, True)])
def test_ablation_equals_forcing_activations_to_zero(scan, bias):
    cfg, params = _tiny(scan, use_bias=bias)
    if bias:  # a nonzero down bias must survive the ablation
        params = jax.tree.map(lambda a: a + 0.1, params)
    rng = np.random.default_rng(0)
    mask = rng.random((cfg.n_layers, cfg.d_ff)) < 0.3
    tokens = jnp.asarray(_batches(3)[0])
    ablated = N.ablate_neurons(cfg, params, mask)
    got = T.apply(cfg, ablated, tokens)
    want = _masked_logits(cfg, params, tokens, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dense = T.apply(cfg, params, tokens)
    assert np.abs(np.asarray(got - dense)).max() > 1e-3  # the mask did something
    unchanged = N.ablate_neurons(cfg, params, np.zeros_like(mask))
    np.testing.assert_array_equal(T.apply(cfg, unchanged, tokens), dense)
    # only the down kernels' masked rows changed
    flat_new = dict(jax.tree_util.tree_flatten_with_path(ablated)[0])
    for path, old in jax.tree_util.tree_flatten_with_path(params)[0]:
        new = np.asarray(flat_new[path])
        if "down" in str(path) and "kernel" in str(path):
            rows = mask if scan else mask[int(str(path[0].key).split("_")[1])]
            assert (new[rows] == 0).all()
            np.testing.assert_array_equal(new[~rows], np.asarray(old)[~rows])
        else:
            np.testing.assert_array_equal(new, np.asarray(old))


def test_random_control():
    rng = np.random.default_rng(1)
    mask = rng.random((4, 30)) < 0.1
    exclude = mask | (rng.random((4, 30)) < 0.2)
    a, b = N.random_control(mask, exclude, 7), N.random_control(mask, exclude, 7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a.sum(-1), mask.sum(-1))
    assert not (a & exclude).any()
    assert not np.array_equal(a, N.random_control(mask, exclude, 8))
    with pytest.raises(ValueError, match="layer 0"):
        N.random_control(np.ones((1, 3), bool), np.array([[True, True, False]]))


# ---------------------------------------------------------------------------------------------
# Held-out split and standard errors
# ---------------------------------------------------------------------------------------------

def test_split_heldout_is_disjoint_and_by_content():
    texts = [f"document {i}" for i in range(400)] + ["document 3"]
    found, held = N.split_heldout(texts, 0.25)
    assert not set(found) & set(held)
    assert len(found) + len(held) == len(texts)
    assert 60 < len(held) < 140
    again = N.split_heldout(list(reversed(texts)), 0.25)
    assert sorted(again[1]) == sorted(held)  # by content, not position


def test_ratio_stderr():
    x = [3.0, 5.0, 4.0, 10.0]
    assert N.ratio_stderr(x, [2.0] * 4) == pytest.approx(mean_stderr([v / 2 for v in x]))
    # hand computation: R = 22 / 10; residuals x - R y
    y = [1.0, 2.0, 3.0, 4.0]
    r = 22 / 10
    res = [a - r * b for a, b in zip(x, y)]
    assert N.ratio_stderr(x, y) == pytest.approx(
        math.sqrt(sum(e * e for e in res) / 12) / 2.5)
    assert N.ratio_stderr([1.0], [2.0]) == 0.0


# ---------------------------------------------------------------------------------------------
# `hibari analyze neurons` end to end
# ---------------------------------------------------------------------------------------------

def _corpus(lang):
    with gzip.open(CORPUS_DIR / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _heldout_by_hand(texts, fraction, max_bytes):
    """The documented split: sha256's first 8 bytes / 2^64 < fraction; then the byte budget."""
    held = [t for t in texts
            if int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2 ** 64
            < fraction]
    out, left = [], max_bytes
    for t in held:
        if left <= 0:
            break
        cut = t.encode()[:left].decode("utf-8", errors="ignore")
        out.append(cut)
        left -= len(cut.encode())
    return len(texts) - len(held), out


@pytest.fixture(scope="module")
def export(tiny_export, tmp_path_factory):
    """(a folder with the shared tiny export as export/, its config)."""
    root = tmp_path_factory.mktemp("neurons")
    (root / "export").symlink_to(tiny_export[0], target_is_directory=True)
    return root, tiny_export[1]


def test_analyze_neurons_end_to_end(export, capsys):
    from hibari.evaluation.analyze_cli import analyze_main
    from hibari.evaluation.lm import load_lm
    from hibari.evaluation.loglikelihood import perplexity_stats
    from hibari.model.params_io import load_params
    root, cfg = export
    out = root / "out"
    files = {lang: str(CORPUS_DIR / f"{lang}.jsonl.gz") for lang in ("en", "ja")}
    assert analyze_main(["neurons", "--checkpoint", str(root / "export"),
                         "--text", f"en={files['en']}", f"ja={files['ja']}",
                         "--max-tokens", "1500", "--seq-len", "64", "--top-percent", "20",
                         "--filter-percentile", "50", "--assign-percentile", "60",
                         "--ablate", "all", "--heldout-max-bytes", "1200",
                         "--save-ablated", str(root / "ablated"), "--out", str(out)]) == 0
    report = json.loads((out / "neurons.json").read_text())
    assert (out / "neurons.png").stat().st_size > 1000
    assert "| layer | en | ja |" in (out / "neurons.md").read_text()
    assert report["tokens"] == {"en": 1500, "ja": 1500}
    assert report["selected"] == round(0.2 * 2 * 64) == report["requested"]
    bar = report["thresholds"]["assign_threshold_p"]
    for layer in report["layers"]:
        for lang in ("en", "ja"):
            assert layer["counts"][lang] == sum(lang in r["languages"] for r in layer["neurons"])
        for r in layer["neurons"]:
            assert r["languages"] == [k for k in ("en", "ja") if r["p"][k] > bar]
            q = [r["p"][k] / (r["p"]["en"] + r["p"]["ja"]) for k in ("en", "ja")]
            assert r["lape"] == pytest.approx(-sum(v * math.log(v) for v in q if v > 0))
    # the held-out split, by hand; the dense and ablated scores, recomputed from the saved models
    ablation = report["ablation"]
    runs = {r["name"]: r for r in ablation["runs"]}
    assert [r["kind"] for r in ablation["runs"]] == ["dense", "language", "random", "language",
                                                     "random"]
    for lang in ("en", "ja"):
        n_found, held = _heldout_by_hand(_corpus(lang), 0.1, 1200)
        assert report["documents"][lang] == n_found
        assert ablation["heldout"][lang]["documents"] == len(held)
        assert ablation["heldout"][lang]["bytes"] == sum(len(t.encode()) for t in held)
        for name, where in (("dense", root / "export"),
                            (f"{lang}-specific zeroed", root / "ablated" / lang)):
            lm = load_lm(where)  # the tokenizer was saved beside the ablated export
            scored = lm.rolling_loglikelihood(held, 64)
            want = perplexity_stats(sum(lp for lp, _ in scored), sum(n for _, n in scored),
                                    sum(len(t.encode()) for t in held),
                                    sum(len(t.split()) for t in held))
            got = runs[name]["scores"][lang]
            assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-9)
            assert got["tokens"] == want["tokens"]
        saved_cfg, saved = load_params(root / "ablated" / lang)
        ids = {(r["layer"], r["neuron"]) for layer in report["layers"]
               for r in layer["neurons"] if lang in r["languages"]}
        assert runs[f"{lang}-specific zeroed"]["zeroed"] == len(ids) > 0
        assert runs[f"random control for {lang}"]["zeroed_per_layer"] == \
            runs[f"{lang}-specific zeroed"]["zeroed_per_layer"]
        down = np.asarray(saved["layers"]["mlp"]["down"]["kernel"])
        zero_rows = {(i, j) for i in range(cfg.n_layers) for j in range(cfg.d_ff)
                     if not down[i, j].any()}
        assert zero_rows == ids
    assert "## Ablation" in capsys.readouterr().out


def test_analyze_neurons_usage_errors(export, tmp_path):
    from hibari.evaluation.analyze_cli import analyze_main
    root, _ = export
    en = str(CORPUS_DIR / "en.jsonl.gz")
    base = ["neurons", "--checkpoint", str(root / "export"), "--out", str(tmp_path / "o"),
            "--max-tokens", "10", "--heldout-max-bytes", "10"]
    with pytest.raises(UsageError, match="two languages"):
        analyze_main(base + ["--text", f"en={en}"])
    with pytest.raises(UsageError, match="LANG=FILE"):
        analyze_main(base + ["--text", en, f"ja={en}"])
    with pytest.raises(UsageError, match="--ablate fr"):
        analyze_main(base + ["--text", f"en={en}", f"ja={en}", "--ablate", "fr"])
    with pytest.raises(InputNotFound, match="nope.jsonl"):
        analyze_main(base + ["--text", f"en={en}", "ja=nope.jsonl"])
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": _corpus("en")[3]}) + "\n"
                    + json.dumps({"text": "something else entirely"}) + "\n")
    with pytest.raises(UsageError, match="1 document"):
        analyze_main(base + ["--text", f"en={en}", f"ja={en}", "--ablate", "en",
                             "--heldout", f"en={held}", f"ja={held}"])
