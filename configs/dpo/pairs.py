"""Preference optimisation on (prompt, chosen, rejected) pairs.

    hibari dpo --config configs/dpo/pairs.py:dpo --workdir runs/dpo --config.init_from=runs/sft

Argument: the loss (dpo | ipo | hinge | kto). Default data: align/assets/seed_pairs.jsonl,
synthetic pairs built from the Self-Instruct seed tasks (chosen = the real output, rejected = a
corruption; see align/assets/SOURCES.md), 10% held out. KTO reads the same pairs as unpaired
examples (chosen desirable, rejected undesirable) unless train_path names unpaired records.
reference: live (frozen model beside the policy) | precomputed (cached log-probs, less memory).
"""
import ml_collections

from hibari.align.losses import LOSSES
from hibari.configs.base import align_config

BETA = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "kto": 0.1}


def get_config(loss: str = "dpo"):
    if loss not in LOSSES:
        raise ValueError(f"configs/dpo/pairs.py: unknown loss {loss!r}; choose from {LOSSES}")
    c = align_config(f"{loss}-pairs", steps=200, lr=5e-4)
    c.data.train_path = "align/assets/seed_pairs.jsonl"
    c.data.seq_len = 1024
    c.model.max_seq_len = 1024
    c.loss = loss
    c.beta = BETA[loss]
    c.label_smoothing = 0.0  # DPO only: > 0 is conservative DPO
    c.kto = ml_collections.ConfigDict(dict(desirable_weight=1.0, undesirable_weight=1.0))
    c.reference = "live"  # live | precomputed
    c.reference_cache = ""  # precomputed: path prefix (default <workdir>/reference_logps)
    return c
