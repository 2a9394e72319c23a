"""Runs record their tokenizer; eval, generate and SFT/DPO/reward refuse a different one (issue
18, finding 6: `hibari eval` scored a run with a same-size tokenizer it was not trained with).

Two real SentencePiece models of the same vocabulary size, trained on different real English
text (the vendored corpus; the XSum sample documents)."""
import gzip
import itertools
import json

import jax
import numpy as np
import pytest

from hibari.data import CORPUS_DIR
from hibari.data.tokenizer import (
    TOKENIZER_RECORD,
    TokenizerMismatch,
    file_sha256,
    recorded_tokenizer,
    tokenizer_record,
    tokenizer_sha256,
    train_tokenizer,
    write_tokenizer_record,
)
from hibari.evaluation.lm import load_lm
from hibari.model import ModelConfig, init
from hibari.train.checkpoint import save_params

VOCAB = 400
TASK_DATA = CORPUS_DIR.parent.parent.parent / "evaluation" / "tasks" / "data"


def _corpus_docs():
    with gzip.open(CORPUS_DIR / "en.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(itertools.islice(f, 40)):
            yield {"id": f"en{i}", "text": json.loads(line)["text"][:1500]}


def _xsum_docs():
    with open(TASK_DATA / "xsum_sample.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            yield {"id": f"xsum{i}", "text": json.loads(line)["document"][:1500]}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    a, b = root / "a.model", root / "b.model"
    sp_a = train_tokenizer(_corpus_docs(), str(a), vocab_size=VOCAB, seed_sentencepiece_size=20000)
    sp_b = train_tokenizer(_xsum_docs(), str(b), vocab_size=VOCAB, seed_sentencepiece_size=20000)
    assert sp_a.get_piece_size() == sp_b.get_piece_size() == VOCAB  # same size: not caught before
    assert sp_a.encode("The government said") != sp_b.encode("The government said")
    return a, b


@pytest.fixture(scope="module")
def tiny():
    """A tiny model's config and random parameters (shapes traced, not compiled: faster)."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                      max_seq_len=64)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))
    return cfg, jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype),
                             shapes)


@pytest.fixture(scope="module")
def run(toks, tiny, tmp_path_factory):
    """A run directory as the loop leaves it (config.json, tokenizer_record.json) whose
    checkpoints/5/ is a tiny params export, trained (say) with tokenizer a."""
    import ml_collections
    run = tmp_path_factory.mktemp("run")
    cfg, params = tiny
    config = ml_collections.ConfigDict({"model": cfg.to_dict(),
                                        "data": {"tokenizer": str(toks[0]), "seq_len": 64}})
    (run / "config.json").write_text(config.to_json())
    record = write_tokenizer_record(config, run)
    save_params(run / "checkpoints" / "5", cfg, params)
    return run, record


def test_record_of_a_config(toks, tmp_path):
    import ml_collections
    a, _ = toks
    record = tokenizer_record(ml_collections.ConfigDict({"data": {"tokenizer": str(a)}}))
    assert record == {"sha256": file_sha256(str(a)), "path": str(a), "vocab_size": VOCAB}
    synthetic = ml_collections.ConfigDict({"data": {"kind": "synthetic", "path": ""}})
    assert tokenizer_record(synthetic) is None
    assert write_tokenizer_record(synthetic, tmp_path) is None
    assert not (tmp_path / TOKENIZER_RECORD).exists()
    # packed shards: the manifest's tokenizer, whose sha256 is the same file hash
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "manifest.json").write_text(json.dumps(
        {"tokenizer": {"path": str(a), "sha256": file_sha256(str(a)), "vocab_size": VOCAB}}))
    config = ml_collections.ConfigDict({"data": {"kind": "packed", "path": str(packed)}})
    assert write_tokenizer_record(config, tmp_path / "w") == record
    assert json.loads((tmp_path / "w" / TOKENIZER_RECORD).read_text()) == record
    assert not list((tmp_path / "w").glob("*.tmp"))


def test_record_is_found_from_the_run_or_a_step(run, tmp_path):
    run_dir, record = run
    assert recorded_tokenizer(run_dir) == record
    assert recorded_tokenizer(run_dir / "checkpoints" / "5") == record
    assert recorded_tokenizer(tmp_path) is None  # older runs, HF dirs: no record
    (tmp_path / TOKENIZER_RECORD).write_text("{not json")
    with pytest.raises(TokenizerMismatch, match=TOKENIZER_RECORD):
        recorded_tokenizer(tmp_path)


def test_eval_refuses_a_same_size_tokenizer_the_run_was_not_trained_with(run, toks):
    run_dir, record = run
    a, b = toks
    step = run_dir / "checkpoints" / "5"
    with pytest.raises(TokenizerMismatch) as e:
        load_lm(step, b)
    message = str(e.value)
    assert "\n" not in message
    for path in (a, b):  # both named, with short hashes
        assert f"{path} (sha256 {tokenizer_sha256(path)[:12]})" in message, message
    assert f"pass --tokenizer {a}" in message and "--allow-tokenizer-mismatch" in message
    lm = load_lm(step, a)  # the recorded tokenizer passes
    assert lm.tokenizer_mismatch is None
    lm = load_lm(step)  # and is found from the run's config.json
    assert lm.tokenizer.name == str(a) and lm.tokenizer_mismatch is None


def test_eval_cli_refuses_then_the_flag_lets_it_through(run, toks, tmp_path, capsys, caplog):
    import hibari.cli
    run_dir, _ = run
    a, b = toks
    step = str(run_dir / "checkpoints" / "5")
    argv = ["eval", "--checkpoint", step, "--tokenizer", str(b), "--tasks", "botchan_perplexity",
            "--limit", "1", "--out", str(tmp_path / "out")]
    assert hibari.cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hibari eval: error: checkpoint {step} was trained with tokenizer "
                          f"{a} (sha256 ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    assert hibari.cli.main(argv + ["--allow-tokenizer-mismatch"]) == 0
    warned = [r.getMessage() for r in caplog.records if "going on" in r.getMessage()]
    assert len(warned) == 1 and str(b) in warned[0] and str(a) in warned[0], warned
    meta = json.loads((tmp_path / "out" / "results.json").read_text())["meta"]
    assert meta["tokenizer_mismatch"]["recorded"]["sha256"] == tokenizer_sha256(a)
    assert meta["tokenizer_mismatch"]["used"] == {"path": str(b), "sha256": tokenizer_sha256(b)}


def test_generate_refuses_likewise(run, toks, tmp_path):
    from hibari.evaluation.cli import generate_main
    run_dir, _ = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The government said\n")
    with pytest.raises(TokenizerMismatch, match=f"but the tokenizer used is {toks[1]} "):
        generate_main(["--checkpoint", str(run_dir / "checkpoints" / "5"), "--tokenizer",
                       str(toks[1]), "--prompts", str(prompts)])


def test_checkpoint_without_a_record_is_accepted(toks, tiny, tmp_path):
    save_params(tmp_path / "export", *tiny)
    assert load_lm(tmp_path / "export", toks[1]).tokenizer_mismatch is None


def test_sft_refuses_a_tokenizer_other_than_init_froms(run, toks, tmp_path, capsys):
    from hibari.align.cli import sft_main
    from hibari.align.tasks import check_init_tokenizer
    from hibari.train.cli import parse_run_flags
    run_dir, _ = run
    a, b = toks
    argv = ["--workdir", str(tmp_path / "sft"), f"--config.init_from={run_dir}",
            f"--config.data.tokenizer={b}"]
    with pytest.raises(TokenizerMismatch) as e:
        sft_main(argv)
    message = str(e.value)
    assert message.startswith(f"config.init_from={run_dir} was trained with tokenizer {a} "
                              f"(sha256 {tokenizer_sha256(a)[:12]}) but config.data.tokenizer="
                              f"{b} is {b} (sha256 {tokenizer_sha256(b)[:12]})"), message
    assert f"set --config.data.tokenizer={a}" in message and "\n" not in message
    assert not (tmp_path / "sft").exists()

    fv = parse_run_flags("dpo", argv + ["--allow-tokenizer-mismatch"], "configs/dpo/pairs.py")
    assert fv.allow_tokenizer_mismatch
    config = fv.config
    with pytest.raises(TokenizerMismatch):
        check_init_tokenizer(config)
    with config.unlocked():  # what `hibari sft/dpo/reward --allow-tokenizer-mismatch` sets
        config.allow_tokenizer_mismatch = True
    assert check_init_tokenizer(config)["used"]["sha256"] == tokenizer_sha256(b)
    config.data.tokenizer = str(a)
    config.allow_tokenizer_mismatch = False
    assert check_init_tokenizer(config) is None  # the recorded tokenizer passes


@pytest.mark.slow  # ~15 s, all of it the loop's compiles and checkpoint
def test_a_real_pretraining_run_records_its_packed_tokenizer(toks, tmp_path):
    """Pack with tokenizer a, pretrain 1 step: the run records a's hash (the manifest's), eval
    finds a through the record and refuses b."""
    from hibari.data.pack import pack_corpus
    from hibari.train.cli import parse_run_flags
    from hibari.train.loop import train
    a, b = toks
    pack_corpus({"en": _corpus_docs()}, str(a), str(tmp_path / "packed"), seq_len=32)
    run_dir = tmp_path / "run"
    fv = parse_run_flags("pretrain", [
        "--config", "configs/pretrain/llama.py:tiny", "--workdir", str(run_dir),
        "--config.data.kind=packed", f"--config.data.path={tmp_path / 'packed'}",
        "--config.data.seq_len=32", "--config.data.batch_size=8", f"--config.model.vocab_size={VOCAB}",
        "--config.model.d_model=16", "--config.model.n_layers=1", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=2", "--config.model.head_dim=8", "--config.model.d_ff=32",
        "--config.steps=1", "--config.optim.warmup_steps=0", "--config.eval_every=0",
        "--config.checkpoint_every=0", "--config.async_checkpoint=False"], None)
    train(fv.config, run_dir)
    record = recorded_tokenizer(run_dir)
    assert record == {"sha256": file_sha256(str(a)), "path": str(a), "vocab_size": VOCAB}
    assert load_lm(run_dir).tokenizer.name == str(a)  # found through the record
    with pytest.raises(TokenizerMismatch, match=f"but the tokenizer used is {b} "):
        load_lm(run_dir, b)
