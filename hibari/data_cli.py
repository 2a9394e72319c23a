"""`hibari data ...` (`hibari.data.cli`) with the language model of the quality stage's perplexity
filter: `hibari.evaluation.quality_scoring.CheckpointScorer`. Composed here, above the rooms,
because data/ knows nothing of models (DESIGN.md); the scorer loads a model only when a config
sets `perplexity_checkpoint`.
"""
from __future__ import annotations

from hibari.data.cli import data_main as data_room_main
from hibari.evaluation.quality_scoring import CheckpointScorer


def data_main(argv: list[str]) -> int:
    return data_room_main(argv, perplexity_scorer=CheckpointScorer())
