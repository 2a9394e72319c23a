"""PPO from a reward (Ouyang et al. 2022; the details of Huang et al. 2024).

    hibari ppo --config configs/rl/ppo.py:tiny --workdir runs/ppo-tiny
    hibari ppo --config configs/rl/ppo.py:sft --workdir runs/ppo \\
        --config.init_from=runs/quickstart/sft --config.data.tokenizer=runs/quickstart/data/tokenizer.model \\
        --config.reward.name=model --config.reward.model=runs/rm

Variants:
  tiny  a fresh tiny policy (d_model 64, 2 layers, the 1,000-piece seed tokenizer) learns to
        answer the Self-Instruct seed prompts in Japanese script (reward: japanese_share);
        a CPU shows the reward rising within a few minutes.
  sft   settings for a trained policy (set init_from, the tokenizer and the reward): smaller
        learning rate, a missing-eos penalty, adaptive KL.
"""
from hibari.configs.base import rl_config

VARIANTS = ("tiny", "sft")


def get_config(variant: str = "tiny"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/rl/ppo.py: unknown variant {variant!r}; choose from "
                         f"{VARIANTS}")
    if variant == "tiny":
        c = rl_config("ppo-tiny", "ppo", steps=100, batch_size=16, prompt_len=128,
                      max_new_tokens=16, lr=1e-3)
        c.reward.normalize = True  # the share's spread is ~0.02 at the start: whiten it
        c.ppo.epochs = 2
        c.kl.beta = 0.05
    else:
        c = rl_config("ppo-sft", "ppo", steps=200, batch_size=16, prompt_len=192,
                      max_new_tokens=48, lr=1e-5)
        c.reward.missing_eos_penalty = 1.0
        c.kl.adaptive = True
        c.kl.beta = 0.05
    c.log_every = 1
    c.eval_every = c.get_ref("steps") // 4
    c.checkpoint_every = c.get_ref("steps") // 4
    return c
