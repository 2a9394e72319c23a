"""The numeric-score probe (evaluation/numeric.py): its statistics against their definitions
(tau-b by counting pairs, kurtosis by moments, entropy by hand), the number reader against
lm.loglikelihood on a tiny random model, run_numeric with a scripted generator, the task
file's `numeric:` section and the graded-answer reader."""
import dataclasses
import importlib.util
import itertools
import json
import math

import numpy as np
import pytest

from hibari.evaluation import judge as J
from hibari.evaluation import numeric as N
from hibari.evaluation.formats import FormatError, graded_jsonl
from hibari.evaluation.tasks import (
    TASK_DIR,
    NumericSpec,
    TaskError,
    TaskSpec,
    Template,
    load_task,
    numeric_spec_from_dict,
)

TASK_FILE = TASK_DIR / "numeric_graded_answers.yaml"


def brute_tau_b(x, y):
    """Kendall's tau-b from its definition: (concordant - discordant) over the geometric mean of
    the pairs untied in x and the pairs untied in y."""
    nc = nd = untied_x = untied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        untied_x += dx != 0
        untied_y += dy != 0
        nc += dx * dy > 0
        nd += dx * dy < 0
    return (nc - nd) / math.sqrt(untied_x * untied_y)


def test_kendall_tau_b_counts_pairs_with_ties():
    rng = np.random.default_rng(0)
    for n, kx, ky in ((12, 3, 5), (30, 4, 2), (7, 7, 7)):
        x = rng.integers(0, kx, n).tolist()
        y = (np.asarray(x) + rng.integers(0, ky, n)).tolist()  # correlated, many ties
        tau, p = N.kendall_tau_b(x, y)
        assert tau == pytest.approx(brute_tau_b(x, y), abs=1e-12)
        assert 0.0 <= p <= 1.0
    assert N.kendall_tau_b([1, 2, 3], [4, 4, 4]) == (None, None)  # no spread: undefined
    assert N.kendall_tau_b([1], [2]) == (None, None)
    assert N.kendall_tau_b([1, 2, 3], [3, 2, 1])[0] == pytest.approx(-1.0)


def test_kurtosis_and_entropy_against_their_definitions():
    scores = [3, 3, 3, 3, 3, 3, 3, 1, 5, 4]
    d = np.asarray(scores, float) - np.mean(scores)
    moment = (d ** 4).mean() / (d ** 2).mean() ** 2 - 3.0
    m, _ = N.score_metrics(scores, [None] * len(scores), 1, 5)
    assert m["kurtosis"] == pytest.approx(moment, rel=1e-12)
    from scipy.stats import kurtosis
    assert m["kurtosis"] == pytest.approx(kurtosis(scores), rel=1e-12)
    # histogram [1, 0, 7, 1, 1] of 10 items
    h = -(3 * 0.1 * math.log2(0.1) + 0.7 * math.log2(0.7))
    assert m["entropy_bits"] == pytest.approx(h, rel=1e-12)
    assert N.entropy_bits([2, 2]) == 1.0 and N.entropy_bits([1, 1, 1, 1]) == 2.0
    assert N.entropy_bits([5, 0, 0]) == 0.0
    assert N.entropy_bits([0.25, 0.75]) == pytest.approx(0.8112781244591328)
    assert N.score_metrics([2, 2, 2], [1, 2, 3], 1, 5)[0]["kurtosis"] is None  # no spread


def test_score_metrics_by_hand():
    scores = [1, 1, 1, 2, None, 5]
    golds = [1, 1, 2, 3, 3, None]
    m, se = N.score_metrics(scores, golds, 1, 5)
    assert m["mean_score"] == pytest.approx(2.0)
    assert m["modal_score"] == 1 and m["modal_share"] == pytest.approx(3 / 5)
    assert se["modal_share"] == pytest.approx(math.sqrt(0.6 * 0.4 * 5 / 4 / 5))
    assert m["parse_failure_rate"] == pytest.approx(1 / 6) and m["n_scored"] == 5
    assert m["kendall_n"] == 4  # items with a score and a gold
    assert m["kendall_tau_b"] == pytest.approx(brute_tau_b([1, 1, 2, 3], [1, 1, 1, 2]))
    assert se["mean_score"] == pytest.approx(np.std([1, 1, 1, 2, 5], ddof=1) / math.sqrt(5))


