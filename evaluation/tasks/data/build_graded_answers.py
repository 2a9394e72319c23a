"""Build graded_answers.jsonl: answers of known quality order for the numeric-score probe.

    python evaluation/tasks/data/build_graded_answers.py            # rewrites the vendored file

From vendored data only, deterministic by `SEED`:
- 40 Self-Instruct seed tasks (align/assets/seed_tasks.jsonl, Apache-2.0; non-classification
  tasks whose reference output has at least 20 words, sampled by the seed): the question is the
  instruction (and its input); answers: the reference output (gold 3), its first third of words
  cut mid-thought (gold 2), the reference output of another sampled task (gold 1: unrelated).
- the ASDiv problems whose answer is a number (39 of the 40 in
  evaluation/tasks/data/asdiv_sample.jsonl, CC-BY-NC-4.0): the question is passage + question; answers: the reference ("9 apples", gold 3), the same unit with a
  number far off (n * k + j, k in 3..9, j in 1..9: on topic but wrong, gold 2), an NQ-open answer
  without digits (evaluation/tasks/data/nq_open_facts.jsonl: off topic, gold 1).
Each line: {"id", "question", "answer", "gold", "lang": "en", "meta": {"source", "variant"}}.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 16
N_SEED_TASKS = 40
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SEED_TASKS = ROOT / "align" / "assets" / "seed_tasks.jsonl"
ASDIV = HERE / "asdiv_sample.jsonl"
NQ = HERE / "nq_open_facts.jsonl"
OUT = HERE / "graded_answers.jsonl"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _item(source: str, i: int, variant: str, question: str, answer: str, gold: int) -> dict:
    return {"id": f"{source}-{i}-{variant}", "question": question, "answer": answer,
            "gold": gold, "lang": "en", "meta": {"source": source, "variant": variant}}


def seed_task_items(tasks: list[dict], rng: random.Random, n: int) -> list[dict]:
    usable = [t for t in tasks if not t.get("is_classification")
              and len(t["instances"][0]["output"].split()) >= 20]
    chosen = rng.sample(usable, n)
    shift = rng.randrange(1, n)  # unrelated answer: the task `shift` places further on
    out = []
    for i, t in enumerate(chosen):
        inst = t["instances"][0]
        question = t["instruction"].strip()
        if inst["input"].strip():
            question += "\n\n" + inst["input"].strip()
        words = inst["output"].split()
        truncated = " ".join(words[:max(3, len(words) // 3)])
        other = chosen[(i + shift) % n]["instances"][0]["output"].strip()
        out += [_item("seed", i, "reference", question, inst["output"].strip(), 3),
                _item("seed", i, "truncated", question, truncated, 2),
                _item("seed", i, "unrelated", question, other, 1)]
    return out


def asdiv_items(problems: list[dict], facts: list[dict], rng: random.Random) -> list[dict]:
    numeric = [(p, m) for p in problems
               if (m := re.match(r"\s*(\d+)(.*)$", p["answer"])) is not None]
    words = [a for a in (f["answer"][0] if isinstance(f["answer"], list) else f["answer"]
                         for f in facts) if not re.search(r"\d", str(a))]
    picks = rng.sample(range(len(words)), len(numeric))
    out = []
    for i, (p, m) in enumerate(numeric):
        question = f"{p['passage'].strip()} {p['question'].strip()}"
        n, unit = int(m.group(1)), m.group(2)
        wrong = n * rng.randint(3, 9) + rng.randint(1, 9)
        unrelated = words[picks[i]]
        out += [_item("asdiv", i, "reference", question, p["answer"].strip(), 3),
                _item("asdiv", i, "wrong_number", question, f"{wrong}{unit}".strip(), 2),
                _item("asdiv", i, "unrelated", question, str(unrelated).strip(), 1)]
    return out


def build(seed: int = SEED, n_seed_tasks: int = N_SEED_TASKS) -> list[dict]:
    rng = random.Random(seed)
    return (seed_task_items(_read(SEED_TASKS), rng, n_seed_tasks)
            + asdiv_items(_read(ASDIV), _read(NQ), rng))


def main() -> None:
    items = build()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items),
                   encoding="utf-8")
    print(f"wrote {len(items)} graded answers to {OUT}")


if __name__ == "__main__":
    main()
