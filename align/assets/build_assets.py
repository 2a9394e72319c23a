"""Rebuild the derived assets of align/assets from the vendored seed_tasks.jsonl.

    python align/assets/build_assets.py

Writes (deterministically):
  seed_sft.jsonl     175 instruction triples {id, instruction, input, output}, each instruction
                     phrased FLAN-style by align.templates.flan_instructions("self_instruct")
  seed_pairs.jsonl   synthetic preference pairs {id, prompt: {instruction, input}, chosen,
                     rejected, rule} with one rule (RULE_TEXT): chosen = the task's real output;
                     rejected = the same output stopped before its last word (`rejected_for`);
                     one pair per seed task whose output has two words or more
  seed_sp.model      a 1,000-piece SentencePiece unigram tokenizer (byte fallback, chat-role
                     tokens) trained on the seed tasks and the templates' text
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

from hibari.align.templates import (
    ALPACA_EN,
    ALPACA_JA,
    flan_instructions,
    seed_task_records,  # noqa: E402
)

RULE = "cut_short"
RULE_TEXT = ("chosen = the task's real output; rejected = the same output stopped before its last "
             "word (an unfinished answer), for the outputs of two words or more")


def rejected_for(output: str) -> str | None:
    """The output stopped before its last whitespace-separated word (trailing space dropped);
    None when the output has fewer than two words (no pair). The pairs differ only in how the
    answer ends, so a model can learn the rule from the text: end an answer where it is
    complete, not mid-sentence."""
    parts = output.rstrip().rsplit(None, 1)
    return parts[0].rstrip() if len(parts) == 2 else None


def preference_pairs(records: list[dict]) -> list[dict]:
    """The pairs of `records` (seed tasks as {id, instruction, input, output}) in file order."""
    pairs = []
    for r in records:
        rejected = rejected_for(r["output"])
        if rejected is not None:
            pairs.append({"id": r["id"], "prompt": {"instruction": r["instruction"],
                                                    "input": r["input"]},
                          "chosen": r["output"], "rejected": rejected, "rule": RULE})
    return pairs


def main() -> None:
    tasks = [json.loads(line) for line in open(HERE / "seed_tasks.jsonl", encoding="utf-8")]
    records = list(seed_task_records(tasks))
    with open(HERE / "seed_sft.jsonl", "w", encoding="utf-8") as f:
        for r in flan_instructions(records, "self_instruct", seed=0):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(HERE / "seed_pairs.jsonl", "w", encoding="utf-8") as f:
        for pair in preference_pairs(records):
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    from hibari.data.tokenizer import train_tokenizer
    texts = [{"text": t} for r in records for t in (r["instruction"], r["input"], r["output"])
             if t]
    texts += [{"text": t.with_input + t.without_input} for t in (ALPACA_EN, ALPACA_JA)] * 20
    train_tokenizer(texts, str(HERE / "seed_sp.model"), vocab_size=1000, num_threads=1,
                    seed_sentencepiece_size=100_000)


if __name__ == "__main__":
    main()
