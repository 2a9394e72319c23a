"""Tokenize and pack documents into fixed-length rows `tokens[t]`, `segment_ids[t]`.

Each document becomes `[bos] + ids + [eos]`. Segment ids number the documents of a row 1, 2, 3, ...
(0 is padding) and positions restart at 0 in each segment, so attention never crosses documents.

- greedy: documents are concatenated and cut every `seq_len` tokens; no padding except in the
  last row; a document cut at a row boundary continues as the first segment of the next row.
- best_fit: documents longer than `seq_len` are cut into `seq_len` chunks; chunks are placed by
  first-fit-decreasing within a buffer of `buffer_size` chunks; rows are padded.

Shards: `<source>-00000.npy` int32 `[rows, 2, seq_len]` (tokens, segment_ids), written to a
temporary name and renamed, plus `manifest.json` (token counts per source, rows, seq_len,
tokenizer path and sha256) written last.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import numpy as np

from hibari.base.segments import positions_from_segments  # noqa: F401 (the rows' convention)
from hibari.data.sources import Doc

Row = tuple[np.ndarray, np.ndarray]  # tokens[t], segment_ids[t]


def with_bos_eos(ids: Iterable[int], bos_id: int, eos_id: int) -> np.ndarray:
    return np.concatenate([[bos_id], np.asarray(list(ids), dtype=np.int64), [eos_id]]).astype(np.int32)


def pack_greedy(docs: Iterable[np.ndarray], seq_len: int, pad_id: int = 0) -> Iterator[Row]:
    tokens = np.full(seq_len, pad_id, np.int32)
    segments = np.zeros(seq_len, np.int32)
    fill, seg = 0, 0
    for doc in docs:
        start = 0
        while start < len(doc):
            take = min(len(doc) - start, seq_len - fill)
            seg += 1
            tokens[fill:fill + take] = doc[start:start + take]
            segments[fill:fill + take] = seg
            fill, start = fill + take, start + take
            if fill == seq_len:
                yield tokens.copy(), segments.copy()
                tokens[:], segments[:], fill, seg = pad_id, 0, 0, 0
    if fill:
        yield tokens, segments


def _rows_from_bins(bins: list[list[np.ndarray]], seq_len: int, pad_id: int) -> Iterator[Row]:
    for chunks in bins:
        tokens = np.full(seq_len, pad_id, np.int32)
        segments = np.zeros(seq_len, np.int32)
        fill = 0
        for seg, chunk in enumerate(chunks, 1):
            tokens[fill:fill + len(chunk)] = chunk
            segments[fill:fill + len(chunk)] = seg
            fill += len(chunk)
        yield tokens, segments


def first_fit_decreasing(chunks: list[np.ndarray], seq_len: int) -> list[list[np.ndarray]]:
    """Bins (rows) of chunks, each bin's total length <= seq_len; bins in order of creation."""
    bins: list[list[np.ndarray]] = []
    room: list[int] = []
    for chunk in sorted(chunks, key=len, reverse=True):
        for b, free in enumerate(room):
            if len(chunk) <= free:
                bins[b].append(chunk)
                room[b] -= len(chunk)
                break
        else:
            bins.append([chunk])
            room.append(seq_len - len(chunk))
    return bins


def pack_best_fit(docs: Iterable[np.ndarray], seq_len: int, pad_id: int = 0, buffer_size: int = 1024) -> Iterator[Row]:
    buffer: list[np.ndarray] = []
    for doc in docs:
        buffer += [doc[i:i + seq_len] for i in range(0, len(doc), seq_len)]
        if len(buffer) >= buffer_size:
            yield from _rows_from_bins(first_fit_decreasing(buffer, seq_len), seq_len, pad_id)
            buffer = []
    yield from _rows_from_bins(first_fit_decreasing(buffer, seq_len), seq_len, pad_id)


def pack_rows(docs: Iterable[np.ndarray], seq_len: int, method: str = "greedy", pad_id: int = 0,
              buffer_size: int = 1024) -> Iterator[Row]:
    if method == "greedy":
        return pack_greedy(docs, seq_len, pad_id)
    if method == "best_fit":
        return pack_best_fit(docs, seq_len, pad_id, buffer_size)
    raise ValueError(f"packing method must be 'greedy' or 'best_fit', not {method!r}")