def test_parse_score():
    assert N.parse_score(" 4", 1, 5) == (4, None)
    assert N.parse_score(" 4/5 because it is good", 1, 5) == (4, None)
    assert N.parse_score(" 85 out of 100", 1, 100) == (85, None)
    assert N.parse_score(" seven", 1, 10) == (None, "no number")
    assert N.parse_score(" 3.5", 1, 5) == (None, "not an integer")
    assert N.parse_score(" 0", 1, 5) == (None, "out of range")
    assert N.parse_score(" 12", 0, 9) == (None, "out of range")


# ------------------------------------------------------------------------ the task's pieces
def _task(spec: NumericSpec, prompt="Rate {answer} to {question} from {low} to {high}."):
    task = TaskSpec(name="t", kind="numeric", data_format="graded_jsonl", data_path=None,
                    templates=[Template(prompt, "")], source="t.yaml")
    task.numeric = spec
    return task


EXAMPLES = [{"id": "a", "question": "q1", "answer": "great", "gold": 3.0},
            {"id": "b", "question": "q2", "answer": "fine", "gold": 2.0},
            {"id": "c", "question": "q3", "answer": "bad", "gold": 1.0},
            {"id": "d", "question": "q4", "answer": "mute"}]


class ScriptedGenerator:
    """A judge that writes a fixed reply per answer word (and remembers what it was asked)."""
    REPLIES = {"great": " 5 stars", "fine": " 3", "bad": " 1.5", "mute": " no idea"}

    def __init__(self):
        self.calls = []

    def generate(self, prompts, max_new_tokens, stop, **kw):
        self.calls.append((list(prompts), max_new_tokens, tuple(stop)))
        return [next(r for w, r in self.REPLIES.items() if f"Rate {w} " in p) for p in prompts]


def test_run_numeric_generation_by_hand():
    spec = NumericSpec(ranges=((1, 5), (0, 9)), read="generation", max_new_tokens=5,
                         wrap="<user>{instruction}</user>\n", primer="Score:")
    task = _task(spec)
    lm = ScriptedGenerator()
    metrics, stderr, records = N.run_numeric(lm, task, task.templates[0], EXAMPLES, [], 0)
    assert lm.calls[0][0][0] == "<user>Rate great to q1 from 1 to 5.</user>\nScore:"
    assert lm.calls[1][0][0] == "<user>Rate great to q1 from 0 to 9.</user>\nScore:"
    assert lm.calls[0][1:] == (5, ("\n",))
    assert [r["score"] for r in records] == [5, 3, None, None] * 2
    assert [r["failure"] for r in records[:4]] == [None, None, "not an integer", "no number"]
    for name in ("1-5", "0-9"):
        assert metrics[f"{name}/parse_failure_rate"] == 0.5
        assert stderr[f"{name}/parse_failure_rate"] == pytest.approx(
            np.std([0, 0, 1, 1], ddof=1) / 2)
        assert metrics[f"{name}/mean_score"] == 4.0
        assert metrics[f"{name}/modal_share"] == 0.5
        assert metrics[f"{name}/kendall_tau_b"] == pytest.approx(1.0)  # 2 scored, concordant
        assert metrics[f"{name}/entropy_bits"] == 1.0
    assert records[0]["range"] == "1-5" and records[4]["range"] == "0-9"
    with pytest.raises(TaskError, match="zero-shot"):
        N.run_numeric(lm, task, task.templates[0], EXAMPLES, EXAMPLES, 2)
    with pytest.raises(TaskError, match="no numeric: section"):
        N.run_numeric(lm, dataclasses.replace(task, numeric=None), task.templates[0], EXAMPLES, [], 0)


@pytest.fixture(scope="module")
def tiny_lm(tiny_export):
    """The shared tiny model; its SentencePiece model writes digits as single tokens (" 10" is
    "▁", "1", "0")."""
    from hibari.evaluation.lm import load_lm
    return load_lm(tiny_export[0], batch_size=4, max_len=128)


