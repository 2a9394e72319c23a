"""The quickstart's data preparation with the model-based quality stage (data/quality.py) after the
rule filters: a hashed n-gram classifier, trained in-process, and optionally a perplexity filter.

    hibari data prepare --config configs/data/quality.py:runs/data/quality
    hibari data prepare --config configs/data/quality.py:runs/data/quality,runs/quickstart/pretrain

The argument is the output directory, optionally followed by `,CHECKPOINT`: a hibari model
(trained on reference text; the quickstart's pretraining run works) that turns on the perplexity
filter, keeping the 80% of each language's documents with the lowest bits/byte (its tokenizer
comes from the run's tokenizer record; set `perplexity_tokenizer` otherwise).

Classifier: reference = the vendored corpus, other = planted noise of the same documents
(`plant_noise`: shuffled words / character chunks, boilerplate, repeated lines, mixed-script
noise; `quality_classifier_other` unset), seed 0; documents with P(reference) < 0.5 are dropped.
For real data, point `quality_classifier_reference` at curated text and `quality_classifier_other`
at a sample of the raw crawl, or pass a saved model as `quality_classifier`.
`report.json["quality"]` counts the drops as `quality.classifier` / `quality.perplexity`.
"""
import os

from hibari.configs.data.quickstart import get_config as quickstart
from hibari.data import CORPUS_DIR


def get_config(arg: str = "runs/data/quality"):
    out, _, checkpoint = arg.partition(",")
    c = quickstart(out)
    c.quality_classifier_reference = [os.path.join(CORPUS_DIR, "*.jsonl.gz")]
    c.quality_classifier_threshold = 0.5
    c.quality_classifier_seed = 0
    if checkpoint:
        c.perplexity_checkpoint = checkpoint
        c.perplexity_keep = 0.8
        c.perplexity_max_tokens = 256
    return c
