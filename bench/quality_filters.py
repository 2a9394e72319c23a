"""Precision / recall of removing planted low-quality text from the bundled corpus: the Gopher /
Japanese rule filters alone, the hashed n-gram classifier, the perplexity filter, and rules + each.

    python bench/quality_filters.py --checkpoint runs/quickstart/pretrain \\
        [--tokenizer runs/quickstart/data/tokenizer.model] [--out bench/results/quality_filters.json]

Evaluation set: the bundled corpus (data/assets/corpus, cleaned as `prepare` cleans it) split by
crc32(id) % 4: fold 0 is evaluated, with `plant_noise(rate=--rate, seed=--seed)` replacing that
share of its documents by shuffled words (ja: character chunks), boilerplate, repeated lines or
mixed-script noise; folds 1-3 train the classifier: reference = their clean documents, other =
planted noise of the same documents (every kind, another seed). Threshold 0.5 on P(reference).
Perplexity filter: bits/byte of the first 256 tokens (BOS + 255 of the document) under the given
hibari checkpoint (hibari.evaluation.quality_scoring, as `hibari data prepare` scores), keeping
`--keep` of each language (lowest first); with rules, the percentile is over the rules' survivors
(the order `hibari data prepare` runs them in). The quickstart model was pretrained on the bundled
corpus except its held-out twentieth (crc32(id) % 20 == 0), so its clean documents are partly
seen text; the `heldout` rows restrict the evaluation to that unseen twentieth.

A "removed" document counts as a true positive when it is planted noise. Rates carry standard
errors (hibari.base.stats.rate: binomial over the documents in the denominator).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from hibari.base.stats import rate  # noqa: E402
from hibari.data import CORPUS_DIR  # noqa: E402
from hibari.data.clean import clean_docs  # noqa: E402
from hibari.data.filters import FilterStats, default_filters, filter_docs  # noqa: E402
from hibari.data.quality import (  # noqa: E402
    NOISE_KINDS,
    ClassifierConfig,
    percentile_keep,
    plant_noise,
    train_classifier,
)
from hibari.data.sources import read_docs  # noqa: E402
from hibari.evaluation.quality_scoring import CheckpointScorer  # noqa: E402


def rule_removed(docs) -> np.ndarray:
    kept = {d["id"] for d in filter_docs((dict(d) for d in docs), default_filters(), FilterStats())}
    return np.array([d["id"] not in kept for d in docs])


def scores(removed: np.ndarray, labels: list, subset: np.ndarray) -> dict:
    noise = np.array([lab is not None for lab in labels])
    r, n = removed[subset], noise[subset]
    out = {"removed": int(r.sum()), "precision": rate(n[r]), "recall": rate(r[n]),
           "clean_removed": rate(r[~n])}
    for kind in NOISE_KINDS:
        k = np.array([lab == kind for lab in labels])[subset]
        out[f"recall_{kind}"] = rate(r[k])
    return out


def fmt(x: dict) -> str:
    return "-" if x["rate"] is None else f"{x['rate']:.3f} ± {x['stderr']:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="hibari checkpoint for the perplexity filter")
    ap.add_argument("--tokenizer", help="its SentencePiece model (default: the run's tokenizer record)")
    ap.add_argument("--rate", type=float, default=0.3, help="share of evaluated documents corrupted")
    ap.add_argument("--keep", type=float, default=0.7, help="perplexity filter: share kept per language")
    ap.add_argument("--threshold", type=float, default=0.5, help="classifier: drop P(reference) below it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args(argv)
    t0 = time.time()

    docs = list(clean_docs(read_docs(os.path.join(str(CORPUS_DIR), "*.jsonl.gz"))))
    fold = [zlib.crc32(d["id"].encode()) % 4 for d in docs]
    pool = [d for d, f in zip(docs, fold) if f != 0]
    evaluated, labels = plant_noise([d for d, f in zip(docs, fold) if f == 0], rate=a.rate, seed=a.seed)
    langs = [d["meta"]["lang"] for d in evaluated]
    texts = [d["text"] for d in evaluated]

    other, _ = plant_noise(pool, rate=1.0, seed=a.seed + 1)
    t = time.time()
    clf = train_classifier([d["text"] for d in pool], [d["text"] for d in other], ClassifierConfig(seed=a.seed))
    train_s = time.time() - t
    t = time.time()
    p_ref = clf.score(texts)
    score_s = time.time() - t
    mb = sum(len(x.encode()) for x in texts) / 1e6

    tokenizer = a.tokenizer
    if tokenizer is None:
        from hibari.data.tokenizer import recorded_tokenizer
        tokenizer = (recorded_tokenizer(a.checkpoint) or {}).get("path")
    scorer = CheckpointScorer()(a.checkpoint, tokenizer, 256)
    t = time.time()
    bpb = scorer(texts)
    ppl_s = time.time() - t

    rules = rule_removed(evaluated)
    clf_removed = p_ref < a.threshold
    ppl_removed = ~percentile_keep(bpb, langs, a.keep)
    survivors = np.flatnonzero(~rules)
    after_rules = np.zeros(len(texts), bool)
    after_rules[survivors[~percentile_keep(bpb[survivors], [langs[i] for i in survivors], a.keep)]] = True
    methods = {"Gopher + Japanese rules": rules, "classifier": clf_removed, f"perplexity (keep {a.keep})": ppl_removed,
               "rules + classifier": rules | clf_removed, "rules + perplexity": rules | after_rules,
               "rules + classifier + perplexity": rules | clf_removed | after_rules}
    heldout = np.array([zlib.crc32(d["id"].split("#noise-")[0].encode()) % 20 == 0 for d in evaluated])
    subsets = {"all": np.ones(len(texts), bool), "heldout": heldout}
    results = {"config": vars(a), "docs": len(texts), "noise": sum(lab is not None for lab in labels),
               "noise_by_kind": {k: labels.count(k) for k in NOISE_KINDS}, "heldout_docs": int(heldout.sum()),
               "classifier": {"train_docs": len(pool) + len(other), "train_s": round(train_s, 2),
                              "score_MB_per_s": round(mb / score_s, 2)},
               "perplexity": {"docs_per_s": round(len(texts) / ppl_s, 1),
                              "median_bits_per_byte": {
                                  lang: {"clean": float(np.median([b for b, g, lab in zip(bpb, langs, labels)
                                                                   if g == lang and lab is None])),
                                         "noise": float(np.median([b for b, g, lab in zip(bpb, langs, labels)
                                                                   if g == lang and lab is not None]))}
                                  for lang in sorted(set(langs))}},
               "methods": {s: {m: scores(r, labels, sub) for m, r in methods.items()} for s, sub in subsets.items()}}
    results["wall_s"] = round(time.time() - t0, 1)

    print(f"{len(texts)} evaluated documents ({results['noise']} planted: {results['noise_by_kind']}); "
          f"classifier trained on {len(pool)} clean + {len(other)} noise documents in {train_s:.1f} s, "
          f"scores {mb / score_s:.1f} MB/s; perplexity {len(texts) / ppl_s:.1f} docs/s")
    cols = ["precision", "recall", "clean_removed"] + [f"recall_{k}" for k in NOISE_KINDS]
    for s in subsets:
        print(f"\n{s} ({int(subsets[s].sum())} docs)\n| method | removed | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 2) + "|")
        for m, r in results["methods"][s].items():
            print(f"| {m} | {r['removed']} | " + " | ".join(fmt(r[c]) for c in cols) + " |")
    print(f"\nwall {results['wall_s']} s")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
