"""Rho-1's cached mode (config.loss.token_selection.mode="cached"): the cache holds each packed
row's reference token losses (checked against the reference's own logits, row by row), the
loader delivers them aligned with the shuffled rows, training equals the live mode step for step,
a stale cache is refused in one line, resume works; and `hibari sweep` / `hibari quickstart`
pretraining honour config.loss.token_selection."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import hibari.cli
from hibari.base.config_files import load_python_config
from hibari.data import CORPUS_DIR
from hibari.data.clean import clean_docs
from hibari.data.loader import PackedLoader, StaleRowArrays
from hibari.data.pack import pack_corpus
from hibari.data.sources import read_docs
from hibari.data.tokenizer import train_tokenizer
from hibari.model import ModelConfig, apply, init, token_log_probs
from hibari.model.params_io import load_params, save_params

SEQ = 32
VOCAB = 1200
REF_CFG = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                      max_seq_len=128)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Packed train rows (en + ja, several shards per source), held-out rows, two references."""
    root = tmp_path_factory.mktemp("rho1_cache")
    docs = {lang: list(clean_docs(read_docs(os.path.join(CORPUS_DIR, f"{lang}.jsonl.gz"))))[:50]
            for lang in ("en", "ja")}
    tok = str(root / "tok.model")
    train_tokenizer(docs["en"][::2] + docs["ja"][::2], tok, vocab_size=VOCAB)
    pack_corpus({k: iter(v[:40]) for k, v in docs.items()}, tok, str(root / "train"), SEQ,
                "greedy", rows_per_shard=100)
    pack_corpus({k: iter(v[40:]) for k, v in docs.items()}, tok, str(root / "eval"), SEQ,
                "greedy", rows_per_shard=100)
    for name, seed in (("ref", 3), ("other_ref", 4)):
        save_params(root / name, REF_CFG, init(REF_CFG, jax.random.key(seed)))
    return {"root": root, "docs": docs, "tok": tok, "train": str(root / "train"),
            "eval": str(root / "eval"), "ref": str(root / "ref"),
            "other_ref": str(root / "other_ref")}


def argv(data, workdir, *extra, steps=4):
    return ["pretrain", "--config", "configs/pretrain/llama.py:tiny", "--workdir", str(workdir),
            f"--config.steps={steps}", "--config.log_every=1", f"--config.eval_every={steps}",
            "--config.eval_batches=2", "--config.checkpoint_every=2",
            "--config.async_checkpoint=False", f"--config.data.seq_len={SEQ}",
            "--config.data.kind=packed", f"--config.data.path={data['train']}",
            f"--config.data.eval_path={data['eval']}", f"--config.model.vocab_size={VOCAB}",
            "--config.loss.token_selection.enabled=True",
            f"--config.loss.token_selection.reference={data['ref']}", *extra]


