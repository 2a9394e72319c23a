"""Deterministic, per-host, resumable batches over packed shards, with source mixtures (grain).

Pipeline (all grain `MapDataset`, i.e. index-addressable, so the k-th batch is a pure function of
the seed and k):

    per source: rows of all its shards -> shuffle(seed + i) -> repeat(num_epochs)
    mix(sources, weights) -> [shard_index::shard_count] -> batch(batch_size) -> add positions

The loader's state is the number of batches consumed: restoring it resumes at exactly the next
batch, with no replay. Batches are prefetched in background threads (or `worker_count` processes).

Row arrays: `row_fields={name: DIR}` adds batch field `name` [b, seq_len] read from DIR, arrays
aligned row for row with the packed shards (DIR/manifest.json, `write_row_arrays_manifest`; e.g.
a reference model's per-token losses, hibari.train.cli.build_token_loss_cache). Each row is read
with its arrays, so shuffling, mixing, host sharding and resume are the same as without them.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Iterator, Protocol, runtime_checkable

import grain
import numpy as np

from hibari.base.errors import InputNotFound, UserError
from hibari.base.segments import positions_from_segments


@runtime_checkable
class Loader(Protocol):
    """What training reads batches from: this host's batches `{name: array[b, ...]}` (tokens,
    segment_ids, positions, and whatever a task's loss needs), in an order fixed by the seed, with
    a position that is saved in each checkpoint and restored on resume. PackedLoader here,
    hibari.align.data.RowLoader and hibari.train.synthetic.SyntheticTokens implement it."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def load_manifests(manifest_or_dirs) -> tuple[dict[str, list[str]], dict[str, int], int]:
    """({source: [shard paths]}, {source: rows}, seq_len) from manifest files or their directories."""
    items = [manifest_or_dirs] if isinstance(manifest_or_dirs, (str, os.PathLike)) else list(manifest_or_dirs)
    shards: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    seq_lens = set()
    for item in map(str, items):
        path = os.path.join(item, "manifest.json") if os.path.isdir(item) else item
        if not os.path.isfile(path):
            raise InputNotFound(f"no manifest at {path!r}: pack the corpus first (`hibari data pack`)")
        with open(path) as f:
            manifest = json.load(f)
        root = os.path.dirname(os.path.abspath(path))
        seq_lens.add(manifest["seq_len"])
        for name, entry in manifest["sources"].items():
            shards.setdefault(name, []).extend(os.path.join(root, s["path"]) for s in entry["shards"])
            rows[name] = rows.get(name, 0) + entry["rows"]
    if len(seq_lens) != 1:
        raise ValueError(f"manifests disagree on seq_len: {sorted(seq_lens)}")
    return shards, rows, seq_lens.pop()


def packed_info(manifest_or_dirs) -> dict:
    """What a trainer must agree with, from packed manifests (files or their directories):
    {"seq_len", "vocab_size" (the tokenizer's), "tokenizer_sha256", "sources": {name: rows}}.
    Raises ValueError when the manifests disagree on seq_len or tokenizer."""
    items = [manifest_or_dirs] if isinstance(manifest_or_dirs, (str, os.PathLike)) else list(manifest_or_dirs)
    _, rows, seq_len = load_manifests(items)
    tokenizers = {}
    for item in map(str, items):
        path = os.path.join(item, "manifest.json") if os.path.isdir(item) else item
        with open(path) as f:
            tok = json.load(f)["tokenizer"]
        tokenizers[tok["sha256"]] = tok
    if len(tokenizers) != 1:
        raise ValueError(f"manifests of {items} were packed with different tokenizers: "
                         f"{sorted(t['path'] for t in tokenizers.values())}")
    (sha, tok), = tokenizers.items()
    return {"seq_len": seq_len, "vocab_size": tok["vocab_size"], "tokenizer_sha256": sha, "sources": rows}


# np.load parses each .npy header with ast.literal_eval; CPython 3.11's parser is not safe to
# run from several threads at once ("SystemError: AST constructor recursion depth mismatch",
# seen in CI when grain's threads opened the shards of two sources together).
_NPY_OPEN_LOCK = threading.Lock()


def target_counts(manifest_or_dirs, vocab_size: int) -> np.ndarray:
    """counts[v]: how often token v is a next-token target in the packed rows (the next token
    of the same non-padding segment, as the training loss counts them)."""
    shards, _, _ = load_manifests(manifest_or_dirs)
    counts = np.zeros(vocab_size, np.int64)
    for path in (p for paths in shards.values() for p in paths):
        with _NPY_OPEN_LOCK:
            rows = np.load(path, mmap_mode="r")
        for start in range(0, len(rows), 4096):
            tokens, seg = rows[start:start + 4096, 0], rows[start:start + 4096, 1]
            same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
            counts += np.bincount(tokens[:, 1:][same], minlength=vocab_size)[:vocab_size]
    return counts


