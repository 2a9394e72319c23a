"""The vendored bilingual corpus end to end (clean, filter, dedup, tokenizer, packed + held-out rows).

    hibari data prepare --config configs/data/quickstart.py:runs/data/quickstart

The argument is the output directory. `get_config` returns the fields of
`hibari.data.pipeline.PrepareConfig`.
"""
import os

import ml_collections

from hibari.data import CORPUS_DIR


def get_config(arg: str = "runs/data/quickstart") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.inputs = [os.path.join(CORPUS_DIR, "*.jsonl.gz")]
    c.out = arg
    c.languages = ("en", "ja")
    c.dedup = ml_collections.ConfigDict({"threshold": 0.8, "num_perm": 128, "ngram": 5, "unit": "char"})
    c.processes = 2
    c.tokenizer_vocab_size = 8000
    c.seq_len = 512
    c.pack_method = "best_fit"
    c.source_field = "lang"
    c.heldout_every = 20
    return c
