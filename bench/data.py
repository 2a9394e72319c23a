"""Throughput of each data-pipeline stage on the vendored corpus (or any JSONL inputs).

    python bench/data.py
    python bench/data.py --input 'corpus/*.jsonl.gz' --processes 2 --out bench/results.jsonl

Stages, each timed alone on the output of the one before: read, clean, filters, MinHash
signatures (one process), dedup end to end (exact + signatures + LSH + write, `--processes`),
tokenizer training, packing (tokenize + pack + write shards) and the loader (batches/s).
Prints one JSON line (device, versions, load average, per-stage docs/s and MB/s of UTF-8 text);
--out FILE appends it to a JSONL file. Results are recorded in BENCHMARKS.md.

--compare-datasketch (on when datasketch is installed: `pip install -e .[bench]`) adds, in the same
run, hibari's MinHash + LSH against datasketch's MinHash + MinHashLSH on an evaluation set: the
corpus plus one edited copy of a sample of its documents (random word replacements for English,
character replacements for Japanese), each pair's true Jaccard computed by brute force on the
character 5-gram sets. Both use the same shingles, num_perm and threshold; each picks its own
(b, r). Reported for each: signature and end-to-end dedup docs/s (one process, in memory), recall
on pairs with J >= threshold + 0.05, false removals on pairs with J <= threshold - 0.2, removals
whose true J to the kept document is below 0.7, and bytes per document held while deduplicating
(tracemalloc peak of the index phase, signatures included), again on documents 4x longer.
datasketch runs with its default SHA-1 hashfunc and, as a fairer speed check, with zlib.crc32.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
import zlib
from importlib import util
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.report import cpu_model, emit, versions  # noqa: E402
from hibari.data import CORPUS_DIR  # noqa: E402
from hibari.data.clean import clean_docs  # noqa: E402
from hibari.data.dedup import MinHasher, NearDedupConfig, dedup_files, near_duplicates  # noqa: E402
from hibari.data.filters import default_filters, filter_docs  # noqa: E402
from hibari.data.loader import PackedLoader  # noqa: E402
from hibari.data.pack import pack_corpus  # noqa: E402
from hibari.data.sources import read_docs, write_jsonl  # noqa: E402
from hibari.data.tokenizer import train_tokenizer  # noqa: E402

CORPUS = os.path.join(CORPUS_DIR, "*.jsonl.gz")


def environment() -> dict:
    return {"device": cpu_model(), "cpus": os.cpu_count(),
            "versions": versions("numpy", "sentencepiece", "grain")}


def text_bytes(docs) -> int:
    return sum(len(d["text"].encode("utf-8")) for d in docs)


def timed(name: str, fn, results: dict, docs_in: list | None = None):
    """Run `fn()`; record docs/s and MB/s of the input documents' text (`docs_in`, else the output)."""
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    docs = out if docs_in is None else docs_in
    results[name] = {"docs": len(docs), "seconds": round(seconds, 3), "docs_per_s": round(len(docs) / seconds, 1),
                     "mb_per_s": round(text_bytes(docs) / seconds / 1e6, 3)}
    return out


def bench_loader(packed_dir: str, batch_size: int, seq_len: int, batches: int) -> dict:
    loader = PackedLoader(packed_dir, batch_size=batch_size, seq_len=seq_len, seed=0)
    it = iter(loader)
    next(it)  # start the prefetch threads outside the timing
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    return {"batches": batches, "batch_size": batch_size, "seq_len": seq_len,
            "batches_per_s": round(batches / seconds, 1),
            "tokens_per_s": round(batches * batch_size * seq_len / seconds)}


# ------------------------------------------------------------------ hibari vs datasketch
def shingle_set(text: str, n: int = 5) -> set[str]:
    """Character n-grams of the case-folded, whitespace-collapsed text: the shingles hibari hashes."""
    t = " ".join(text.casefold().split())
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb)


def edited_copy(doc: dict, rate: float, rng, vocab: list[str]) -> str:
    """Replace `rate` of the words (English) or characters (Japanese and other unspaced text)."""
    if doc["meta"].get("lang") == "en":
        units, sep, pool = doc["text"].split(), " ", vocab
    else:
        units, sep = list(doc["text"]), ""
        pool = [c for c in units if not c.isspace()] or units
    for i in rng.choice(len(units), int(round(rate * len(units))), replace=False):
        units[i] = pool[rng.integers(len(pool))]
    return sep.join(units)


