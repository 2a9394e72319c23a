"""Supervised fine-tuning: render, tokenize with a response-only loss mask, pack, load.

Records (JSONL): instruction triples {id?, instruction, input?, output} rendered through an
instruction template, or chats {id?, messages: [{role, content}, ...]} rendered through the chat
template (every assistant turn is a response). Each example is `[bos] prompt response [eos]`
tokenized segment by segment, so `loss_mask` comes from token spans.

Packing: whole examples are placed into rows of `seq_len` by first-fit-decreasing (several
examples per row, each its own segment id: no cross-example attention, positions restart);
examples longer than `seq_len` are skipped and counted. Rows are reshuffled every epoch from
(seed, epoch). The loss is train/losses' `lm_loss_fn`, which honours `loss_mask`.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from hibari.align.data import AlignDataError, RowLoader, SegmentEncoder, Skipped, read_records
from hibari.align.templates import TEMPLATES, ChatTemplate, Segment, as_chat, get_template
from hibari.data.pack import first_fit_decreasing
from hibari.train.losses import lm_loss_fn


class Example(NamedTuple):
    id: str
    tokens: np.ndarray  # [n] int32
    loss_mask: np.ndarray  # [n] int32, 1 = target


def render(record: Mapping[str, Any], template) -> list[Segment]:
    """Segments of a record: chats through the chat template, triples through `template`
    (the chat template makes a triple a user turn and an assistant turn)."""
    if "messages" in record:
        return TEMPLATES["chat"].render(record)
    if isinstance(template, ChatTemplate):
        return template.render(as_chat(record))
    return template.render(record)


def tokenize(record: Mapping[str, Any], encoder: SegmentEncoder, template, seq_len: int
             ) -> Example:
    """One Example; raises TemplateError (malformed) or AlignDataError (too long)."""
    tokens, mask = encoder.encode(render(record, template))
    if len(tokens) > seq_len:
        raise AlignDataError(f"over-long example (> seq_len={seq_len} tokens)")
    return Example(str(record.get("id")), tokens, mask)


def load_examples(paths: str | Sequence[str], encoder: SegmentEncoder, template,
                  seq_len: int, skipped: Skipped | None = None) -> tuple[list[Example], Skipped]:
    """Tokenized examples of JSONL files; malformed / over-long records are counted."""
    template = get_template(template) if isinstance(template, (str, Mapping)) else template
    return read_records(paths, lambda r: tokenize(r, encoder, template, seq_len), skipped)


def pack(examples: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
    """Rows {tokens, segment_ids, loss_mask}[rows, seq_len] by first-fit-decreasing."""
    lengths = np.array([len(e.tokens) for e in examples])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat_tokens = np.concatenate([e.tokens for e in examples])
    flat_mask = np.concatenate([e.loss_mask for e in examples])
    # pack index ranges into the flat arrays (data.pack's first-fit-decreasing on spans)
    bins = first_fit_decreasing([np.arange(s, s + n) for s, n in zip(starts, lengths)], seq_len)
    rows = {k: np.zeros((len(bins), seq_len), np.int32)
            for k in ("tokens", "segment_ids", "loss_mask")}
    for r, spans in enumerate(bins):
        fill = 0
        for seg, span in enumerate(spans, 1):
            end = fill + len(span)
            rows["tokens"][r, fill:end] = flat_tokens[span]
            rows["loss_mask"][r, fill:end] = flat_mask[span]
            rows["segment_ids"][r, fill:end] = seg
            fill = end
    return rows


def unpacked(examples: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
    """One example per row (padding): the reference that packing must match."""
    rows = {k: np.zeros((len(examples), seq_len), np.int32)
            for k in ("tokens", "segment_ids", "loss_mask")}
    for r, e in enumerate(examples):
        n = len(e.tokens)
        rows["tokens"][r, :n], rows["loss_mask"][r, :n], rows["segment_ids"][r, :n] = \
            e.tokens, e.loss_mask, 1
    return rows


def epoch_rows(examples: Sequence[Example], seq_len: int, seed: int, epoch: int | None,
               buffer_size: int = 1024) -> dict[str, np.ndarray]:
    """An epoch's packed rows: examples shuffled from (seed, epoch), packed buffer by buffer,
    rows shuffled again; `epoch=None` keeps the file order (evaluation)."""
    order = np.arange(len(examples))
    if epoch is not None:
        order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    parts = [pack([examples[i] for i in order[s:s + buffer_size]], seq_len)
             for s in range(0, len(order), buffer_size)]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if epoch is not None:
        perm = np.random.default_rng([seed, epoch, 1]).permutation(len(rows["tokens"]))
        rows = {k: v[perm] for k, v in rows.items()}
    return rows


def sft_loader(examples: Sequence[Example], *, seq_len: int, batch_size: int, seed: int,
               split: str = "train", shard_index: int | None = None,
               shard_count: int | None = None) -> RowLoader:
    """Host-local batches {tokens, segment_ids, positions, loss_mask}[batch_size, seq_len];
    train repeats forever (reshuffled per epoch), eval is one ordered pass."""
    if not examples:
        raise AlignDataError(f"no {split} examples")
    train = split == "train"
    return RowLoader(lambda e: epoch_rows(examples, seq_len, seed, e if train else None),
                     batch_size=batch_size, shard_index=shard_index, shard_count=shard_count,
                     epochs=None if train else 1)


def sft_loss_fn(cfg, z_loss: float = 0.0, logits_chunk: int = 0):
    """Next-token loss over response tokens only: train/losses' lm_loss_fn reads
    batch["loss_mask"]; aux["weight"] = counted tokens."""
    return lm_loss_fn(cfg, z_loss, logits_chunk)
