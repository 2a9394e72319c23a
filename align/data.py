"""Shared data plumbing for SFT, preference and reward data.

- `read_records(paths, convert)`: JSONL records with their `file:line`; malformed ones (invalid
  UTF-8 or JSON, a field of the wrong type, ...) are counted per reason (with the first
  locations) in a `Skipped` report (the data room's `SourceStats`) instead of crashing mid-run;
  a file with no usable record is an error naming it.
- `SegmentEncoder`: tokenizes rendered segments one by one -> (tokens, loss_mask), the mask
  coming from token spans (prompt 0, response 1), with [bos] ... [eos].
- `RowLoader`: the loader interface of train/loop over rows built per epoch: a deterministic,
  per-host, resumable stream (state = number of batches consumed).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from hibari.align.templates import Segment, TemplateError
from hibari.base.errors import UserError
from hibari.base.segments import positions_from_segments
from hibari.data.sources import SourceStats, decoded_lines, open_binary

log = logging.getLogger(__name__)


class AlignDataError(UserError, ValueError):
    """No usable data, or a file that cannot be read; the message names the file."""


@dataclass
class Skipped(SourceStats):
    """Skipped records per reason, with the first `keep` `file:line` of each: the data room's
    `SourceStats` (bad / reasons / bad_examples) plus locations grouped by reason."""
    keep: int = 5
    where: dict[str, list[str]] = field(default_factory=dict)

    def reject(self, where: str, reason: str, strict: bool = False):
        super().reject(where, reason, strict)
        locations = self.where.setdefault(reason, [])
        if len(locations) < self.keep:
            locations.append(where)

    def add(self, reason: str, where: str) -> None:
        self.reject(where, reason)

    @property
    def counts(self) -> dict[str, int]:
        return self.reasons

    @property
    def total(self) -> int:
        return self.bad

    def summary(self) -> str:
        return "; ".join(f"{n} x {reason} (e.g. {', '.join(self.where[reason])})"
                         for reason, n in sorted(self.counts.items()))

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.where.items()}}

    def split_counts(self, kept: int) -> dict:
        """{read, kept, too_long, malformed, reasons} of one split whose usable examples are
        `kept` (read = kept + skipped; too_long = reasons of an over-long example)."""
        too_long = sum(n for reason, n in self.counts.items() if is_too_long(reason))
        return {"read": kept + self.total, "kept": kept, "too_long": too_long,
                "malformed": self.total - too_long, "reasons": dict(self.counts)}


TOO_LONG = ("over-long", "longer than")  # how the readers' too-long reasons begin / read


def is_too_long(reason: str) -> bool:
    return reason.startswith(TOO_LONG[0]) or TOO_LONG[1] in reason


def read_jsonl(path: str, skipped: Skipped) -> Iterator[tuple[str, dict]]:
    """(`file:line`, record) for each JSON object line (`.gz` / `.zst` read too); each line is
    decoded on its own, so an invalid UTF-8 line is skipped like any bad line."""
    try:
        open_binary(path).close()
    except OSError as e:
        raise AlignDataError(f"{path}: cannot read ({e}); check config.data paths") from None
    try:
        for n, line in decoded_lines(path, skipped):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.add(f"invalid JSON ({e.msg})", where)
                continue
            if not isinstance(record, dict):
                skipped.add(f"not a JSON object (a {type(record).__name__})", where)
                continue
            record.setdefault("id", where)
            yield where, record
    except UserError as e:  # a file that cannot be read to the end (corrupt compression)
        raise AlignDataError(str(e)) from None


def read_records(paths: str | Sequence[str], convert: Callable[[dict], Any],
                 skipped: Skipped | None = None) -> tuple[list[Any], Skipped]:
    """[convert(record)] over JSONL files; `convert` raises TemplateError / AlignDataError for a
    malformed record (counted with its file:line and skipped). A file that is empty or holds
    no usable record is an error naming it (so is an empty list of files). The skipped records
    are logged here only when no `skipped` is given; a caller that passes one reports them
    (once, e.g. align.tasks.read_splits)."""
    own = skipped is None
    skipped = skipped if skipped is not None else Skipped()
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise AlignDataError("no data files given (an empty list of paths); set the config's "
                             "data paths (e.g. config.data.train_path)")
    out = []
    for path in map(str, paths):
        before, bad_before = len(out), skipped.total
        for where, record in read_jsonl(path, skipped):
            try:
                out.append(convert(record))
            except (TemplateError, AlignDataError) as e:
                skipped.add(str(e), where)
        if len(out) == before:
            bad = skipped.total - bad_before
            why = (f"all {bad} records skipped: {_summary_of(skipped, path)}" if bad
                   else "the file is empty")
            raise AlignDataError(f"{path}: no usable records ({why})")
    if own and skipped.total:
        log.warning("skipped %d records: %s", skipped.total, skipped.summary())
    return out, skipped


def _summary_of(skipped: Skipped, path: str) -> str:
    """The reasons of `skipped` that have an example in `path` (first locations kept)."""
    prefix = f"{path}:"
    mine = {r: [w for w in ws if w.startswith(prefix)] for r, ws in skipped.where.items()}
    return "; ".join(f"{reason} (e.g. {', '.join(ws)})" for reason, ws in sorted(mine.items()) if ws) \
        or skipped.summary()


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
