"""The decoder-only Transformer as Flax Linen modules, used functionally.

    params = init(cfg, key)
    logits = apply(cfg, params, tokens, segment_ids=None, positions=None)   # logits[b, t, v] fp32

Shapes: tokens[b, t]; segment_ids[b, t] (one id per packed document, 0 = padding; a token attends
only to earlier tokens of its own segment); positions[b, t] (restart at 0 in each document;
derived from segment_ids when not given). Every parameter is created with logical axis names
(`param_axes`), and key activations are constrained to logical axes; both only take effect when
the caller sets `nn.logical_axis_rules` and a mesh (see train/sharding.py).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from jax.ad_checkpoint import checkpoint_name

from hibari.base.segments import positions_from_segments
from hibari.model.attention import segment_attention
from hibari.model.config import ModelConfig

# cfg.attention values served by a fused kernel from segment ids (model/attention.py): the
# layers then get segment_ids[b, t] where the XLA paths get the dense mask[b, 1, t, t]
SEGMENT_KERNELS = {"cudnn_segments": "cudnn", "pallas_gpu": "pallas_gpu", "splash": "splash"}

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


def _param_init(std: float, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


# ---------------------------------------------------------------------------------------------
# Positions and masks
# ---------------------------------------------------------------------------------------------

def attention_mask(q_segment_ids, kv_segment_ids, q_positions=None, kv_positions=None):
    """mask[b, 1, tq, tk]: causal within a segment. Causality is by index when positions are
    not given (training), by position otherwise (decoding with a cache)."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if q_positions is None:
        tq, tk = q_segment_ids.shape[-1], kv_segment_ids.shape[-1]
        causal = jnp.tril(jnp.ones((tq, tk), dtype=bool), k=tk - tq)[None]
    else:
        causal = q_positions[:, :, None] >= kv_positions[:, None, :]
    return (same & causal)[:, None]


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """inv_freq[head_dim // 2], with Llama-3 frequency scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x[b, t, h, d] by position (rotate-half layout, as HF Llama)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
    """The original Transformer's fixed encoding: [sin(p w_i), cos(p w_i)] for i < dim/2."""
    inv = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions[..., None].astype(jnp.float32) * inv
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


# ---------------------------------------------------------------------------------------------
# Attention core (shared by training and cached decoding)
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scaled_masked_softmax(scores, mask, scale: float):
    """softmax(where(mask, scores * scale, fp32 min)) over the last axis, fp32.

    Its gradient keeps only the probabilities: autodiff of the plain expression keeps the
    unnormalised exponentials too, a second [b, kv, g, tq, tk] array per layer saved by the
    layer scan (on a CPU that memory traffic costs as much as the attention matmuls)."""
    if mask is not None:
        scores = jnp.where(mask, scores * scale, jnp.finfo(jnp.float32).min)
    else:
        scores = scores * scale
    return jax.nn.softmax(scores, axis=-1)


def _scaled_masked_softmax_fwd(scores, mask, scale):
    probs = _scaled_masked_softmax(scores, mask, scale)
    return probs, (probs, mask)


def _scaled_masked_softmax_bwd(scale, res, g):
    probs, mask = res
    g = g.astype(jnp.float32)
    d_scores = probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True)) * scale
    if mask is not None:
        d_scores = jnp.where(mask, d_scores, 0.0)
    return d_scores, None


_scaled_masked_softmax.defvjp(_scaled_masked_softmax_fwd, _scaled_masked_softmax_bwd)


def attend(q, k, v, mask, impl: str = "xla"):
    """q[b, tq, h, d], k/v[b, tk, kv, d], mask[b, 1, tq, tk] (or None = full) -> [b, tq, h, d].

    impl: "xla" (einsum, fp32 scores), "dot_product" (jax.nn.dot_product_attention, XLA),
    "cudnn" (its cuDNN flash kernel on GPUs; the XLA kernel elsewhere, so one config runs on
    a CPU too)."""
    if impl in ("dot_product", "cudnn"):
        on_gpu = impl == "cudnn" and jax.default_backend() == "gpu"
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, implementation="cudnn" if on_gpu else None)
    b, tq, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, tq, kv, h // kv, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    probs = _scaled_masked_softmax(scores, None if mask is None else mask[:, :, None],
                                   1 / math.sqrt(d)).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, tq, h, d)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

