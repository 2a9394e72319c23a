"""`hibari eval` / `hibari generate` end to end on a tiny saved model, and the training hook."""
import gzip
import io
import itertools
import json
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
