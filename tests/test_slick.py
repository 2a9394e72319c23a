"""SliCK as a runnable evaluation: categories on scripted samplers against the paper's
definitions and a hand computation, exemplar draws, resume, and `hibari slick` end to end on a
tiny random model."""
import json
import math
import re

import pytest

import hibari.cli
from hibari.base.config_files import load_python_config
from hibari.base.errors import InputNotFound, UserError
from hibari.evaluation.metrics import normalize
from hibari.evaluation.slick import (
    CATEGORIES,
    SlickError,
    exemplar_ids,
    load_facts,
    probe,
    probe_facts,
    run_slick,
    score_record,
    summarize,
)

CONFIG = "configs/slick/nq_open.py"
VENDORED = "evaluation/tasks/data/nq_open_facts.jsonl"
N_PROMPTS, SAMPLES = 4, 3

# question -> (gold, prompts answered right greedily, (prompt, sample) pairs answered right when
# sampling, wrong-answer style); the fake model finds the prompt/sample index by counting.
SCRIPT = {
    "What is the capital of France?": ("Paris", {0, 1, 2, 3}, {(0, 0), (1, 1)}, "no"),
    "Which planet is the largest?": ("Jupiter", {0, 1, 2, 3}, set(), "no"),
    "Who wrote Hamlet?": ("William Shakespeare", {0, 2}, {(0, 0), (0, 1), (3, 2)}, "no"),
    "What is the chemical symbol for gold?": ("Au", set(), {(1, 2)}, "sentence"),
    "Who painted the ceiling of the Sistine Chapel?": ("Michelangelo", set(), set(), "no"),
}
POOL_EXTRA = [("What colour is the sky?", "blue"), ("How many legs has a spider?", "eight"),
              ("Which ocean is the largest?", "Pacific Ocean")]


