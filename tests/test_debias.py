"""Debiasing losses (align/debias.py) against independent numpy transcriptions, the bias
models, the classification head, the planted-marker data and `hibari classify` end to end
(learns the marker, resumes, rejects bad configs with one line)."""
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hibari.cli
from hibari.align import classify, debias
from hibari.base.config_files import load_python_config
from hibari.base.resources import resource_path
from hibari.model import ModelConfig
from hibari.train.loop import train
from hibari.train.sharding import logical_shardings, make_mesh, normalize_rules

ROOT = Path(__file__).parent.parent
IMDB = str(resource_path("hibari.align", "assets", "imdb", "sample.csv"))


# ---------------------------------------------------------------------------------------------
# Independent transcriptions: per-example loops in float64, no shared helpers
# ---------------------------------------------------------------------------------------------

def np_log_softmax_row(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def np_poe(logits, bias_log_probs, labels):
    total = 0.0
    for z, b, y in zip(logits, bias_log_probs, labels):
        combined = [a + c for a, c in zip(np_log_softmax_row(list(z)), b)]
        total += -np_log_softmax_row(combined)[y]
    return total / len(labels)


def np_reweight(logits, bias_probs, labels):
    num = den = 0.0
    for z, b, y in zip(logits, bias_probs, labels):
        w = 1.0 - b[y]
        num += w * -np_log_softmax_row(list(z))[y]
        den += w
    return num / den if den > 0 else 0.0


def np_conf_reg(logits, teacher, bias_probs, labels):
    total = 0.0
    for z, t, b, y in zip(logits, teacher, bias_probs, labels):
        scaled = [p ** (1.0 - b[y]) for p in t]
        s = [v / sum(scaled) for v in scaled]
        logp = np_log_softmax_row(list(z))
        total += -sum(si * lp for si, lp in zip(s, logp))
    return total / len(labels)


def random_case(n=7, k=3, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, k))
    bias = rng.dirichlet(np.ones(k), n)
    teacher = rng.dirichlet(np.ones(k) * 0.5, n)
    labels = rng.integers(0, k, n)
    return logits, bias, teacher, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_transcriptions_and_have_finite_gradients(seed):
    logits, bias, teacher, labels = random_case(seed=seed)
    j = lambda x: jnp.asarray(x, jnp.float32)
    y = jnp.asarray(labels)
    got = {
        "poe": debias.product_of_experts_loss(j(logits), j(np.log(bias)), y),
        "reweight": debias.example_reweighting_loss(j(logits), j(bias), y),
        "conf_reg": debias.confidence_regularization_loss(j(logits), j(teacher), j(bias), y),
        "ce": debias.cross_entropy(j(logits), y),
    }
    want = {"poe": np_poe(logits, np.log(bias), labels),
            "reweight": np_reweight(logits, bias, labels),
            "conf_reg": np_conf_reg(logits, teacher, bias, labels),
            "ce": np_reweight(logits, np.zeros_like(bias), labels)}
    for name in got:
        np.testing.assert_allclose(float(got[name]), want[name], rtol=1e-5, err_msg=name)
    for kind in debias.LOSS_KINDS:
        g = jax.grad(lambda z: debias.debias_loss(kind, z, y, j(bias), j(teacher)))(j(logits))
        assert np.all(np.isfinite(np.asarray(g))), kind
        assert float(jnp.abs(g).sum()) > 0, kind


