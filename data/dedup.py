"""Exact and near-duplicate removal.

Exact: a hash of the normalised text (NFKC, case-folded, whitespace removed); first one kept.

Near: MinHash over character n-grams (works for Japanese, which has no spaces) or word n-grams,
then LSH with `b` bands of `r` rows. Two documents of Jaccard similarity s share at least one
band with probability `s_curve(s, b, r) = 1 - (1 - s**r)**b`, which rises steepest near
`(1/b)**(1/r)`. Candidate pairs are verified against the signature estimate of their Jaccard
similarity, clustered with union-find, and each cluster keeps its first document in input order.

Scales past memory: signatures of each input shard are computed in a worker process and written
to disk as `.npy` (num_perm uint32 per document, whatever the document length); the band pass reads
them back, one band at a time.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Iterable, Iterator

import numpy as np

from hibari.base.progress import progress_bar
from hibari.data.sources import Doc, SourceStats, expand_paths, read_docs, write_jsonl

U64 = np.uint64
_MASK32 = U64(0xFFFFFFFF)


# ------------------------------------------------------------------ exact
def normalized_digest(text: str) -> bytes:
    key = "".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


@dataclass
class DedupStats:
    docs_in: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    clusters: int = 0  # near-duplicate clusters with more than one document
    removed: dict = field(default_factory=dict)  # removed id -> kept id (near and exact)


def exact_dedup(docs: Iterable[Doc], stats: DedupStats | None = None) -> Iterator[Doc]:
    """Stream documents whose normalised text was not seen before."""
    stats = stats if stats is not None else DedupStats()
    seen: dict[bytes, str] = {}
    for doc in docs:
        stats.docs_in += 1
        digest = normalized_digest(doc["text"])
        if digest in seen:
            stats.exact_removed += 1
            stats.removed[doc["id"]] = seen[digest]
            continue
        seen[digest] = doc["id"]
        yield doc


# ------------------------------------------------------------------ LSH math
def s_curve(s, bands: int, rows: int):
    """Probability that two documents of Jaccard similarity `s` become LSH candidates."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def implied_threshold(bands: int, rows: int) -> float:
    """Similarity where the S-curve is steepest, approximately (1/b)^(1/r)."""
    return (1.0 / bands) ** (1.0 / rows)


def choose_bands(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(b, r) with b*r <= num_perm minimising the weighted false-positive area below `threshold`
    and false-negative area above it under the S-curve. Verification removes false positives
    later, so weighting recall more (fp_weight < 0.5) is reasonable."""
    xs_lo, xs_hi = np.linspace(0, threshold, 201), np.linspace(threshold, 1, 201)
    best, best_cost = (1, 1), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(s_curve(xs_lo, b, r), xs_lo)
            fn = np.trapezoid(1 - s_curve(xs_hi, b, r), xs_hi)
            cost = fp_weight * fp + (1 - fp_weight) * fn
            if cost < best_cost:
                best, best_cost = (b, r), cost
    return best


# ------------------------------------------------------------------ MinHash
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64 that scrambles all bits."""
    x = x ^ (x >> U64(30))
    x = x * U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> U64(27))
    x = x * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


_WORD = re.compile(r"\w+")


def shingle_units(text: str, unit: str) -> np.ndarray:
    """uint64 codes of the text's units: characters (whitespace runs become one space, case
    folded) or words (`\\w+`, case folded, CRC32 each)."""
    text = " ".join(text.casefold().split())
    if unit == "char":
        return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(U64)
    if unit == "word":
        return np.fromiter((zlib.crc32(w.encode("utf-8")) for w in _WORD.findall(text)), dtype=U64)
    raise ValueError(f"unit must be 'char' or 'word', not {unit!r}")


