"""Corpus to trained model: `prepare` a small slice of the vendored corpus, then `hibari pretrain`
on its packed rows with held-out eval, mixture weights from the CLI and an exact resume."""
import json
import math
import os
import re

import numpy as np
import pytest

import hibari.cli
from hibari.data import CORPUS_DIR
from hibari.data.pipeline import PrepareConfig, prepare
from hibari.data.sources import read_docs

CORPUS = str(CORPUS_DIR)
SEQ, VOCAB, STEPS = 64, 1000, 40
WEIGHTS = {"en": 1.0, "ja": 2.0}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for lang, n in (("en", 60), ("ja", 150)):  # half the first Japanese documents are filtered out
        with open(root / f"{lang}.jsonl", "w", encoding="utf-8") as f:
            for _, d in zip(range(n), read_docs(os.path.join(CORPUS, f"{lang}.jsonl.gz"))):
                f.write(json.dumps({"id": d["id"], "text": d["text"], **d["meta"]}, ensure_ascii=False) + "\n")
    out = root / "prepared"
    report = prepare(PrepareConfig(inputs=[str(root / "*.jsonl")], out=str(out), tokenizer_vocab_size=VOCAB,
                                   seq_len=SEQ, pack_method="best_fit", heldout_every=5))
    assert set(report["pack_heldout"]) == {"en", "ja"}
    return out


def unigram_entropy(packed_dir, weights) -> float:
    """Entropy (nats) of the unigram distribution of training targets (token t+1 in t's segment)
    under the mixture: source s's distribution weighted by weights[s] (its rows are near full)."""
    manifest = json.load(open(packed_dir / "manifest.json"))
    mixture = np.zeros(manifest["tokenizer"]["vocab_size"])
    for name, entry in manifest["sources"].items():
        counts = np.zeros_like(mixture)
        for shard in entry["shards"]:
            rows = np.load(packed_dir / shard["path"])
            tokens, seg = rows[:, 0], rows[:, 1]
            is_target = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
            counts += np.bincount(tokens[:, 1:][is_target], minlength=len(counts))
        mixture += weights[name] / sum(weights.values()) * counts / counts.sum()
    p = mixture[mixture > 0]
    return float(-(p * np.log(p)).sum())


def pretrain(prepared, workdir, steps, *extra, status=0):
    """`hibari pretrain` in this process; returns the metrics.jsonl records."""
    argv = ["pretrain", "--config", "configs/pretrain/llama.py:tiny", "--workdir", str(workdir),
            "--config.data.kind=packed", f"--config.data.path={prepared / 'packed'}",
            f"--config.data.eval_path={prepared / 'packed-heldout'}", f"--config.data.seq_len={SEQ}",
            f"--config.model.vocab_size={VOCAB}", f"--config.data.weights={WEIGHTS}",
            f"--config.steps={steps}", "--config.log_every=1", "--config.eval_every=20",
            "--config.checkpoint_every=0", "--config.optim.schedule=constant", "--config.optim.lr=1e-2",
            "--config.optim.warmup_steps=2",  # the same in the 20- and 40-step commands
            "--config.data.batch_size=32", "--config.async_checkpoint=False", *extra]
    assert hibari.cli.main(argv) == status
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")] if status == 0 else []


def test_pretrain_on_packed_corpus_learns_evaluates_and_resumes(prepared, tmp_path):
    full = pretrain(prepared, tmp_path / "full", STEPS)
    losses = {r["step"]: r["loss"] for r in full}
    assert sorted(losses) == list(range(1, STEPS + 1))
    baseline = unigram_entropy(prepared / "packed", WEIGHTS)
    assert losses[1] > math.log(VOCAB) - 0.5                      # starts near uniform
    assert np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)]) < baseline - 0.3, (baseline, losses)
    evals = {r["step"]: r["eval_loss"] for r in full if "eval_loss" in r}
    assert sorted(evals) == [20, 40] and evals[40] < evals[20] < math.log(VOCAB)

    pretrain(prepared, tmp_path / "resumed", STEPS // 2)          # stops after saving step 20
    resumed = pretrain(prepared, tmp_path / "resumed", STEPS)     # same command, more steps
    assert [(r["step"], r["loss"]) for r in resumed] == [(s, losses[s]) for s in range(1, STEPS + 1)]
    assert [r["eval_loss"] for r in resumed if "eval_loss" in r] == [evals[20], evals[40]]


@pytest.mark.parametrize("override, message", [
    ("--config.data.seq_len=32", "config.data.seq_len=32 but config.data.path="),
    ("--config.model.vocab_size=512", "config.model.vocab_size=512 is smaller than the tokenizer"),
    ("--config.data.weights={'web': 1.0}", r"config.data.weights names \['web'\]"),
])
def test_mismatched_config_is_named_before_training(prepared, tmp_path, override, message, capsys):
    pretrain(prepared, tmp_path / "bad", 2, override, status=1)  # the message, exit status 1
    err = capsys.readouterr().err
    assert re.search("hibari pretrain: error: .*" + message, err) and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
