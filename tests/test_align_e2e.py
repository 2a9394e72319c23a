"""align/ end to end on 8 simulated CPU devices: DPO and a reward model learn a synthetic
preference rule; sharded equals single-device; the CLIs run, resume and chain
(SFT -> DPO with a precomputed reference -> reward model -> score)."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import hibari.cli
from hibari.align import cli, tasks
from hibari.align.reward import load_reward_model, score
from hibari.base.resources import resource_path
from hibari.configs.base import align_config
from hibari.data.tokenizer import load_tokenizer
from hibari.train.loop import build, train
from hibari.train.metrics import read_metrics
from hibari.train.sharding import global_batch

ROOT = Path(__file__).parent.parent
TOKENIZER = str(resource_path("hibari.align", "assets", "seed_sp.model"))
COLOURS = ["red", "blue", "green", "black", "white", "brown"]
NUMBERS = ["one", "two", "three", "four", "five", "six"]


def synthetic_pairs(path: Path, n: int, seed: int) -> None:
    """A rule that depends on the prompt: if the prompt's first word is a colour, the chosen
    answer lists colours and the rejected one numbers; otherwise the reverse."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            first = rng.integers(2)
            words = [str(rng.choice([COLOURS, NUMBERS][first]))] + \
                list(rng.choice(COLOURS + NUMBERS, 3))
            same = " ".join(rng.choice([COLOURS, NUMBERS][first], 3))
            other = " ".join(rng.choice([NUMBERS, COLOURS][first], 3))
            f.write(json.dumps({"id": f"s{seed}-{i}", "prompt": " ".join(words),
                                "chosen": same, "rejected": other}) + "\n")


def tiny_config(tmp_path, steps, **fields):
    c = align_config("test", steps=steps, seq_len=64, batch_size=16, lr=3e-3)
    c.model.update(vocab_size=1024, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                   head_dim=16, d_ff=64)
    synthetic_pairs(tmp_path / "train.jsonl", 512, seed=0)
    synthetic_pairs(tmp_path / "eval.jsonl", 64, seed=1)
    c.data.update(tokenizer=TOKENIZER, train_path=str(tmp_path / "train.jsonl"),
                  eval_path=str(tmp_path / "eval.jsonl"), template="minimal")
    # log (and so sync) every 10 steps: many steps in flight can starve XLA:CPU collectives
    c.update(log_every=10, eval_every=steps, checkpoint_every=0, async_checkpoint=False)
    with c.unlocked():
        c.update(dict(loss="dpo", beta=0.5, label_smoothing=0.0, reference="live",
                      reference_cache="", kto=dict(desirable_weight=1.0,
                                                   undesirable_weight=1.0)))
        c.update(fields)
    return c


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_preference_optimisation_learns_a_rule(tmp_path, loss):
    config = tiny_config(tmp_path, steps=120, loss=loss)
    task = tasks.preference_task(config, tmp_path / "run")
    before = task.on_eval(0, task.base_params)
    summary = train(config, tmp_path / "run", task)
    after = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    print(f"{loss} held-out accuracy {before['heldout_accuracy']:.3f} -> "
          f"{after['heldout_accuracy']:.3f}, margin {before['heldout_reward_margin']:.3f} -> "
          f"{after['heldout_reward_margin']:.3f}, train loss {summary['loss']:.3f}")
    assert before["heldout_accuracy"] == 0.5 and before["heldout_reward_margin"] == 0.0
    assert after["heldout_accuracy"] >= 0.9
    assert after["heldout_reward_margin"] > 0.5
    if loss == "dpo":
        assert after["reward_chosen"] > after["reward_rejected"]
        assert {"accuracy", "kl_ref_estimate", "eval_loss"} <= set(after)
    else:
        assert after["reward_desirable"] > after["reward_undesirable"]


@pytest.mark.slow
def test_reward_model_learns_the_same_rule(tmp_path):
    config = tiny_config(tmp_path, steps=100)
    task = tasks.reward_task(config)
    before = task.on_eval(0, task.base_params)["heldout_accuracy"]
    train(config, tmp_path / "rm", task)
    after = read_metrics(tmp_path / "rm" / "metrics.jsonl")[-1]["heldout_accuracy"]
    print(f"reward model held-out accuracy {before:.3f} -> {after:.3f}")
    assert after >= 0.9


