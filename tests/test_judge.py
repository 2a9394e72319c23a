"""`hibari judge` (evaluation/arena.py, evaluation/judge.py): scripted judges with known
behaviour through the pipeline's own functions, the label scorer against lm.loglikelihood, and
the pipeline end to end on a tiny random model (answer and judgment caches, CLI, errors)."""
import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

import hibari.cli
from hibari.base.progress import Progress
from hibari.base.resources import resource_path
from hibari.evaluation import arena
from hibari.evaluation import judge as J
from hibari.evaluation.arena import (
    PromptFileError,
    check_answer,
    load_prompts,
    pairwise_records,
    read_source,
    single_records,
    verbosity_records,
)
from hibari.evaluation.formats import FormatError

SOURCES = {
    "seed": {"path": "align/assets/seed_tasks.jsonl", "format": "seed_tasks", "limit": 3,
             "category": "open-ended"},
    "nq": {"path": "evaluation/tasks/data/nq_open_facts.jsonl", "format": "nq_open", "limit": 4,
           "category": "open QA"},
    "asdiv": {"path": "evaluation/tasks/data/asdiv_sample.jsonl", "format": "asdiv", "limit": 4,
              "category": "math"},
}


class Scripted:
    """A judge from two plain functions: prefer(first, second) -> P(first better) and
    grade(answer) -> a score distribution."""

    def __init__(self, prefer, grade=None):
        self._prefer, self._grade = prefer, grade

    def prefer(self, requests):
        return [self._prefer(r.first, r.second) for r in requests]

    def grade(self, requests, low, high):
        return [self._grade(r.answer, low, high) for r in requests]


def _prompts():
    return load_prompts(SOURCES)


def _answers(prompts, correct_for):
    """{contestant: {id: answer}}: `correct_for[name]` says, per prompt index, whether the
    answer is right (checkable prompts get the gold answer or a wrong one)."""
    out = {}
    for name, pattern in correct_for.items():
        out[name] = {}
        for i, p in enumerate(prompts):
            right = pattern(i)
            if p["check"] == "number":
                n = p["gold_number"] if right else p["gold_number"] + 7
                text = f"The answer is {n:g}."
            elif p["check"] == "contains":
                text = f"It is {p['answers'][0]}." if right else "It is nobody."
            else:
                text = f"Answer {i} by {name}."
            out[name][p["id"]] = text + f" [{name}]" * (len(name) % 3 + 1)
    return out


def test_prompt_sources_ids_references_and_checks():
    prompts = _prompts()
    assert [p["id"] for p in prompts] == [f"seed/{i}" for i in range(3)] + \
        [f"nq/{i}" for i in range(4)] + [f"asdiv/{i}" for i in range(4)]
    seed0 = json.loads(open(resource_path("hibari.align", "assets", "seed_tasks.jsonl"))
                       .readline())
    assert prompts[0]["instruction"] == seed0["instruction"]
    assert prompts[0]["reference"] == seed0["instances"][0]["output"]
    asdiv0 = prompts[7]  # "Seven red apples and two green apples ..." -> "9 apples"
    assert asdiv0["category"] == "math" and asdiv0["gold_number"] == 9.0
    assert asdiv0["question"].startswith("Seven red apples") and asdiv0["reference"] == "9 apples"
    assert check_answer(asdiv0, "There are 9 apples.") is True
    assert check_answer(asdiv0, "There are 19 apples, not 9.5") is False
    nq0 = prompts[3]  # "terre haute north vigo high school terre haute in" -> ["Indiana"]
    assert check_answer(nq0, "It is in indiana, USA") is True
    assert check_answer(nq0, "Indianapolis") is False
    assert check_answer(prompts[0], "anything") is None


