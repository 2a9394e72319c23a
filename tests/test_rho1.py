"""Rho-1 selective language modelling: the token selection against a brute-force sort (on one
device, under jit and on a batch sharded over the 8 simulated devices), the selective loss
against the plain LM loss and a hand-weighted loss, and `hibari pretrain` with
config.loss.token_selection (a run that logs the kept share; one-line errors)."""
import json
import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import hibari.cli
from hibari.model import ModelConfig, init
from hibari.model.params_io import save_params
from hibari.train.losses import lm_loss_fn, selective_lm_loss_fn, selective_token_weights

RATIOS = (0.01, 1 / 3, 0.5, 0.6, 0.7, 0.9999, 1.0)


def brute_force(token_loss, ref_loss, weights, ratio):
    """Keep the ⌈ratio·n⌉ weight-1 tokens of largest excess, ties to the earlier (row-major)
    token: a Python sort over (−excess, position); ratio read as its decimal (0.7 = 7/10)."""
    flat = [(-(float(a) - float(b)), i) for i, (a, b, w) in
            enumerate(zip(token_loss.ravel(), ref_loss.ravel(), weights.ravel())) if w > 0]
    k = math.ceil(Fraction(repr(ratio)).limit_denominator(10_000) * len(flat))
    keep = np.zeros(weights.size, np.float32)
    for _, i in sorted(flat)[:k]:
        keep[i] = 1.0
    return keep.reshape(weights.shape)


def random_batch(seed, shape=(8, 16)):
    """Losses on a coarse grid (many ties, equal excesses from different pairs) and padding."""
    rng = np.random.default_rng(seed)
    token_loss = rng.integers(0, 6, shape).astype(np.float32) * 0.5
    ref_loss = rng.integers(0, 4, shape).astype(np.float32) * 0.5
    weights = (rng.random(shape) < 0.7).astype(np.float32)
    weights[0, -5:] = 0.0  # a padded tail
    return token_loss, ref_loss, weights


@pytest.mark.parametrize("ratio", RATIOS)
def test_selection_equals_a_brute_force_sort(ratio):
    select = jax.jit(selective_token_weights, static_argnums=3)
    for seed in range(3):
        token_loss, ref_loss, weights = random_batch(seed)
        expected = brute_force(token_loss, ref_loss, weights, ratio)
        got = np.asarray(select(token_loss, ref_loss, weights, ratio))
        np.testing.assert_array_equal(got, expected)
        n = int(weights.sum())
        assert got.sum() == math.ceil(Fraction(repr(ratio)).limit_denominator(10_000) * n)
        assert np.all(got <= weights)  # padding never kept
    # eager equals jit
    np.testing.assert_array_equal(np.asarray(selective_token_weights(
        token_loss, ref_loss, weights, ratio)), got)


def test_selection_edge_cases():
    loss = np.array([[3.0, 1.0, 2.0, 2.0, 5.0]], np.float32)
    ref = np.zeros_like(loss)
    w = np.array([[1, 1, 1, 1, 0]], np.float32)  # the largest loss is padding
    # n = 4: 0.7 keeps ⌈2.8⌉ = 3; 0.75 keeps exactly 3; ties at 2.0 go to the earlier token
    for ratio, kept in ((0.01, [1, 0, 0, 0, 0]), (0.5, [1, 0, 1, 0, 0]), (0.7, [1, 0, 1, 1, 0]),
                        (0.75, [1, 0, 1, 1, 0]), (1.0, [1, 1, 1, 1, 0])):
        np.testing.assert_array_equal(selective_token_weights(loss, ref, w, ratio), [kept])
    # 0.7 of 10 tokens is 7, not ⌈7.000000000000001⌉ = 8
    ten = np.arange(10, dtype=np.float32)[None]
    assert float(selective_token_weights(ten, 0 * ten, np.ones_like(ten), 0.7).sum()) == 7
    none = selective_token_weights(loss, ref, np.zeros_like(w), 0.5)
    assert float(none.sum()) == 0.0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            selective_token_weights(loss, ref, w, bad)


def test_selection_on_a_batch_sharded_over_8_devices_equals_one_device():
    assert jax.device_count() == 8
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    token_loss, ref_loss, weights = random_batch(7, (16, 32))
    one = np.asarray(jax.jit(selective_token_weights, static_argnums=3)(
        token_loss, ref_loss, weights, 0.6))
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    placed = [jax.device_put(x, sharding) for x in (token_loss, ref_loss, weights)]
    out = jax.jit(selective_token_weights, static_argnums=3, out_shardings=sharding)(
        *placed, 0.6)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out), one)
    np.testing.assert_array_equal(one, brute_force(token_loss, ref_loss, weights, 0.6))


CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
REF_CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32)


def lm_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (4, 16)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[1, 8:] = 2  # two packed documents
    seg[2, 12:] = 0  # padding
    pos = np.concatenate([np.arange(16)] * 4).reshape(4, 16).astype(np.int32)
    pos[1, 8:] = np.arange(8)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


@pytest.fixture(scope="module")
def models():
    return init(CFG, jax.random.key(0)), init(REF_CFG, jax.random.key(1))


def test_keep_ratio_1_is_the_plain_lm_loss(models):
    params, ref = models
    batch, rng = lm_batch(), jax.random.key(0)
    for z in (0.0, 1e-3):
        plain, plain_aux = lm_loss_fn(CFG, z_loss=z)(params, batch, rng)
        sel, aux = selective_lm_loss_fn(CFG, REF_CFG, 1.0, z_loss=z)(params, batch, rng,
                                                                     frozen=ref)
        np.testing.assert_allclose(sel, plain, rtol=1e-6)
        np.testing.assert_allclose(aux["nll"], plain_aux["nll"], rtol=1e-6)
        assert float(aux["kept_share"]) == 1.0 and float(aux["weight"]) == plain_aux["weight"]