def project(x, kernel, n_in: int = 1):
    """x[..., *in] @ kernel[*in, *out] as one 2-D matmul [tokens, in] @ [in, out].

    Same function as jnp.tensordot(x, kernel, n_in); the 2-D form makes the kernel's gradient
    a single-contraction dot [in, tokens] @ [tokens, out]. With the leading batch axes kept,
    the gradient contracts over (batch, length) and XLA:CPU lays it out with transposing
    copies fused into the elementwise backward (cache-missing loops), ~30% of a small
    model's CPU train step."""
    lead, k_in = x.shape[:x.ndim - n_in], kernel.shape[:n_in]
    k_out = kernel.shape[n_in:]
    y = jnp.dot(x.reshape(-1, math.prod(k_in)), kernel.reshape(math.prod(k_in), -1))
    return y.reshape(*lead, *k_out)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis, computed in fp32."""

    cfg: ModelConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dim = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 (self.axis_name,)),
                           (dim,), jnp.dtype(cfg.param_dtype))
        xf = x.astype(jnp.float32)
        if cfg.norm == "layernorm":
            xf = xf - xf.mean(-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
        y = y * scale.astype(jnp.float32)
        if cfg.norm == "layernorm":
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   (self.axis_name,)),
                              (dim,), jnp.dtype(cfg.param_dtype))
            y = y + bias.astype(jnp.float32)
        return y.astype(x.dtype)


class Dense(nn.Module):
    """x[..., *in] @ kernel[*in, *out] (+ bias[*out]), kernel created in its true shape so
    its logical axes apply directly (flax's DenseGeneral initialises a flattened kernel)."""

    cfg: ModelConfig
    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    n_in: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        shape = tuple(x.shape[x.ndim - self.n_in:]) + tuple(self.features)
        kernel = self.param("kernel", _param_init(cfg.init_std, self.kernel_axes), shape,
                            param_dtype)
        y = project(x.astype(dtype), kernel.astype(dtype), self.n_in)
        if self.use_bias:
            out_axes = self.kernel_axes[self.n_in:]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   out_axes),
                              tuple(self.features), param_dtype)
            y = y + bias.astype(dtype)
        if self.has_variable("params", "lora_a"):  # adapters attached by hibari.model.lora
            y = y + self._lora(x, dtype).astype(y.dtype)
        return y

    def _lora(self, x, dtype):
        """dropout(x) @ A @ B' (B' = scale * B, folded in by `hibari.model.lora.attach`):
        LoRA's low-rank term, present only when the tree carries "lora_a" / "lora_b" (and,
        while training with dropout, "lora_key" + "lora_dropout") beside this kernel."""
        a = self.get_variable("params", "lora_a")
        b = self.get_variable("params", "lora_b")
        if self.has_variable("params", "lora_key"):
            key = jax.random.wrap_key_data(self.get_variable("params", "lora_key"))
            rate = self.get_variable("params", "lora_dropout")
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        h = jnp.tensordot(x.astype(dtype), a.astype(dtype), axes=self.n_in)
        return jnp.tensordot(h, b.astype(dtype), axes=1)


def _dense(cfg: ModelConfig, features, kernel_axes, *, n_in=1, bias: bool, name: str):
    features = features if isinstance(features, tuple) else (features,)
    return Dense(cfg, features, kernel_axes, n_in=n_in, use_bias=bias, name=name)


