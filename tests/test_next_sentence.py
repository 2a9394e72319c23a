"""The next-sentence tasks (evaluation/tasks/data/build_next_sentence.py): the vendored files are
the builder's output, and every item is what it claims, checked against the raw corpus text."""
import gzip
import importlib.util
import json
import re
from collections import Counter

import pytest

from hibari.data import CORPUS_DIR
from hibari.evaluation.tasks import TASK_DIR, load_task

BUILDER = TASK_DIR / "data" / "build_next_sentence.py"
LANGS = ("en", "ja")


def _builder():
    spec = importlib.util.spec_from_file_location("build_next_sentence", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus():
    out = {}
    for lang in LANGS:
        with gzip.open(CORPUS_DIR / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
            out[lang] = [json.loads(line) for line in f if line.strip()]
    return out


def _rows(lang):
    path = TASK_DIR / "data" / f"next_sentence_{lang}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _choices(row):
    return [re.sub(r"^[A-D]\. ", "", line) for line in row["options"].split("\n")]


def _flat(text, lang):
    """Independent of the builder's paragraph logic: Japanese without any whitespace (the
    Debian Reference is hard-wrapped mid-sentence), English with whitespace runs as one space."""
    return re.sub(r"\s+", "", text) if lang == "ja" else re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("lang", LANGS)
def test_vendored_files_are_the_builders_output(lang, corpus):
    b = _builder()
    expected = b.render(b.build(lang, corpus[lang]))
    assert (TASK_DIR / "data" / f"next_sentence_{lang}.jsonl").read_text(encoding="utf-8") \
        == expected


@pytest.mark.parametrize("lang", LANGS)
def test_gold_follows_the_context_in_its_document_and_distractors_do_not(lang, corpus):
    texts = {r["id"]: _flat(r["text"], lang) for r in corpus[lang]}
    sep = "" if lang == "ja" else " "
    rows = _rows(lang)
    assert len(rows) == 100 and len({r["doc"] for r in rows}) == 100  # one item per document
    letters = Counter()
    for row in rows:
        choices = _choices(row)
        letter = row["answer"][0]
        letters[letter] += 1
        gold = choices["ABCD".index(letter)]
        assert row["answer"] == f"{letter}. {gold}" and len(set(choices)) == 4
        doc = texts[row["doc"]]
        # the context, then (after a space, or nothing in Japanese) the gold sentence
        assert _flat(row["question"] + sep + gold, lang) in doc, row["id"]
        distractors = [c for c in choices if c != gold]
        for sentence, other in zip(distractors, row["distractor_docs"]):
            assert other != row["doc"]
            assert _flat(sentence, lang) in texts[other], (row["id"], sentence)
            assert _flat(sentence, lang) not in doc, (row["id"], sentence)
            assert 0.7 * len(gold) <= len(sentence) <= 1.3 * len(gold), (row["id"], sentence)
        for s in choices + [row["question"]]:
            assert 15 <= len(s) <= 401 and "\n" not in s
    # the gold position is spread over the four letters (seeded shuffle, not always "A")
    assert set(letters) == set("ABCD") and min(letters.values()) >= 15, letters


@pytest.mark.parametrize("lang", LANGS)
def test_task_documents_leave_the_held_out_tail_alone(lang, corpus):
    """bench/prune_study.py holds out the last documents of each file as held-out text."""
    tail = {r["id"] for r in corpus[lang][-20:]}
    used = {r["doc"] for r in _rows(lang)} | {d for r in _rows(lang) for d in r["distractor_docs"]}
    assert not used & tail


@pytest.mark.parametrize("lang", LANGS)
def test_tasks_load_and_render_as_continuations(lang):
    task = load_task(f"next_sentence_{lang}")
    examples = task.examples()
    rows = _rows(lang)
    assert task.kind == "choice" and len(examples) == len(rows) == 100
    for ex, row in zip(examples, rows):
        assert ex["question"] == row["question"]
        assert ex["choices"][ex["gold"]] == row["answer"][3:]
    target = task.templates[0].target
    assert target == ("{choice}" if lang == "ja" else " {choice}")
