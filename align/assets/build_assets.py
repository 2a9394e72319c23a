"""Rebuild the derived assets of align/assets from the vendored seed_tasks.jsonl.

    python align/assets/build_assets.py

Writes (deterministically):
  seed_sft.jsonl     175 instruction triples {id, instruction, input, output}, each instruction
                     phrased FLAN-style by align.templates.flan_instructions("self_instruct")
  seed_pairs.jsonl   175 synthetic preference pairs {id, prompt: {instruction, input}, chosen,
                     rejected, rule}: chosen = the task's real output; rejected = a corruption
                     chosen by a hash of the id (see `rejected_for`)
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
    phrasing_index,
    seed_task_records,  # noqa: E402
)

RULES = ("other_task", "truncated", "shuffled")


def rejected_for(records: list[dict], i: int) -> tuple[str, str]:
    """(rule, rejected output) for record i: the output of another task (7 tasks further in
    file order), the first third of the real output's words, or its words in reverse order."""
    output = records[i]["output"]
    words = output.split()
    rule = RULES[phrasing_index(0, records[i]["id"], len(RULES))]
    if rule == "truncated" and len(words) < 3 or rule == "shuffled" and len(words) < 2:
        rule = "other_task"
    if rule == "other_task":
        return rule, records[(i + 7) % len(records)]["output"]
    if rule == "truncated":
        return rule, " ".join(words[:max(1, len(words) // 3)])
    return rule, " ".join(reversed(words))


def main() -> None:
    tasks = [json.loads(line) for line in open(HERE / "seed_tasks.jsonl", encoding="utf-8")]
    records = list(seed_task_records(tasks))
    with open(HERE / "seed_sft.jsonl", "w", encoding="utf-8") as f:
        for r in flan_instructions(records, "self_instruct", seed=0):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(HERE / "seed_pairs.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            rule, rejected = rejected_for(records, i)
            f.write(json.dumps({"id": r["id"], "prompt": {"instruction": r["instruction"],
                                                          "input": r["input"]},
                                "chosen": r["output"], "rejected": rejected, "rule": rule},
                               ensure_ascii=False) + "\n")
    from hibari.data.tokenizer import train_tokenizer
    texts = [{"text": t} for r in records for t in (r["instruction"], r["input"], r["output"])
             if t]
    texts += [{"text": t.with_input + t.without_input} for t in (ALPACA_EN, ALPACA_JA)] * 20
    train_tokenizer(texts, str(HERE / "seed_sp.model"), vocab_size=1000, num_threads=1,
                    seed_sentencepiece_size=100_000)


if __name__ == "__main__":
    main()