class Attention(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        self.q = _dense(cfg, (cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim"),
                        bias=qkv_bias, name="q")
        self.k = _dense(cfg, (cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                        bias=qkv_bias, name="k")
        self.v = _dense(cfg, (cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                        bias=qkv_bias, name="v")
        self.o = _dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), n_in=2,
                        bias=cfg.use_bias, name="o")
        if cfg.qk_norm:
            self.q_norm = Norm(cfg, axis_name="head_dim")
            self.k_norm = Norm(cfg, axis_name="head_dim")

    def project(self, x, positions):
        """x[b, t, d] -> q[b, t, h, hd], k/v[b, t, kv, hd] with qk-norm and RoPE applied."""
        cfg = self.cfg
        q, k, v = self.q(x), self.k(x), self.v(x)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.position == "rope":
            inv_freq = rope_inv_freq(cfg)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = _constrain(q, ("batch", "length", "heads", "head_dim"))
        k = _constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = _constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        return q, k, v

    def __call__(self, x, mask, positions, kv=None, index=None):
        """Self-attention; with a cache `kv` = (k[b, S, kv, hd], v[...]) the new keys and values
        are written at slots [index, index + t) and the queries attend over the whole cache.
        `mask` is the dense mask[b, 1, tq, tk], or segment_ids[b, t] when cfg.attention is a
        segment kernel (SEGMENT_KERNELS) and there is no cache.
        Returns (out[b, t, d], updated kv or None)."""
        q, k, v = self.project(x, positions)
        impl = self.cfg.attention
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
            kv = (k, v)
            # cuDNN and the segment kernels take no arbitrary mask: a cache attends by XLA
            impl = "xla" if impl == "cudnn" or impl in SEGMENT_KERNELS else impl
        if impl in SEGMENT_KERNELS:  # `mask` is segment_ids[b, t] (see hidden)
            out = segment_attention(q, k, v, mask, impl=SEGMENT_KERNELS[impl])
        else:
            out = attend(q, k, v, mask, impl)
        out = checkpoint_name(out, "attn_out")
        return self.o(out), kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        act = {"swiglu": nn.silu, "geglu": lambda z: nn.gelu(z, approximate=False),
               "gelu": lambda z: nn.gelu(z, approximate=False), "relu": nn.relu}[cfg.mlp]
        up = _dense(cfg, cfg.d_ff, ("embed", "mlp"), bias=cfg.use_bias, name="up")(x)
        if cfg.gated_mlp:
            gate = _dense(cfg, cfg.d_ff, ("embed", "mlp"), bias=cfg.use_bias, name="gate")(x)
            h = act(gate) * up
        else:
            h = act(up)
        h = _constrain(h, ("batch", "length", "mlp"))
        h = checkpoint_name(h, "mlp_out")
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), bias=cfg.use_bias, name="down")(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    cfg: ModelConfig

    def setup(self):
        self.attn_norm = Norm(self.cfg)
        self.attn = Attention(self.cfg)
        self.mlp_norm = Norm(self.cfg)
        self.mlp = MLP(self.cfg)

    def __call__(self, x, mask, positions, kv=None, index=None):
        a, kv = self.attn(self.attn_norm(x), mask, positions, kv, index)
        h = x + a
        out = h + self.mlp(self.mlp_norm(h))
        return _constrain(out, ("batch", "length", "embed")), kv


class Transformer(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.compute_dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=_param_init(cfg.init_std, ("vocab", "embed")))
        if cfg.position == "learned":
            self.pos_embed = self.param(
                "pos_embed", _param_init(cfg.init_std, ("length", "embed")),
                (cfg.max_seq_len, cfg.d_model), jnp.dtype(cfg.param_dtype))
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            self.layers = [block(cfg) for _ in range(cfg.n_layers)]
        self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), bias=False,
                                  name="lm_head")

    def embed_tokens(self, tokens, positions):
        cfg = self.cfg
        x = self.embed(tokens.astype(jnp.int32))
        if cfg.position == "learned":
            x = x + jnp.take(self.pos_embed, positions, axis=0).astype(x.dtype)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.d_model).astype(x.dtype)
        return _constrain(x, ("batch", "length", "embed"))

    def run_layers(self, x, mask, positions, kv=None, index=None):
        """All blocks; kv (k[L, b, S, kv, hd], v[...]) is the per-layer cache or None."""
        if self.cfg.scan_layers:
            return self.layers(x, mask, positions, kv, index)
        new = []
        for i, layer in enumerate(self.layers):
            x, layer_kv = layer(x, mask, positions,
                                None if kv is None else (kv[0][i], kv[1][i]), index)
            new.append(layer_kv)
        if kv is None:
            return x, None
        return x, (jnp.stack([k for k, _ in new]), jnp.stack([v for _, v in new]))

    def hidden(self, tokens, segment_ids=None, positions=None):
        """Final-norm hidden states h[b, t, d] (compute dtype)."""
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids, jnp)
        x = self.embed_tokens(tokens, positions)
        if self.cfg.attention in SEGMENT_KERNELS:  # the kernels take the ids, no dense mask
            mask = segment_ids.astype(jnp.int32)
        else:
            mask = attention_mask(segment_ids, segment_ids)
        x, _ = self.run_layers(x, mask, positions)
        return self.final_norm(x)

    def decode(self, tokens, segment_ids, positions, cache, last_only: bool = False):
        """Process tokens[b, t] into cache slots [index, index + t) -> (logits[b, t, v], cache);
        `last_only`: logits[b, 1, v] of the last position (a prefill never materialises
        [b, t, vocab] logits).

        The mask is by segment and position over the whole cache, so left padding (segment 0)
        and unfilled slots are never attended to by real tokens."""
        index = cache["index"]
        seg_all = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, index, 1)
        pos_all = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, index, 1)
        mask = attention_mask(segment_ids, seg_all, positions, pos_all)
        x = self.embed_tokens(tokens, positions)
        x, (k, v) = self.run_layers(x, mask, positions, (cache["k"], cache["v"]), index)
        cache = {"k": k, "v": v, "segment_ids": seg_all, "positions": pos_all,
                 "index": index + tokens.shape[1]}
        return self.logits(self.final_norm(x[:, -1:] if last_only else x)), cache

    def logits(self, h):
        """logits[..., v] in fp32 from hidden states h[..., d]."""
        if self.cfg.tie_embeddings:
            out = self.embed.attend(h)
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)

    def __call__(self, tokens, segment_ids=None, positions=None):
        logits = self.logits(self.hidden(tokens, segment_ids, positions))
        return _constrain(logits, ("batch", "length", "vocab"))


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------