def metrics(workdir):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Live and cached pretraining, 4 steps each, same seed and data."""
    root = tmp_path_factory.mktemp("rho1_runs")
    assert hibari.cli.main(argv(data, root / "live")) == 0
    assert hibari.cli.main(argv(data, root / "cached",
                                "--config.loss.token_selection.mode=cached")) == 0
    return root


def reference_losses_by_hand(ref_params, tokens, segment_ids):
    """-log p(tokens[t+1]) under the reference at each t where t+1 continues t's document, from
    the logits of the full forward pass (apply), one row at a time; 0 elsewhere."""
    out = np.zeros(tokens.shape, np.float32)
    for b in range(tokens.shape[0]):
        seg = segment_ids[b]
        pos = np.zeros_like(seg)
        for t in range(1, len(seg)):
            pos[t] = pos[t - 1] + 1 if seg[t] == seg[t - 1] else 0
        logits = apply(REF_CFG, ref_params, tokens[b:b + 1], seg[None], pos[None])
        lp, _ = token_log_probs(logits[:, :-1], tokens[b:b + 1, 1:])
        for t in range(len(seg) - 1):
            if seg[t] != 0 and seg[t + 1] == seg[t]:
                out[b, t] = -float(lp[0, t])
    return out


@pytest.mark.slow  # ~40 s: two pretraining runs (their compiles) and the cache
def test_cached_mode_equals_live_mode(data, runs):
    live, cached = metrics(runs / "live"), metrics(runs / "cached")
    assert sorted(live) == sorted(cached) == [1, 2, 3, 4]
    for step in live:
        for key in ("loss", "nll", "selected_nll", "kept_share", "excess_kept",
                    "excess_dropped", "grad_norm"):
            assert cached[step][key] == pytest.approx(live[step][key], rel=1e-5, abs=1e-6), \
                (step, key)
        assert 0.6 <= cached[step]["kept_share"] < 0.62
    for key in ("eval_loss", "eval_nll"):
        assert cached[4][key] == pytest.approx(live[4][key], rel=1e-5)
    assert os.path.isdir(runs / "cached" / "reference_token_losses" / "eval")


@pytest.mark.slow  # shares the runs above
def test_cache_rows_are_the_reference_losses_and_the_loader_aligns_them(data, runs):
    cache = runs / "cached" / "reference_token_losses"
    _, ref = load_params(data["ref"])
    manifest = json.load(open(cache / "train" / "manifest.json"))
    assert manifest["packed"][0]["manifest"] == os.path.join(data["train"], "manifest.json")
    packed = json.load(open(os.path.join(data["train"], "manifest.json")))
    for source in ("en", "ja"):  # every shard, a few rows of each, against the logits
        shards = packed["sources"][source]["shards"]
        assert len(shards) >= 2
        for i, shard in enumerate(shards):
            rows = np.load(os.path.join(data["train"], shard["path"]))
            losses = np.load(cache / "train" / f"{source}-{i:05d}.npy")
            assert losses.shape == (len(rows), SEQ) and losses.dtype == np.float32
            pick = [0, len(rows) // 2, len(rows) - 1]
            want = reference_losses_by_hand(ref, rows[pick, 0], rows[pick, 1])
            np.testing.assert_allclose(losses[pick], want, rtol=1e-5, atol=1e-5)
    # the loader: each shuffled, mixed row comes with its own losses
    loader = PackedLoader(data["train"], batch_size=8, seq_len=SEQ, seed=0,
                          row_fields={"ref_token_loss": str(cache / "train")})
    plain = PackedLoader(data["train"], batch_size=8, seq_len=SEQ, seed=0)
    for _, (batch, same) in zip(range(2), zip(loader, plain)):
        np.testing.assert_array_equal(batch["tokens"], same["tokens"])  # order unchanged
        want = reference_losses_by_hand(ref, batch["tokens"], batch["segment_ids"])
        np.testing.assert_allclose(batch["ref_token_loss"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~20 s: a resumed run
def test_cached_run_resumes_like_an_uninterrupted_one(data, runs, tmp_path):
    work = tmp_path / "resumed"
    shutil.copytree(runs / "cached", work)
    shutil.rmtree(work / "checkpoints" / "4")  # as if stopped after the step-2 checkpoint
    cache_files = {p: p.stat().st_mtime_ns for p in (work / "reference_token_losses").rglob("*")}
    assert hibari.cli.main(argv(data, work, "--config.loss.token_selection.mode=cached")) == 0
    again, whole = metrics(work), metrics(runs / "cached")
    for step in (3, 4):
        for key in ("loss", "nll", "kept_share", "grad_norm"):
            assert again[step][key] == pytest.approx(whole[step][key], rel=1e-5), (step, key)
    assert cache_files == {p: p.stat().st_mtime_ns
                           for p in (work / "reference_token_losses").rglob("*")}  # reused


def selection_config(data, **fields):
    config = load_python_config("configs/pretrain/llama.py:tiny")
    config.data.update(kind="packed", path=data["train"], eval_path=data["eval"], seq_len=SEQ)
    config.model.vocab_size = VOCAB
    config.loss.token_selection.update({"enabled": True, "reference": data["ref"],
                                        "mode": "cached", **fields})
    return config


@pytest.mark.slow  # ~25 s with the data fixture (tokenizer, packing) and a cache build
def test_stale_or_mismatched_cache_is_refused(data, tmp_path, capsys):
    from hibari.train.cli import token_selection_task
    cache = tmp_path / "cache"
    task = token_selection_task(selection_config(data, cache=str(cache)))
    assert task.frozen_params is None and (cache / "train" / "manifest.json").exists()
    # a copy of the reference (same bytes, new path and mtime) is the same reference
    shutil.copytree(data["ref"], tmp_path / "ref_copy")
    token_selection_task(selection_config(data, cache=str(cache),
                                          reference=str(tmp_path / "ref_copy")))
    # another reference
    with pytest.raises(StaleRowArrays, match=r"train/manifest\.json: computed with reference "
                                             r".*ref'.* not config\.loss\.token_selection\."
                                             r"reference=.*other_ref.*; delete .*cache"):
        token_selection_task(selection_config(data, cache=str(cache), reference=data["other_ref"]))
    # repacked rows (another manifest): refused through the command line in one line
    repacked = tmp_path / "repacked"
    pack_corpus({k: iter(v[:30]) for k, v in data["docs"].items()}, data["tok"], str(repacked),
                SEQ, "greedy", rows_per_shard=100)
    capsys.readouterr()
    assert hibari.cli.main(argv(data, tmp_path / "run", f"--config.data.path={repacked}",
                                "--config.loss.token_selection.mode=cached",
                                f"--config.loss.token_selection.cache={cache}")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hibari pretrain: error: ")
    assert f"{cache}/train/manifest.json: built for packed rows {data['train']}" in err[0]
    assert "repacked or another dataset" in err[0] and f"delete {cache}" in err[0]
    # a bad mode, and cached mode on synthetic data
    assert hibari.cli.main(argv(data, tmp_path / "run",
                                "--config.loss.token_selection.mode=precomputed")) == 1
    assert "mode='precomputed'; choose one of ('live', 'cached')" in capsys.readouterr().err
    assert hibari.cli.main(argv(data, tmp_path / "run", "--config.data.kind=synthetic",
                                "--config.loss.token_selection.mode=cached")) == 1
    assert "needs config.data.kind='packed'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # ~15 s: one sweep member
def test_sweep_member_with_token_selection_uses_the_selective_loss(data, tmp_path):
    import ml_collections

    from hibari.configs.sweeps._common import sweep_defaults
    from hibari.sweep import run_sweep
    sweep = sweep_defaults()
    sweep.update(name="rho1", widths=(64,), head_dim=16, eval_points=1, min_steps=1,
                 step_tolerance=0.0, warmup_fraction=0.0)
    sweep.variants = ml_collections.ConfigDict({"rho1": {"loss": {"token_selection": {
        "enabled": True, "keep_ratio": 0.6, "reference": data["ref"]}}}})
    sweep.overrides = ml_collections.ConfigDict({
        "steps": 3, "log_every": 1, "eval_batches": 1, "async_checkpoint": False,
        "model": {"vocab_size": VOCAB},
        "data": {"kind": "packed", "path": data["train"], "eval_path": data["eval"],
                 "seq_len": SEQ}})
    out = run_sweep(sweep, tmp_path / "sweep", report=False)
    assert out["failures"] == [] and out["rows"] == 1
    records = metrics(tmp_path / "sweep" / "d64-l2")
    assert all(0.6 <= records[s]["kept_share"] < 0.62 for s in (1, 2, 3))
    final = records[3]
    assert final["eval_loss"] != final["eval_nll"]  # kept tokens only vs every token
    row = json.loads(open(tmp_path / "sweep" / "results.jsonl").readline())
    assert row["loss"] == final["eval_nll"]  # the sweep compares all-token held-out losses


@pytest.mark.slow  # ~20 s: the quickstart's pretraining stage on tiny data
def test_quickstart_pretrain_stage_honours_token_selection(data, tmp_path):
    from hibari.quickstart import Plan, run_training
    out = tmp_path / "qs"
    shutil.copytree(data["train"], out / "data" / "packed")
    shutil.copytree(data["eval"], out / "data" / "packed-heldout")
    qc = load_python_config("configs/quickstart.py:ci")
    qc.pretrain.overrides.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2,
                                 eval_batches=1)
    qc.pretrain.overrides.model = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                       head_dim=16, d_ff=64)
    qc.pretrain.overrides.loss = dict(token_selection=dict(
        enabled=True, keep_ratio=0.5, reference=data["ref"], mode="cached"))
    plan = Plan(qc, out)
    assert "--config.loss.token_selection.mode=cached" in plan.command("pretrain")
    result = run_training(plan, "pretrain")
    records = metrics(out / "pretrain")
    assert all(0.5 <= records[s]["kept_share"] < 0.52 for s in (1, 2))
    assert (out / "pretrain" / "reference_token_losses" / "train" / "manifest.json").exists()
    assert result["kept_share"] == records[2]["kept_share"] and "eval_nll" in result
