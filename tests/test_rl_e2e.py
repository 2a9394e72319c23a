"""RL end to end on the tiny configs (8 simulated CPU devices): PPO and GRPO raise a
programmatic reward while the KL penalty holds the policy near its reference; a sharded step
equals a single-device one; PPO against a trained reward model with a separate critic resumes
exactly; bad configs fail with one line."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import hibari.cli
from hibari.align import cli
from hibari.align.rl_train import plot_run, rl_task
from hibari.base.config_files import load_python_config
from hibari.train.loop import build, train
from hibari.train.metrics import read_metrics
from hibari.train.sharding import global_batch

ROOT = Path(__file__).parent.parent
PPO = str(ROOT / "configs/rl/ppo.py")
GRPO = str(ROOT / "configs/rl/grpo.py")
FAST = ["async_checkpoint=False", "optim.warmup_steps=0"]
TOPICS = ["rain", "tea", "trains", "cats", "rice", "snow", "music", "the sea", "books", "bread",
          "桜", "富士山", "お茶", "電車", "猫", "雪"]
VERBS = ["Describe", "Write about", "Say something about", "Explain", "Praise"]


def short_prompts(path: Path, n: int = 80) -> str:
    """Short instructions (~10-20 tokens templated), so test rollouts are cheap."""
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = f"{rng.choice(VERBS)} {rng.choice(TOPICS)}."
            f.write(json.dumps({"id": f"p{i}", "prompt": text}, ensure_ascii=False) + "\n")
    return str(path)


def small(tmp_path) -> list[str]:
    """Overrides: the short prompts, a 32-token prompt window, the minimal template."""
    path = short_prompts(tmp_path / "prompts.jsonl")
    return [f"data.train_path={path}", "data.prompt_len=32", "data.template=minimal"]


def _cli(main, workdir, config, *overrides):
    argv = [f"--config={config}", "--workdir", str(workdir)] + [f"--config.{o}" for o in overrides]
    assert main(argv) == 0


def _mean(records, key, rows):
    return float(np.mean([r[key] for r in rows]))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,fields", [
    ("grpo", {"steps": 36, "kl.beta": 0.02, "data.batch_size": 8, "grpo.group_size": 2}),
    ("ppo", {"steps": 40, "optim.lr": 2e-3, "kl.beta": 0.02}),
])
def test_tiny_rl_raises_the_reward_with_bounded_kl(tmp_path, algorithm, fields):
    """From a random policy (share of Japanese script ~0.02: 42 of 1,000 pieces), the mean
    reward of the last 10 rollout batches beats the first 10 by a wide margin, the KL to the
    reference stays finite and below the policy's full departure (T x log V nats), and the
    run leaves its curves, held-out samples and per-step records. (One device: the CLI and
    the sharded step are tested below.)"""
    config = _tiny(tmp_path, algorithm, checkpoint_every=0, **fields)
    train(config, tmp_path, rl_task(config, tmp_path, algorithm), devices=jax.devices()[:1])
    plot_run(tmp_path)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    first, last = records[:10], records[-10:]
    assert _mean(records, "reward", last) > _mean(records, "reward", first) + 0.1
    kl = np.array([r["kl"] for r in records])
    assert np.all(np.isfinite(kl)) and kl.max() < 0.8 * 16 * np.log(1024)
    final = records[-1]
    assert {"entropy", "clip_fraction", "approx_kl", "response_length", "eval_reward",
            "eval_reward_stderr"} <= set(final)
    if algorithm == "ppo":
        assert {"value_loss", "explained_variance"} <= set(final)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    samples = [json.loads(line) for line in
               (tmp_path / "samples" / f"{final['step']}.jsonl").read_text().splitlines()]
    assert len(samples) == final["eval_prompts"] > 0
    assert np.mean([s["score"] for s in samples]) == pytest.approx(final["eval_reward"])


def _tiny(tmp_path, algorithm: str, **fields):
    """The tiny config on short prompts; `fields`: dotted config paths -> values."""
    config = load_python_config((PPO if algorithm == "ppo" else GRPO) + ":tiny")
    path = short_prompts(tmp_path / "prompts.jsonl")
    fields = {"async_checkpoint": False, "optim.warmup_steps": 0, "data.train_path": path,
              "data.prompt_len": 32, "data.template": "minimal", **fields}
    config.update_from_flattened_dict(fields)
    return config


@pytest.mark.slow
def test_sharded_rl_step_equals_single_device(tmp_path):
    """One PPO step on 4 data x 2 fsdp devices and on one device: the same rollout (sampling
    does not depend on the sharding), the same scores and the same update."""
    results = []
    for devices, fsdp in ((jax.devices(), 2), (jax.devices()[:1], 1)):
        config = _tiny(tmp_path, "ppo", steps=1, **{"mesh.fsdp": fsdp, "data.batch_size": 8})
        run = build(config, None, rl_task(config, tmp_path, "ppo"), devices=devices)
        batch = global_batch(next(iter(run.loader)), run.mesh, run.rules)
        state, metrics = run.step_fn(run.state, batch)
        results.append(({k: float(metrics[k]) for k in ("reward", "kl", "loss", "entropy",
                                                        "response_length")},
                        np.asarray(jax.device_get(state.params["policy"]["lm_head"]["kernel"]))))
    (m8, p8), (m1, p1) = results
    assert m8["reward"] == m1["reward"] and m8["response_length"] == m1["response_length"]
    for key in ("kl", "loss", "entropy"):
        assert m8[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-5), key
    np.testing.assert_allclose(p8, p1, rtol=1e-4, atol=0.02 * config.optim.lr)


@pytest.mark.slow
def test_ppo_against_a_reward_model_with_a_critic_resumes_exactly(tmp_path):
    """`hibari reward`, then `hibari ppo` with reward.name=model, a critic initialised from the
    reward model and the adaptive KL controller (its coefficient is checkpointed state; the
    sampler's key is the state's rng): stopping after step 2 and rerunning the command gives
    steps 3-4 of the uninterrupted run exactly."""
    rm = tmp_path / "rm"
    _cli(cli.reward_main, rm, str(ROOT / "configs/reward/pairs.py"), *FAST, "steps=2",
         "data.seq_len=256", "model.max_seq_len=256", "data.batch_size=8",
         "checkpoint_every=2", "eval_every=0", "data.template=alpaca_en")
    args = [*FAST, *small(tmp_path), "steps=4", "checkpoint_every=2", "eval_every=4",
            "reward.name=model", f"reward.model={rm}", "ppo.value=critic",
            "reward.normalize=False", "kl.adaptive=True", "kl.target=0.5", "kl.horizon=50",
            "data.batch_size=8", "model.max_seq_len=256"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _cli(cli.ppo_main, straight, f"{PPO}:tiny", *args)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    shutil.rmtree(resumed / "samples")
    (resumed / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_metrics(straight / "metrics.jsonl")[:2]))
    _cli(cli.ppo_main, resumed, f"{PPO}:tiny", *args)
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert all(np.isfinite(r[k]) for r in a for k in ("reward", "kl", "value_loss"))
    assert len({r["reward"] for r in a}) == 4  # scores from the reward model, not constant
    assert a[3]["kl_coef"] != a[0]["kl_coef"]  # the controller moved and was restored
    for ra, rb in zip(a[2:], b[2:]):
        for key in ("reward", "kl", "kl_coef", "loss", "value_loss", "eval_reward"):
            if key in ra:
                assert rb[key] == ra[key], (ra["step"], key)
    samples = (resumed / "samples" / "4.jsonl").read_text().splitlines()
    assert len(samples) == b[-1]["eval_prompts"] > 0


@pytest.mark.parametrize("command,config,override,message", [
    ("grpo", GRPO, "grpo.group_size=1", "config.grpo.group_size must be >= 2"),
    ("ppo", PPO, "reward.name=no_such_reward", "config.reward.name='no_such_reward'"),
    ("grpo", PPO, "steps=2", "config.algorithm='ppo': this config is for `hibari ppo`"),
    ("ppo", PPO, "kl.beta=-1.0", "config.kl.beta=-1.0 must be a finite number"),
    ("ppo", PPO, "ppo.value=shared", "config.ppo.value='shared'"),
    ("ppo", PPO, "reward.name=model", "needs config.reward.model"),
    ("ppo", PPO, "rollout.top_p=0.0", "config.rollout.top_p=0.0"),
    ("ppo", PPO, "ppo.minibatches=3", "divisible by config.ppo.minibatches=3"),
])
def test_bad_rl_configs_fail_with_one_line(tmp_path, capsys, command, config, override,
                                           message):
    argv = [command, f"--config={config}:tiny", "--workdir", str(tmp_path / "w"),
            f"--config.{override}"]
    assert hibari.cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"hibari {command}: error:" in err and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "w" / "checkpoints").exists()