def test_edge_cases():
    logits, bias, teacher, labels = random_case(seed=3)  # the shapes compiled above
    y = jnp.asarray(labels)
    # bias probability 1 on the label: weight 0, the example drops out of the weighted mean
    certain = bias.copy()
    certain[0] = np.eye(3)[labels[0]]
    full = debias.example_reweighting_loss(jnp.asarray(logits), jnp.asarray(certain), y)
    rest = debias.example_reweighting_loss(jnp.asarray(logits[1:]), jnp.asarray(certain[1:]),
                                           y[1:])
    np.testing.assert_allclose(float(full), float(rest), rtol=1e-6)
    # Σw = 0: loss 0, gradients zero and finite
    all_certain = np.eye(3)[labels]
    f = lambda z: debias.example_reweighting_loss(z, jnp.asarray(all_certain), y)
    assert float(f(jnp.asarray(logits))) == 0.0
    g = np.asarray(jax.grad(f)(jnp.asarray(logits, jnp.float32)))
    assert np.all(g == 0.0)
    # confidence regularisation: β = 1 -> uniform target (also where the teacher has a 0);
    # β = 0 -> the teacher itself
    teacher0 = np.array([[1.0, 0.0, 0.0]] * 7)
    s = debias.scaled_teacher(jnp.asarray(teacher0), jnp.asarray(all_certain), y)
    np.testing.assert_allclose(np.asarray(s), 1 / 3, rtol=1e-6)
    s = debias.scaled_teacher(jnp.asarray(teacher), jnp.asarray(1 - all_certain), y)
    np.testing.assert_allclose(np.asarray(s), teacher, rtol=1e-5)
    # product of experts with a uniform bias is plain cross entropy; a bias prob of 0 stays
    # finite through the floor of bias_log_probs
    uniform = jnp.full((7, 3), 1 / 3)
    np.testing.assert_allclose(float(debias.debias_loss("poe", jnp.asarray(logits), y, uniform)),
                               float(debias.cross_entropy(jnp.asarray(logits), y)), rtol=1e-6)
    zero = jnp.asarray(1 - all_certain)
    assert np.isfinite(float(debias.debias_loss("poe", jnp.asarray(logits), y, zero)))


# ---------------------------------------------------------------------------------------------
# Bias models and data
# ---------------------------------------------------------------------------------------------

def test_vendored_split_and_planted_markers():
    examples = classify.read_labelled(IMDB, 2)
    assert len(examples) == 200 and sum(x.label for x in examples) == 103
    train_, test = classify.stratified_split(examples, 0.3, seed=0)
    assert (len(train_), len(test)) == (140, 60)
    assert sum(x.label for x in test) == 31  # round(0.3 * 103) positive, round(0.3 * 97) neg.
    assert not {x.id for x in train_} & {x.id for x in test}
    planted, agrees = classify.plant_markers(train_, ["[[B]]", "[[A]]"], 0.9, seed=0)
    assert agrees.sum() == 126
    for x, a in zip(planted, agrees):
        assert x.text.startswith(["[[B]]", "[[A]]"][x.label if a else 1 - x.label] + " ")
    anti, agrees = classify.plant_markers(test, ["[[B]]", "[[A]]"], 0.0, seed=1)
    assert not agrees.any()
    assert all(x.text.startswith(["[[A]]", "[[B]]"][x.label]) for x in anti)


def test_bow_bias_models_and_probability_files(tmp_path):
    examples = classify.read_labelled(IMDB, 2)[:80]
    planted, _ = classify.plant_markers(examples, ["[[B]]", "[[A]]"], 0.9, seed=0)
    texts, labels = [x.text for x in planted], [x.label for x in planted]
    marker = debias.fit_bow(texts, labels, 2, vocab=["[[A]]", "[[B]]"], l2=0.01)
    p = debias.bow_probs(marker, ["[[A]] fine", "[[B]] fine"])
    for row, name in ((0, "[[A]]"), (1, "[[B]]")):  # ~ the empirical P(label | marker)
        marked = [y for t, y in zip(texts, labels) if t.startswith(name)]
        np.testing.assert_allclose(p[row, 1], np.mean(marked), atol=0.03)
    oof = debias.cross_fitted_bow_probs(texts, labels, 2, folds=4, seed=0, min_count=2)
    assert oof.shape == (80, 2) and np.allclose(oof.sum(1), 1)
    assert ((oof.argmax(1) == np.array(labels)).mean()) > 0.7  # the marker is in the vocab
    ids = [x.id for x in examples]
    path = tmp_path / "probs.jsonl"
    debias.write_probs_file(path, ids, oof)
    np.testing.assert_allclose(debias.read_probs_file(path, ids[::-1], 2), oof[::-1],
                               atol=1e-5)
    with pytest.raises(debias.BiasModelError, match="no probabilities for 1 examples"):
        debias.read_probs_file(path, ids + ["nope"], 2)
    with pytest.raises(debias.BiasModelError, match="must be 3 non-negative"):
        debias.read_probs_file(path, ids, 3)


