"""Shared pieces of the sweep configs: defaults of every field, the two architectures, data."""
import os

import ml_collections

# The original Transformer (Vaswani et al. 2017) against the base config's Transformer++ (Llama:
# RMSNorm, SwiGLU, RoPE, no biases, AdamW beta2=0.95). Its d_ff follows the width rule (4d for
# a non-gated MLP, 8/3 d for SwiGLU), so both have about the same parameters per layer. The
# original used inverse-sqrt decay, which hibari has no schedule for: both keep the cosine.
ORIGINAL_TRANSFORMER = {"model": {"norm": "layernorm", "mlp": "relu", "position": "sinusoidal",
                                  "use_bias": True},
                        "optim": {"b2": 0.98}}

PREPARE_COMMAND = "hibari data prepare --config configs/data/quickstart.py:{out}"


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


def packed_data_overrides(prepared_dir: str, prepare_flags: str = "") -> dict:
    """Overrides that train on `hibari data prepare` output: packed/ rows, packed-heldout/ for
    eval, and the seq_len and vocabulary they were packed with (`prepare_flags`: what the error
    message's prepare command adds, e.g. "--vocab-size 1024")."""
    from data.loader import packed_info
    train_dir = os.path.join(prepared_dir, "packed")
    eval_dir = os.path.join(prepared_dir, "packed-heldout")
    for path in (train_dir, eval_dir):
        if not os.path.exists(os.path.join(path, "manifest.json")):
            raise ValueError(f"{path}: no packed shards; make them with "
                             f"`{PREPARE_COMMAND.format(out=prepared_dir)}{prepare_flags and ' ' + prepare_flags}` "
                             "(a few minutes on a CPU) "
                             "or pass ':synthetic' to train on the synthetic source")
    info = packed_info(train_dir)
    return {"data": {"kind": "packed", "path": train_dir, "eval_path": eval_dir,
                     "seq_len": info["seq_len"]},
            "model": {"vocab_size": info["vocab_size"], "max_seq_len": info["seq_len"]}}
