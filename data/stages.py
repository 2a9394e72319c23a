"""The rules both runners of `hibari data prepare` share (data/pipeline.py runs the stages locally,
data/beam.py as Beam pipelines): the held-out split, the tokenizer's training call and its errors,
the report's totals."""
from __future__ import annotations

import re
import zlib

from hibari.base.errors import UserError
from hibari.data.sources import Doc, read_docs


class PrepareError(UserError, ValueError):
    """Input or settings that `prepare` cannot use; the message names the file or field."""


def is_heldout(doc_id: str, every: int = 20) -> bool:
    return zlib.crc32(doc_id.encode()) % every == 0


def split_docs(path: str, every: int, heldout: bool):
    """The documents of `path` on one side of the held-out split."""
    return (d for d in read_docs(path) if is_heldout(d["id"], every) == heldout)


SPLITS = ((False, "pack", "packed"), (True, "pack_heldout", "packed-heldout"))  # (held out, report key, dir)


def sentencepiece_message(e: Exception) -> str:
    """SentencePiece's complaint without its source location, e.g. "Vocabulary size too high
    (3000). Please set it to a value <= 277."."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    text = re.sub(r"^[A-Z_]+: \S+\(\d+\) ", "", text)  # "INTERNAL: src/trainer_interface.cc(744) "
    return re.sub(r"^\[.*?\] (?=\S)", "", text)  # the failed check, when a message follows


def train_tokenizer_on(cfg, sample: list[Doc], corpus: str, model: str, totals: dict):
    """Train `model` on the tokenizer sample (`tokenizer_sample` of the training documents);
    errors name the corpus and what the stages left of it."""
    from hibari.data.tokenizer import train_tokenizer
    if not sample:
        dropped = ", ".join(f"{r} {d['docs']}" for r, d in list(totals["dropped"].items())[:3])
        raise PrepareError(f"{corpus}: no training document to train the tokenizer on ({totals['read_docs']} "
                           f"read, {totals['filtered_docs']} kept by the filters{': ' + dropped if dropped else ''}; "
                           f"{totals['dedup_docs_out']} after dedup); check the inputs, languages and text_field")
    try:
        return train_tokenizer(sample, model, vocab_size=cfg.tokenizer_vocab_size, model_type=cfg.tokenizer_model_type,
                               character_coverage=cfg.tokenizer_character_coverage)
    except RuntimeError as e:  # SentencePiece's own complaint, e.g. a vocabulary too large for the text
        raise PrepareError(f"tokenizer_vocab_size={cfg.tokenizer_vocab_size} on {corpus}: SentencePiece says "
                           f"\"{sentencepiece_message(e)}\"; change the vocabulary size or add text") from None


def totals(shard_stats: list[dict], dedup: dict) -> dict:
    dropped: dict[str, dict] = {}
    for s in shard_stats:
        for reason, d in s["filter"]["dropped"].items():
            agg = dropped.setdefault(reason, {"docs": 0, "chars": 0})
            agg["docs"] += d["docs"]
            agg["chars"] += d["chars"]
    return {"read_docs": sum(s["read"]["docs"] for s in shard_stats),
            "read_chars": sum(s["read"]["chars"] for s in shard_stats),
            "bad_records": sum(s["read"]["bad"] for s in shard_stats),
            "bad_examples": [e for s in shard_stats for e in s["read"]["bad_examples"]][:20],
            "filtered_docs": sum(s["filter"]["docs_out"] for s in shard_stats),
            "filtered_chars": sum(s["filter"]["chars_out"] for s in shard_stats),
            "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1]["docs"])),
            "dedup_docs_out": dedup["docs_out"], "exact_removed": dedup["exact_removed"],
            "near_removed": dedup["near_removed"], "near_clusters": dedup["near_clusters"]}


