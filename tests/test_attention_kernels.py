"""Segment-id attention kernels (model/attention.py) against the XLA path (transformer.attend with
attention_mask): outputs and gradients on packed rows with several documents, padding and
grouped-query heads. On CPU the Pallas kernels run in interpret mode; cuDNN cannot run here, so
its packing of segment ids into offsets/lengths is checked against brute force, and its error
is checked. On a GPU backend (bench/gpu_suite.sh) the GPU kernels run natively in bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hibari.base.errors import UsageError
from hibari.model.attention import KERNELS, cudnn_packing, segment_attention
from hibari.model.transformer import attend, attention_mask

BACKEND = jax.default_backend()
INTERPRETED = ("pallas_gpu", "splash")  # Pallas kernels with an interpret mode


def packed_segments(b: int, t: int, seed: int) -> np.ndarray:
    """Rows of consecutive documents with random lengths, ids 1, 2, ...; the last row is full,
    the others end in padding (id 0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for i in range(b):
        end = t if i == b - 1 else int(rng.integers(t // 2, t - 3))
        pos, doc = 0, 1
        while pos < end:
            n = int(rng.integers(1, max(2, t // 3)))
            seg[i, pos:min(end, pos + n)] = doc
            pos, doc = pos + n, doc + 1
    return seg


def inputs(b, t, h, kv, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, t, kv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, kv, d), dtype)
    cot = jax.random.normal(ks[3], (b, t, h, d), dtype)
    return q, k, v, cot, jnp.asarray(packed_segments(b, t, seed))


def out_and_grads(fn, q, k, v, cot):
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    return (out, *vjp(cot))


def compare(impl, b, t, h, kv, d, dtype, tol, interpret=None):
    """Kernel (inputs in `dtype`) vs the XLA path in fp32 on the same values. fp32: elementwise
    within tol; bf16: relative error norm over real rows within tol (bf16 rounds at 4e-3)."""
    q, k, v, cot, seg = inputs(b, t, h, kv, d, dtype)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, cot)]
    ref = out_and_grads(lambda q, k, v: attend(q, k, v, attention_mask(seg, seg)), *f32)
    got = out_and_grads(
        lambda q, k, v: segment_attention(q, k, v, seg, impl=impl, interpret=interpret),
        q, k, v, cot)
    real = np.asarray(seg) != 0
    assert int(real.sum()) < b * t and len(np.unique(np.asarray(seg))) > 4  # padding, many docs
    for name, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
        assert g.shape == r.shape and g.dtype == dtype, name
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.isfinite(g).all(), f"{impl} {name}: non-finite values (padding rows?)"
        if dtype == jnp.float32:
            np.testing.assert_allclose(g[real], r[real], atol=tol, rtol=tol,
                                       err_msg=f"{impl} {name}")
        else:
            err = np.linalg.norm(g[real] - r[real]) / np.linalg.norm(r[real])
            assert err < tol, f"{impl} {name}: relative error {err:.3g}"


@pytest.mark.skipif(BACKEND != "cpu", reason="interpret mode is the CPU path")
@pytest.mark.parametrize("impl", INTERPRETED)
def test_interpret_kernel_matches_xla(impl):
    """t = 100 is not a multiple of any block: the kernels pad and drop the tail."""
    compare(impl, b=2, t=100, h=4, kv=2, d=16, dtype=jnp.float32, tol=2e-5)


@pytest.mark.skipif(BACKEND != "cpu", reason="interpret mode is the CPU path")
def test_pallas_gpu_short_rows():
    """t below the smallest Triton block (16) is padded up to it."""
    compare("pallas_gpu", b=3, t=13, h=4, kv=2, d=8, dtype=jnp.float32, tol=2e-5)


@pytest.mark.skipif(BACKEND != "cpu", reason="interpret mode is the CPU path")
def test_splash_bf16_interpret():
    """bf16 inputs: q is scaled in fp32 before the kernel; errors near bf16 rounding (~3e-3)."""
    compare("splash", b=2, t=128, h=4, kv=2, d=64, dtype=jnp.bfloat16, tol=3e-2)


@pytest.mark.skipif(BACKEND != "gpu", reason="needs a GPU backend (bench/gpu_suite.sh runs it)")
@pytest.mark.parametrize("impl", ("cudnn", "pallas_gpu"))
def test_gpu_kernel_matches_xla_bf16(impl):
    """t = 300: not a multiple of the Triton blocks (padded); cuDNN takes any t."""
    compare(impl, b=2, t=300, h=8, kv=2, d=64, dtype=jnp.bfloat16, tol=3e-2)


@pytest.mark.skipif(BACKEND != "cpu", reason="checks the errors a CPU backend gives")
def test_off_platform_errors_are_one_line():
    q, k, v, _, seg = inputs(1, 16, 4, 2, 8)
    cases = [("cudnn", None, "needs a GPU backend"), ("cudnn", True, "no interpret mode"),
             ("pallas_gpu", False, "needs a GPU backend"),
             ("splash", False, "needs a TPU backend")]
    for impl, interpret, words in cases:
        with pytest.raises(UsageError) as err:
            segment_attention(q, k, v, seg, impl=impl, interpret=interpret)
        msg = str(err.value)
        assert "\n" not in msg and f"'{impl}'" in msg and words in msg and "'cpu'" in msg


def test_bad_impl_and_shapes():
    q, k, v, _, seg = inputs(1, 16, 4, 2, 8)
    with pytest.raises(UsageError, match="not a segment kernel; choose one of cudnn"):
        segment_attention(q, k, v, seg, impl="xla")
    with pytest.raises(UsageError, match="multiple of kv heads"):
        segment_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), seg,
                          impl="splash")
    with pytest.raises(UsageError, match=r"segment_ids \(1, 15\) should be \(1, 16\)"):
        segment_attention(q, k, v, seg[:, :15], impl="splash")
    assert KERNELS == ("cudnn", "pallas_gpu", "splash")


def brute_runs(row):
    """[(start, length)] of runs of equal ids, by a Python loop."""
    runs, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[i - 1]:
            runs.append((start, i - start))
            start = i
    return runs


def test_cudnn_packing_matches_brute_force_and_mask():
    """The offsets/lengths handed to cuDNN describe the runs of each row; attention causal within
    each run (cuDNN's packed PADDING_CAUSAL semantics) is attention_mask's mask on every real
    (non-padding) query row. Padding rows differ when a row has two padding runs: attention_mask
    joins them (one id), cuDNN keeps each run apart."""
    seg = packed_segments(5, 40, seed=3)
    seg[1, :3] = 0  # a leading padding run too
    for m in (40, 20):
        lengths, offsets, n_runs = map(np.asarray, cudnn_packing(jnp.asarray(seg), m))
        assert lengths.shape == (5, m) and offsets.shape == (5, m + 1)
        for i, row in enumerate(seg):
            runs = brute_runs(row)
            assert n_runs[i] == len(runs) <= m
            assert offsets[i].tolist() == [s for s, _ in runs] + [-1] * (m + 1 - len(runs))
            assert lengths[i].tolist() == [n for _, n in runs] + [-1] * (m - len(runs))
            mask = np.zeros((40, 40), bool)
            for s, n in zip(offsets[i], lengths[i]):
                if s >= 0:
                    mask[s:s + n, s:s + n] = np.tril(np.ones((n, n), bool))
            want = np.asarray(attention_mask(jnp.asarray(row[None]), jnp.asarray(row[None])))
            real = row != 0
            np.testing.assert_array_equal(mask[real], want[0, 0][real])


def test_cudnn_packing_overflow_raises_when_run():
    """More runs in a row than max_segments: an error naming max_segments when the jitted
    computation runs (a bound cuDNN's statistics need), none when the rows fit."""
    seg = jnp.asarray(packed_segments(3, 40, seed=4))
    worst = max(len(brute_runs(row)) for row in np.asarray(seg))
    packing = jax.jit(cudnn_packing, static_argnums=1)
    jax.block_until_ready(packing(seg, worst))
    with pytest.raises(Exception, match=f"holds {worst} runs .* over max_segments={worst - 1}"):
        jax.block_until_ready(packing(seg, worst - 1))


@pytest.mark.parametrize("impl", ["pallas_gpu", "splash"])
def test_model_with_a_segment_kernel_equals_the_xla_model(impl):
    """cfg.attention = a segment kernel: the whole Transformer (packed rows, padding, GQA, the
    layer scan) gives the XLA model's logits and parameter gradients on real tokens (Pallas
    interpret mode on CPU)."""
    import dataclasses

    from hibari.model import ModelConfig, apply, init

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=64)
    kcfg = dataclasses.replace(cfg, attention=impl)
    params = init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 1, 64)
    seg = jnp.asarray([[1] * 15 + [2] * 20 + [0] * 5, [1] * 40], jnp.int32)
    real = np.asarray(seg) > 0

    def loss(c):
        return lambda p: (apply(c, p, tokens, seg) * real[..., None]).sum() / 100.0

    ref_logits, got_logits = apply(cfg, params, tokens, seg), apply(kcfg, params, tokens, seg)
    np.testing.assert_allclose(np.asarray(got_logits)[real], np.asarray(ref_logits)[real],
                               atol=2e-4, rtol=2e-4)
    ref_g, got_g = jax.grad(loss(cfg))(params), jax.grad(loss(kcfg))(params)
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(got_g)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-4, rtol=2e-3)
