"""The Transformer's properties: causality, packing, RoPE, ablation variants, counts, config
validation, vocabulary resizing and sharded placement on an 8-device mesh."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from hibari.model import (
    ConfigError,
    ModelConfig,
    RopeScaling,
    apply,
    count_params,
    flops_per_token,
    init,
    param_axes,
    param_shapes,
    resize_vocab,
)
from hibari.model.config import MLPS, NORMS, POSITIONS
from hibari.model.transformer import apply_rope, positions_from_segments, rope_inv_freq

VOCAB = 128
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(2, 16)), jnp.int32)


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


_apply_jit = jax.jit(apply, static_argnums=0)


def _apply(cfg, params, tokens, segment_ids=None, positions=None):
    """Jitted `apply` called with one signature (explicit segment_ids and positions) so that
    tests sharing a config and shape share one compilation."""
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return _apply_jit(cfg, params, tokens, segment_ids, positions)


def random_params(cfg: ModelConfig, seed: int = 0):
    """Seeded random parameters of `cfg`'s shapes (norm scales near 1, biases non-zero), made
    without compiling anything."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        noise = rng.standard_normal(shape.shape).astype(np.float32)
        value = 1 + 0.1 * noise if path[-1].key == "scale" else 0.05 * noise
        return jnp.asarray(value, dtype=shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


def n_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def base():
    cfg = tiny()
    return cfg, random_params(cfg)


# ---------------------------------------------------------------------------------------------
# Causality, packing, RoPE
# ---------------------------------------------------------------------------------------------

def test_future_tokens_never_change_past_logits(base):
    cfg, params = base
    changed = TOKENS.at[:, 10].set((TOKENS[:, 10] + 1) % VOCAB)
    a, b = _apply(cfg, params, TOKENS), _apply(cfg, params, changed)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert not np.allclose(a[:, 10:], b[:, 10:])  # the change is visible from position 10 on


def test_packed_document_logits_equal_the_document_alone(base):
    cfg, params = base
    doc = TOKENS[1, :7]
    row = jnp.concatenate([TOKENS[0, :5], doc, TOKENS[0, 8:12]])[None]
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7 + [3] * 4])
    positions = jnp.concatenate([jnp.arange(n) for n in (5, 7, 4)])[None]
    np.testing.assert_array_equal(positions_from_segments(segment_ids), positions)
    packed = _apply(cfg, params, row, segment_ids, positions)
    alone = _apply(cfg, params, doc[None])
    np.testing.assert_allclose(packed[0, 5:12], alone[0], atol=1e-5, rtol=0)
    unpacked = _apply(cfg, params, row)  # one long document: the middle one sees its neighbour
    assert not np.allclose(unpacked[0, 5:12], alone[0], atol=1e-3)


@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 16)])
def test_rope_scores_depend_only_on_position_difference(scaling):
    cfg = tiny(head_dim=32, rope_scaling=scaling)
    inv_freq = rope_inv_freq(cfg)
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (1, 1, 1, cfg.head_dim))
    k = jax.random.normal(kk, (1, 1, 1, cfg.head_dim))

    def score(m, n):
        qm = apply_rope(q, jnp.asarray([[m]]), inv_freq)
        kn = apply_rope(k, jnp.asarray([[n]]), inv_freq)
        return float(jnp.sum(qm * kn))

    for delta in (0, 3, 17):
        scores = [score(n + delta, n) for n in (0, 5, 40, 200)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    by_offset = [score(d, 0) for d in range(0, 64, 8)]
    assert np.ptp(by_offset) > 0.1  # while different offsets do differ
    rotated = apply_rope(q, jnp.asarray([[123]]), inv_freq)
    np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q), rtol=1e-5)


