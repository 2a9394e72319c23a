"""GRPO from a reward: G samples per prompt, group-normalised advantages, no critic, the k3
KL estimator to the reference inside the loss (Shao et al. 2024, DeepSeekMath).

    hibari grpo --config configs/rl/grpo.py:tiny --workdir runs/grpo-tiny
    hibari grpo --config configs/rl/grpo.py:sft --workdir runs/grpo \\
        --config.init_from=runs/quickstart/sft --config.data.tokenizer=runs/quickstart/data/tokenizer.model

Variants as configs/rl/ppo.py: `tiny` (a fresh tiny policy, reward japanese_share, a few
minutes on a CPU) and `sft` (a trained policy; set init_from, the tokenizer and the reward).
config.data.batch_size counts prompts; each rollout holds batch_size x group_size responses.
"""
from hibari.configs.base import rl_config


def get_config(variant: str = "tiny"):
    c = rl_config("grpo", variant, batch_size=4)
    if variant == "tiny":
        c.steps = 60
        c.optim.lr = 3e-3
    c.kl.beta = 0.1 if variant == "tiny" else 0.04
    c.grpo.group_size = 4
    c.grpo.minibatches = 2
    return c