def unigram_probs(counts: np.ndarray) -> np.ndarray:
    """Add-one smoothed unigram distribution from token counts."""
    smoothed = counts.astype(np.float64) + 1.0
    return smoothed / smoothed.sum()


def unigram_cross_entropy(train, heldout, vocab_size: int) -> float:
    """Nats per target token on `heldout` rows of the add-one unigram model of `train` rows:
    the loss of a model that ignores context, the baseline a language model must beat."""
    held = target_counts(heldout, vocab_size)
    return float(-(held * np.log(unigram_probs(target_counts(train, vocab_size)))).sum()
                 / max(held.sum(), 1))


class PackedRows:
    """Random access over the rows `[2, seq_len]` of a list of `.npy` shards (memory-mapped,
    opened lazily so the source pickles cheaply into worker processes)."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        with _NPY_OPEN_LOCK:  # another loader's reader threads may be opening shards
            sizes = [np.load(p, mmap_mode="r").shape[0] for p in self.paths]
        self.offsets = np.cumsum([0] + sizes)
        self._arrays = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if self._arrays is None:
            with _NPY_OPEN_LOCK:  # grain's reader threads ask for rows concurrently
                if self._arrays is None:
                    self._arrays = [np.load(p, mmap_mode="r") for p in self.paths]
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return np.array(self._arrays[shard][index - self.offsets[shard]])

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}


def _manifest_file(item) -> str:
    item = str(item)
    return os.path.join(item, "manifest.json") if os.path.isdir(item) else item


def packed_identity(manifest_or_dirs) -> list[dict]:
    """[{"manifest": absolute path, "sha256": of its bytes}] per packed manifest: what row arrays
    built from these rows record (a repack writes another manifest, so another sha256)."""
    items = [manifest_or_dirs] if isinstance(manifest_or_dirs, (str, os.PathLike)) else list(manifest_or_dirs)
    out = []
    for item in items:
        path = _manifest_file(item)
        with open(path, "rb") as f:
            out.append({"manifest": os.path.abspath(path), "sha256": hashlib.sha256(f.read()).hexdigest()})
    return out


def packed_shard_rows(manifest_or_dirs) -> dict[str, list[tuple[str, int]]]:
    """{source: [(shard path, rows)]} in the order PackedLoader reads them (the manifests' order)."""
    shards, _, _ = load_manifests(manifest_or_dirs)
    out = {}
    for name, paths in shards.items():
        with _NPY_OPEN_LOCK:
            out[name] = [(p, int(np.load(p, mmap_mode="r").shape[0])) for p in paths]
    return out


class StaleRowArrays(UserError, ValueError):
    """Row arrays (`row_fields`) were built for other packed rows; the message names the file."""


ROW_ARRAYS_VERSION = 1


def row_array_shard_name(source: str, index: int) -> str:
    """File name of a source's index-th row-array shard (index over the manifests' shards)."""
    return f"{source}-{index:05d}.npy"


def write_row_arrays_manifest(directory: str, manifest_or_dirs, field: str, dtype: str,
                              extra: dict | None = None) -> dict:
    """Write DIR/manifest.json for row arrays already saved as DIR/`row_array_shard_name(source,
    i)` ([rows of packed shard i, seq_len]): the packed rows' identity (`packed_identity`), the
    shards' row counts and `extra` (what else the arrays depend on, e.g. the model that made them)."""
    _, _, seq_len = load_manifests(manifest_or_dirs)
    manifest = {"version": ROW_ARRAYS_VERSION, "field": field, "dtype": dtype, "seq_len": seq_len,
                "packed": packed_identity(manifest_or_dirs),
                "sources": {name: {"shards": [{"path": row_array_shard_name(name, i), "rows": rows}
                                              for i, (_, rows) in enumerate(shards)]}
                            for name, shards in packed_shard_rows(manifest_or_dirs).items()},
                **(extra or {})}
    path = os.path.join(directory, "manifest.json")
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)
    return manifest


def check_row_arrays(directory: str, manifest_or_dirs, fix: str = "") -> dict:
    """DIR/manifest.json of row arrays, checked against the packed rows they must align with
    (the same manifests, byte for byte, and row counts); StaleRowArrays names the file and
    `fix` (default: delete DIR to rebuild it)."""
    path = os.path.join(directory, "manifest.json")
    fix = fix or f"delete {directory} to rebuild it"
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise InputNotFound(f"{path}: no row arrays here; {fix}") from None
    except ValueError as e:
        raise StaleRowArrays(f"{path}: unreadable ({e}); {fix}") from None
    if manifest.get("version") != ROW_ARRAYS_VERSION:
        raise StaleRowArrays(f"{path}: row arrays of version {manifest.get('version')!r}, this "
                             f"hibari reads {ROW_ARRAYS_VERSION}; {fix}")
    now = packed_identity(manifest_or_dirs)
    then = manifest.get("packed")
    if then != now:
        was = ", ".join(f"{p['manifest']} sha256 {p['sha256'][:12]}" for p in then or [])
        got = ", ".join(f"{p['manifest']} sha256 {p['sha256'][:12]}" for p in now)
        raise StaleRowArrays(f"{path}: built for packed rows {was or '?'}, not {got} (repacked "
                             f"or another dataset); {fix}")
    for name, shards in packed_shard_rows(manifest_or_dirs).items():
        have = [s["rows"] for s in manifest["sources"].get(name, {}).get("shards", [])]
        if have != [rows for _, rows in shards]:
            raise StaleRowArrays(f"{path}: source {name!r} has row arrays of {have} rows per "
                                 f"shard, the packed shards {[r for _, r in shards]}; {fix}")
    return manifest