def shingle_hashes(text: str, ngram: int, unit: str = "char") -> np.ndarray:
    """Distinct 64-bit hashes of the text's n-grams of units (the whole text if shorter)."""
    codes = shingle_units(text, unit)
    if len(codes) == 0:
        return np.zeros(1, dtype=U64)
    n = min(ngram, len(codes))
    windows = len(codes) - n + 1
    with np.errstate(over="ignore"):
        mixed = _mix64(codes + U64(1))
        h = mixed[:windows].copy()
        for j in range(1, n):  # polynomial hash of each window, mod 2^64
            h = h * U64(0x100000001B3) + mixed[j:windows + j]
        h = np.sort(_mix64(h))  # distinct values: repeated n-grams would only cost hashing work later
        return h[np.r_[True, h[1:] != h[:-1]]]  # = np.unique(h); its hash-based path is ~5x slower here


class MinHasher:
    """`num_perm` hash functions h_i(x) = ((a_i x + b_i) mod 2^64) >> 32 over 32-bit shingle keys
    (multiply-add-shift, a 2-universal family); the signature keeps each function's minimum."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, unit: str = "char", seed: int = 0,
                 block: int = 4096):
        rng = np.random.default_rng(seed)
        self.a = (rng.integers(0, 2**63, num_perm, dtype=np.int64).astype(U64) << U64(1)) | U64(1)
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.int64).astype(U64)
        self.num_perm, self.ngram, self.unit, self.block = num_perm, ngram, unit, block

    def signature(self, text: str) -> np.ndarray:
        """uint32[num_perm]; memory bounded by `block` shingles at a time. The `>> 32` is monotone,
        so it is applied once to the minima rather than to every (function, shingle) value."""
        keys = shingle_hashes(text, self.ngram, self.unit) >> U64(32)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=U64)
        a, b = self.a[:, None], self.b[:, None]
        with np.errstate(over="ignore"):
            for i in range(0, len(keys), self.block):
                hv = a * keys[None, i:i + self.block]  # (num_perm, block), wraps mod 2^64
                hv += b
                np.minimum(sig, hv.min(axis=1), out=sig)
        return (sig >> U64(32)).astype(np.uint32)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


# ------------------------------------------------------------------ clustering
class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int):
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the smaller index becomes the root: clusters keep their first document
            self.parent[max(ri, rj)] = min(ri, rj)


def band_keys(sigs: np.ndarray, band: int, rows: int) -> np.ndarray:
    """uint64 key of band `band` (rows band*r .. band*r+r-1) for every signature."""
    part = sigs[:, band * rows:(band + 1) * rows].astype(U64)
    key = np.zeros(len(sigs), dtype=U64)
    with np.errstate(over="ignore"):
        for j in range(rows):
            key = _mix64(key ^ (part[:, j] + U64(j << 32)))
    return key


MAX_PAIRS_PER_BUCKET = 64


def bucket_edges(members: list, sigs: list[np.ndarray], min_similarity: float | None = None,
                 max_pairs_per_bucket: int = MAX_PAIRS_PER_BUCKET) -> list[tuple]:
    """The pairs (i, j) that join the members of one LSH bucket (given in input order, with their
    signatures): each member to the first earlier one whose signature estimate reaches
    `min_similarity` (any earlier one without it); in buckets larger than
    `max_pairs_per_bucket` only the first member is tried. The local path and data.beam both
    cluster by these edges, so they find the same components."""
    edges = []
    all_pairs = len(members) <= max_pairs_per_bucket
    for k in range(1, len(members)):
        for a in range(k if all_pairs else 1):
            if min_similarity is None or estimate_jaccard(sigs[a], sigs[k]) >= min_similarity:
                edges.append((members[a], members[k]))
                break
    return edges


def cluster_signatures(sigs: np.ndarray, bands: int, rows: int, min_similarity: float | None = None,
                       max_pairs_per_bucket: int = MAX_PAIRS_PER_BUCKET) -> UnionFind:
    """Union-find over LSH band collisions joined by `bucket_edges`."""
    uf = UnionFind(len(sigs))
    for band in range(bands):
        keys = band_keys(sigs, band, rows)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(keys)]
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            members = np.sort(order[s:e]).tolist()
            for i, j in bucket_edges(members, [sigs[m] for m in members], min_similarity, max_pairs_per_bucket):
                uf.union(i, j)
    return uf


@dataclass
class NearDedupConfig:
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    unit: str = "char"
    bands: int | None = None  # chosen from threshold and num_perm when None
    rows: int | None = None
    seed: int = 0
    verify: bool = True  # check candidates against the signature estimate

    def resolved(self) -> "NearDedupConfig":
        if self.bands and self.rows:
            if self.bands * self.rows > self.num_perm:
                raise ValueError(f"bands*rows = {self.bands * self.rows} exceeds num_perm {self.num_perm}")
            return self
        b, r = choose_bands(self.threshold, self.num_perm, fp_weight=0.3 if self.verify else 0.5)
        return NearDedupConfig(**{**self.__dict__, "bands": b, "rows": r})

    def describe(self) -> dict:
        c = self.resolved()
        grid = np.round(np.linspace(0, 1, 11), 2)
        return {"threshold": c.threshold, "num_perm": c.num_perm, "bands": c.bands, "rows": c.rows,
                "ngram": c.ngram, "unit": c.unit, "verify": c.verify,
                "implied_threshold": round(implied_threshold(c.bands, c.rows), 4),
                "s_curve": {str(s): round(float(p), 4) for s, p in zip(grid, s_curve(grid, c.bands, c.rows))}}


def near_duplicates(sigs: np.ndarray, config: NearDedupConfig) -> dict[int, int]:
    """{removed index: kept index} for every document whose cluster keeps an earlier one."""
    c = config.resolved()
    uf = cluster_signatures(sigs, c.bands, c.rows, c.threshold if c.verify else None)
    roots = np.array([uf.find(i) for i in range(len(sigs))], dtype=np.int64)
    return {int(i): int(r) for i, r in enumerate(roots) if r != i}


def near_dedup_docs(docs: Iterable[Doc], config: NearDedupConfig = NearDedupConfig(),
                    stats: DedupStats | None = None) -> list[Doc]:
    """In-memory convenience for small collections: the documents each cluster keeps."""
    docs = list(docs)
    hasher = MinHasher(config.num_perm, config.ngram, config.unit, config.seed)
    sigs = np.stack([hasher.signature(d["text"]) for d in docs]) if docs else np.zeros((0, config.num_perm), np.uint32)
    removed = near_duplicates(sigs, config)
    if stats is not None:
        stats.docs_in += len(docs)
        stats.near_removed += len(removed)
        stats.clusters += len(set(removed.values()))
        stats.removed.update({docs[i]["id"]: docs[k]["id"] for i, k in removed.items()})
    return [d for i, d in enumerate(docs) if i not in removed]


# ------------------------------------------------------------------ files, in parallel
def _signature_shard(args) -> tuple[str, int]:
    path, out_prefix, cfg, text_field, key, nonempty = args
    done = out_prefix + ".done.json"
    if os.path.exists(done) and os.path.exists(out_prefix + ".npy"):  # finished by an earlier run
        with open(done) as f:
            record = json.load(f)
        if record.get("key") == key:
            return out_prefix, record["docs"]
    hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.unit, cfg.seed)
    ids, sigs = [], []
    for doc in read_docs(path, text_field=text_field, stats=SourceStats(), nonempty=nonempty):
        ids.append(doc["id"])
        sigs.append(hasher.signature(doc["text"]))
    sigs = np.stack(sigs) if sigs else np.zeros((0, cfg.num_perm), np.uint32)
    _write_json(out_prefix + ".ids.json", ids)
    np.save(out_prefix + ".tmp.npy", sigs)
    os.replace(out_prefix + ".tmp.npy", out_prefix + ".npy")
    _write_json(done, {"key": key, "docs": len(ids)})  # written last: marks the shard done
    return out_prefix, len(ids)


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def file_key(path: str) -> str:
    """What identifies a file's version cheaply: its absolute path, size and mtime (ns)."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def compute_signatures(paths: list[str], work_dir: str, config: NearDedupConfig,
                       processes: int = 1, text_field: str = "text", keys: list[str] | None = None,
                       nonempty: bool = False) -> list[str]:
    """One signature file per input shard (`work_dir/sig-00000.npy` + `.ids.json` + `.done.json`).

    A shard is reused only when its `.done.json` records the same key: the input's `keys[i]`
    (default: `file_key`, path + size + mtime) and the MinHash parameters."""
    os.makedirs(work_dir, exist_ok=True)
    keys = keys if keys is not None else [file_key(p) for p in paths]
    params = json.dumps({"num_perm": config.num_perm, "ngram": config.ngram, "unit": config.unit,
                         "seed": config.seed, "text_field": text_field}, sort_keys=True)
    jobs = [(p, os.path.join(work_dir, f"sig-{i:05d}"), config, text_field, f"{k} {params}", nonempty)
            for i, (p, k) in enumerate(zip(paths, keys))]
    shards = progress_bar("minhash", len(jobs), unit=" shards")  # tqdm on a tty, else lines
    if processes > 1 and len(jobs) > 1:
        with get_context("spawn").Pool(processes) as pool:
            done = list(shards.track(pool.imap(_signature_shard, jobs)))
    else:
        done = [_signature_shard(j) for j in shards.track(jobs)]
    return [prefix for prefix, _ in done]