def eval_set(docs: list[dict], copies: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Corpus texts followed by one edited copy of `copies` sampled documents; returns the texts,
    the (source, copy) index pairs and their true Jaccard similarity."""
    rng = np.random.default_rng(seed)
    vocab = sorted({w for d in docs if d["meta"].get("lang") == "en" for w in d["text"].split()})
    texts = [d["text"] for d in docs]
    sources = np.sort(rng.choice(len(docs), min(copies, len(docs)), replace=False))
    pairs, sims = [], []
    for src in sources:  # edit rates log-uniform: true J spreads over ~0.2 .. 1
        en = docs[src]["meta"].get("lang") == "en"
        rate = float(np.exp(rng.uniform(np.log(0.003), np.log(0.5 if en else 0.15))))
        texts.append(edited_copy(docs[src], rate, rng, vocab))
        pairs.append((int(src), len(texts) - 1))
        sims.append(jaccard(texts[src], texts[-1]))
    return texts, np.array(pairs, dtype=np.int64), np.array(sims)


def hibari_signatures(texts, cfg):
    hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.unit, cfg.seed)
    return np.stack([hasher.signature(t) for t in texts])


def hibari_index(sigs, cfg) -> np.ndarray:
    """keeper[i]: the document i's cluster keeps (i itself when kept)."""
    keeper = np.arange(len(sigs))
    for i, k in near_duplicates(sigs, cfg).items():
        keeper[i] = k
    return keeper


def datasketch_signatures(texts, cfg, **kwargs):
    from datasketch import MinHash
    return MinHash.bulk(([s.encode("utf-8") for s in shingle_set(t, cfg.ngram)] for t in texts),
                        num_perm=cfg.num_perm, **kwargs)


def datasketch_crc32_signatures(texts, cfg):
    """datasketch with a cheaper hashfunc than its default SHA-1 (its docs suggest a fast hash)."""
    return datasketch_signatures(texts, cfg, hashfunc=zlib.crc32)


def datasketch_index(minhashes, cfg) -> np.ndarray:
    """The usual datasketch dedup loop: a document with any LSH candidate among the kept ones is
    removed (kept: the earliest candidate), otherwise inserted. Candidates are not verified."""
    from datasketch import MinHashLSH
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    keeper = np.arange(len(minhashes))
    for i, m in enumerate(minhashes):
        candidates = lsh.query(m)
        if candidates:
            keeper[i] = min(candidates)
        else:
            lsh.insert(i, m)
    return keeper


SYSTEMS = {"hibari": (hibari_signatures, hibari_index), "datasketch": (datasketch_signatures, datasketch_index),
           "datasketch_crc32": (datasketch_crc32_signatures, datasketch_index)}


def held_bytes(system: str, texts: list[str], cfg) -> dict:
    """tracemalloc peaks: the index phase (signatures + LSH state; divided by the document count)
    and the signature phase (transient working memory of one document, in MB)."""
    signatures, index = SYSTEMS[system]
    tracemalloc.start()
    sigs = signatures(texts, cfg)
    sig_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    index(sigs, cfg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"held_bytes_per_doc": round(peak / len(texts)), "signature_phase_peak_mb": round(sig_peak / 1e6, 2)}


def compare_dedup(docs: list[dict], args) -> dict:
    import datasketch
    from datasketch import MinHashLSH
    cfg = NearDedupConfig(threshold=args.threshold, num_perm=128, ngram=5, unit="char").resolved()
    texts, pairs, sims = eval_set(docs, args.copies)
    above, below = sims >= cfg.threshold + 0.05, sims <= cfg.threshold - 0.2
    ds_lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    out = {"datasketch_version": datasketch.__version__, "docs": len(texts), "pairs": len(pairs),
           "pairs_above": int(above.sum()), "pairs_below": int(below.sum()),
           "true_jaccard_histogram": np.histogram(sims, bins=np.linspace(0, 1, 11))[0].tolist(),
           "threshold": cfg.threshold, "num_perm": cfg.num_perm, "shingles": "char 5-grams",
           "nbytes_text": sum(len(t.encode("utf-8")) for t in texts)}
    rng = np.random.default_rng(1)  # 4x longer documents: each text followed by 3 random others
    mem_texts = texts[:args.mem_docs]
    long_texts = ["\n".join([t] + [mem_texts[j] for j in rng.choice(len(mem_texts), 3, replace=False)])
                  for t in mem_texts]
    for name, (signatures, index) in SYSTEMS.items():
        t0 = time.perf_counter()
        sigs = signatures(texts, cfg)
        t1 = time.perf_counter()
        keeper = index(sigs, cfg)
        t2 = time.perf_counter()
        same = keeper[pairs[:, 0]] == keeper[pairs[:, 1]]
        removed = np.flatnonzero(keeper != np.arange(len(texts)))
        removed_sims = np.array([jaccard(texts[i], texts[keeper[i]]) for i in removed])
        b, r = (cfg.bands, cfg.rows) if name == "hibari" else (ds_lsh.b, ds_lsh.r)
        out[name] = {
            "bands": b, "rows": r, "verify": name == "hibari",
            "signature_docs_per_s": round(len(texts) / (t1 - t0), 1),
            "dedup_docs_per_s": round(len(texts) / (t2 - t0), 1),
            "seconds": [round(t1 - t0, 3), round(t2 - t1, 3)],
            "recall_above": round(float(same[above].mean()), 4),
            "false_removal_rate_below": round(float(same[below].mean()), 4),
            "removed": len(removed), "removed_below_0.7": int((removed_sims < 0.7).sum()),
            "min_removed_jaccard": round(float(removed_sims.min()), 4) if len(removed) else None,
            "memory": {"docs": len(mem_texts),
                       "1x": {"mean_chars": round(np.mean([len(t) for t in mem_texts])), **held_bytes(name, mem_texts, cfg)},
                       "4x": {"mean_chars": round(np.mean([len(t) for t in long_texts])), **held_bytes(name, long_texts, cfg)}},
        }
    for other in ("datasketch", "datasketch_crc32"):
        out[f"speedup_vs_{other}"] = {k: round(out["hibari"][k] / out[other][k], 2)
                                      for k in ("signature_docs_per_s", "dedup_docs_per_s")}
    return out


def run(args) -> dict:
    results: dict = {}
    load_before = os.getloadavg()
    docs = timed("read", lambda: list(read_docs(args.input)), results)
    cleaned = timed("clean", lambda: list(clean_docs(docs)), results, docs)
    kept = timed("filters", lambda: list(filter_docs(cleaned, default_filters())), results, cleaned)
    results["filters"]["docs_out"] = len(kept)
    hasher = MinHasher(num_perm=128, ngram=5, unit="char")
    timed("minhash", lambda: [hasher.signature(d["text"]) for d in kept], results, kept)
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(os.path.join(tmp, "kept.jsonl"), kept)
        dedup = timed("dedup", lambda: dedup_files(
            [os.path.join(tmp, "kept.jsonl")], os.path.join(tmp, "dedup.jsonl"), NearDedupConfig(threshold=0.8),
            work_dir=os.path.join(tmp, "work"), processes=args.processes), results, kept)
        results["dedup"].update(docs_out=dedup["docs_out"], processes=args.processes)
        unique = list(read_docs(os.path.join(tmp, "dedup.jsonl")))
        model = os.path.join(tmp, "tok.model")
        timed("tokenizer", lambda: train_tokenizer(unique, model, vocab_size=args.vocab_size), results, unique)
        results["tokenizer"]["vocab_size"] = args.vocab_size
        by_lang = {lang: [d for d in unique if d["meta"].get("lang") == lang]
                   for lang in sorted({d["meta"].get("lang", "all") for d in unique})}
        manifest = timed("pack", lambda: pack_corpus(by_lang, model, os.path.join(tmp, "packed"), args.seq_len,
                                                    "best_fit"), results, unique)
        tokens = sum(e["tokens"] for e in manifest["sources"].values())
        results["pack"].update(tokens=tokens, tokens_per_s=round(tokens / results["pack"]["seconds"]))
        results["loader"] = bench_loader(os.path.join(tmp, "packed"), args.batch_size, args.seq_len, args.batches)
    compare = compare_dedup(docs, args) if args.compare_datasketch else None
    env = environment()
    if compare:
        env["versions"]["datasketch"] = compare["datasketch_version"]
    return {"bench": "data", "input": args.input, **env,
            "loadavg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)], "stages": results,
            **({"dedup_vs_datasketch": compare} if compare else {})}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", default=CORPUS, help="JSONL/text/parquet files or globs")
    p.add_argument("--processes", type=int, default=2, help="dedup signature worker processes")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="loader batch (rows)")
    p.add_argument("--batches", type=int, default=200, help="loader batches timed")
    p.add_argument("--compare-datasketch", action=argparse.BooleanOptionalAction,
                   default=util.find_spec("datasketch") is not None,
                   help="hibari vs datasketch MinHash LSH (default: on when datasketch is installed)")
    p.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard threshold (comparison)")
    p.add_argument("--copies", type=int, default=800, help="edited copies added to the evaluation set")
    p.add_argument("--mem-docs", type=int, default=400, help="documents in the tracemalloc memory runs")
    p.add_argument("--out", help="append the result line to this JSONL file")
    args = p.parse_args(argv)
    result = run(args)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
