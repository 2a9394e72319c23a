"""model/: the functional Flax Transformer, its config, counts and interop.

    from hibari.model import ModelConfig, init, apply
"""
from hibari.model.config import ConfigError, ModelConfig, RopeScaling
from hibari.model.counting import count_params, flops_per_token, matmul_params
from hibari.model.logprobs import chunked_log_probs, next_token_targets, token_log_probs
from hibari.model.transformer import apply, hidden, init, param_axes, param_shapes, unembed
from hibari.model.vocab import resize_vocab

__all__ = [
    "ConfigError", "ModelConfig", "RopeScaling", "apply", "chunked_log_probs", "count_params",
    "flops_per_token", "hidden", "init", "matmul_params", "next_token_targets", "param_axes",
    "param_shapes", "resize_vocab", "token_log_probs", "unembed",
]
