"""Fused attention kernels for packed rows, driven by segment ids instead of a dense mask.

    out = segment_attention(q, k, v, segment_ids, impl="splash")   # out[b, t, h, d]

q[b, t, h, d], k/v[b, t, kv, d] (h a multiple of kv: grouped-query attention); segment_ids[b, t]
(one id per packed document, 0 = padding). A token attends to earlier tokens (by index) with the
same id, as `transformer.attention_mask` + `transformer.attend` (the XLA reference) do; padding
tokens (id 0) attend causally among themselves, so every row has a finite output. Self-attention
only (training and scoring), no cache.

impl (see docs/attention.md):
  "cudnn"      cuDNN flash attention (jax 0.10.2's fused_attention_stablehlo) in its packed
               layout: each row's runs of equal ids become q/kv offsets + lengths, causal within
               a run. GPU only (Hopper or newer for the packed layout), bf16/fp16 only; no
               interpret mode. Ids must form contiguous runs (as packed rows do).
  "pallas_gpu" jax.experimental.pallas.ops.gpu.attention (Triton flash attention, segment ids +
               causal). GPU, or Pallas interpret mode on CPU.
  "splash"     jax.experimental.pallas.ops.tpu.splash_attention (SegmentIds + CausalMask).
               TPU, or Pallas interpret mode on CPU.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hibari.base.errors import UsageError

KERNELS = ("cudnn", "pallas_gpu", "splash")

_PLATFORM = {"cudnn": "gpu", "pallas_gpu": "gpu", "splash": "tpu"}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _use_interpret(impl: str, interpret: bool | None) -> bool:
    """Whether to run `impl` in Pallas interpret mode; a one-line UsageError when it cannot run
    on this backend at all."""
    backend = jax.default_backend()
    need = _PLATFORM[impl]
    if impl == "cudnn":
        if backend != "gpu" or interpret:
            raise UsageError(
                f"attention impl 'cudnn' needs a GPU backend (cuDNN has no interpret mode), "
                f"got backend '{backend}': use impl 'xla' (or 'pallas_gpu' / 'splash' in "
                f"interpret mode) here")
        return False
    if interpret is None:
        interpret = backend == "cpu"
    if not interpret and backend != need:
        raise UsageError(
            f"attention impl '{impl}' needs a {need.upper()} backend, got '{backend}': use impl "
            f"'xla' here (or interpret=True, slow, for testing)")
    return bool(interpret)


def _check_shapes(q, k, v, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise UsageError(f"segment_attention: want q[b, t, h, d] and k = v[b, t, kv, d], got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise UsageError(f"segment_attention: k/v {k.shape} do not fit q {q.shape} (same b, t, d; "
                         f"h a multiple of kv heads)")
    if segment_ids.shape != (b, t):
        raise UsageError(f"segment_attention: segment_ids {segment_ids.shape} should be {(b, t)}")


def _pad_time(x, t_pad, value=0):
    t = x.shape[1]
    if t_pad == t:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, t_pad - t)
    return jnp.pad(x, widths, constant_values=value)


# ---------------------------------------------------------------------------------------------
# Pallas GPU (Triton) flash attention
# ---------------------------------------------------------------------------------------------

def _pallas_gpu(q, k, v, segment_ids, interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    b, t, h, d = q.shape
    rep = h // k.shape[2]
    if rep > 1:  # the kernel indexes k/v by the query head
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    # Forward blocks up to 128 (jax's default), backward 32 (its default); Triton dots need
    # blocks of at least 16. t is padded to a multiple of the forward block; the padded tail
    # (id 0, after every real token) is never attended to by a real row, and is dropped.
    block = min(128, max(16, 1 << (t - 1).bit_length()))
    bwd = min(32, block)
    t_pad = _round_up(t, block)
    sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=bwd,
                                        block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd)
    out = pallas_attention.mha(
        _pad_time(q, t_pad), _pad_time(k, t_pad), _pad_time(v, t_pad),
        _pad_time(segment_ids.astype(jnp.int32), t_pad), sm_scale=1.0 / math.sqrt(d),
        causal=True, block_sizes=sizes, interpret=interpret)
    return out[:, :t]


# ---------------------------------------------------------------------------------------------
# TPU splash attention
# ---------------------------------------------------------------------------------------------

def _splash_block(t_pad: int) -> int:
    """The largest of 512, 256, 128 that divides t_pad (a multiple of 128: TPU lanes)."""
    return next(blk for blk in (512, 256, 128) if t_pad % blk == 0)


def _splash_kernel(h: int, t_pad: int, interpret: bool):
    """A fresh kernel per trace: a kernel cached across traces holds arrays of the trace that
    made it (a leaked tracer when one trace is an apply and the next a grad inside the layer
    scan: tests/test_attention_kernels.py)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    blk = _splash_block(t_pad)
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    mask = sm.MultiHeadMask([sm.CausalMask((t_pad, t_pad)) for _ in range(h)])
    with jax.ensure_compile_time_eval():  # its mask-info arrays as constants
        return sk.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q, k, v, segment_ids, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, h, d = q.shape
    t_pad = _round_up(t, 128)
    kernel = _splash_kernel(h, t_pad, interpret)
    # The kernel takes one example, heads first, and no softmax scale: scale q (in fp32).
    q = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)
    q, k, v = (jnp.swapaxes(_pad_time(x, t_pad), 1, 2) for x in (q, k, v))  # [b, heads, t, d]
    seg = _pad_time(segment_ids.astype(jnp.int32), t_pad)

    def one(q, k, v, s):
        return kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s))  # k/v[kv, t, d]: GQA inside

    out = jax.vmap(one)(q, k, v, seg)
    return jnp.swapaxes(out, 1, 2)[:, :t]