def dedup_files(inputs, output: str, config: NearDedupConfig = NearDedupConfig(), work_dir: str | None = None,
                processes: int = 1, text_field: str = "text", exact: bool = True,
                input_keys: list[str] | None = None, nonempty: bool = False) -> dict:
    """Near-dedup JSONL/text/parquet shards into one JSONL `output` (other fields preserved) and
    `output + ".removed.jsonl"` with `{"id", "kept_id", "reason"}` per removed document; both
    are written under temporary names and renamed when complete.

    Signature shards in `work_dir` are reused while their input is unchanged: `input_keys[i]`
    names input i's version (default: path + size + mtime). `nonempty`: an input file without
    a usable document is an error naming it."""
    paths = expand_paths(inputs)
    work_dir = work_dir or output + ".work"
    config = config.resolved()
    prefixes = compute_signatures(paths, work_dir, config, processes, text_field, input_keys, nonempty)
    sigs = np.concatenate([np.load(p + ".npy") for p in prefixes])
    ids = [i for p in prefixes for i in json.load(open(p + ".ids.json"))]
    removed = near_duplicates(sigs, config)

    stats = DedupStats()
    clusters = len(set(removed.values()))

    def kept_docs(log):
        seen: dict[bytes, str] = {}  # normalised-text digest -> id of the kept document
        for i, doc in enumerate(read_docs(paths, text_field=text_field)):
            stats.docs_in += 1
            digest = normalized_digest(doc["text"])
            kept_id = ids[removed[i]] if i in removed else seen.get(digest) if exact else None
            if kept_id is None:
                seen.setdefault(digest, doc["id"])
                yield doc
                continue
            reason = "exact" if seen.get(digest) == kept_id else "near"
            stats.exact_removed += reason == "exact"
            stats.near_removed += reason == "near"
            log.write(json.dumps({"id": doc["id"], "kept_id": kept_id, "reason": reason},
                                 ensure_ascii=False) + "\n")

    removed_log = output + ".removed.jsonl"
    try:
        with open(removed_log + ".tmp", "w", encoding="utf-8") as log:
            kept = write_jsonl(output, kept_docs(log))  # atomic: a temporary name, then renamed
    except BaseException:
        os.remove(removed_log + ".tmp")
        raise
    os.replace(removed_log + ".tmp", removed_log)
    return {"docs_in": stats.docs_in, "docs_out": kept, "near_removed": stats.near_removed,
            "exact_removed": stats.exact_removed, "near_clusters": clusters,
            "bytes_per_doc_signatures": int(sigs.itemsize * sigs.shape[1]),
            "config": config.describe()}