def test_bad_prompt_row_names_file_and_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"question": "q", "answer": ["a"]}\n\n{"question": "r", "answer": []}\n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:3: 'answer' must be a non-empty list"):
        read_source("x", {"path": str(bad), "format": "nq_open", "limit": 0})
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(FormatError, match=r"p\.jsonl:2: not valid JSON"):
        read_source("x", {"path": str(bad), "format": "jsonl", "limit": 0})


def test_always_first_judge_is_never_consistent():
    prompts = _prompts()
    answers = _answers(prompts, {"m1": lambda i: i % 2 == 0, "m2": lambda i: True,
                                 "m3": lambda i: False})
    recs = pairwise_records(Scripted(lambda first, second: 0.9), prompts, answers,
                            ["m1", "m2", "m3"], ("without", "with"))
    assert len(recs) == 2 * len(prompts) * 3  # seed tasks all have a reference
    assert all(r["verdict"] == "tie" for r in recs)
    report = J.position_report(recs)
    for mode in ("without", "with"):
        assert report[mode]["consistency"]["rate"] == 0.0
        assert report[mode]["first_position_rate"] == {"rate": 1.0, "stderr": 0.0,
                                                       "n": 2 * len(prompts) * 3}
    # a judge biased toward position B and otherwise deciding by length: consistent iff the
    # length difference beats the bias -- hand-counted on three pairs
    recs = pairwise_records(
        Scripted(lambda f, s: 0.4 + 0.3 * (len(f) > len(s) + 5) - 0.3 * (len(s) > len(f) + 5)),
        prompts[:1], {"a": {"seed/0": "x" * 10}, "b": {"seed/0": "x" * 12},
                      "c": {"seed/0": "x" * 30}}, ["a", "b", "c"], ("without",))
    # (a,b): 0.4 / 0.4 -> tie; (a,c): 0.1 / 0.7 -> c; (b,c): 0.1 / 0.7 -> c
    assert [r["verdict"] for r in recs] == ["tie", "b", "b"]
    pos = J.position_report(recs)["without"]
    assert pos["consistency"]["rate"] == pytest.approx(2 / 3)
    assert pos["first_position_rate"]["rate"] == pytest.approx(2 / 6)  # only the 0.7s


def test_order_averaged_battles_cancel_a_constant_position_bias():
    from hibari.evaluation.arena import battles
    prompts = _prompts()[:1]
    # always prefers the first answer (0.9 / 0.8), a little more when the first is longer
    recs = pairwise_records(Scripted(lambda f, s: 0.9 if len(f) > len(s) else 0.8), prompts,
                            {"short": {"seed/0": "x"}, "long": {"seed/0": "x" * 9}},
                            ["short", "long"], ("without",))
    assert battles(recs, "without") == [("short", "long", "tie")]
    # P(short better) = (0.8 + (1 - 0.9)) / 2 = 0.45 < 0.5
    assert recs[0]["p_a_better"] == pytest.approx(0.45)
    assert battles(recs, "without", averaged=True) == [("short", "long", "b")]
    calls = itertools.count()  # the same text scored twice, 1e-7 apart (float rounding)
    recs = pairwise_records(Scripted(lambda f, s: 0.8 + 1e-7 * (next(calls) % 2)), prompts,
                            {"m": {"seed/0": "same"}, "n": {"seed/0": "same"}},
                            ["m", "n"], ("without",))
    assert recs[0]["identical"] and recs[0]["p_a_better"] != 0.5
    assert battles(recs, "without", averaged=True) == [("m", "n", "tie")]


def test_weak_judge_paragraph_names_the_favoured_position():
    from hibari.evaluation.arena import weak_judge_paragraph
    prompts = _prompts()
    answers = _answers(prompts, {"m1": lambda i: True, "m2": lambda i: False})
    for p_first, side, pct in ((0.2, "second", "100.0%"), (0.9, "first", "100.0%")):
        recs = pairwise_records(Scripted(lambda f, s, p=p_first: p), prompts, answers,
                                ["m1", "m2"], ("with",))
        text = weak_judge_paragraph({"judge": {"name": "j", "params": 1000},
                                     "bias": {"position": J.position_report(recs),
                                              "verbosity": None, "grading_accuracy": {}}})
        assert f"shown {side} in {pct}" in text and "judged with a reference" in text


