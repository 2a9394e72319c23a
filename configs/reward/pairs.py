"""Reward model (scalar head, Bradley-Terry loss) on preference pairs.

    hibari reward --config configs/reward/pairs.py --workdir runs/rm --config.init_from=runs/sft

Default data: align/assets/seed_pairs.jsonl (synthetic pairs, see align/assets/SOURCES.md).
"""
from hibari.configs.base import align_config


def get_config(arg: str = ""):
    del arg
    c = align_config("reward-pairs", steps=200)
    c.data.train_path = "align/assets/seed_pairs.jsonl"
    c.data.seq_len = 1024
    c.model.max_seq_len = 1024
    return c
