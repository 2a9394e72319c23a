"""Stream documents `Doc = {"id": str, "text": str, "meta": dict}` from files, never all at once.

Formats: JSONL (`.jsonl`, `.json`), plain text (`.txt`: one document per file, or per line /
per blank-line paragraph), parquet (read in record batches), TFDS array_record datasets through
`tfds.data_source` (no TensorFlow). Any of these may be gzip (`.gz`) or zstd (`.zst`) compressed.

Bad records (malformed JSON, invalid UTF-8, missing field, empty text) are counted in a
`SourceStats` with `file:line` and skipped; `strict=True` raises `BadInput` instead. A file that
cannot be read at all (corrupt compression, not parquet) raises `BadInput` naming it; with
`nonempty=True` so does a file that yields no usable document (empty, or every record bad).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from hibari.base.errors import InputNotFound, UserError

Doc = dict[str, Any]  # {"id": str, "text": str, "meta": dict}


class BadInput(UserError, ValueError):
    """A record that cannot be read; the message names the file, line/field and the fix."""


@dataclass
class SourceStats:
    docs: int = 0
    chars: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)  # first few "file:line: reason"
    reasons: dict[str, int] = field(default_factory=dict)  # bad records per reason

    def reject(self, where: str, reason: str, strict: bool):
        if strict:
            raise BadInput(f"{where}: {reason} (rerun without --strict to skip and count such records)")
        self.bad += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.bad_examples) < 20:
            self.bad_examples.append(f"{where}: {reason}")


def expand_paths(patterns: str | Iterable[str]) -> list[str]:
    """Sorted files matching globs (or plain paths); error if a pattern matches nothing."""
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    paths: list[str] = []
    for pattern in map(str, patterns):
        matched = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matched = [p for p in matched if os.path.isfile(p)]
        if not matched:
            raise InputNotFound(f"no input file matches {pattern!r}: check the path or glob")
        paths += matched
    return paths


def open_binary(path: str) -> io.BufferedIOBase:
    """Open a file for reading bytes, decompressing `.gz` / `.zst` transparently."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _base_name(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".gz", ".zst"):
        name = name.removesuffix(ext)
    return name


def _unreadable() -> tuple[type[BaseException], ...]:
    """Exceptions of a file whose bytes cannot be read back (corrupt or truncated compression)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard
        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


_UNREADABLE = _unreadable()


def decoded_lines(path: str, stats: SourceStats, strict: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a (possibly compressed) file, decoded one line at a
    time: an invalid UTF-8 line is a bad record (`file:line`) and the others are still read; an
    unreadable file raises BadInput naming it and the line reached."""
    lineno = 0
    try:
        f = open_binary(path)
    except FileNotFoundError:
        raise InputNotFound(f"{path}: no such file; check the path") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot open ({e.strerror or e}); check the path") from None
    try:
        with f:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    stats.reject(f"{path}:{lineno}", f"invalid UTF-8 at byte {e.start}", strict)
    except _UNREADABLE as e:
        raise BadInput(f"{path}:{lineno + 1}: cannot read the file past this line ({type(e).__name__}: "
                       f"{e}); is it truncated or not really {_compression(path)}?") from None


def _compression(path: str) -> str:
    return "gzip" if path.endswith(".gz") else "zstd" if path.endswith(".zst") else "plain text"


def read_jsonl(path: str, text_field: str = "text", id_field: str = "id",
               stats: SourceStats | None = None, strict: bool = False) -> Iterator[Doc]:
    """One document per JSON line; every other field goes to `meta`."""
    stats = stats if stats is not None else SourceStats()
    for lineno, line in decoded_lines(path, stats, strict):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            stats.reject(where, f"malformed JSON ({e.msg} at column {e.colno})", strict)
            continue
        if not isinstance(record, dict) or text_field not in record:
            stats.reject(where, f"missing field {text_field!r} (choose the field with --text-field)", strict)
            continue
        text = record.pop(text_field)
        if not isinstance(text, str):
            stats.reject(where, f"field {text_field!r} must be a string, got {type(text).__name__}", strict)
            continue
        if not text.strip():
            stats.reject(where, f"field {text_field!r} is empty", strict)
            continue
        doc_id = str(record.pop(id_field, f"{_base_name(path)}:{lineno}"))
        stats.docs += 1
        stats.chars += len(text)
        yield {"id": doc_id, "text": text, "meta": record}


def read_text(path: str, split: str = "file", stats: SourceStats | None = None,
              strict: bool = False) -> Iterator[Doc]:
    """Plain text: one document per file (`split="file"`), per line, or per blank-line paragraph."""
    if split not in ("file", "line", "paragraph"):
        raise ValueError(f"split must be 'file', 'line' or 'paragraph', not {split!r}")
    stats = stats if stats is not None else SourceStats()
    name = _base_name(path)

    def emit(n: int, text: str) -> Iterator[Doc]:
        if text.strip():
            stats.docs += 1
            stats.chars += len(text)
            yield {"id": f"{name}:{n}", "text": text, "meta": {"path": path}}

    buf: list[str] = []
    start = 1
    for lineno, line in decoded_lines(path, stats, strict):
        if split == "line":
            yield from emit(lineno, line.rstrip("\n"))
        elif split == "paragraph" and not line.strip():
            yield from emit(start, "".join(buf).strip("\n"))
            buf, start = [], lineno + 1
        else:
            buf.append(line)
    if split != "line":
        yield from emit(start if split == "paragraph" else 0, "".join(buf).strip("\n"))