@pytest.mark.slow
def test_sharded_dpo_step_equals_single_device(tmp_path):
    results = []
    for devices, fsdp in ((jax.devices(), 2), (jax.devices()[:1], 1)):  # 4 data x 2 fsdp vs 1
        config = tiny_config(tmp_path, steps=2)
        config.mesh.fsdp = fsdp
        run = build(config, None, tasks.preference_task(config, tmp_path), devices=devices)
        batch = global_batch(next(iter(run.loader)), run.mesh, run.rules)
        state, metrics = run.step_fn(run.state, batch)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]),
                        float(metrics["accuracy"]),
                        np.asarray(jax.device_get(state.params["lm_head"]["kernel"]))))
    (l8, g8, a8, p8), (l1, g1, a1, p1) = results
    assert l8 == pytest.approx(l1, rel=1e-5) and g8 == pytest.approx(g1, rel=1e-4)
    assert a8 == a1
    # Adam's first update is ~ lr * g / (|g| + eps): coordinates whose gradient is near eps
    # amplify float rounding, so compare the updated weights to a small fraction of lr.
    np.testing.assert_allclose(p8, p1, rtol=1e-5, atol=0.02 * config.optim.lr)


def _cli(main, workdir, config, *overrides):
    argv = [f"--config={config}", "--workdir", str(workdir)] + [f"--config.{o}" for o in overrides]
    assert main(argv) == 0


SMALL = ["data.template=minimal", "data.seq_len=256", "model.max_seq_len=256",
         "data.batch_size=8", "log_every=1", "optim.warmup_steps=1", "async_checkpoint=False"]


@pytest.mark.slow
def test_cli_sft_resumes_then_dpo_and_reward_chain(tmp_path):
    straight, resumed = tmp_path / "sft", tmp_path / "sft_resumed"
    sft_cfg = str(ROOT / "configs/sft/instruct.py")
    _cli(cli.sft_main, straight, sft_cfg, *SMALL, "steps=4", "checkpoint_every=4",
         "eval_every=4")
    _cli(cli.sft_main, resumed, sft_cfg, *SMALL, "steps=4", "checkpoint_every=2",
         "eval_every=0")
    # stopped at 2 ... here: a fresh run of 4 steps saved at 2 and 4; drop the last to resume
    import shutil
    shutil.rmtree(resumed / "checkpoints" / "4")
    _cli(cli.sft_main, resumed, sft_cfg, *SMALL, "steps=4", "checkpoint_every=2",
         "eval_every=0")
    a = {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_metrics(resumed / "metrics.jsonl")}
    # the replayed steps 3 and 4 replace the first run's records: each step appears once
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert b[3] == pytest.approx(a[3], rel=1e-6) and b[4] == pytest.approx(a[4], rel=1e-6)
    assert "eval_loss" in read_metrics(straight / "metrics.jsonl")[-1]

    # DPO from the SFT run with a precomputed reference; the cache is reused on resume
    dpo = tmp_path / "dpo"
    dpo_args = [f"init_from={straight}", "reference=precomputed", "data.template=minimal",
                "data.seq_len=256", "data.batch_size=8", "log_every=1", "optim.warmup_steps=1",
                "async_checkpoint=False", "checkpoint_every=2", "eval_every=2"]
    _cli(cli.dpo_main, dpo, str(ROOT / "configs/dpo/pairs.py") + ":ipo", *dpo_args, "steps=2")
    cache = dpo / "reference_logps.npy"
    stamp = cache.stat().st_mtime_ns
    _cli(cli.dpo_main, dpo, str(ROOT / "configs/dpo/pairs.py") + ":ipo", *dpo_args, "steps=3")
    assert cache.stat().st_mtime_ns == stamp
    records = read_metrics(dpo / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "heldout_accuracy" in records[1] and np.isfinite(records[-1]["loss"])

    # reward model from the SFT run; score() on the trained model
    rm = tmp_path / "rm"
    _cli(cli.reward_main, rm, str(ROOT / "configs/reward/pairs.py"), f"init_from={straight}",
         "data.template=minimal", "data.seq_len=256", "data.batch_size=8", "steps=2",
         "optim.warmup_steps=1", "async_checkpoint=False", "checkpoint_every=2", "eval_every=2")
    cfg, params = load_reward_model(rm)
    r = score(params, ["Name two colours.", {"instruction": "Add", "input": "1 + 1"}],
              ["Red and green.", "2"], cfg=cfg, tokenizer=load_tokenizer(TOKENIZER),
              template="minimal")
    assert r.shape == (2,) and np.all(np.isfinite(r)) and r[0] != r[1]


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    argv = ["--config=" + str(ROOT / "configs/dpo/pairs.py"), "--workdir", str(tmp_path),
            "--config.data.train_path=" + str(tmp_path / "missing.jsonl")]
    assert hibari.cli.main(["dpo", *argv]) == 1
    err = capsys.readouterr().err
    assert "hibari dpo: error:" in err and "missing.jsonl: cannot read" in err
    assert "Traceback" not in err