def test_gradients_reach_only_the_policy_and_equal_a_hand_weighted_loss(models):
    from hibari.model import hidden
    from hibari.model.logprobs import chunked_log_probs, next_token_targets
    params, ref = models
    batch, rng = lm_batch(), jax.random.key(0)
    loss_fn = selective_lm_loss_fn(CFG, REF_CFG, 0.6)
    targets, weights = next_token_targets(batch)

    def token_loss(cfg, p):
        h = hidden(cfg, p, batch["tokens"], batch["segment_ids"], batch["positions"])
        return -chunked_log_probs(cfg, p, h, targets)[0]

    mine, ref_loss = np.asarray(token_loss(CFG, params)), np.asarray(token_loss(REF_CFG, ref))
    mask = brute_force(mine, ref_loss, np.asarray(weights), 0.6)
    hand = lambda p: (token_loss(CFG, p) * mask).sum() / mask.sum()  # noqa: E731

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng,
                                                                   frozen=ref)
    np.testing.assert_allclose(loss, hand(params), rtol=1e-6)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(hand)(params))):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)
    ref_grads = jax.grad(lambda f: loss_fn(params, batch, rng, frozen=f)[0])(ref)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(ref_grads))
    # the aux metrics by hand
    n, excess = float(weights.sum()), mine - ref_loss
    drop = np.asarray(weights) - mask
    assert float(aux["kept_share"]) == pytest.approx(mask.sum() / n)
    assert float(aux["excess_kept"]) == pytest.approx((excess * mask).sum() / mask.sum(), 1e-5)
    assert float(aux["excess_dropped"]) == pytest.approx((excess * drop).sum() / drop.sum(), 1e-5)
    assert float(aux["excess_kept"]) >= float(aux["excess_dropped"])
    assert float(aux["nll"]) == pytest.approx((mine * np.asarray(weights)).sum() / n, 1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A params export of a tiny model with the vocabulary of the pretraining runs below."""
    root = tmp_path_factory.mktemp("rho1_ref")
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                      max_seq_len=128)
    save_params(root / "ref", cfg, init(cfg, jax.random.key(3)))
    return root / "ref"


def pretrain(workdir, *extra):
    argv = ["pretrain", "--config", "configs/pretrain/llama.py:tiny", "--workdir", str(workdir),
            "--config.steps=4", "--config.log_every=1", "--config.eval_every=4",
            "--config.eval_batches=1", "--config.checkpoint_every=0",
            "--config.async_checkpoint=False", "--config.data.seq_len=32", *extra]
    return hibari.cli.main(argv)


@pytest.mark.slow  # ~18 s: compiles the step, the eval step and the all-token eval
def test_pretrain_with_token_selection_logs_the_kept_share(reference, tmp_path):
    assert pretrain(tmp_path / "run", "--config.loss.token_selection.enabled=True",
                    "--config.loss.token_selection.keep_ratio=0.6",
                    f"--config.loss.token_selection.reference={reference}") == 0
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in records if "kept_share" in r]
    assert len(steps) == 4
    # ⌈0.6 n⌉ of n counted targets, n <= 8 x 31 and well over 100 (a few documents per row)
    for r in steps:
        assert 0.6 <= r["kept_share"] < 0.61
        assert r["excess_kept"] > r["excess_dropped"] and math.isfinite(r["nll"])
    final = records[-1]
    assert "eval_nll" in final and "eval_loss" in final


def test_vocab_mismatch_is_one_line(reference, tmp_path, capsys):
    assert pretrain(tmp_path / "bad", "--config.model.vocab_size=1024",
                    "--config.loss.token_selection.enabled=True",
                    f"--config.loss.token_selection.reference={reference}") == 1
    err = capsys.readouterr().err
    assert re.search(r"hibari pretrain: error: config\.loss\.token_selection\.reference=.* has "
                     r"vocab_size=512 but config\.model\.vocab_size=1024", err)
    assert "Traceback" not in err and not (tmp_path / "bad").exists()
    assert pretrain(tmp_path / "bad", "--config.loss.token_selection.enabled=True",
                    "--config.loss.token_selection.keep_ratio=0") == 1
    assert "keep_ratio=0.0 must be a number in (0, 1]" in capsys.readouterr().err


def test_reference_with_another_tokenizer_is_refused(reference, tmp_path):
    from hibari.base.config_files import load_python_config
    from hibari.data.tokenizer import TokenizerMismatch
    from hibari.train.cli import check_reference_tokenizer
    run = tmp_path / "refrun"
    run.mkdir()
    (run / "tokenizer_record.json").write_text(json.dumps({"sha256": "0" * 64, "path": "x.model"}))
    config = load_python_config("configs/pretrain/llama.py:tiny")
    config.data.tokenizer = "align/assets/seed_sp.model"
    with pytest.raises(TokenizerMismatch, match=r"reference=.*refrun.* was trained with "
                                                r"tokenizer x\.model \(sha256 000000000000\)"):
        check_reference_tokenizer(config, str(run))
    check_reference_tokenizer(config, str(run), allow=True)  # a warning only
    check_reference_tokenizer(config, str(reference))  # no record: nothing to compare