# ---------------------------------------------------------------------------------------------
# cuDNN flash attention, packed layout
# ---------------------------------------------------------------------------------------------

DEFAULT_MAX_SEGMENTS = 64


def _raise_overflow(worst, max_segments):
    raise UsageError(f"segment_attention(impl='cudnn'): a row holds {int(worst)} runs of segment "
                     f"ids (padding runs included), over max_segments={max_segments}: raise "
                     f"max_segments")


def cudnn_packing(segment_ids, max_segments: int):
    """Runs of equal ids (padding runs included) as cuDNN's packed-layout tensors:
    (lengths[b, M], offsets[b, M + 1], n_runs[b]), int32, unused entries -1 (M = max_segments).
    A row with more than M runs raises a UsageError when the computation runs."""
    b, t = segment_ids.shape
    start = jnp.concatenate([jnp.ones((b, 1), bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    n_runs = start.sum(axis=1).astype(jnp.int32)
    if max_segments < t:  # the host is called only when a row overflows
        worst = n_runs.max()
        jax.lax.cond(worst > max_segments,
                     lambda: jax.debug.callback(_raise_overflow, worst, max_segments),
                     lambda: None)
    offsets = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=-1)[0])(start)
    offsets = offsets.astype(jnp.int32)
    idx = jnp.arange(max_segments + 1)[None, :]
    offsets = jnp.where(idx < jnp.minimum(n_runs, max_segments)[:, None], offsets, -1)
    ends = jnp.where(idx[:, 1:] < n_runs[:, None], offsets[:, 1:], t)  # the next run's start
    lengths = jnp.where(offsets[:, :-1] >= 0, ends - offsets[:, :-1], -1).astype(jnp.int32)
    return lengths, offsets, n_runs


def _cudnn(q, k, v, segment_ids, max_segments: int | None):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    b, t, h, d = q.shape
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UsageError(f"attention impl 'cudnn' needs bfloat16 or float16 q/k/v, got {q.dtype}: "
                         f"set model.compute_dtype=bfloat16")
    # cuDNN keeps softmax statistics [b * M, h, t] (fp32): M = t would cost as much as dense
    # scores, so M is a bound (checked when the step runs). M >= 2: one segment per row would
    # select cuDNN's unpacked layout.
    m = max(2, min(t, DEFAULT_MAX_SEGMENTS if max_segments is None else int(max_segments)))
    lengths, offsets, _ = cudnn_packing(segment_ids, m)
    rep = h // k.shape[2]
    if rep > 1:  # jax scales packed kv offsets by the query head count: give k/v all h heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    return cudnn_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                           kv_offsets=offsets, scale=1.0 / math.sqrt(d),
                           mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


# ---------------------------------------------------------------------------------------------

def segment_attention(q, k, v, segment_ids, *, impl: str, interpret: bool | None = None,
                      max_segments: int | None = None):
    """Causal self-attention within segments with a fused kernel -> out[b, t, h, d] (q's dtype).

    interpret: run a Pallas kernel in interpret mode (default: on a CPU backend only).
    max_segments (cudnn only): a bound on runs of equal ids per row, padding runs included
    (None: DEFAULT_MAX_SEGMENTS, at most t); a row with more raises when the step runs. cuDNN's
    grid and its softmax statistics [b * max_segments, h, t] grow with it."""
    if impl not in KERNELS:
        raise UsageError(f"attention impl '{impl}' is not a segment kernel; choose one of "
                         f"{', '.join(KERNELS)}")
    _check_shapes(q, k, v, segment_ids)
    use_interpret = _use_interpret(impl, interpret)
    if impl == "cudnn":
        return _cudnn(q, k, v, segment_ids, max_segments)
    if impl == "pallas_gpu":
        return _pallas_gpu(q, k, v, segment_ids, use_interpret)
    return _splash(q, k, v, segment_ids, use_interpret)