def test_head_shapes_and_axes():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=8, d_ff=32, max_seq_len=16)
    params = classify.init_classifier_params(cfg, jax.random.key(0), 3)
    assert params["head"]["kernel"].shape == (16, 3) and params["head"]["bias"].shape == (3,)
    axes = classify.classifier_param_axes(cfg)
    assert jax.tree.structure(axes["head"]) == jax.tree.structure(params["head"])
    assert tuple(axes["head"]["kernel"]) == ("embed", None)
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    sh = logical_shardings(axes, jax.eval_shape(lambda: params), mesh,
                           normalize_rules(load_python_config(
                               str(ROOT / "configs/classify/shortcut.py")).rules))
    assert sh["head"]["kernel"].spec[0] == "fsdp"
    tokens = jnp.ones((5, 16), jnp.int32)
    seg = jnp.ones((5, 16), jnp.int32).at[1, 8:].set(0).at[4].set(0)  # padding, empty row
    for pool in classify.POOLS:
        fn = jax.jit(lambda p, b: classify.class_logits(cfg, p, b, pool))
        logits = fn(params, {"tokens": tokens, "segment_ids": seg})
        assert logits.shape == (5, 3) and np.all(np.isfinite(np.asarray(logits)))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def tiny_config(steps, **fields):
    c = load_python_config(str(ROOT / "configs/classify/shortcut.py"))
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                   max_seq_len=32)
    c.data.update(seq_len=32, batch_size=16)
    c.update(steps=steps, log_every=10, eval_every=steps, checkpoint_every=steps,
             async_checkpoint=False)
    c.optim.lr = 3e-3
    c.update_from_flattened_dict(fields)
    return c


@pytest.mark.slow
def test_classify_learns_the_marker_and_resumes(tmp_path):
    workdir = tmp_path / "ce"
    config = tiny_config(40)
    task, finish = classify.build_classify(config, workdir)
    summary = train(config, workdir, task, devices=jax.devices()[:1])
    results = finish(summary["params"])
    print({k: v for k, v in results.items() if k.startswith("acc")})
    assert results["accuracy_id"] >= 0.75  # the marker agrees in 90% of these rows
    assert results["accuracy_anti"] <= 0.4  # plain training took the shortcut
    assert results["bias_accuracy_anti"] == 0.0 and results["marker_agrees_id"] == 0.9
    preds = [json.loads(x) for x in open(workdir / "predictions" / "train.jsonl")]
    assert len(preds) == 140 and set(preds[0]) >= {"id", "probs", "label", "pred"}
    # rerun with more steps resumes from the checkpoint
    config = tiny_config(45)
    summary = train(config, workdir, classify.build_classify(config, workdir)[0],
                    devices=jax.devices()[:1])
    assert summary["start_step"] == 40 and summary["step"] == 45
    # conf_reg reads the plain run's predictions as its teacher, poe a bias file (the losses
    # themselves are checked above; these build the training rows only)
    bias = {json.loads(x)["id"]: json.loads(x)["probs"] for x in open(workdir / "bias_probs.jsonl")}
    teacher = {p["id"]: p["probs"] for p in preds}
    for kind, extra in (("conf_reg", {"loss.teacher": str(workdir)}),
                        ("poe", {"bias.kind": "file",
                                 "bias.path": str(workdir / "bias_probs.jsonl")})):
        config = tiny_config(5, **{"loss.kind": kind}, **extra)
        batch = next(iter(classify.build_classify(config, None)[0].make_loader("train")))
        train_ids = [x.id for x in classify.stratified_split(
            classify.read_labelled(IMDB, 2), 0.3, seed=0)[0]]
        for i, b, t in zip(batch["index"][:, 0], batch["bias_probs"],
                           batch.get("teacher_probs", batch["bias_probs"])):
            np.testing.assert_allclose(b, bias[train_ids[i]], atol=1e-5)
            if kind == "conf_reg":
                np.testing.assert_allclose(t, teacher[train_ids[i]], atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("loss.kind=focal", "config.loss.kind='focal'; choose from"),
    ("loss.kind=conf_reg", "config.loss.teacher must name"),
    ("bias.kind=file", "config.bias.path must name"),
    ("bias.kind=oracle", "config.bias.kind='oracle'"),
    ("head.pool=max", "config.head.pool='max'"),
    ("plant.markers=('x',)", "config.plant.markers=['x'] must be 2 distinct"),
    ("data.test_fraction=1.0", "config.data.test_fraction=1.0"),
    # path fields are made absolute at the command line (hibari.train.cli.make_paths_absolute)
    ("data.path=nowhere.csv", f"config.data.path='{Path.cwd() / 'nowhere.csv'}': no such file"),
])
def test_bad_configs_fail_with_one_line(tmp_path, capsys, override, message):
    argv = ["classify", "--config", str(ROOT / "configs/classify/shortcut.py"),
            "--workdir", str(tmp_path / "run"), f"--config.{override}"]
    assert hibari.cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hibari classify: error: ") and message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
