"""Transformer++ (Llama) against the original Transformer, 2 seeds each, minutes on a CPU.

    hibari sweep --config configs/sweeps/ablation_tiny.py --workdir runs/ablation_tiny
    hibari sweep --config configs/sweeps/ablation_tiny.py:runs/data/quickstart --workdir ...

Argument: `synthetic` (default; the deterministic Markov source) or a `hibari data prepare`
output directory (its packed/ rows, evaluated on packed-heldout/).
"""
import ml_collections

from hibari.configs.sweeps._common import (
    ORIGINAL_TRANSFORMER,
    packed_data_overrides,
    sweep_defaults,
)


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
    c = sweep_defaults()
    c.name = "ablation_tiny"
    c.base = "configs/pretrain/llama.py:tiny"
    c.mode = "grid"
    c.widths = (64,)
    c.aspect = 32              # 2 layers
    c.head_dim = 16            # 4 heads
    c.variants = ml_collections.ConfigDict({"transformerpp": {},
                                            "transformer": ORIGINAL_TRANSFORMER})
    c.seeds = (0, 1)
    c.lrs = (3e-3,)
    c.tokens = (262144,)       # 256 steps of 8 x 128 tokens on the synthetic source
    c.eval_points = 8
    if arg != "synthetic":
        c.overrides = ml_collections.ConfigDict(packed_data_overrides(arg))
    return c
