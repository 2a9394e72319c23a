"""KV-cache decoding equals recomputing the full forward pass; batching, sampling, stopping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hibari.model import ModelConfig, apply, init
from hibari.model.decode import decode_step, generate, init_cache, sample

BASE = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                   max_seq_len=64)
VARIANTS = {
    "gqa_scan": {},
    "mha_unscanned_qknorm": dict(n_kv_heads=4, scan_layers=False, qk_norm=True),
    "learned_positions_layernorm": dict(position="learned", norm="layernorm", mlp="gelu",
                                        use_bias=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_logits_equal_full_forward(variant):
    cfg = BASE.replace(**VARIANTS[variant])
    params = init(cfg, jax.random.key(0))
    seq = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 20)).astype(np.int32)
    full = np.asarray(apply(cfg, params, seq))
    prompt = 7
    cache = init_cache(cfg, 2, 32)
    ones = np.ones((2, prompt), np.int32)
    logits, cache = decode_step(cfg, params, seq[:, :prompt], ones,
                                np.tile(np.arange(prompt), (2, 1)).astype(np.int32), cache)
    got = [np.asarray(logits)]
    for t in range(prompt, 20):
        logits, cache = decode_step(cfg, params, seq[:, t:t + 1], np.ones((2, 1), np.int32),
                                    np.full((2, 1), t, np.int32), cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    np.testing.assert_allclose(got, full, atol=1e-4, rtol=1e-4)


def test_greedy_generate_matches_argmax_of_full_forward():
    params = init(BASE, jax.random.key(1))
    prompt = [5, 17, 33, 2, 8]
    new = generate(BASE, params, [prompt], max_new_tokens=12)[0]
    assert len(new) == 12
    seq = prompt + new
    logits = np.asarray(apply(BASE, params, np.asarray([seq], np.int32)))[0]
    assert list(np.argmax(logits[len(prompt) - 1:-1], axis=-1)) == new


def test_left_padded_batch_equals_one_prompt_at_a_time():
    params = init(BASE, jax.random.key(2))
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13, 14, 15, 16, 17, 18], [42]]
    batched = generate(BASE, params, prompts, max_new_tokens=8)
    single = [generate(BASE, params, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single


def test_eos_and_stop_callback_end_rows():
    params = init(BASE, jax.random.key(3))
    free = generate(BASE, params, [[1, 2, 3]], max_new_tokens=10)[0]
    eos = free[4]
    cut = generate(BASE, params, [[1, 2, 3]], max_new_tokens=10, eos_ids=(eos,))[0]
    assert cut == free[:free.index(eos)]
    stopped = generate(BASE, params, [[1, 2, 3]], max_new_tokens=10,
                       stop=lambda row, toks: len(toks) >= 3)[0]
    assert stopped == free[:3]


def test_sampling_distribution_topk_topp():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.vmap(lambda k, T, K, P: sample(logits, k, T, K, P)[0],
                    in_axes=(0, None, None, None))
    freq = np.bincount(np.asarray(draw(keys, 1.0, 0, 1.0)), minlength=4) / len(keys)
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.015)
    # Nucleus 0.7: the smallest prefix with mass >= 0.7 is {0, 1}, renormalised to 2/3, 1/3.
    freq = np.bincount(np.asarray(draw(keys, 1.0, 0, 0.7)), minlength=4) / len(keys)
    np.testing.assert_allclose(freq, [2 / 3, 1 / 3, 0, 0], atol=0.015)
    # top-k 3 renormalises the first three.
    freq = np.bincount(np.asarray(jax.vmap(lambda k: sample(logits, k, 1.0, 3, 1.0)[0])(keys)),
                       minlength=4) / len(keys)
    np.testing.assert_allclose(freq, np.array([0.5, 0.25, 0.15, 0]) / 0.9, atol=0.015)
    # Temperature 0 is greedy; temperature 0.5 sharpens to p^2 / sum p^2.
    assert int(sample(logits, keys[0], 0.0, 0, 1.0)[0]) == 0
    freq = np.bincount(np.asarray(draw(keys, 0.5, 0, 1.0)), minlength=4) / len(keys)
    p2 = np.array([0.5, 0.25, 0.15, 0.1]) ** 2
    np.testing.assert_allclose(freq, p2 / p2.sum(), atol=0.015)