def _dummy_tokens():
    return jnp.zeros((1, 2), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def init(cfg: ModelConfig, key: jax.Array):
    """Fresh parameters (a plain pytree of arrays) from a PRNG key. Jittable with out_shardings."""
    variables = Transformer(cfg).init(key, _dummy_tokens())
    return meta.unbox(variables["params"])


def param_axes(cfg: ModelConfig):
    """The logical axis names of every parameter: a pytree of PartitionSpec like `init`'s."""
    boxed = jax.eval_shape(lambda k: Transformer(cfg).init(k, _dummy_tokens()),
                           jax.random.key(0))
    return nn.get_partition_spec(boxed)["params"]


def param_shapes(cfg: ModelConfig):
    """ShapeDtypeStructs of the parameters, without allocating them."""
    return jax.eval_shape(lambda k: init(cfg, k), jax.random.key(0))


@functools.partial(jax.jit, static_argnums=0)
def apply(cfg: ModelConfig, params, tokens, segment_ids=None, positions=None):
    """logits[b, t, v] (fp32) for tokens[b, t]."""
    return Transformer(cfg).apply({"params": params}, tokens, segment_ids, positions)


@functools.partial(jax.jit, static_argnums=0)
def hidden(cfg: ModelConfig, params, tokens, segment_ids=None, positions=None):
    """Final hidden states h[b, t, d]; pair with `unembed` to compute logits in chunks."""
    return Transformer(cfg).apply({"params": params}, tokens, segment_ids, positions,
                                  method=Transformer.hidden)


@functools.partial(jax.jit, static_argnums=0)
def unembed(cfg: ModelConfig, params, h):
    """logits[..., v] (fp32) from hidden states h[..., d]."""
    return Transformer(cfg).apply({"params": params}, h, method=Transformer.logits)