class ScriptedLM:
    """A fake LanguageModel: answers the last question of each prompt from SCRIPT."""

    def __init__(self):
        self.calls, self.questions, self.seen = [], [], {}

    def generate(self, prompts, *, max_new_tokens, stop, temperature=0.0, seed=0,
                 batch_size=None):
        assert stop == ["\n"] and max_new_tokens > 0
        self.calls.append({"rows": list(prompts), "temperature": temperature, "seed": seed,
                           "batch_size": batch_size})
        out = []
        for p in prompts:
            question = re.findall(r"Q: ([^\n]*)\nA:$", p)[0]
            gold, greedy_ok, sampled_ok, style = SCRIPT[question]
            key = (question, temperature > 0)
            i = self.seen.get(key, 0)
            self.seen[key] = i + 1
            self.questions.append(question)
            ok = i in greedy_ok if temperature == 0 else (i // SAMPLES, i % SAMPLES) in sampled_ok
            wrong = f"I think it is {gold}." if style == "sentence" else "I do not know"
            out.append(" " + (gold if ok else wrong) + ("\nQ: more" if ok else ""))
        return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    facts = write_jsonl(tmp_path / "facts.jsonl", [
        {"id": f"f{i}", "question": q, "answer": gold}
        for i, (q, (gold, *_)) in enumerate(SCRIPT.items())])
    pool = write_jsonl(tmp_path / "pool.jsonl", [
        {"id": f"p{i}", "question": q, "answers": [a]} for i, (q, a) in enumerate(POOL_EXTRA)]
        + [{"id": "dup", "question": "what is the CAPITAL of France", "answers": ["Paris"]}])
    return facts, pool


def make_config(facts, pool="", limit=0, **fields):
    c = load_python_config(CONFIG)
    c.checkpoint = "scripted"
    c.facts.update(path=facts, format="jsonl", limit=limit)
    c.pool.update(path=pool, format="jsonl" if pool else "")
    c.update(n_prompts=N_PROMPTS, k=2, samples=SAMPLES, chunk_facts=2, batch_size=3)
    c.update(fields)
    return c


def se_of(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def test_categories_shares_and_table_against_hand_computation(files):
    facts_path, _ = files
    cfg = make_config(facts_path)
    facts = load_facts(facts_path, "jsonl")
    records = [score_record(r, "exact") for r in probe(ScriptedLM(), facts, facts, cfg)]
    by_q = {r["question"]: r for r in records}
    # the paper's definitions on the scripted outcomes
    expect = {"What is the capital of France?": ("HighlyKnown", 1.0, 2 / 12),
              "Which planet is the largest?": ("HighlyKnown", 1.0, 0.0),
              "Who wrote Hamlet?": ("MaybeKnown", 0.5, 3 / 12),
              "What is the chemical symbol for gold?": ("WeaklyKnown", 0.0, 1 / 12),
              "Who painted the ceiling of the Sistine Chapel?": ("Unknown", 0.0, 0.0)}
    for q, (cat, p0, pt) in expect.items():
        r = by_q[q]
        assert (r["category"], r["p_correct_greedy"]) == (cat, p0)
        assert r["p_correct_sampled"] == pytest.approx(pt)
        assert len(r["greedy"]) == N_PROMPTS and [len(s) for s in r["sampled"]] == [SAMPLES] * 4
    assert by_q["Who wrote Hamlet?"]["greedy_exact"] == [True, False, True, False]
    assert by_q["What is the capital of France?"]["greedy"][0] == "Paris"  # cut at the newline

    # the older entry point gives the same categories (exact match)
    legacy = probe_facts(ScriptedLM(), facts, n_prompts=N_PROMPTS, k=2, samples=SAMPLES)
    assert [r["category"] for r in legacy] == [r["category"] for r in records]

    s = summarize(records, "exact")
    assert s["counts"] == {"HighlyKnown": 2, "MaybeKnown": 1, "WeaklyKnown": 1, "Unknown": 1}
    assert s["shares"]["HighlyKnown"]["rate"] == 0.4
    assert s["shares"]["HighlyKnown"]["stderr"] == pytest.approx(math.sqrt(0.3 / 5))
    for cat in ("MaybeKnown", "WeaklyKnown", "Unknown"):
        assert s["shares"][cat]["rate"] == 0.2
        assert s["shares"][cat]["stderr"] == pytest.approx(math.sqrt(0.2 / 5))
    t = s["per_category"]
    assert t["HighlyKnown"]["p_correct_greedy"] == {"rate": 1.0, "stderr": 0.0, "n": 2}
    assert t["HighlyKnown"]["p_correct_sampled"]["rate"] == pytest.approx(1 / 12)
    assert t["HighlyKnown"]["p_correct_sampled"]["stderr"] == pytest.approx(se_of([1 / 6, 0]))
    assert t["MaybeKnown"]["p_correct_greedy"]["rate"] == 0.5
    assert t["MaybeKnown"]["greedy_accuracy_exact"]["rate"] == 1.0  # prompt 0 was right
    assert t["WeaklyKnown"]["greedy_accuracy_exact"]["rate"] == 0.0
    assert t["WeaklyKnown"]["greedy_accuracy_contains"]["rate"] == 1.0  # "I think it is Au."
    assert t["Unknown"]["p_correct_sampled"]["rate"] == 0.0
    o = s["overall"]
    assert o["greedy_accuracy_exact"]["rate"] == pytest.approx(0.6)
    assert o["greedy_accuracy_exact"]["stderr"] == pytest.approx(math.sqrt(0.3 / 5))
    assert o["greedy_accuracy_contains"]["rate"] == pytest.approx(0.8)
    assert o["p_correct_greedy"]["rate"] == pytest.approx(2.5 / 5)
    # the lenient criterion: the sentence answers contain "Au", so that fact is HighlyKnown
    assert s["counts_other_match"] == {"HighlyKnown": 3, "MaybeKnown": 1, "WeaklyKnown": 0,
                                       "Unknown": 1}
    lenient = summarize([score_record(r, "contains") for r in records], "contains")
    assert lenient["counts"] == s["counts_other_match"]


def test_exemplars_exclude_the_fact_and_are_deterministic(files):
    facts = load_facts(VENDORED)
    assert len(facts) == 200 and facts[0]["id"] == "nq_open_facts:1"
    for fact in facts:
        draws = exemplar_ids(fact, facts, 10, 4, seed=0)
        assert draws == exemplar_ids(fact, facts, 10, 4, seed=0)
        assert all(len(set(d)) == 4 for d in draws)
        assert all(normalize(facts[j]["question"]) != normalize(fact["question"])
                   for d in draws for j in d)
    other_seed = [exemplar_ids(f, facts, 10, 4, seed=1) for f in facts[:20]]
    assert other_seed != [exemplar_ids(f, facts, 10, 4, seed=0) for f in facts[:20]]
    # a pool entry that repeats the question (other id, other case and punctuation) is excluded
    _, pool_path = files
    pool = load_facts(pool_path, "jsonl")
    france = {"id": "f0", "question": "What is the capital of France?", "answers": ["Paris"]}
    drawn = {j for d in exemplar_ids(france, pool, 20, 3, seed=0) for j in d}
    assert drawn == {0, 1, 2}
    with pytest.raises(SlickError, match=r"config.k=4: the exemplar pool has only 3 facts"):
        exemplar_ids(france, pool, 1, 4, seed=0)


def test_sampled_batches_fixed_per_fact(files):
    """A fact's sampled call (rows, seed, batch) does not depend on chunking or other facts."""
    facts_path, _ = files
    facts = load_facts(facts_path, "jsonl")

    def sampled_calls(fs, **fields):
        lm = ScriptedLM()
        probe(lm, fs, facts, make_config(facts_path, **fields))
        return {c["rows"][0]: (c["rows"], c["seed"], c["batch_size"])
                for c in lm.calls if c["temperature"] > 0}
    whole = sampled_calls(facts, chunk_facts=2)
    assert len(whole) == 5 and all(b == N_PROMPTS * SAMPLES for _, _, b in whole.values())
    assert len({s for _, s, _ in whole.values()}) == 5  # one seed per fact
    assert sampled_calls(facts, chunk_facts=5, batch_size=7) == whole
    part = sampled_calls(facts[3:])
    assert part == {k: v for k, v in whole.items() if k in part} and len(part) == 2


def test_resume_probes_only_missing_facts_and_restarts_on_change(files, tmp_path):
    facts_path, pool_path = files
    out = tmp_path / "out"
    lines = []
    first = ScriptedLM()
    r1 = run_slick(make_config(facts_path, pool_path), out, log=lines.append, lm=first)
    assert len(set(first.questions)) == 5
    assert r1["meta"]["timings"]["facts_probed"] == 5
    samples = (out / "samples" / "slick.jsonl").read_text()
    again = ScriptedLM()
    r2 = run_slick(make_config(facts_path, pool_path), out, log=lines.append, lm=again)
    assert again.calls == []
    assert r2["summary"] == r1["summary"] and r2["meta"]["timings"]["facts_cached"] == 5
    assert (out / "samples" / "slick.jsonl").read_text() == samples
    # a smaller selection, then a larger one: only the facts never probed are probed
    sub = tmp_path / "sub"
    run_slick(make_config(facts_path, pool_path, limit=2), sub, lm=ScriptedLM())
    more = ScriptedLM()
    r3 = run_slick(make_config(facts_path, pool_path), sub, log=lines.append, lm=more)
    assert set(more.questions) == set(list(SCRIPT)[2:])
    assert r3["summary"] == r1["summary"]
    # the criterion is not in the fingerprint: a rescoring, nothing probed
    lenient = ScriptedLM()
    r4 = run_slick(make_config(facts_path, pool_path, match="contains"), out, lm=lenient)
    assert lenient.calls == [] and r4["summary"]["counts"]["HighlyKnown"] == 3
    # a field that changes the answers starts over, and says so in one line
    lines.clear()
    changed = ScriptedLM()
    run_slick(make_config(facts_path, pool_path, seed=7), out, log=lines.append, lm=changed)
    assert len(set(changed.questions)) == 5
    assert any("fingerprint changed (seed)" in x and "starting over" in x for x in lines)


def test_bad_rows_and_fields_name_file_line_or_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    cases = [('{"question": "q", "answer": ["a"]}\n{"question": "q2", "answer": [', "bad.jsonl:2: "
              "not valid JSON"),
             ('{"question": "q", "answer": "a"}\n', "bad.jsonl:1: 'answer' must be a non-empty "
              "list"),
             ('\n{"answer": ["a"]}\n', "bad.jsonl:2: 'question' must be a non-empty string")]
    for text, message in cases:
        bad.write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            load_facts(bad, "nq_open")
    bad.write_text('{"id": 1, "question": "q", "answers": "a"}\n'
                   '{"id": "1", "question": "r", "answer": "b"}\n')
    with pytest.raises(SlickError, match=r"bad.jsonl:2: id '1' repeats line 1"):
        load_facts(bad, "jsonl")
    with pytest.raises(InputNotFound, match=r"config.facts.path='nope.jsonl': no such file"):
        load_facts("nope.jsonl")
    facts = str(tmp_path / "ok.jsonl")
    write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "answer": ["a"]}])
    for field, value, message in (("match", "fuzzy", "config.match='fuzzy': choose one of"),
                                  ("temperature", 0.0, "config.temperature=0.0: must be > 0"),
                                  ("template", "Q: {q}\nA:", "config.template="),
                                  ("samples", 0, "config.samples=0: must be an integer >= 1")):
        with pytest.raises(SlickError, match=re.escape(message)):
            run_slick(make_config(facts, **{field: value}), tmp_path / "o", lm=ScriptedLM())
    assert not (tmp_path / "o").exists()  # nothing written before validation


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_export):
    return tiny_export[0]


