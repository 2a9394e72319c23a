"""Tokenize and pack documents into fixed-length rows `tokens[t]`, `segment_ids[t]`.

Each document becomes `[bos] + ids + [eos]`. Segment ids number the documents of a row 1, 2, 3, ...
(0 is padding) and positions restart at 0 in each segment, so attention never crosses documents.

- greedy: documents are concatenated and cut every `seq_len` tokens; no padding except in the
  last row; a document cut at a row boundary continues as the first segment of the next row.
- best_fit: documents longer than `seq_len` are cut into `seq_len` chunks; chunks are placed by
  first-fit-decreasing within a buffer of `buffer_size` chunks; rows are padded.

Shards: `<source>-00000.npy` int32 `[rows, 2, seq_len]` (tokens, segment_ids), written to a
temporary name and renamed, plus `manifest.json` (token counts per source, rows, seq_len,
tokenizer path and sha256) written last. Repacking a packed directory stages the new shards and
swaps them in together (`pack_corpus`).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import numpy as np

from hibari.base.progress import progress_bar
from hibari.base.segments import positions_from_segments  # noqa: F401 (the rows' convention)
from hibari.data.sources import Doc

Row = tuple[np.ndarray, np.ndarray]  # tokens[t], segment_ids[t]
ROWS_PER_SHARD = 4096  # rows per .npy shard
BEST_FIT_BUFFER = 1024  # chunks first-fit-decreasing sees at once


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


def pack_best_fit(docs: Iterable[np.ndarray], seq_len: int, pad_id: int = 0, buffer_size: int = BEST_FIT_BUFFER) -> Iterator[Row]:
    buffer: list[np.ndarray] = []
    for doc in docs:
        buffer += [doc[i:i + seq_len] for i in range(0, len(doc), seq_len)]
        if len(buffer) >= buffer_size:
            yield from _rows_from_bins(first_fit_decreasing(buffer, seq_len), seq_len, pad_id)
            buffer = []
    yield from _rows_from_bins(first_fit_decreasing(buffer, seq_len), seq_len, pad_id)


def pack_rows(docs: Iterable[np.ndarray], seq_len: int, method: str = "greedy", pad_id: int = 0,
              buffer_size: int = BEST_FIT_BUFFER) -> Iterator[Row]:
    if method == "greedy":
        return pack_greedy(docs, seq_len, pad_id)
    if method == "best_fit":
        return pack_best_fit(docs, seq_len, pad_id, buffer_size)
    raise ValueError(f"packing method must be 'greedy' or 'best_fit', not {method!r}")


# ------------------------------------------------------------------ the same rows from a plan (data.beam)
# A placement: one piece of a document in a row, (row, column, segment id, start in the document,
# length). `plan_placements` finds them from the documents' lengths alone, so a distributed packer
# can plan on one worker (a few integers per document) and move only the token pieces to the workers
# that write each shard; `rows_from_placements` builds the rows. Together they give `pack_rows`'
# rows exactly (tests/test_data_beam.py checks both methods against it).
Placement = tuple[int, int, int, int, int]


def plan_placements(lengths: Iterable[int], seq_len: int, method: str = "greedy",
                    buffer_size: int = BEST_FIT_BUFFER) -> Iterator[tuple[int, list[Placement]]]:
    """(document index, its placements) for documents of these lengths in order, as `pack_rows`
    lays them out; streamed (greedy: one document at a time; best_fit: a buffer at a time), so
    the caller holds only the lengths."""
    lengths = map(int, lengths)
    if method == "greedy":
        row = fill = seg = 0
        for d, n in enumerate(lengths):
            placements, start = [], 0
            while start < n:
                take = min(n - start, seq_len - fill)
                seg += 1
                placements.append((row, fill, seg, start, take))
                fill, start = fill + take, start + take
                if fill == seq_len:
                    row, fill, seg = row + 1, 0, 0
            yield d, placements
        return
    if method != "best_fit":
        raise ValueError(f"packing method must be 'greedy' or 'best_fit', not {method!r}")
    rows = 0
    buffer: list[tuple[int, int, int]] = []  # (document, start, length) of each chunk

    def flush():
        nonlocal rows
        room: list[int] = []
        count: list[int] = []
        placed: dict[int, list[Placement]] = {d: [] for d, _, _ in buffer}
        # first_fit_decreasing's order: longest first, ties in buffer order (a stable sort)
        for d, start, n in sorted(buffer, key=lambda c: c[2], reverse=True):
            b = next((b for b, free in enumerate(room) if n <= free), len(room))
            if b == len(room):
                room.append(seq_len)
                count.append(0)
            count[b] += 1
            placed[d].append((rows + b, seq_len - room[b], count[b], start, n))
            room[b] -= n
        rows += len(room)
        return placed.items()

    for d, n in enumerate(lengths):
        buffer += [(d, i, min(seq_len, n - i)) for i in range(0, n, seq_len)]
        if len(buffer) >= buffer_size:
            yield from flush()
            buffer = []
    yield from flush()


def pack_plan(lengths: Iterable[int], seq_len: int, method: str = "greedy",
              buffer_size: int = BEST_FIT_BUFFER) -> tuple[list[list[Placement]], int]:
    """(placements of each document, number of rows) that `pack_rows` gives documents of these
    lengths, in order."""
    plan = [placements for _, placements in plan_placements(lengths, seq_len, method, buffer_size)]
    return plan, 1 + max((p[-1][0] for p in plan if p), default=-1)


def rows_from_placements(pieces: Iterable[tuple[int, int, int, np.ndarray]], n_rows: int, seq_len: int,
                         pad_id: int = 0) -> np.ndarray:
    """int32 `[n_rows, 2, seq_len]` (tokens, segment ids) from `(row, column, segment, tokens)`
    pieces, rows numbered from 0; the rest is padding."""
    out = np.zeros((n_rows, 2, seq_len), np.int32)
    out[:, 0] = pad_id
    for row, col, seg, tokens in pieces:
        out[row, 0, col:col + len(tokens)] = tokens
        out[row, 1, col:col + len(tokens)] = seg
    return out


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


def shard_name(source: str, index: int) -> str:
    return f"{source}-{index:05d}.npy"


def save_array(path: str, array: np.ndarray):
    """np.save under a temporary name, then renamed: a reader never sees half a shard."""
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def write_shards(rows: Iterable[Row], out_dir: str, source: str, rows_per_shard: int = ROWS_PER_SHARD) -> list[dict]:
    """`[rows, 2, seq_len]` int32 shards; returns `[{"path", "rows"}]` (paths relative to out_dir)."""
    shards, buf = [], []

    def flush():
        name = shard_name(source, len(shards))
        save_array(os.path.join(out_dir, name), np.stack([np.stack(r) for r in buf]).astype(np.int32))
        shards.append({"path": name, "rows": len(buf)})

    for row in rows:
        buf.append(row)
        if len(buf) == rows_per_shard:
            flush()
            buf = []
    if buf:
        flush()
    return shards


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj, indent=None) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)


def _finished(directory: str, name: str, key: dict) -> dict | None:
    """The `<name>.done.json` entry in `directory` when it matches `key` and its shards exist."""
    entry = _read_json(os.path.join(directory, f"{name}.done.json"))
    if not entry or any(entry.get(k) != v for k, v in key.items()):
        return None
    if not all(os.path.exists(os.path.join(directory, s["path"])) for s in entry.get("shards", [])):
        return None
    return entry


def _finish_swap(out_dir: str) -> None:
    """Complete a swap journaled in `manifest.json.pending` (see pack_corpus): move the staged
    shards and done files into place, write the manifest, drop what the old manifest alone used."""
    pending_path = os.path.join(out_dir, "manifest.json.pending")
    pending = _read_json(pending_path)
    if pending is None:
        return
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):  # the old manifest names shards about to be replaced
        os.remove(manifest_path)
    for src, dst in pending["moves"]:
        if os.path.exists(os.path.join(out_dir, src)):
            os.replace(os.path.join(out_dir, src), os.path.join(out_dir, dst))
    _write_json(manifest_path, pending["manifest"], indent=1)
    _drop(out_dir, pending["obsolete"])
    os.remove(pending_path)


def _drop(out_dir: str, names) -> None:
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)
    staging = os.path.join(out_dir, STAGING)
    if os.path.isdir(staging):
        for name in os.listdir(staging):
            os.remove(os.path.join(staging, name))
        os.rmdir(staging)


STAGING = ".next"  # changed sources of an already packed directory are packed here first


def new_manifest(tokenizer_path: str, sp, seq_len: int, method: str, split: str,
                 fingerprint: dict | None) -> tuple[dict, dict]:
    """(a manifest without sources, the key a source's `<name>.done.json` must match)."""
    from hibari.data.tokenizer import file_sha256
    manifest = {"version": 1, "seq_len": seq_len, "method": method, "split": split,
                "tokenizer": {"path": os.path.abspath(tokenizer_path), "sha256": file_sha256(tokenizer_path),
                              "vocab_size": sp.get_piece_size(), "pad_id": sp.pad_id(),
                              "bos_id": sp.bos_id(), "eos_id": sp.eos_id()},
                "fingerprint": fingerprint, "sources": {}}
    key = {"seq_len": seq_len, "method": method, "split": split,
           "tokenizer_sha256": manifest["tokenizer"]["sha256"], "fingerprint": fingerprint}
    return manifest, key


def source_entry(counts: dict, shards: list[dict], seq_len: int, key: dict) -> dict:
    """A source's manifest entry (and `.done.json`): its docs / chars / tokens, rows, padding,
    shards and the key."""
    n_rows = sum(s["rows"] for s in shards)
    return {"docs": counts["docs"], "chars": counts["chars"], "tokens": counts["tokens"], "rows": n_rows,
            "padding": n_rows * seq_len - counts["tokens"],
            "chars_per_token": round(counts["chars"] / max(1, counts["tokens"] - 2 * counts["docs"]), 4),
            "shards": shards, **key}


def write_manifest(out_dir: str, manifest: dict) -> None:
    """Every source's `<name>.done.json`, then `manifest.json` (last: it marks the directory
    complete). For a directory whose shards were written elsewhere (data.beam); `pack_corpus`
    writes its own as it goes."""
    for name, entry in manifest["sources"].items():
        _write_json(os.path.join(out_dir, f"{name}.done.json"), entry)
    _write_json(os.path.join(out_dir, "manifest.json"), manifest, indent=1)


def pack_corpus(sources: dict[str, Iterable[Doc]], tokenizer_path: str, out_dir: str, seq_len: int,
                method: str = "greedy", rows_per_shard: int = ROWS_PER_SHARD, buffer_size: int = BEST_FIT_BUFFER,
                split: str = "", fingerprint: dict | None = None, status: dict | None = None) -> dict:
    """Pack every source into its own shards and write `out_dir/manifest.json`.

    `split` names which documents these are (e.g. the held-out rule); it is recorded in the manifest.
    `fingerprint` (a caller's record of what shaped the documents, e.g. data.pipeline's stage
    fingerprint) is recorded too. A source whose `<source>.done.json` matches seq_len, method,
    tokenizer, split and fingerprint is not redone (an interrupted run resumes); `status`, when
    given, receives `{source: "reused" | "packed"}`.

    Replacing a packed directory never leaves its manifest naming a mix of old and new shards:
    when `out_dir` already has a manifest, changed sources are packed into `out_dir/.next/` and
    moved into place only once every source is done, the swap journaled in
    `manifest.json.pending` (the old manifest is removed first, so a reader sees either a
    complete manifest or none; an interrupted swap completes on the next call). Shards that only
    the old manifest named are deleted after the new manifest is written."""
    from hibari.data.tokenizer import load_tokenizer
    sp = load_tokenizer(tokenizer_path)
    os.makedirs(out_dir, exist_ok=True)
    _finish_swap(out_dir)
    manifest, key = new_manifest(tokenizer_path, sp, seq_len, method, split, fingerprint)
    old = _read_json(os.path.join(out_dir, "manifest.json"))
    staging = os.path.join(out_dir, STAGING) if old is not None else None
    old_files = {s["path"] for e in (old or {}).get("sources", {}).values() for s in e.get("shards", [])}
    old_files |= {f"{n}.done.json" for n in (old or {}).get("sources", {})}
    staged: list[str] = []
    for name, docs in sources.items():
        entry = _finished(out_dir, name, key)
        if entry is None and staging and (entry := _finished(staging, name, key)) is not None:
            staged.append(name)
        if entry is not None:
            manifest["sources"][name] = entry
            if status is not None:
                status[name] = "reused"
            continue
        target = staging or out_dir
        os.makedirs(target, exist_ok=True)
        done = os.path.join(target, f"{name}.done.json")
        stale = _read_json(done)
        if stale is not None:  # its shards are about to be overwritten: drop the marker first
            os.remove(done)
            if target == out_dir:
                old_files |= {s["path"] for s in stale.get("shards", [])}
        counts = {"docs": 0, "chars": 0, "tokens": 0}
        token_docs = tokenize_docs(progress_bar(f"pack {name}", None, unit=" docs").track(docs), sp, counts=counts)
        rows = pack_rows(token_docs, seq_len, method, pad_id=max(sp.pad_id(), 0), buffer_size=buffer_size)
        shards = write_shards(rows, target, name, rows_per_shard)
        entry = source_entry(counts, shards, seq_len, key)
        _write_json(done, entry)
        manifest["sources"][name] = entry
        if staging:
            staged.append(name)
        if status is not None:
            status[name] = "packed"
    new_files = {s["path"] for e in manifest["sources"].values() for s in e["shards"]}
    new_files |= {f"{n}.done.json" for n in manifest["sources"]}
    obsolete = sorted(old_files - new_files)
    if staged:
        moves = [(os.path.join(STAGING, f), f) for n in staged
                 for f in [s["path"] for s in manifest["sources"][n]["shards"]] + [f"{n}.done.json"]]
        _write_json(os.path.join(out_dir, "manifest.json.pending"),
                    {"manifest": manifest, "moves": moves, "obsolete": obsolete})
        _finish_swap(out_dir)
    else:
        _write_json(os.path.join(out_dir, "manifest.json"), manifest, indent=1)
        _drop(out_dir, obsolete)
    return manifest