def test_prefers_longer_judge_has_verbosity_bias_one():
    prompts = _prompts()
    names = ["m1", "m2"]
    answers = _answers(prompts, {"m1": lambda i: True, "m2": lambda i: False})

    def grade_longer(answer, low, high):  # more mass on high scores for longer answers
        w = min(len(answer) / 200, 1.0)
        ps = [(1 - w) if k == low else w if k == high else 0.0 for k in range(low, high + 1)]
        return ps
    judge = Scripted(lambda f, s: 0.8 if len(f) > len(s) else 0.2, grade_longer)
    recs = verbosity_records(judge, prompts, answers, names, n=6, repeat=2, low=1, high=5)
    assert len(recs) == 6 and {r["model"] for r in recs} == {"m1", "m2"}
    assert len({r["prompt_id"] for r in recs}) == 6
    assert all(r["padded"] == J.pad_with_repetition(r["original"], 2) for r in recs)
    rep = J.verbosity_report(recs)
    assert rep["padded_win_rate"] == {"rate": 1.0, "stderr": 0.0, "n": 6}
    assert rep["original_win_rate"]["rate"] == 0.0
    assert rep["mean_p_padded_better"]["mean"] == pytest.approx(0.8)
    gaps = [4 * (min(len(r["padded"]) / 200, 1) - min(len(r["original"]) / 200, 1))
            for r in recs]
    assert rep["single_score_gap"]["mean"] == pytest.approx(np.mean(gaps))
    # a judge that ignores length (prefers the first) shows no verbosity win
    rep = J.verbosity_report(verbosity_records(Scripted(lambda f, s: 0.9), prompts, answers,
                                               names, n=4, repeat=1))
    assert rep["padded_win_rate"]["rate"] == 0.0 and rep["single_score_gap"]["n"] == 0


def test_prefers_own_judge_shows_self_enhancement_on_equally_correct_pairs():
    prompts = _prompts()
    names = ["judge", "other", "third"]
    # both right on even prompts, both wrong on odd ones: always equally correct
    answers = _answers(prompts, {n: (lambda i: i % 2 == 0) for n in names})
    own = set(answers["judge"].values())
    prefers_own = Scripted(lambda f, s: 0.9 if f in own else 0.1 if s in own else 0.5)
    recs = pairwise_records(prefers_own, prompts, answers, names, ("without",))
    se = J.self_enhancement_report(recs, "judge")
    assert se["measured"]
    m = se["modes"]["without"]
    assert m["win_rate_vs"]["other"]["rate"] == 1.0 and m["win_rate_vs"]["third"]["rate"] == 1.0
    checkable = [p for p in prompts if p["check"]]
    assert m["own_pick_equally_correct"] == {"rate": 1.0, "stderr": 0.0,
                                             "n": 2 * len(checkable)}
    assert m["equally_correct_pairs"] == {"both_correct": 2 * 4, "both_wrong": 2 * 4}
    assert m["mean_p_own_equally_correct"]["mean"] == pytest.approx(0.9)
    # a judge without self-preference (it prefers "third") gives the judge 0 and no bias signal
    neutral = Scripted(lambda f, s: 0.9 if f in set(answers["third"].values()) else
                       0.1 if s in set(answers["third"].values()) else 0.5)
    m = J.self_enhancement_report(pairwise_records(neutral, prompts, answers, names,
                                                   ("without",)), "judge")["modes"]["without"]
    assert m["win_rate_vs"]["other"]["rate"] == 0.5 and m["own_pick_equally_correct"]["rate"] \
        == pytest.approx((8 * 0.5 + 8 * 0.0) / 16)
    assert J.self_enhancement_report(recs, None, "why")["measured"] is False