def test_llama3_scaling_changes_only_low_frequencies():
    plain = rope_inv_freq(tiny(head_dim=32))
    scaled = rope_inv_freq(tiny(head_dim=32, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)))
    wavelen = 2 * math.pi / np.asarray(plain)
    high, low = wavelen < 16 / 4.0, wavelen > 16 / 1.0
    np.testing.assert_array_equal(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 8.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Ablation variants and counts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mlp", MLPS)
@pytest.mark.parametrize("position", POSITIONS)
def test_every_norm_mlp_position_combination_has_the_counted_params(norm, mlp, position):
    """All 32 combinations, by shape only (tracing `init`, no compilation); the variants
    below execute."""
    cfg = tiny(norm=norm, mlp=mlp, position=position)
    assert n_params(param_shapes(cfg)) == count_params(cfg).total


VARIANTS = {
    # With the default config (`base`: RMSNorm, SwiGLU, RoPE, GQA, scanned), the remat and
    # attention tests below, these cover every value of every switch.
    "original-transformer-mha": dict(norm="layernorm", mlp="relu", position="sinusoidal",
                                     use_bias=True, n_kv_heads=4),
    "geglu-learned-qk_norm-tied-head_dim": dict(mlp="geglu", position="learned", qk_norm=True,
                                                tie_embeddings=True, head_dim=24),
    "gelu-nope-qkv_bias-mqa-unscanned-bf16": dict(
        mlp="gelu", position="none", qkv_bias=True, n_kv_heads=1, norm="layernorm",
        qk_norm=True, scan_layers=False, compute_dtype="bfloat16"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_initialises_runs_and_matches_count_params(name):
    cfg = tiny(**VARIANTS[name])
    shapes = param_shapes(cfg)  # traces `init`
    assert n_params(shapes) == count_params(cfg).total
    assert jax.tree.structure(shapes) == jax.tree.structure(param_axes(cfg))
    logits = _apply(cfg, random_params(cfg), TOKENS)
    assert logits.shape == (*TOKENS.shape, VOCAB) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_non_embedding_count_excludes_exactly_the_embeddings():
    cfg = tiny(position="learned")
    shapes = param_shapes(cfg)
    embeddings = (shapes["embed"]["embedding"].size + shapes["lm_head"]["kernel"].size
                  + shapes["pos_embed"].size)
    assert count_params(cfg).non_embedding == n_params(shapes) - embeddings
    tied = tiny(tie_embeddings=True)
    assert count_params(tied).non_embedding == count_params(cfg.replace(position="rope")
                                                            ).non_embedding


def test_flops_per_token_matches_a_hand_count():
    cfg = tiny(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160)
    # per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288; SwiGLU 3*64*160 = 30720
    matmul = 2 * (12288 + 30720) + 64 * 256  # layers + lm_head = 102400
    # attention: QK^T and AV, 2 FLOPs per MAC, fwd+bwd x3: 12 * L * H * hd * T
    attention = 12 * 2 * 4 * 16 * 128
    assert flops_per_token(cfg, 128) == 6 * 102400 + attention == 811008
    assert matmul == 102400


def _loss(cfg, params, tokens):
    logits = apply(cfg, params, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


_grad = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "save_attn_out"])
def test_remat_policies_keep_loss_and_gradients(policy, base):
    cfg, params = base
    loss, grads = _grad(cfg, params, TOKENS)
    loss_r, grads_r = _grad(cfg.replace(remat=policy), params, TOKENS)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, atol=1e-6, rtol=1e-5)


def test_xla_and_dot_product_attention_agree(base):
    cfg, params = base
    segment_ids = jnp.asarray([[1] * 6 + [2] * 10, [1] * 12 + [0] * 4])
    xla = _apply(cfg, params, TOKENS, segment_ids)
    dot = _apply(cfg.replace(attention="dot_product"), params, TOKENS, segment_ids)
    np.testing.assert_allclose(dot, xla, atol=1e-5, rtol=0)


def test_scanned_and_unscanned_layers_compute_the_same_function(base):
    cfg, params = base
    unscanned = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.n_layers):
        unscanned[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    flat_cfg = cfg.replace(scan_layers=False)
    assert jax.tree.structure(unscanned) == jax.tree.structure(param_shapes(flat_cfg))
    np.testing.assert_allclose(_apply(flat_cfg, unscanned, TOKENS), _apply(cfg, params, TOKENS),
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,field", [
    (dict(d_model=64, n_heads=5, n_kv_heads=5), "model.d_model"),
    (dict(n_heads=4, n_kv_heads=3), "model.n_heads"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(mlp="swish"), "model.mlp"),
    (dict(position="alibi"), "model.position"),
    (dict(attention="flash"), "model.attention"),
    (dict(remat="everything"), "model.remat"),
    (dict(param_dtype="float64"), "model.param_dtype"),
    (dict(vocab_size=0), "model.vocab_size"),
    (dict(n_layers=2.0), "model.n_layers"),
    (dict(head_dim=15), "model.head_dim"),
    (dict(rope_theta=0.0), "model.rope_theta"),
    (dict(norm_eps=-1e-5), "model.norm_eps"),
    (dict(rope_scaling="llama3"), "model.rope_scaling"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny(**changes)


def test_config_from_dict_rejects_unknown_fields_and_round_trips():
    cfg = tiny(rope_scaling=RopeScaling(4.0, 1.0, 4.0, 32))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown field.*n_head"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_head": 4}, where="run/config.json")


# ---------------------------------------------------------------------------------------------
# Vocabulary resizing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_resize_vocab_keeps_old_rows_and_initialises_new_ones(tied, base):
    cfg, params = base
    if tied:
        cfg = tiny(**VARIANTS["geglu-learned-qk_norm-tied-head_dim"])
        params = random_params(cfg, seed=2)
    new_cfg, new = resize_vocab(cfg, params, VOCAB + 3, sources={VOCAB + 1: [5, 9]})
    assert new_cfg.vocab_size == VOCAB + 3
    assert n_params(new) == count_params(new_cfg).total
    old_e, new_e = params["embed"]["embedding"], new["embed"]["embedding"]
    np.testing.assert_array_equal(new_e[:VOCAB], old_e)
    np.testing.assert_allclose(new_e[VOCAB], old_e.mean(0), atol=1e-6)
    np.testing.assert_allclose(new_e[VOCAB + 1], (old_e[5] + old_e[9]) / 2, atol=1e-6)
    if not tied:
        old_h, new_h = params["lm_head"]["kernel"], new["lm_head"]["kernel"]
        np.testing.assert_array_equal(new_h[:, :VOCAB], old_h)
        np.testing.assert_allclose(new_h[:, VOCAB + 1], (old_h[:, 5] + old_h[:, 9]) / 2,
                                   atol=1e-6)
    # Old tokens' logits over the old vocabulary are unchanged (tied or not): the hidden states
    # depend only on old embedding rows and the old output rows are kept.
    np.testing.assert_allclose(_apply(new_cfg, new, TOKENS)[..., :VOCAB],
                               _apply(cfg, params, TOKENS), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="smaller"):
        resize_vocab(cfg, params, VOCAB - 1)
    with pytest.raises(ConfigError, match="outside the old vocabulary"):
        resize_vocab(cfg, params, VOCAB + 1, sources={VOCAB: [VOCAB + 5]})


# ---------------------------------------------------------------------------------------------
# Sharding on an 8-device (data=2, fsdp=2, tensor=2) mesh
# ---------------------------------------------------------------------------------------------

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
         ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
EXPECTED_SPECS = {  # written out by hand from the rules; a leading None is the layers axis
    "embed/embedding": ("tensor", "fsdp"),
    "layers/attn_norm/scale": (None, "fsdp"),
    "layers/attn/q/kernel": (None, "fsdp", "tensor", None),
    "layers/attn/k/kernel": (None, "fsdp", "tensor", None),
    "layers/attn/v/kernel": (None, "fsdp", "tensor", None),
    "layers/attn/o/kernel": (None, "tensor", None, "fsdp"),
    "layers/mlp_norm/scale": (None, "fsdp"),
    "layers/mlp/gate/kernel": (None, "fsdp", "tensor"),
    "layers/mlp/up/kernel": (None, "fsdp", "tensor"),
    "layers/mlp/down/kernel": (None, "tensor", "fsdp"),
    "final_norm/scale": ("fsdp",),
    "lm_head/kernel": ("fsdp", "tensor"),
}


def _mesh() -> Mesh:
    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 2)
    return Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _spec(spec: P) -> tuple:
    spec = tuple(spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def test_params_are_placed_by_the_logical_rules_and_logits_match_one_device(base):
    cfg, params = base
    mesh = _mesh()
    shardings = nn.logical_to_mesh_sharding(param_axes(cfg), mesh, RULES)
    placed = jax.jit(init, static_argnums=0, out_shardings=shardings)(cfg, jax.random.key(0))
    found = {"/".join(k.key for k in path): x
             for path, x in jax.tree_util.tree_leaves_with_path(placed)}
    assert sorted(found) == sorted(EXPECTED_SPECS)
    for name, x in found.items():
        assert _spec(x.sharding.spec) == _spec(P(*EXPECTED_SPECS[name])), name
        shard = x.addressable_shards[0].data.shape
        divisors = [1 if a is None else mesh.shape[a] for a in EXPECTED_SPECS[name]]
        assert shard == tuple(n // d for n, d in zip(x.shape, divisors)), name

    sharded_params = jax.device_put(params, shardings)
    tokens = jnp.concatenate([TOKENS, TOKENS[::-1]])  # batch 4 over (data, fsdp)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        sharded = jax.jit(apply, static_argnums=0)(cfg, sharded_params, tokens)
    assert _spec(sharded.sharding.spec) == (("data", "fsdp"), None, "tensor")
    single = [_apply(cfg, params, TOKENS), _apply(cfg, params, TOKENS[::-1])]  # one device
    np.testing.assert_allclose(sharded, np.concatenate(single), atol=1e-5, rtol=0)


def test_explicit_head_dim_need_not_divide_d_model():
    cfg = ModelConfig(vocab_size=50, d_model=64, n_layers=1, n_heads=6, n_kv_heads=2,
                      head_dim=16, d_ff=96)
    params = init(cfg, jax.random.key(0))
    assert params["layers"]["attn"]["q"]["kernel"].shape == (1, 64, 6, 16)
    assert sum(x.size for x in jax.tree.leaves(params)) == count_params(cfg).total
    assert apply(cfg, params, jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 50)
