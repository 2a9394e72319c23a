"""PPO from a reward (Ouyang et al. 2022; the details of Huang et al. 2024).

    hibari ppo --config configs/rl/ppo.py:tiny --workdir runs/ppo-tiny
    hibari ppo --config configs/rl/ppo.py:sft --workdir runs/ppo \\
        --config.init_from=runs/quickstart/sft --config.data.tokenizer=runs/quickstart/data/tokenizer.model \\
        --config.reward.name=model --config.reward.model=runs/rm

Variants:
  tiny  a fresh tiny policy (d_model 64, 2 layers, the 1,000-piece seed tokenizer) learns to
        answer the Self-Instruct seed prompts in Japanese script (reward: japanese_share);
        a CPU shows the reward rising within a few minutes.
  sft   settings for a trained policy (set init_from, the tokenizer and the reward): a small
        learning rate, a missing-eos penalty, adaptive KL.
"""
from hibari.configs.base import rl_config


def get_config(variant: str = "tiny"):
    c = rl_config("ppo", variant, batch_size=16)
    if variant == "tiny":
        c.reward.normalize = True  # the share's spread is ~0.02 at the start: whiten it
        c.ppo.epochs = 2
    else:
        c.kl.adaptive = True
    c.kl.beta = 0.05
    return c