def test_correctness_judge_has_grading_accuracy_one_per_category():
    prompts = _prompts()
    answers = _answers(prompts, {"right": lambda i: True, "wrong": lambda i: False,
                                 "mixed": lambda i: i % 2 == 0})
    correct = {a for name in answers for p in prompts for a in [answers[name][p["id"]]]
               if check_answer(p, a)}
    by_truth = Scripted(lambda f, s: 0.95 if f in correct and s not in correct else
                        0.05 if s in correct and f not in correct else 0.5)
    recs = pairwise_records(by_truth, prompts, answers, ["right", "wrong", "mixed"],
                            ("without", "with"))
    acc = J.grading_accuracy_report(recs)
    for mode in ("without", "with"):
        assert set(acc[mode]) == {"all", "math", "open QA"}
        for cat in ("math", "open QA"):
            assert acc[mode][cat]["picks_correct"]["rate"] == 1.0
            # right-vs-wrong on 4 prompts + mixed vs the other on 4 prompts
            assert acc[mode][cat]["picks_correct"]["n"] == 8
    anti = Scripted(lambda f, s: 1 - by_truth._prefer(f, s))
    acc = J.grading_accuracy_report(pairwise_records(anti, prompts, answers,
                                                     ["right", "wrong"], ("without",)))
    assert acc["without"]["all"]["picks_correct"] == {"rate": 0.0, "stderr": 0.0, "n": 8}


def test_pad_with_repetition_is_deterministic_longer_and_adds_no_content():
    answer = "Paris is the capital. It lies on the Seine!\nIt is large."
    padded = J.pad_with_repetition(answer, 3)
    assert padded == J.pad_with_repetition(answer, 3) and padded.startswith(answer)
    assert len(padded) > len(J.pad_with_repetition(answer, 2)) > len(answer)
    words = lambda t: set(t.replace("\n", " ").split())  # noqa: E731
    fillers = {w for r in J.RESTATEMENTS for w in r.split()}
    assert words(padded) - words(answer) <= fillers
    assert padded.count("capital") == 4
    assert len(J.pad_with_repetition("", 1)) > 0
    with pytest.raises(ValueError):
        J.pad_with_repetition(answer, 0)


def test_lm_judge_softmax_over_labels_by_hand():
    seen = []

    def scorer(contexts, options):
        seen.append((list(contexts), list(options)))
        return [[math.log(0.2), math.log(0.6), math.log(0.2), -1e9, math.log(1.0)]
                if len(options) == 5 else [math.log(3.0), math.log(1.0)] for _ in contexts]
    judge = J.LMJudge(scorer, render=lambda s: f"<u>{s}</u>")
    [p] = judge.prefer([J.PairRequest("q?", "one", "two", "ref")])
    assert p == pytest.approx(0.75)
    ctx = seen[-1][0][0]
    assert ctx.startswith("<u>") and ctx.endswith("</u>" + J.PAIRWISE_PRIMER)
    assert "Reference answer: ref" in ctx and ctx.index("Answer A: one") < ctx.index("Answer B: two")
    assert seen[-1][1] == [" A", " B"]
    [dist] = judge.grade([J.GradeRequest("q?", "ans")], 1, 5)
    assert seen[-1][1] == [" 1", " 2", " 3", " 4", " 5"]
    assert "Reference answer" not in seen[-1][0][0]
    assert sum(dist) == pytest.approx(1.0)
    assert dist == pytest.approx([0.1, 0.3, 0.1, 0.0, 0.5])
    entry = arena._score_entry(dist, 1)
    assert entry["score"] == 5 and entry["expected"] == pytest.approx(0.1 + 0.6 + 0.3 + 2.5)