def read_parquet(path: str, text_field: str = "text", id_field: str = "id",
                 batch_size: int = 1024, stats: SourceStats | None = None,
                 strict: bool = False) -> Iterator[Doc]:
    """Parquet rows read in record batches of `batch_size`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    stats = stats if stats is not None else SourceStats()
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise BadInput(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise BadInput(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                       "choose it with --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for record in batch.to_pylist():
            row += 1
            text = record.pop(text_field)
            if not isinstance(text, str) or not text.strip():
                stats.reject(f"{path}:row {row}", f"column {text_field!r} is empty or null", strict)
                continue
            stats.docs += 1
            stats.chars += len(text)
            yield {"id": str(record.pop(id_field, f"{_base_name(path)}:{row}")), "text": text,
                   "meta": record}


def read_tfds(name: str, split: str = "train", data_dir: str | None = None,
              text_field: str = "text", stats: SourceStats | None = None,
              strict: bool = False) -> Iterator[Doc]:
    """A TFDS dataset prepared in array_record format, read by random access (no TensorFlow)."""
    import tensorflow_datasets as tfds
    stats = stats if stats is not None else SourceStats()
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    for i in range(len(source)):
        record = dict(source[i])
        text = record.pop(text_field, None)
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                stats.reject(f"tfds:{name}/{split}[{i}]", f"invalid UTF-8 at byte {e.start}", strict)
                continue
        if not isinstance(text, str) or not text.strip():
            stats.reject(f"tfds:{name}/{split}[{i}]", f"feature {text_field!r} missing or empty", strict)
            continue
        meta = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                for k, v in record.items() if isinstance(v, (str, bytes, int, float, bool))}
        stats.docs += 1
        stats.chars += len(text)
        yield {"id": f"{name}/{split}:{i}", "text": text, "meta": meta}


def read_file(path: str, text_field: str = "text", text_split: str = "file",
              stats: SourceStats | None = None, strict: bool = False) -> Iterator[Doc]:
    """Dispatch on the file name (compression suffix ignored)."""
    base = _base_name(path)
    if base.endswith((".jsonl", ".json", ".ndjson")):
        return read_jsonl(path, text_field, stats=stats, strict=strict)
    if base.endswith(".parquet"):
        return read_parquet(path, text_field, stats=stats, strict=strict)
    if base.endswith((".txt", ".text", ".md")):
        return read_text(path, text_split, stats=stats, strict=strict)
    raise BadInput(f"{path}: unknown format; use .jsonl, .parquet or .txt (optionally .gz/.zst)")


def read_docs(inputs: str | Iterable[str], text_field: str = "text", text_split: str = "file",
              stats: SourceStats | None = None, strict: bool = False,
              nonempty: bool = False) -> Iterator[Doc]:
    """Documents from every file matching `inputs` (globs), in sorted path order.

    `tfds:NAME[/SPLIT][@DATA_DIR]` reads a prepared TFDS dataset instead of files. With
    `nonempty`, a file (or dataset) that yields no document raises BadInput naming it (user
    inputs; an intermediate shard that filtering emptied is fine).
    """
    stats = stats if stats is not None else SourceStats()
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    for spec in map(str, inputs):
        if spec.startswith("tfds:"):
            name, _, data_dir = spec[5:].partition("@")
            name, _, split = name.partition("/")
            files = [(spec, read_tfds(name, split or "train", data_dir or None, text_field, stats, strict))]
        else:
            files = ((path, read_file(path, text_field, text_split, stats, strict)) for path in expand_paths(spec))
        for path, docs in files:
            docs_before, bad_before, examples_before = stats.docs, stats.bad, len(stats.bad_examples)
            yield from docs
            if nonempty and stats.docs == docs_before:
                raise BadInput(f"{path}: no usable document ({_why_empty(stats, bad_before, examples_before)}); "
                               f"check the file and --text-field ({text_field!r})")


def _why_empty(stats: SourceStats, bad_before: int, examples_before: int) -> str:
    bad = stats.bad - bad_before
    if not bad:
        return "the file is empty"
    first = stats.bad_examples[examples_before] if len(stats.bad_examples) > examples_before else ""
    return f"all {bad} records bad" + (f", e.g. {first}" if first else "")


def write_jsonl(path: str, docs: Iterable[Doc]) -> int:
    """Write docs as JSONL (`.gz` compressed if so named) atomically: tmp file, then rename."""
    tmp = f"{path}.tmp"
    n = 0
    opener = gzip.open if path.endswith(".gz") else open
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with opener(tmp, "wt", encoding="utf-8") as f:
            for doc in docs:
                record = {"id": doc["id"], "text": doc["text"], **doc.get("meta", {})}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
    except BaseException:
        os.remove(tmp)  # never leave a partial file behind
        raise
    os.replace(tmp, path)
    return n