# ------------------------------------------------------------------ tokenize + write shards
def tokenize_docs(docs: Iterable[Doc], sp, batch: int = 256, counts: dict | None = None) -> Iterator[np.ndarray]:
    """`[bos] + ids + [eos]` per document, encoding `batch` documents per call."""
    def flush(texts):
        for ids in sp.encode(texts):
            doc = with_bos_eos(ids, sp.bos_id(), sp.eos_id())
            if counts is not None:
                counts["docs"] += 1
                counts["tokens"] += len(doc)
            yield doc
    texts: list[str] = []
    for doc in docs:
        texts.append(doc["text"])
        if counts is not None:
            counts["chars"] += len(doc["text"])
        if len(texts) == batch:
            yield from flush(texts)
            texts = []
    yield from flush(texts)


def _save_atomic(path: str, array: np.ndarray):
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def write_shards(rows: Iterable[Row], out_dir: str, source: str, rows_per_shard: int = 4096) -> list[dict]:
    """`[rows, 2, seq_len]` int32 shards; returns `[{"path", "rows"}]` (paths relative to out_dir)."""
    shards, buf = [], []

    def flush():
        name = f"{source}-{len(shards):05d}.npy"
        _save_atomic(os.path.join(out_dir, name), np.stack([np.stack(r) for r in buf]).astype(np.int32))
        shards.append({"path": name, "rows": len(buf)})

    for row in rows:
        buf.append(row)
        if len(buf) == rows_per_shard:
            flush()
            buf = []
    if buf:
        flush()
    return shards


def pack_corpus(sources: dict[str, Iterable[Doc]], tokenizer_path: str, out_dir: str, seq_len: int,
                method: str = "greedy", rows_per_shard: int = 4096, buffer_size: int = 1024,
                split: str = "") -> dict:
    """Pack every source into its own shards and write `out_dir/manifest.json`.

    `split` names which documents these are (e.g. the held-out rule); it is recorded in the manifest.
    A source whose `<source>.done.json` matches seq_len, tokenizer and split is not redone (an
    interrupted run resumes)."""
    from tqdm import tqdm

    from hibari.data.tokenizer import file_sha256, load_tokenizer
    sp = load_tokenizer(tokenizer_path)
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"version": 1, "seq_len": seq_len, "method": method, "split": split,
                "tokenizer": {"path": os.path.abspath(tokenizer_path), "sha256": file_sha256(tokenizer_path),
                              "vocab_size": sp.get_piece_size(), "pad_id": sp.pad_id(),
                              "bos_id": sp.bos_id(), "eos_id": sp.eos_id()},
                "sources": {}}
    for name, docs in sources.items():
        done = os.path.join(out_dir, f"{name}.done.json")
        if os.path.exists(done):
            with open(done) as f:
                entry = json.load(f)
            if (entry["seq_len"], entry["tokenizer_sha256"], entry.get("split", "")) == (
                    seq_len, manifest["tokenizer"]["sha256"], split):
                manifest["sources"][name] = entry
                continue
        counts = {"docs": 0, "chars": 0, "tokens": 0}
        token_docs = tokenize_docs(tqdm(docs, desc=f"pack {name}", unit="doc"), sp, counts=counts)
        rows = pack_rows(token_docs, seq_len, method, pad_id=max(sp.pad_id(), 0), buffer_size=buffer_size)
        shards = write_shards(rows, out_dir, name, rows_per_shard)
        n_rows = sum(s["rows"] for s in shards)
        entry = {**counts, "rows": n_rows, "padding": n_rows * seq_len - counts["tokens"],
                 "chars_per_token": round(counts["chars"] / max(1, counts["tokens"] - 2 * counts["docs"]), 4),
                 "shards": shards, "seq_len": seq_len, "tokenizer_sha256": manifest["tokenizer"]["sha256"],
                 "split": split}
        with open(done + ".tmp", "w") as f:
            json.dump(entry, f)
        os.replace(done + ".tmp", done)
        manifest["sources"][name] = entry
    tmp = os.path.join(out_dir, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "manifest.json"))
    return manifest
