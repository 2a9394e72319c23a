"""data/: sources, cleaning, quality filters, MinHash dedup, SentencePiece, packing, the loader.

Every stage is a streaming function over documents, usable alone from Python and from
`hibari data`. `CORPUS_DIR` is the vendored bilingual corpus (assets/SOURCES.md).
"""
from hibari.base.resources import resource_path

CORPUS_DIR = resource_path("hibari.data", "assets", "corpus")
