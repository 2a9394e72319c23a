"""Calibration text for activation statistics (pruning, language-specific neurons), as packed
token batches.

    texts = read_texts("data/assets/corpus/en.jsonl.gz")          # or notes.txt, or a task
    batches = token_batches(tok, texts, seq_len=512, batch_size=8, max_tokens=32768)
    # [(tokens[b, t], segment_ids[b, t]), ...] -> hibari.model.activations.dense_statistics

Sources (`read_texts`):
  *.txt                 documents separated by blank lines (one or more empty lines; a file
                        without blank lines is one document).
  *.jsonl, *.jsonl.gz   the `field` (default "text") of each record; a malformed line, a record
                        without the field or with an empty or non-string one raises a UserError
                        naming file:line.
  a task name or YAML   the task's rendered prompts (hibari.evaluation.tasks: the default
                        template, 0-shot, `build_context`), one document per example; for a
                        perplexity task, its texts.

Packing (`token_batches`): each text is encoded as a whole prompt by the evaluation tokenizer
(`EvalTokenizer.encode(text)`: its context prefix, i.e. BOS where the tokenizer adds one, then
the text), the documents are concatenated in order and cut into rows of `seq_len`
(`hibari.data.pack.pack_greedy`: a document longer than the room left continues as the first
segment of the next row; segment ids number the documents of a row 1, 2, ...; 0 = padding).
The stream stops after `max_tokens` real tokens (the last document cut there). The last batch is
filled up with all-padding rows so that every batch has the same shape (one compilation).
Nothing is random: the same texts and tokenizer give the same batches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from hibari.base.errors import InputNotFound, UsageError
from hibari.data.pack import pack_greedy
from hibari.data.sources import read_jsonl, read_text

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TASK_SUFFIXES = (".yaml", ".yml")


def _task_texts(name_or_path: str | Path) -> list[str]:
    from hibari.evaluation.tasks import build_context, load_task
    task = load_task(name_or_path)
    template = task.templates[0]
    return [build_context(task, template, e, []) for e in task.examples(strict=True)]


def read_texts(source: str | Path, field: str = "text") -> list[str]:
    """The documents of `source`: a .txt file (blank-line separated), a .jsonl / .jsonl.gz file
    (`field` of each record) or a task name / task YAML (its 0-shot prompts, default template).
    Raises a UserError naming the file (and line) for a missing file or a bad row."""
    name = str(source)
    path = Path(source)
    if name.endswith(JSONL_SUFFIXES) or name.endswith(TEXT_SUFFIXES):
        if not path.is_file():
            raise InputNotFound(f"calibration file {name} does not exist; check the path")
        if name.endswith(TEXT_SUFFIXES):
            docs = read_text(name, split="paragraph", strict=True)
        else:
            docs = read_jsonl(name, text_field=field, strict=True)
        texts = [d["text"] for d in docs]
    elif name.endswith(TASK_SUFFIXES) or (not path.suffix and not path.exists()):
        texts = _task_texts(source)
    else:
        raise UsageError(f"calibration source {name!r}: expected a .txt, .jsonl or .jsonl.gz "
                         "file, a task YAML or a task name (hibari eval --list-tasks)")
    if not texts:
        raise UsageError(f"calibration source {name!r} holds no text")
    return texts


def _capped(docs: Iterator[np.ndarray], max_tokens: int | None) -> Iterator[np.ndarray]:
    left = max_tokens
    for doc in docs:
        if left is not None:
            doc = doc[:left]
            left -= len(doc)
        if len(doc):
            yield doc
        if left is not None and left <= 0:
            return


def token_batches(tokenizer, texts, *, seq_len: int, batch_size: int,
                  max_tokens: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(tokens[batch_size, seq_len] int32, segment_ids[batch_size, seq_len] int32), ...]:
    `texts` encoded with `tokenizer` (an EvalTokenizer: `encode(text)` with its prefix) and
    packed greedily, one segment per document (0 = padding), long documents split across
    rows, at most `max_tokens` real tokens in all (None: every text)."""
    if seq_len < 1 or batch_size < 1:
        raise UsageError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"max_tokens={max_tokens} must be >= 1 (or None for every text)")
    docs = (np.asarray(tokenizer.encode(t), np.int32) for t in texts if t)
    rows = list(pack_greedy(_capped(docs, max_tokens), seq_len, tokenizer.pad_id))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens = np.full((batch_size, seq_len), tokenizer.pad_id, np.int32)
        segments = np.zeros((batch_size, seq_len), np.int32)
        for i, (t, s) in enumerate(chunk):
            tokens[i], segments[i] = t, s
        batches.append((tokens, segments))
    return batches
