"""Instruction tuning (SFT) with a response-only loss.

    hibari sft --config configs/sft/instruct.py:alpaca_en --workdir runs/sft \\
        --config.init_from=runs/pretrain-small --config.data.tokenizer=tok.model

Argument: the template (alpaca_en | alpaca_ja | minimal | chat). Default data: the vendored
Self-Instruct seed tasks (align/assets/seed_sft.jsonl, FLAN-style phrasings), 10% held out.
Without init_from a tiny random model is trained (smoke runs on a CPU).
"""
from hibari.align.templates import TEMPLATES
from hibari.configs.base import align_config


def get_config(template: str = "alpaca_en"):
    if template not in TEMPLATES:
        raise ValueError(f"configs/sft/instruct.py: unknown template {template!r}; choose from "
                         f"{sorted(TEMPLATES)}")
    c = align_config(f"sft-{template}", steps=200)
    c.data.template = template
    return c