def test_number_logprobs_against_loglikelihood(tiny_lm):
    lm = tiny_lm
    contexts = ["Rate it from 1 to 12. Rating:", "Is 7 good? " * 3 + "Rating:"]
    labels = J.score_labels(1, 12)
    assert [len(lm.tokenizer.encode_pair(contexts[0], s)[1]) for s in (" 1", " 10")] == [2, 3]
    got = N.number_logprobs(lm, contexts, labels)
    for c, row in zip(contexts, got):
        ll = {s: lp for s, (lp, _, _) in zip(labels, lm.loglikelihood([(c, s) for s in labels]))}
        # " 1" ends there only if no digit making 10, 11 or 12 follows
        p_more = sum(math.exp(ll[s] - ll[" 1"]) for s in (" 10", " 11", " 12"))
        want = [ll[" 1"] + math.log(1 - p_more)] + [ll[s] for s in labels[1:]]
        assert np.allclose(row, want, atol=2e-5)
    # a context longer than the model: each token sees the max_len tokens before it, so what
    # lies further left does not count
    tail = "Is 7 good? " * 40 + "Rating:"
    assert len(lm.tokenizer.encode(tail)) > lm.max_len + 10
    cut = [N.number_logprobs(lm, [head + tail], labels)[0] for head in ("x " * 30, "y z " * 9)]
    assert np.allclose(cut[0], cut[1], atol=1e-6) and np.all(np.isfinite(cut[0]))


def test_number_logprobs_1_to_100_reads_nine_rows(tiny_lm, monkeypatch):
    """1-100 with " 10" = "▁", "1", "0": the positions before "▁", each first digit and "10"'s
    second digit are read from the rows " 2".." 9" and " 10" of each context: 9 rows."""
    lm, c = tiny_lm, "Rate it from 1 to 100. Rating:"
    real = N._next_token_scorer()
    rows = []

    def counting(cfg, params, inputs, segments, reads):
        rows.append(int((np.asarray(segments).sum(1) > 0).sum()))
        return real(cfg, params, inputs, segments, reads)
    monkeypatch.setattr(N, "_next_token_scorer", lambda: counting)
    labels = J.score_labels(1, 100)
    got = dict(zip(labels, N.number_logprobs(lm, [c], labels)[0]))
    assert sum(rows) == 9
    ll = {s: lp for s, (lp, _, _) in zip(labels, lm.loglikelihood([(c, s) for s in labels]))}
    for s in (" 1", " 10", " 57", " 100", " 9"):  # " 9" ends unless " 90".." 99" follow
        p_more = sum(math.exp(ll[s + str(d)] - ll[s]) for d in range(10) if s + str(d) in ll)
        assert got[s] == pytest.approx(ll[s] + math.log(1 - p_more), abs=2e-5), s


def test_run_numeric_logits_matches_the_distribution(tiny_lm):
    task = _task(NumericSpec(ranges=((1, 5), (1, 12)), read="logits"))
    metrics, stderr, records = N.run_numeric(tiny_lm, task, task.templates[0], EXAMPLES, [], 0)
    assert len(records) == 8
    for r in records:
        lp = N.number_logprobs(tiny_lm, [r["prompt"]], J.score_labels(r["low"], r["high"]))[0]
        p = np.exp(np.asarray(lp) - max(lp))
        p /= p.sum()
        values = np.arange(r["low"], r["high"] + 1)
        assert np.allclose(r["distribution"], p, atol=1e-6)
        assert r["score"] == values[np.argmax(p)]
        assert r["expected"] == pytest.approx(float(p @ values), abs=1e-5)
        assert r["entropy_bits"] == pytest.approx(float(-(p * np.log2(p)).sum()), abs=1e-5)
    for name in ("1-5", "1-12"):
        rs = [r for r in records if r["range"] == name]
        assert metrics[f"{name}/mean_expected"] == pytest.approx(np.mean([r["expected"]
                                                                          for r in rs]))
        assert metrics[f"{name}/item_entropy_bits"] == pytest.approx(
            np.mean([r["entropy_bits"] for r in rs]))
        assert f"{name}/parse_failure_rate" not in metrics
        assert stderr[f"{name}/mean_expected"] > 0


def test_plot_histograms_writes_a_png(tmp_path):
    recs = [{"low": 1, "high": 5, "score": s} for s in (1, 3, 3, None)] + \
           [{"low": 1, "high": 100, "score": s} for s in (50, 80, 80)]
    dist = [{"low": 1, "high": 5, "score": 2, "distribution": [0.1, 0.6, 0.1, 0.1, 0.1]}]
    out = N.plot_histograms([{"name": "a", "records": recs},
                             {"name": "b", "records": recs[:2] + dist}], tmp_path / "h.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert N._bins(1, 100)[:2] == [(1, 5), (6, 10)] and N._bins(0, 9) == [(k, k) for k in
                                                                           range(10)]


