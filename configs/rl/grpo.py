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

VARIANTS = ("tiny", "sft")


def get_config(variant: str = "tiny"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/rl/grpo.py: unknown variant {variant!r}; choose from "
                         f"{VARIANTS}")
    if variant == "tiny":
        c = rl_config("grpo-tiny", "grpo", steps=60, batch_size=4, prompt_len=128,
                      max_new_tokens=16, lr=3e-3)
        c.kl.beta = 0.1
    else:
        c = rl_config("grpo-sft", "grpo", steps=200, batch_size=4, prompt_len=192,
                      max_new_tokens=48, lr=1e-5)
        c.reward.missing_eos_penalty = 1.0
        c.kl.beta = 0.04
    c.grpo.group_size = 4
    c.grpo.minibatches = 2
    c.log_every = 1
    c.eval_every = c.get_ref("steps") // 4
    c.checkpoint_every = c.get_ref("steps") // 4
    return c
