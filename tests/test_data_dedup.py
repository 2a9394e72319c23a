"""Dedup against independent references: brute-force Jaccard on real text, the S-curve formula
measured empirically, hand-built clusters, and the natural duplicates of the vendored corpus."""
import json
import os
import re

import numpy as np
import pytest

from hibari.data import CORPUS_DIR
from hibari.data.dedup import (
    MinHasher,
    NearDedupConfig,
    band_keys,
    choose_bands,
    dedup_files,
    estimate_jaccard,
    exact_dedup,
    implied_threshold,
    near_dedup_docs,
    near_duplicates,
    s_curve,
    shingle_hashes,
)
from hibari.data.sources import read_docs

CORPUS = str(CORPUS_DIR)


@pytest.fixture(scope="module")
def english():
    return {d["id"]: d for d in read_docs(os.path.join(CORPUS, "en.jsonl.gz"))}


def char_shingles(text, n=5):
    """Reference: the set of character n-grams of the case-folded, whitespace-collapsed text."""
    t = " ".join(text.casefold().split())
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def jaccard(a, b):
    return len(a & b) / len(a | b)


def mutate(text, fraction, rng, vocab):
    """Replace `fraction` of the words with random corpus words (a near duplicate)."""
    words = text.split()
    for i in rng.choice(len(words), int(round(fraction * len(words))), replace=False):
        words[i] = vocab[rng.integers(len(vocab))]
    return " ".join(words)


def test_s_curve_formula():
    assert s_curve(0.0, 20, 5) == 0.0 and s_curve(1.0, 20, 5) == 1.0
    assert s_curve(0.6, 20, 5) == pytest.approx(1 - (1 - 0.6 ** 5) ** 20)
    assert implied_threshold(20, 5) == pytest.approx(0.05 ** 0.2)
    b, r = choose_bands(0.8, 128)
    assert b * r <= 128 and abs(implied_threshold(b, r) - 0.8) < 0.06
    assert np.all(np.diff(s_curve(np.linspace(0, 1, 50), b, r)) >= 0)


def test_minhash_estimate_matches_brute_force_jaccard(english):
    rng = np.random.default_rng(0)
    vocab = sorted({w for d in english.values() for w in d["text"].split()})
    hasher = MinHasher(num_perm=256, ngram=5, unit="char", seed=1)
    errors = []
    for doc_id in list(english)[::20]:
        text = english[doc_id]["text"]
        for fraction in (0.02, 0.1, 0.3):
            other = mutate(text, fraction, rng, vocab)
            true = jaccard(char_shingles(text), char_shingles(other))
            est = estimate_jaccard(hasher.signature(text), hasher.signature(other))
            sigma = np.sqrt(true * (1 - true) / 256)
            errors.append((est - true) / max(sigma, 1e-3))
    errors = np.array(errors)
    assert np.all(np.abs(errors) < 4.5), errors
    assert abs(errors.mean()) < 0.5  # unbiased


def test_signature_matches_python_integer_reference(english):
    h = MinHasher(num_perm=16, ngram=5, seed=3)
    text = english["kjv/Ruth/001"]["text"][:400]
    keys = [int(k) >> 32 for k in shingle_hashes(text, 5)]
    want = [min(((int(a) * x + int(b)) % 2**64) >> 32 for x in keys) for a, b in zip(h.a, h.b)]
    assert h.signature(text).tolist() == want
    # shingles: the distinct character 5-grams of the normalised text (no hash collisions here)
    assert len(keys) == len(char_shingles(text))


def test_signature_independent_of_block_size(english):
    text = english["kjv/Psalms/119"]["text"]  # the longest chapter
    full = MinHasher(128, block=1 << 20).signature(text)
    assert np.array_equal(full, MinHasher(128, block=100).signature(text))


def test_s_curve_holds_empirically(english):
    """Sets of distinct real words with exact Jaccard s: the share of pairs sharing a band
    matches 1-(1-s^r)^b (each trial uses fresh hash functions)."""
    words = sorted({w for d in english.values() for w in re.findall(r"[a-z]+", d["text"].casefold())})
    bands, rows, n, trials = 20, 5, 60, 150
    rng = np.random.default_rng(0)
    for k in (28, 40, 48, 53):  # shared words of 60 -> s = k / (120 - k)
        s = k / (2 * n - k)
        hits = 0
        for t in range(trials):
            pick = rng.choice(len(words), 2 * n - k, replace=False)
            a = [words[i] for i in pick[:n]]
            b = [words[i] for i in pick[:k]] + [words[i] for i in pick[n:]]
            h = MinHasher(bands * rows, ngram=1, unit="word", seed=1000 * k + t)
            sigs = np.stack([h.signature(" ".join(a)), h.signature(" ".join(b))])
            hits += any(band_keys(sigs, j, rows)[0] == band_keys(sigs, j, rows)[1] for j in range(bands))
        p = float(s_curve(s, bands, rows))
        assert abs(hits / trials - p) < 4 * np.sqrt(p * (1 - p) / trials) + 0.02, (s, hits / trials, p)


