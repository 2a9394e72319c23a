"""Shared data plumbing for SFT, preference and reward data.

- `read_records(path, check)`: JSONL records with their `file:line`; malformed ones are counted
  per reason (with the first locations) in a `Skipped` report instead of crashing mid-run.
- `SegmentEncoder`: tokenizes rendered segments one by one -> (tokens, loss_mask), the mask
  coming from token spans (prompt 0, response 1), with [bos] ... [eos].
- `RowLoader`: the loader interface of train/loop over rows built per epoch: a deterministic,
  per-host, resumable stream (state = number of batches consumed).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from hibari.align.templates import Segment, TemplateError
from hibari.base.errors import UserError
from hibari.base.segments import positions_from_segments

log = logging.getLogger(__name__)


class AlignDataError(UserError, ValueError):
    """No usable data, or a file that cannot be read; the message names the file."""


class Skipped:
    """Counts of skipped records per reason, with the first few `file:line` of each."""

    def __init__(self, keep: int = 5):
        self.keep = keep
        self.counts: dict[str, int] = {}
        self.where: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        locations = self.where.setdefault(reason, [])
        if len(locations) < self.keep:
            locations.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return "; ".join(f"{n} x {reason} (e.g. {', '.join(self.where[reason])})"
                         for reason, n in sorted(self.counts.items()))

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.where.items()}}


def read_jsonl(path: str, skipped: Skipped) -> Iterator[tuple[str, dict]]:
    """(`file:line`, record) for each JSON object line; bad lines go to `skipped`."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise AlignDataError(f"{path}: cannot read ({e}); check config.data paths") from e
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.add(f"invalid JSON ({e.msg})", where)
                continue
            if not isinstance(record, dict):
                skipped.add("not a JSON object", where)
                continue
            record.setdefault("id", where)
            yield where, record


def read_records(paths: str | Sequence[str], convert: Callable[[dict], Any],
                 skipped: Skipped | None = None) -> tuple[list[Any], Skipped]:
    """[convert(record)] over JSONL files; `convert` raises TemplateError / AlignDataError for a
    malformed record (counted with its file:line and skipped). Errors if nothing is left."""
    skipped = skipped if skipped is not None else Skipped()
    paths = [paths] if isinstance(paths, str) else list(paths)
    out = []
    for path in paths:
        for where, record in read_jsonl(path, skipped):
            try:
                out.append(convert(record))
            except (TemplateError, AlignDataError) as e:
                skipped.add(str(e), where)
    if skipped.total:
        log.warning("skipped %d records: %s", skipped.total, skipped.summary())
    if not out:
        raise AlignDataError(f"{paths}: no usable records ({skipped.summary() or 'empty'})")
    return out, skipped


# ---------------------------------------------------------------------------------------------
# Tokenization by segments
# ---------------------------------------------------------------------------------------------

class SegmentEncoder:
    """Encodes text segments without SentencePiece's dummy "▁" prefix, so the tokens of a
    rendered example are the concatenation of its segments' tokens."""

    def __init__(self, sp):
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp = SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        self.vocab_size = sp.get_piece_size()

    def encode(self, segments: Sequence[Segment], add_eos: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
        """(tokens[n], loss_mask[n]): [bos] + segments + [eos]; the mask is 1 on the tokens of
        response segments (and on eos when the last segment is a response)."""
        pieces = self.sp.encode([s.text for s in segments])
        tokens = [self.bos_id]
        mask = [0]
        for seg, ids in zip(segments, pieces):
            tokens += ids
            mask += [int(seg.is_response)] * len(ids)
        if add_eos:
            tokens.append(self.eos_id)
            mask.append(int(bool(segments) and segments[-1].is_response))
        return np.asarray(tokens, np.int32), np.asarray(mask, np.int32)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def check_vocab(encoder: SegmentEncoder, vocab_size: int, where: str = "config.model") -> None:
    if encoder.vocab_size > vocab_size:
        raise AlignDataError(f"the tokenizer has {encoder.vocab_size} pieces but "
                             f"{where}.vocab_size={vocab_size}; use a matching tokenizer "
                             "(config.data.tokenizer) or a larger model vocabulary")


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

def with_positions(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows["positions"] = positions_from_segments(rows["segment_ids"])
    return rows


class RowLoader:
    """Batches of rows from `make_rows(epoch) -> {name: array[n_rows, ...]}`.

    Batch k of the global stream holds rows [k * B, (k + 1) * B) of the epochs' rows
    concatenated (B = local batch x shard_count); this host takes its `shard_index` slice.
    `epochs=None` repeats forever (train); `epochs=1` stops after one pass and pads the last
    batch with empty rows (segment_ids 0: they count nothing). State = batches consumed."""

    def __init__(self, make_rows: Callable[[int], dict[str, np.ndarray]], *, batch_size: int,
                 shard_index: int | None = None, shard_count: int | None = None,
                 epochs: int | None = None):
        self.make_rows = make_rows
        self.batch_size = batch_size
        self.shard_index = jax.process_index() if shard_index is None else shard_index
        self.shard_count = jax.process_count() if shard_count is None else shard_count
        self.epochs = epochs
        self._batch = 0
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None
        self._sizes: dict[int, int] = {}

    def _rows(self, epoch: int) -> dict[str, np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            rows = self.make_rows(epoch)
            self._sizes[epoch] = len(rows["tokens"])
            if not self._sizes[epoch]:
                raise AlignDataError("an epoch produced no rows; check the data and seq_len")
            self._cache = (epoch, rows)
        return self._cache[1]

    def _size(self, epoch: int) -> int:
        if epoch not in self._sizes:
            self._rows(epoch)
        return self._sizes[epoch]

    def _global_rows(self, start: int, count: int) -> dict[str, np.ndarray] | None:
        """Rows [start, start + count) of the stream (None when a finite stream has ended)."""
        epoch, offset = 0, start
        while offset >= self._size(epoch):
            offset -= self._size(epoch)
            epoch += 1
            if self.epochs is not None and epoch >= self.epochs:
                return None
        parts: list[dict[str, np.ndarray]] = []
        while count > 0:
            if self.epochs is not None and epoch >= self.epochs:
                parts.append({k: np.zeros((count,) + v.shape[1:], v.dtype)
                              for k, v in parts[0].items()})
                break
            rows = self._rows(epoch)
            take = min(count, self._size(epoch) - offset)
            parts.append({k: v[offset:offset + take] for k, v in rows.items()})
            count, offset, epoch = count - take, 0, epoch + 1
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def batch(self, k: int) -> dict[str, np.ndarray] | None:
        size = self.batch_size * self.shard_count
        if self._global_rows(k * size, 1) is None:  # the same answer on every host
            return None
        rows = self._global_rows(k * size + self.shard_index * self.batch_size, self.batch_size)
        if rows is None:  # this host's slice lies past the end: empty rows
            rows = {k: np.zeros((self.batch_size,) + v.shape[1:], v.dtype)
                    for k, v in self._rows(0).items()}
        return with_positions(rows)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            batch = self.batch(self._batch)
            if batch is None:
                return
            self._batch += 1
            yield batch

    def get_state(self) -> dict:
        return {"batch": self._batch}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._batch = int(state["batch"])
