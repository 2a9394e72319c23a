"""model/activations.py: the intercepted statistics equal the same sums computed from flax's
own captured intermediates (an independent path through the model)."""
import jax
import jax.numpy as jnp
import numpy as np

from hibari.model import transformer as T
from hibari.model.activations import (
    dense_statistics,
    input_square_sums,
    positive_counts,
    unscanned,
)
from hibari.model.config import ModelConfig


def _setup(scan: bool):
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=4, d_ff=24, max_seq_len=32, tie_embeddings=False,
                      scan_layers=scan)
    params = T.init(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (3, 10))
    segments = np.ones((3, 10), int)
    segments[1, :4], segments[1, 4:] = 1, 2  # two packed documents
    segments[2, 6:] = 0  # padding: not counted
    return cfg, params, tokens, segments


def _captured(cfg, params, tokens, segments):
    plain, tree = unscanned(cfg, params)
    _, state = T.Transformer(plain).apply(
        {"params": tree}, jnp.asarray(tokens), jnp.asarray(segments),
        method=T.Transformer.hidden, capture_intermediates=True, mutable=["intermediates"])
    return state["intermediates"]


def test_statistics_match_captured_activations_scanned_and_not():
    for scan in (True, False):
        cfg, params, tokens, segments = _setup(scan)
        inter = _captured(cfg, params, tokens, segments)
        valid = segments > 0
        sq = dense_statistics(cfg, params, [(tokens, segments)] * 2, input_square_sums)
        assert sq["tokens"] == 2 * valid.sum()
        for layer in ("layers_0", "layers_1"):
            normed = np.asarray(inter[layer]["attn_norm"]["__call__"][0])[valid]
            np.testing.assert_allclose(sq[f"{layer}/attn/q"], 2 * (normed ** 2).sum(0),
                                       rtol=1e-5)
            gate = np.asarray(inter[layer]["mlp"]["gate"]["__call__"][0])[valid]
            up = np.asarray(inter[layer]["mlp"]["up"]["__call__"][0])[valid]
            h = jax.nn.silu(gate) * up  # the input of down
            np.testing.assert_allclose(sq[f"{layer}/mlp/down"], 2 * (h ** 2).sum(0),
                                       rtol=1e-4)
        assert sq["layers_0/attn/o"].shape == (cfg.n_heads, cfg.head_dim)
        assert "lm_head" not in sq
        on = dense_statistics(cfg, params, [(tokens, segments)], positive_counts)
        gate = np.asarray(inter["layers_1"]["mlp"]["gate"]["__call__"][0])[valid]
        np.testing.assert_array_equal(on["layers_1/mlp/gate"], (gate > 0).sum(0))
