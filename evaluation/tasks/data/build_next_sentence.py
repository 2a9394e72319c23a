"""Build next_sentence_{en,ja}.jsonl: "which sentence comes next?" multiple choice from the
bundled corpus (data/assets/corpus/{en,ja}.jsonl.gz; origin and licenses in
data/assets/SOURCES.md), the same construction in both languages.

    python evaluation/tasks/data/build_next_sentence.py     # rewrites the two JSONL files

Per language: documents are reserved for the task by a seeded draw from all but the last
RESERVE_SKIP_LAST documents of the file (those are bench/prune_study.py's held-out text; the
study also leaves every reserved document out of its calibration text). Each document is cut
into paragraphs at blank lines; a paragraph's lines are joined (Japanese: with nothing, the
Debian Reference is hard-wrapped; English: with a space) and split into sentences after
。！？ (Japanese) or after [.!?] (and a closing quote/bracket) followed by a space (English).
A sentence is kept if it ends with that punctuation and has MIN_CHARS..MAX_CHARS characters
(Japanese ones must contain hiragana: natural prose, not an option list). One item per reserved
document, at a seeded position: context = CONTEXT_SENTENCES consecutive kept sentences of a
paragraph, gold = the sentence that follows them in that paragraph; 3 distractors drawn
(seeded) from the kept sentences of the OTHER item documents whose length is within
±LENGTH_BAND of the gold's (in characters); the gold's position among the 4 is seeded.
Records are langtest_choice rows (question, options "A. x\\nB. y...", answer "B. y") plus
`doc`, `position` (index of the gold in the document's kept-sentence list of its paragraph)
and `distractor_docs`, for the tests and for the prune study's exclusion.
"""
from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

from hibari.data import CORPUS_DIR

HERE = Path(__file__).resolve().parent
LANGS = ("en", "ja")
SEED = 20261201
ITEMS = 100
CONTEXT_SENTENCES = 2
MIN_CHARS, MAX_CHARS = 15, 200
LENGTH_BAND = 0.3
RESERVE_SKIP_LAST = 20
N_DISTRACTORS = 3
LETTERS = "ABCD"
BLANK = re.compile(r"\n[ \t\u00a0\u3000]*\n")
SPLIT = {"ja": re.compile(r"(?<=[。！？])"),
         "en": re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")}
END = {"ja": re.compile(r"[。！？]$"), "en": re.compile(r"[.!?][\"')\]]?$")}
HIRAGANA = re.compile(r"[\u3041-\u309f]")


def read_corpus(lang: str, corpus: Path = CORPUS_DIR) -> list[dict]:
    """The records ({"id", "text", ...}) of data/assets/corpus/<lang>.jsonl.gz, in file order."""
    with gzip.open(corpus / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def paragraphs(text: str, lang: str) -> list[str]:
    """Blank-line separated blocks, each block's lines stripped and joined."""
    sep = "" if lang == "ja" else " "
    out = []
    for block in BLANK.split(text.replace("\r", "")):
        lines = [ln.strip(" \t\u00a0\u3000") for ln in block.split("\n")]
        joined = sep.join(ln for ln in lines if ln)
        if joined:
            out.append(re.sub(r"\s+", " ", joined) if lang == "en" else joined)
    return out


def kept(sentence: str, lang: str) -> bool:
    return (MIN_CHARS <= len(sentence) <= MAX_CHARS and bool(END[lang].search(sentence))
            and (lang != "ja" or bool(HIRAGANA.search(sentence))))


def sentence_runs(text: str, lang: str) -> list[list[str]]:
    """Per paragraph, the runs of consecutive kept sentences (a skipped piece ends a run, so
    consecutive sentences in a run really are consecutive in the text)."""
    runs = []
    for para in paragraphs(text, lang):
        run: list[str] = []
        for piece in SPLIT[lang].split(para):
            piece = piece.strip()
            if not piece:
                continue
            if kept(piece, lang):
                run.append(piece)
            else:
                if run:
                    runs.append(run)
                run = []
        if run:
            runs.append(run)
    return runs


def reserved_docs(records: list[dict], rng: random.Random) -> list[dict]:
    """All candidate documents (not among the last RESERVE_SKIP_LAST), in a seeded order."""
    pool = records[:len(records) - RESERVE_SKIP_LAST]
    return rng.sample(pool, len(pool))


def build(lang: str, records: list[dict], seed: int = SEED, n: int = ITEMS) -> list[dict]:
    """The task rows of one language (see the module docstring)."""
    rng = random.Random(f"{seed}:{lang}")
    usable = []  # (doc id, runs) of candidate documents with an item position, seeded order
    for rec in reserved_docs(records, rng):
        runs = [r for r in sentence_runs(rec["text"], lang) if len(r) > CONTEXT_SENTENCES]
        if runs:
            usable.append((rec["id"], runs))
    # the first n usable documents give the items and, each for the others, the distractors
    items_docs = usable[:n]
    pool = [(doc, s) for doc, runs in items_docs for run in runs for s in run]
    rows = []
    for k, (doc, runs) in enumerate(items_docs):
        spots = [(ri, i) for ri, run in enumerate(runs) for i in range(CONTEXT_SENTENCES, len(run))]
        ri, i = spots[rng.randrange(len(spots))]
        run = runs[ri]
        context, gold = run[i - CONTEXT_SENTENCES:i], run[i]
        lo, hi = len(gold) * (1 - LENGTH_BAND), len(gold) * (1 + LENGTH_BAND)
        own = {s for r in runs for s in r}  # no distractor that also occurs in this document
        cands = sorted({s for d, s in pool if d != doc and lo <= len(s) <= hi and s not in own})
        if len(cands) < N_DISTRACTORS:
            continue
        distractors = rng.sample(cands, N_DISTRACTORS)
        where = {s: d for d, s in pool if d != doc}
        choices = list(distractors)
        g = rng.randrange(N_DISTRACTORS + 1)
        choices.insert(g, gold)
        sep = "" if lang == "ja" else " "
        rows.append({
            "id": f"next_sentence_{lang}-{k}", "doc": doc,
            "question": sep.join(context),
            "options": "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices)),
            "answer": f"{LETTERS[g]}. {gold}",
            "distractor_docs": [where[s] for s in distractors]})
    return rows


def task_docs(rows: list[dict]) -> set[str]:
    """Every corpus document a task's rows use (item documents and distractor documents)."""
    return {r["doc"] for r in rows} | {d for r in rows for d in r["distractor_docs"]}


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> None:
    for lang in LANGS:
        rows = build(lang, read_corpus(lang))
        (HERE / f"next_sentence_{lang}.jsonl").write_text(render(rows), encoding="utf-8")
        print(f"next_sentence_{lang}.jsonl: {len(rows)} items from "
              f"{len(task_docs(rows))} documents")


if __name__ == "__main__":
    main()