class _RowsWithArrays:
    """A source's packed rows, each with its row arrays: {"row": [2, t], field: [t], ...}."""

    def __init__(self, rows: PackedRows, fields: dict[str, PackedRows]):
        self.rows, self.fields = rows, fields

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"row": self.rows[index], **{k: v[index] for k, v in self.fields.items()}}


def _to_batch(rows) -> dict[str, np.ndarray]:
    if isinstance(rows, dict):  # row_fields: {"row": [b, 2, t], field: [b, t], ...}
        extra = {k: v for k, v in rows.items() if k != "row"}
        return {**_to_batch(rows["row"]), **extra}
    tokens, segment_ids = rows[:, 0].astype(np.int32), rows[:, 1].astype(np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions_from_segments(segment_ids)}


class PackedLoader:
    """Iterable of host-local batches `{"tokens", "segment_ids", "positions"}`, each `[b, t]` int32.

    `weights` ({source: weight}) defaults to each source's share of rows; a source missing from
    `weights` or weighted 0 is left out. With `num_epochs`, the stream ends when the first source
    runs out (its epochs consumed at its mixture rate); with None it never ends.
    `row_fields` ({batch field: row-array directory}, checked by `check_row_arrays`) adds those
    fields to each batch; the batches' order and the loader state are the same without them.
    """

    def __init__(self, manifest_or_dirs, *, batch_size: int, seq_len: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1, weights: dict[str, float] | None = None,
                 num_epochs: int | None = None, worker_count: int = 0, prefetch: int = 4,
                 row_fields: dict[str, str] | None = None):
        shards, rows, manifest_seq_len = load_manifests(manifest_or_dirs)
        arrays = {field: check_row_arrays(d, manifest_or_dirs) for field, d in (row_fields or {}).items()}
        if seq_len != manifest_seq_len:
            raise ValueError(f"seq_len={seq_len} but the shards were packed with seq_len={manifest_seq_len}: "
                             "repack or change the config")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        if weights is None:
            weights = {name: float(n) for name, n in rows.items()}
        unknown = set(weights) - set(shards)
        if unknown:
            raise ValueError(f"weights name unknown sources {sorted(unknown)}; sources are {sorted(shards)}")
        names = sorted(n for n, w in weights.items() if w > 0)
        if not names:
            raise ValueError("all mixture weights are zero")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.shard_index, self.shard_count = shard_index, shard_count
        self.weights = {n: weights[n] for n in names}
        self.num_epochs, self.worker_count, self.prefetch = num_epochs, worker_count, prefetch

        parts = []
        for i, name in enumerate(names):
            source = PackedRows(shards[name])
            if arrays:
                source = _RowsWithArrays(source, {
                    field: PackedRows([os.path.join(row_fields[field], s["path"])
                                       for s in m["sources"][name]["shards"]])
                    for field, m in arrays.items()})
            ds = grain.MapDataset.source(source).shuffle(seed=(seed * 1000003 + i) % 2**32)
            parts.append(ds.repeat(num_epochs))
        mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [self.weights[n] for n in names])
        host = mixed[shard_index::shard_count]
        self._batches = host.batch(batch_size, drop_remainder=True).map(_to_batch)
        self._next_batch = 0
        self._iterator = None

    def __len__(self) -> int:
        """Batches per full pass (sys.maxsize-ish when repeating forever)."""
        return len(self._batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        ds = self._batches[self._next_batch:].to_iter_dataset(
            grain.ReadOptions(num_threads=2, prefetch_buffer_size=self.prefetch))
        if self.worker_count > 0:
            from absl import flags
            if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
        for batch in ds:
            self._next_batch += 1
            yield batch

    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "shard_index": self.shard_index, "shard_count": self.shard_count,
                "weights": self.weights, "num_epochs": self.num_epochs}

    def get_state(self) -> dict:
        """JSON-serialisable: the number of batches consumed and what they depend on."""
        return {"next_batch": self._next_batch, **self._fingerprint()}

    def set_state(self, state: dict) -> None:
        mine = self._fingerprint()
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            raise ValueError(f"loader state was saved with different settings (saved, now): {differ}")
        self._next_batch = int(state["next_batch"])
