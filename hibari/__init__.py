"""hibari: one JAX/Flax codebase from corpus to evaluation.

One distribution, one import name. The rooms are installed under it from their folders at the
repository root:

    hibari.model       ModelConfig, the functional Flax Transformer, decoding, HF/GGUF interop
    hibari.data        sources, cleaning, filters, dedup, SentencePiece, packing, the loader
    hibari.train       mesh + axis rules, TrainState, the pure step, the loop, checkpoints
    hibari.align       SFT, DPO/IPO/KTO, reward models (reuses hibari.train)
    hibari.evaluation  harnesses, probes, scaling-law fits
    hibari.configs     ml-collections experiment files (leaves: no room imports them)

This package itself holds what every room stands on (`hibari.base`) and what composes the rooms:
the command line (`hibari.cli`) and the pipelines (`hibari.quickstart`, `hibari.sweep`) with
their reports. Imports run one way: hibari.cli / pipelines -> align, evaluation -> train ->
model, data -> base (tests/test_layout.py checks it).
"""
__version__ = "0.1.0"
