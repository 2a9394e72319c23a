"""Shared pieces of the sweep configs: defaults of every field, the two architectures, data."""
import ml_collections

from hibari.train.loop import packed_data_overrides  # noqa: F401 (the sweep configs' data)

# The original Transformer (Vaswani et al. 2017) against the base config's Transformer++ (Llama:
# RMSNorm, SwiGLU, RoPE, no biases, AdamW beta2=0.95). Its d_ff follows the width rule (4d for
# a non-gated MLP, 8/3 d for SwiGLU), so both have about the same parameters per layer. The
# original used inverse-sqrt decay, which hibari has no schedule for: both keep the cosine.
ORIGINAL_TRANSFORMER = {"model": {"norm": "layernorm", "mlp": "relu", "position": "sinusoidal",
                                  "use_bias": True},
                        "optim": {"b2": 0.98}}


def sweep_defaults() -> ml_collections.ConfigDict:
    """Every field a sweep config has (docs/sweeps.md describes them)."""
    c = ml_collections.ConfigDict()
    c.name = "sweep"
    c.base = "configs/pretrain/llama.py:tiny"
    c.mode = "grid"                  # grid | isoflop
    c.widths = (64,)                 # d_model values
    c.aspect = 32                    # n_layers = round(d_model / aspect)
    c.head_dim = 64                  # n_heads = d_model / head_dim
    c.ff_multiple = 16               # SwiGLU d_ff = 8/3 d rounded up to this
    c.variants = ml_collections.ConfigDict({"base": {}})
    c.lrs = (3e-3,)
    c.seeds = (0,)
    c.tokens = ml_collections.FieldReference(None, field_type=tuple)  # grid: D per run
    c.budgets = (1e12,)              # isoflop: C = 6ND per budget
    c.param_count = "total"          # isoflop: the N of 6ND (total | non_embedding)
    c.eval_points = 8                # evaluations per run
    c.step_tolerance = 0.02          # steps may move this much so that evals divide them
    c.min_steps = 10                 # members with fewer steps are left out
    c.warmup_fraction = 0.05
    c.overrides = ml_collections.ConfigDict()  # applied to every member, e.g. {"data": {...}}
    return c
