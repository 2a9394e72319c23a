"""model/: the functional Flax Transformer, its config, counts and interop.

    from hibari.model import ModelConfig, init, apply
"""
from hibari.model.config import ConfigError, ModelConfig, RopeScaling
from hibari.model.counting import count_params, flops_per_token, matmul_params
from hibari.model.transformer import apply, hidden, init, param_axes, param_shapes, unembed
from hibari.model.vocab import resize_vocab

__all__ = [
    "ConfigError", "ModelConfig", "RopeScaling", "apply", "count_params", "flops_per_token",
    "hidden", "init", "matmul_params", "param_axes", "param_shapes", "resize_vocab", "unembed",
]
