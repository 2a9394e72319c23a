"""KV-cache decoding equals recomputing the full forward pass; batching, sampling, stopping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hibari.model import ModelConfig, apply, init
from hibari.model.decode import (
    _step_logits,
    decode_step,
    generate,
    generate_host,
    init_cache,
    left_pad,
    sample,
    sample_tokens,
    start_decode,
)

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
    # The jitted sampler's prefill (last logits) and its own cache layout and step.
    state = jax.jit(lambda p: start_decode(cfg, p, seq[:, :prompt], ones, jax.random.key(0),
                                           max_new_tokens=20 - prompt))(params)
    step = jax.jit(lambda p, t, pos, c: _step_logits(cfg, p, t, np.ones((2, 1), np.int32), pos,
                                                     c))
    got, cache = [np.asarray(state["last"])], state["cache"]
    for t in range(prompt, 19):
        logits, cache = step(params, seq[:, t:t + 1], np.full((2, 1), t, np.int32), cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(got, axis=1), full[:, prompt - 1:-1], atol=1e-4,
                               rtol=1e-4)


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


# ---------------------------------------------------------------------------------------------
# The jitted sampler (sample_tokens; generate on top of it) against the host loop
# ---------------------------------------------------------------------------------------------

TINY = BASE  # (shares the compiled init with the tests above)
RAGGED = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 2, 1], [42], [3] * 17, [11, 12, 13, 14, 15],
          [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71], [90, 1], [7, 77, 7, 77, 7, 77, 7]]
RAGGED16 = RAGGED + [p[::-1] for p in RAGGED]  # 2 rows per device on the 8-device mesh
N_NEW, WIDTH, PAD = 8, 32, 3
EOS = tuple(range(0, TINY.vocab_size, 8))  # 13 ids: some rows end early, some do not


@pytest.fixture(scope="module")
def tiny_params():
    return init(TINY, jax.random.key(7))


@jax.jit
def tiny_sampler(params, tokens, segments, key, temperature, top_p):
    """sample_tokens inside the caller's own jit, temperature and top_p traced."""
    return sample_tokens(TINY, params, tokens, segments, key, max_new_tokens=N_NEW,
                         temperature=temperature, top_k=30, top_p=top_p, eos_ids=EOS,
                         pad_id=PAD)


def eos_for(rows, n):
    """A token some rows emit (within their first n tokens) and some do not."""
    for tok in (t for r in rows for t in r[:n]):
        if 0 < sum(tok in r[:n] for r in rows) < len(rows):
            return tok
    raise AssertionError("no token separates the rows; change the seed")


def test_jitted_generate_equals_host_loop_greedy_eos_and_stop(tiny_params):
    free = generate_host(TINY, tiny_params, RAGGED, max_new_tokens=12)
    eos = eos_for(free, 12)
    host = generate_host(TINY, tiny_params, RAGGED, max_new_tokens=12, eos_ids=(eos,))
    assert 0 < sum(len(r) < 12 for r in host) < len(RAGGED)  # per-row eos exercised
    assert generate(TINY, tiny_params, RAGGED, max_new_tokens=12, eos_ids=(eos,)) == host

    def stop(row, toks):  # some rows stop after a few tokens (within and across chunks)
        return row % 3 == 0 and len(toks) >= 1 + 2 * row

    both = dict(max_new_tokens=12, eos_ids=(eos,), stop=stop)
    host_stop = generate_host(TINY, tiny_params, RAGGED, **both)
    assert host_stop != host
    assert generate(TINY, tiny_params, RAGGED, **both) == host_stop


def test_jitted_generate_sampled_equals_host_loop(tiny_params):
    # Same seed, same key chain: the same tokens (fp32, highest matmul precision).
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=5)
    host = generate_host(TINY, tiny_params, RAGGED, **kw)
    assert generate(TINY, tiny_params, RAGGED, **kw) == host
    assert host != generate_host(TINY, tiny_params, RAGGED, **{**kw, "seed": 6})


def test_sample_tokens_tokens_mask_lengths_brute_force(tiny_params):
    tokens, segments = left_pad(RAGGED16, WIDTH)
    out = {k: np.asarray(v) for k, v in tiny_sampler(
        tiny_params, tokens, segments, jax.random.key(0), np.float32(0), np.float32(1)).items()}
    # Greedy: each token is the argmax of one full forward pass over prompt + tokens so far;
    # a row ends with (and includes) its first eos id, then holds the pad id with mask 0.
    seq_segments = np.concatenate([segments, np.ones((len(RAGGED16), N_NEW), np.int32)], axis=1)
    logits = np.asarray(apply(TINY, tiny_params, np.concatenate([tokens, out["tokens"]], axis=1),
                              seq_segments))
    argmax = logits[:, WIDTH - 1:-1].argmax(-1)
    want_tokens = np.full((len(RAGGED16), N_NEW), PAD)
    want_mask = np.zeros((len(RAGGED16), N_NEW), np.int32)
    for i, row in enumerate(argmax.tolist()):
        end = next((j + 1 for j, t in enumerate(row) if t in EOS), N_NEW)
        want_tokens[i, :end], want_mask[i, :end] = row[:end], 1
    assert 0 < (want_mask.sum(1) < N_NEW).sum() < len(RAGGED16)  # some rows end, some do not
    np.testing.assert_array_equal(out["tokens"], want_tokens)
    np.testing.assert_array_equal(out["mask"], want_mask)
    np.testing.assert_array_equal(out["lengths"], want_mask.sum(1))


def test_sample_tokens_sharded_batch_equals_one_device(tiny_params):
    from hibari.model import param_axes
    from hibari.train.sharding import (
        DEFAULT_RULES,
        batch_sharding,
        logical_shardings,
        make_mesh,
        normalize_rules,
        replicated,
        sharding_context,
    )

    tokens, segments = left_pad(RAGGED16, WIDTH)
    args = (tokens, segments, jax.random.key(11), np.float32(0.8), np.float32(0.9))
    single = tiny_sampler(tiny_params, *args)

    mesh = make_mesh({"data": -1})
    rules = normalize_rules(DEFAULT_RULES)
    shardings = logical_shardings(param_axes(TINY), jax.eval_shape(lambda: tiny_params), mesh,
                                  rules)
    batch, rep = batch_sharding(mesh, rules), replicated(mesh)

    def run_sharded(*a):
        with sharding_context(mesh, rules):
            return tiny_sampler(*a)

    sharded = jax.jit(run_sharded, in_shardings=(shardings, batch, batch, rep, rep, rep))(
        jax.device_put(tiny_params, shardings), *args)
    assert len(sharded["tokens"].sharding.device_set) == 8
    for name in ("tokens", "mask", "lengths"):
        np.testing.assert_array_equal(np.asarray(sharded[name]), np.asarray(single[name]))
    lengths = np.asarray(single["lengths"])
    assert 0 < (lengths < N_NEW).sum() < len(lengths)  # rows ended on an eos, others did not