# ------------------------------------------------------------------------ the task file
@pytest.mark.parametrize("section, field", [
    ({"ranges": [[1, 5], [5, 1]]}, "numeric.ranges[1]"),
    ({"ranges": [[1, 5], [1, 5]]}, "numeric.ranges"),
    ({"ranges": []}, "numeric.ranges"),
    ({"ranges": [[True, 5]]}, "numeric.ranges[0]"),
    ({"read": "probs"}, "numeric.read"),
    ({"max_new_tokens": 0}, "numeric.max_new_tokens"),
    ({"wrap": "<s>{prompt}"}, "numeric.wrap"),
    ({"wrap": "<s>{instruction"}, "numeric.wrap"),
    ({"primer": 3}, "numeric.primer"),
    ({"rangez": [[1, 5]]}, "unknown key"),
    ([1, 5], "numeric="),
])
def test_numeric_spec_errors_name_file_and_field(section, field):
    with pytest.raises(TaskError) as e:
        numeric_spec_from_dict(section, "tasks/x.yaml")
    assert str(e.value).startswith("tasks/x.yaml: ") and field in str(e.value)


def test_numeric_spec_defaults_and_values():
    assert numeric_spec_from_dict(None, "x") == NumericSpec()
    spec = numeric_spec_from_dict({"ranges": [[0, 9]], "read": "generation",
                                     "wrap": "[{instruction}]"}, "x")
    assert spec.ranges == ((0, 9),) and spec.read == "generation" and spec.wrap == "[{instruction}]"


def test_graded_reader_skips_and_counts_bad_rows(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [json.dumps({"id": "ok", "question": "q", "answer": "a", "gold": 2, "lang": "en"}),
            "{not json",
            json.dumps({"question": "q", "gold": 1}),
            json.dumps({"question": "q", "answer": "a", "gold": "high"}),
            json.dumps({"question": "q", "answer": "a", "gold": True}),
            json.dumps({"question": " ", "answer": "a"}),
            json.dumps({"question": "q", "answer": "b"})]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    ex = graded_jsonl(path, strict=False)
    assert ex == [{"id": "ok", "question": "q", "answer": "a", "gold": 2.0, "lang": "en"},
                  {"id": "g-7", "question": "q", "answer": "b"}]
    assert ex.stats.bad == 5
    assert [s.split(": ")[0] for s in ex.skipped] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "missing field 'answer'" in ex.skipped[1] and "gold 'high'" in ex.skipped[2]
    with pytest.raises(FormatError, match=f"{path}:2"):
        graded_jsonl(path, strict=True)


def test_vendored_task_and_its_builder():
    task = load_task(TASK_FILE)
    examples = graded_jsonl(task.data_path)
    assert len(examples) == 237 and not examples.skipped
    assert sorted({e["gold"] for e in examples}) == [1.0, 2.0, 3.0]
    assert task.numeric.ranges == ((1, 5), (0, 9), (1, 100))
    # the prompt is the judge's single-answer grading instruction, without a reference
    e = examples[0]
    want = J.SINGLE_INSTRUCTION.format(question=e["question"], answer=e["answer"],
                                       reference="", low=1, high=5)
    assert N.numeric_context(task, task.templates[0], e, 1, 5) == want + "\n\nRating:"
    # the vendored file is what the builder makes
    spec = importlib.util.spec_from_file_location(
        "build_graded_answers", task.data_path.parent / "build_graded_answers.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert builder.build() == [json.loads(x) for x in task.data_path.read_text().splitlines()]


def test_hibari_eval_runs_a_numeric_task(tiny_export, tmp_path):
    """`hibari eval` reads kind: numeric through load_task, writes the range statistics, the
    records and the histogram PNG; the metrics are recomputable from the samples."""
    from hibari.cli import main
    from hibari.evaluation.report import read_samples
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(tiny_export[0]), "--tasks",
                 "numeric_graded_answers", "--limit", "6", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    (result,) = data["results"]
    assert result["kind"] == "numeric" and result["n"] == 6
    assert (out / result["histogram"]).stat().st_size > 0
    records = read_samples(out / "results.json")["numeric_graded_answers"]
    assert len(records) == 6 * 3
    for low, high in ((1, 5), (0, 9), (1, 100)):
        mine = [r for r in records if (r["low"], r["high"]) == (low, high)]
        assert result["metrics"][f"{low}-{high}/mean_score"] == pytest.approx(
            np.mean([r["score"] for r in mine]))
        for r in mine:  # each distribution sums to 1 over the range; the score is its argmax
            assert len(r["distribution"]) == high - low + 1
            assert sum(r["distribution"]) == pytest.approx(1.0, abs=1e-6)
            assert r["score"] == low + int(np.argmax(r["distribution"]))