def test_single_records_per_mode_with_reference_only_where_one_exists(tmp_path):
    rows = [{"prompt": "Say hi.", "reference": "hi"}, {"prompt": "Say bye."}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = read_source("own", {"path": str(path), "format": "jsonl", "limit": 0})
    answers = {"m": {"own/0": "hi", "own/1": "ok"}, "n": {"own/0": "hello", "own/1": "bye"}}
    seen = []

    class Recorder(Scripted):
        def grade(self, requests, low, high):
            seen.extend(requests)
            return [[0.0, 1.0, 0.0] for _ in requests]
    recs = single_records(Recorder(None), prompts, answers, ["m", "n"], ("without", "with"),
                          0, 2)
    assert [(r["mode"], r["prompt_id"], r["model"]) for r in recs] == [
        ("without", "own/0", "m"), ("without", "own/0", "n"), ("without", "own/1", "m"),
        ("without", "own/1", "n"), ("with", "own/0", "m"), ("with", "own/0", "n")]
    assert [r.reference for r in seen] == [None] * 4 + ["hi", "hi"]
    assert all(r["score"] == 1 and r["expected"] == 1.0 and r["correct"] is None for r in recs)


def test_single_report_histogram_and_kurtosis():
    scores = [1, 2, 2, 3, 5, 5, 5]
    recs = [{"mode": "without", "model": "m", "score": s, "expected": s - 0.5} for s in scores]
    rep = J.single_report(recs, 1, 5)["without"]["m"]
    assert rep["histogram"] == {"1": 1, "2": 2, "3": 1, "4": 0, "5": 3}
    x = np.array(scores, float)
    d = x - x.mean()
    assert rep["kurtosis"] == pytest.approx((d ** 4).mean() / (d ** 2).mean() ** 2 - 3)
    assert rep["chosen"]["mean"] == pytest.approx(x.mean())
    assert rep["expected"]["stderr"] == pytest.approx(x.std(ddof=1) / math.sqrt(len(x)))


def test_progress_lines_without_a_terminal():
    now, lines = [0.0], []
    p = Progress("pairwise", 100, lines.append, every=10.0, clock=lambda: now[0])
    for t, n in ((3.0, 10), (10.0, 40), (12.0, 10), (25.0, 40)):
        now[0] = t
        p.advance(n)
    p.finish()
    assert lines == ["pairwise: 50/100 (5/s, ETA 10 s)", "pairwise: 100/100 in 25.0 s"]
    lines.clear()  # absolute counts (update), a unit, a slow rate
    p = Progress("slick", 10, lines.append, " facts probed", every=10.0, clock=lambda: now[0])
    for done, t in ((1, 29.0), (2, 35.5), (3, 37.0), (10, 38.0)):
        now[0] = t
        p.update(done)
    p.finish()
    assert lines == ["slick: 2/10 facts probed (0.19/s, ETA 42 s)",
                     "slick: 10/10 facts probed in 13.0 s"]


# ------------------------------------------------------------------ a tiny model end to end

@pytest.fixture(scope="module")
def tiny(tiny_export):
    return tiny_export[0]


def test_option_logprobs_equal_loglikelihood(tiny):
    from hibari.evaluation.lm import load_lm
    lm = load_lm(tiny, batch_size=3)
    contexts = ["Which is better? The better answer is Answer",
                "short", "x " * 300 + "end"]  # the last one is cut from the left
    # one token each; a shared "▁" then one token each; different lengths (the fallback)
    for options in ([" A", " B"], [" 1", " 2", " 3"], [" 1", " 10"]):
        want = [[lp for lp, _, _ in lm.loglikelihood([(c, o)])] for c in contexts
                for o in options]
        fast = dataclasses.replace(lm)
        if options != [" 1", " 10"]:  # the one-row paths must not call loglikelihood
            fast.loglikelihood = None
        got = J.option_logprobs(fast, contexts, options)
        assert np.allclose(np.ravel(got), np.ravel(want), atol=2e-5)
    assert [len(lm.tokenizer.encode_pair(contexts[0], o)[1]) for o in (" A", " 1", " 10")] \
        == [1, 2, 3]


CONFIG = '''from hibari.configs.judge.arena import quickstart_config, template


def get_config(arg=""):
    c = quickstart_config({ckpt!r}, {ckpt!r})
    c.contestants.dpo.template = template("minimal")  # the same model, another template
    c.prompts.seed.limit, c.prompts.nq.limit, c.prompts.asdiv.limit = 1, 1, 1
    c.generation.max_new_tokens = 4
    c.verbosity.n = 2
    c.single.reference = "without"
    c.ratings.bootstrap_rounds = 20
    return c
'''


def _without_meta(results):
    return {k: v for k, v in results.items() if k != "meta"}


@pytest.mark.slow
def test_cli_end_to_end_cache_reuse_and_errors(tiny, tmp_path, capsys):
    cfg_file = tmp_path / "tiny_judge.py"
    cfg_file.write_text(CONFIG.format(ckpt=str(tiny)))
    out = tmp_path / "out"
    argv = ["judge", "--config", str(cfg_file), "--out", str(out)]
    assert hibari.cli.main(argv) == 0
    for f in ("results.json", "report.md", "ratings.png", "single_scores.png",
              "samples/pairwise.jsonl", "samples/single.jsonl", "samples/verbosity.jsonl"):
        assert (out / f).is_file(), f
    assert (out / "ratings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = json.loads((out / "results.json").read_text())
    assert first["meta"]["answers"] == {n: {"generated": 3, "cached": 0, "seconds": pytest.approx(
        first["meta"]["answers"][n]["seconds"])} for n in ("sft", "dpo")}
    assert first["judge"]["contestant"] == "sft"  # same checkpoint and template as the judge
    assert set(first["pairwise"]) == {"without", "with"} and set(first["single"]) == {"without"}
    report = (out / "report.md").read_text()
    assert "Read the bias report, not the ranking" in report and "weak judge" in report
    # every count in results.json from the per-sample log alone
    pairs = [json.loads(x) for x in (out / "samples/pairwise.jsonl").read_text().splitlines()]
    assert len(pairs) == 2 * 3 and all(r["verdict"] in ("a", "b", "tie") for r in pairs)
    for mode, pw in first["pairwise"].items():
        mine = [r for r in pairs if r["mode"] == mode]
        wins = sum(r["verdict"] == "a" for r in mine)
        assert pw["win_matrix"]["wins"][0][1] == wins
        assert pw["win_matrix"]["ties"][0][1] == sum(r["verdict"] == "tie" for r in mine)
        consistency = first["bias"]["position"][mode]["consistency"]
        distinct = [r for r in mine if not r["identical"]]
        assert consistency["n"] == len(distinct)
        assert consistency["rate"] == pytest.approx(
            np.mean([r["verdict"] != "tie" for r in distinct]) if distinct else None)
    singles = [json.loads(x) for x in (out / "samples/single.jsonl").read_text().splitlines()]
    assert len(singles) == 2 * 3
    for r in singles:
        assert sum(r["probs"]) == pytest.approx(1.0) and len(r["probs"]) == 5
        assert 1 <= r["expected"] <= 5 and r["score"] == 1 + int(np.argmax(r["probs"]))
    verb = [json.loads(x) for x in (out / "samples/verbosity.jsonl").read_text().splitlines()]
    assert len(verb) == 2 and all(len(r["padded"]) > len(r["original"]) for r in verb)
    assert "Bradley-Terry" in capsys.readouterr().out

    # a rerun: nothing generated, nothing judged, the cached files untouched, same results
    answers = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "answers").iterdir()}
    lines = []
    again = arena.run_judge(arena.plain_config(_load(cfg_file)), out, log=lines.append)
    assert again["meta"]["answers"]["sft"]["generated"] == 0
    assert again["meta"]["answers"]["dpo"]["generated"] == 0
    assert again["meta"]["judgments"]["scored"] == 0
    assert not any(line.startswith("loaded") for line in lines)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes())
            for p in (out / "answers").iterdir()} == answers
    assert _without_meta(again) == _without_meta(first)

    # a changed generation setting regenerates, and says so in one line
    capsys.readouterr()
    # (and with self-enhancement switched off, the report says it was not measured and why)
    assert hibari.cli.main(argv + ["--config.generation.max_new_tokens=6",
                                   "--config.judge.contestant=none"]) == 0
    err = capsys.readouterr().err
    assert "answers sft: fingerprint changed (generation): regenerating" in err
    third = json.loads((out / "results.json").read_text())
    assert third["meta"]["answers"]["sft"]["generated"] == 3
    assert third["contestants"][0]["generation"]["max_new_tokens"] == 6
    assert third["bias"]["self_enhancement"]["measured"] is False
    assert "- not measured: the judge is not a contestant (config.judge.contestant='none')" \
        in (out / "report.md").read_text()

    # a wrong config field: one line naming it and the nearest fields
    assert hibari.cli.main(argv + ["--config.generation.max_new_token=6"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "generation.max_new_token" in err
    assert "nearest" in err and "generation.max_new_tokens" in err
    # a missing checkpoint: one line naming the field, before anything is loaded
    assert hibari.cli.main(argv + ["--config.contestants.dpo.checkpoint=/no/such/dir"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.contestants.dpo.checkpoint" in err


def _load(path):
    from hibari.base.config_files import load_python_config
    return load_python_config(str(path))


def test_shipped_configs_load_and_name_their_models():
    from hibari.base.config_files import load_python_config
    c = load_python_config("configs/judge/arena.py")
    assert list(arena.plain_config(c)["contestants"]) == ["smollm2", "sft", "dpo"]
    assert c.judge.checkpoint == c.contestants.smollm2.checkpoint == "SmolLM2-135M-Instruct.Q4_1.gguf"
    c.gguf = "/models/x.gguf"  # one field moves the judge and the contestant together
    assert c.judge.checkpoint == c.contestants.smollm2.checkpoint == "/models/x.gguf"
    assert [c.prompts[s].limit for s in ("seed", "nq", "asdiv")] == [24, 16, 16]
    q = load_python_config("configs/judge/arena.py:quickstart")
    assert q.judge.checkpoint == q.contestants.sft.checkpoint == "runs/quickstart/sft"
    assert q.generation.max_new_tokens == 48
    from hibari.configs.judge.arena import quickstart_config
    g = quickstart_config("a", "b", judge_checkpoint="j.gguf")
    assert g.judge.template.to_dict()["with_input"].startswith("<|im_start|>user")


@pytest.mark.parametrize("name", ["alpaca_en", "alpaca_ja", "minimal", "chat"])
def test_config_templates_render_as_align_renders_them(name):
    """configs/judge/arena.py's template(name) (evaluation/ may not import align/) renders
    every prompt exactly as the align template does."""
    from hibari.align.templates import ChatTemplate, as_chat, get_template
    from hibari.configs.judge.arena import template
    tpl, mine = get_template(name), arena._template(template(name).to_dict(), "t")
    for record in ({"instruction": "Add {x} to 2.", "input": "x = 3"},
                   {"instruction": "Say hi.", "input": ""}):
        shown = as_chat(record, with_output=False) if isinstance(tpl, ChatTemplate) else record
        want = "".join(seg.text for seg in tpl.prompt(shown))
        assert mine.render(record["instruction"], record["input"]) == want


def test_template_field_errors_are_one_line():
    with pytest.raises(arena.JudgeConfigError, match=r"config\.judge\.template='alpaca_en': "
                       r"give a group"):
        arena._template("alpaca_en", "judge.template")
    with pytest.raises(arena.JudgeConfigError, match=r"with_input has placeholders \['answer', "
                       r"'instruction'\]"):
        arena._template({"with_input": "{instruction}{answer}", "without_input": "{instruction}"},
                        "contestants.x.template")
