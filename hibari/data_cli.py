"""`hibari data ...` (`hibari.data.cli`) with the language model of the quality stage's perplexity
filter: `hibari.evaluation.quality_scoring.CheckpointScorer`. Composed here, above the rooms,
because data/ knows nothing of models (DESIGN.md). Only `prepare` (the one stage whose config can
set `perplexity_checkpoint`) gets the scorer, so the other stages start without importing JAX; the
scorer loads a model only when the config sets `perplexity_checkpoint`.
"""
from __future__ import annotations

from hibari.data.cli import data_main as data_room_main


def data_main(argv: list[str]) -> int:
    scorer = None
    if argv[:1] == ["prepare"]:
        from hibari.evaluation.quality_scoring import CheckpointScorer
        scorer = CheckpointScorer()
    return data_room_main(argv, perplexity_scorer=scorer)