def test_recall_and_false_positives_on_injected_near_duplicates(english):
    rng = np.random.default_rng(1)
    vocab = sorted({w for d in english.values() for w in d["text"].split()})
    bases = [english[i] for i in list(english)[::8]]
    docs, pairs = [], []
    for base in bases:
        docs.append(base)
        for fraction in (0.01, 0.03, 0.25, 0.5):
            text = mutate(base["text"], fraction, rng, vocab)
            pairs.append((len(docs), base["id"], jaccard(char_shingles(base["text"]), char_shingles(text))))
            docs.append({"id": f"{base['id']}~{fraction}", "text": text, "meta": {}})
    config = NearDedupConfig(threshold=0.8, num_perm=128, ngram=5)
    removed = near_duplicates(np.stack([MinHasher(128, 5).signature(d["text"]) for d in docs]), config)
    index = {d["id"]: i for i, d in enumerate(docs)}
    found = {(i, base): removed.get(i) == index[base] for i, base, _ in pairs}
    high = [found[(i, b)] for i, b, j in pairs if j >= 0.9]
    low = [found[(i, b)] for i, b, j in pairs if j <= 0.6]
    assert len(high) >= 40 and len(low) >= 40
    assert np.mean(high) >= 0.95 and np.mean(low) <= 0.05, (np.mean(high), np.mean(low))


def test_clusters_keep_their_first_document(english):
    a, b, c = (english[i] for i in ("botchan/0003", "kjv/Ruth/001", "botchan/0040"))
    shout = {**a, "id": "a-upper", "text": a["text"].upper()}        # same after case folding
    b2 = {**b, "id": "b-edit", "text": b["text"].replace("Naomi", "Noemi", 1)}
    stats_docs = [a, b, c, shout, b2]
    from hibari.data.dedup import DedupStats
    stats = DedupStats()
    kept = near_dedup_docs(stats_docs, NearDedupConfig(threshold=0.8), stats)
    assert [d["id"] for d in kept] == [a["id"], b["id"], c["id"]]
    assert stats.removed == {"a-upper": a["id"], "b-edit": b["id"]}
    assert [d["id"] for d in exact_dedup([a, shout, c])] == [a["id"], c["id"]]


@pytest.mark.slow
def test_dedup_files_on_vendored_corpus(tmp_path):
    """The real corpus: exact duplicates (manpages installed under two names) and near ones
    (2 Kings 19 / Isaiah 37); every near removal is checked against brute-force Jaccard."""
    out = str(tmp_path / "dedup.jsonl")
    inputs = [os.path.join(CORPUS, "en.jsonl.gz"), os.path.join(CORPUS, "ja.jsonl.gz")]
    result = dedup_files(inputs, out, NearDedupConfig(threshold=0.8), processes=2)
    texts = {d["id"]: d["text"] for d in read_docs(inputs)}
    removed = [json.loads(l) for l in open(out + ".removed.jsonl", encoding="utf-8")]
    kept = list(read_docs(out))
    assert result["docs_in"] == len(texts) == len(kept) + len(removed)
    assert {r["id"] for r in removed}.isdisjoint(d["id"] for d in kept)
    assert {r["kept_id"] for r in removed} <= {d["id"] for d in kept}
    assert all(set(d["meta"]) == {"source", "lang"} for d in kept)  # other fields preserved
    exact = [r for r in removed if r["reason"] == "exact"]
    near = [r for r in removed if r["reason"] == "near"]
    assert len(exact) >= 50 and len(near) >= 10
    assert all(" ".join(texts[r["id"]].casefold().split()) == " ".join(texts[r["kept_id"]].casefold().split())
               for r in exact)
    sims = [jaccard(char_shingles(texts[r["id"]]), char_shingles(texts[r["kept_id"]])) for r in near]
    assert min(sims) >= 0.7, sorted(sims)[:5]
    assert {"id": "kjv/Isaiah/037", "kept_id": "kjv/2Kings/019", "reason": "near"} in removed
    # a rerun reuses the signature shards already on disk
    work = out + ".work"
    mtimes = {f: os.path.getmtime(os.path.join(work, f)) for f in os.listdir(work)}
    assert dedup_files(inputs, out, NearDedupConfig(threshold=0.8))["docs_out"] == len(kept)
    assert mtimes == {f: os.path.getmtime(os.path.join(work, f)) for f in os.listdir(work)}