def test_cli_end_to_end_on_a_tiny_model(tiny_checkpoint, tmp_path, capsys):
    facts = write_jsonl(tmp_path / "facts.jsonl", [
        {"question": q, "answer": [gold]} for q, (gold, *_) in list(SCRIPT.items())[:4]])
    out = tmp_path / "out"
    argv = ["slick", "--config", f"{CONFIG}:cpu", "--checkpoint", str(tiny_checkpoint),
            "--out", str(out), f"--config.facts.path={facts}", "--config.n_prompts=2",
            "--config.k=2", "--config.samples=2", "--config.max_new_tokens=3",
            "--config.chunk_facts=3"]
    assert hibari.cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    s = results["summary"]
    assert s["facts"] == 4 and sum(s["counts"].values()) == 4
    assert set(s["counts"]) == set(CATEGORIES)
    assert results["meta"]["prefix"]["mode"] == "auto"
    assert results["meta"]["checkpoint"] == str(tiny_checkpoint)
    rows = [json.loads(x) for x in (out / "samples" / "slick.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"facts:{n}" for n in (1, 2, 3, 4)]
    for r in rows:
        assert len(r["greedy"]) == 2 and [len(x) for x in r["sampled"]] == [2, 2]
        assert all(len(e) == 2 for e in r["exemplars"]) and r["id"] not in sum(r["exemplars"], [])
    assert len({a for r in rows for x in r["sampled"] for a in x}) > 8  # samples vary
    # the answers do not depend on the chunking or the greedy batch size (a fresh directory)
    cfg = make_config(facts, n_prompts=2, samples=2, max_new_tokens=3, chunk_facts=1,
                      batch_size=1)
    cfg.update(checkpoint=str(tiny_checkpoint), facts={"format": "nq_open"})
    run_slick(cfg, tmp_path / "one_by_one", log=lambda line: None)
    alone = (tmp_path / "one_by_one" / "samples" / "slick.jsonl").read_text().splitlines()
    assert [(r["greedy"], r["sampled"]) for r in map(json.loads, alone)] == \
        [(r["greedy"], r["sampled"]) for r in rows]
    assert "## Per category" in (out / "report.md").read_text()
    assert (out / "slick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a malformed row: one line naming file:line, before the model is loaded
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": ["a"]}\n{"question": "r"}\n')
    capsys.readouterr()
    argv[argv.index(f"--config.facts.path={facts}")] = f"--config.facts.path={bad}"
    assert hibari.cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:2: 'answer' must be" in err
