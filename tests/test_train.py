"""train/: schedules, losses, shardings, 8 vs 1 devices, grad accumulation, resharded restore,
NaN policy, config errors. In-process on 8 simulated CPU devices."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hibari.configs.pretrain.llama import get_config
from hibari.model import ModelConfig, apply, init
from hibari.train.checkpoint import Checkpointer
from hibari.train.loop import NonFiniteError, Task, TrainConfigError, build, train
from hibari.train.losses import lm_loss_fn, next_token_targets
from hibari.train.metrics import read_metrics
from hibari.train.optim import decay_mask, make_schedule
from hibari.train.sharding import MeshError, global_batch, mesh_shape
from hibari.train.synthetic import SyntheticTokens


def tiny(**overrides):
    c = get_config("tiny")
    c.steps = 6
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 0
    c.data.batch_size = 8
    c.data.seq_len = 32
    c.model.max_seq_len = 32
    c.model.vocab_size = 128
    c.async_checkpoint = False
    c.optim.warmup_steps = 2  # fixed, not derived from the shortened steps
    c.update_from_flattened_dict(overrides)
    return c


def run_steps(run, n):
    state, losses = run.state, []
    batches = iter(run.loader)
    for _ in range(n):
        state, m = run.step_fn(state, global_batch(next(batches), run.mesh, run.rules))
        losses.append(float(m["loss"]))
    return state, losses


# --- schedules and optimizer -------------------------------------------------------------------

def test_warmup_cosine_values():
    optim = tiny().optim
    optim.lr, optim.warmup_steps, optim.min_lr_ratio, optim.schedule = 1.0, 10, 0.1, "cosine"
    sched = make_schedule(optim, 110)
    for t in (0, 5, 10):
        assert float(sched(t)) == pytest.approx(t / 10)
    for t in (10, 35, 60, 85, 110):
        expect = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 100))
        assert float(sched(t)) == pytest.approx(expect, rel=1e-5)


def test_wsd_values():
    optim = tiny().optim
    optim.lr, optim.warmup_steps, optim.min_lr_ratio = 2.0, 10, 0.0
    optim.schedule, optim.decay_fraction = "wsd", 0.2
    sched = make_schedule(optim, 110)  # stable until 90, linear to 0 at 110
    assert float(sched(50)) == pytest.approx(2.0)
    assert float(sched(90)) == pytest.approx(2.0)
    assert float(sched(100)) == pytest.approx(1.0)
    assert float(sched(110)) == pytest.approx(0.0, abs=1e-6)


def test_weight_decay_mask():
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, use_bias=True)
    mask = decay_mask(init(cfg, jax.random.key(0)))
    assert mask["layers"]["attn"]["q"]["kernel"] and mask["lm_head"]["kernel"]
    assert not mask["layers"]["attn"]["q"]["bias"]
    assert not mask["layers"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
    assert not mask["embed"]["embedding"]
    assert decay_mask(init(cfg, jax.random.key(0)), True)["embed"]["embedding"]


# --- losses ------------------------------------------------------------------------------------

def _reference_nll(logits, tokens, seg):
    """Brute force: mean -log softmax(logits[t])[tokens[t+1]] over pairs in one segment."""
    total, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if seg[b, t] != 0 and seg[b, t + 1] == seg[b, t]:
                row = logits[b, t].astype(np.float64)
                logz = np.log(np.exp(row - row.max()).sum()) + row.max()
                total += logz - row[tokens[b, t + 1]]
                count += 1
    return total / count


def test_lm_loss_matches_bruteforce_on_packed_rows():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    params = init(cfg, jax.random.key(1))
    batch = SyntheticTokens(vocab_size=50, batch_size=3, seq_len=24, seed=3,
                            mean_doc_len=8).batch(0)
    batch["segment_ids"][0, -5:] = 0  # padding tail
    loss, aux = lm_loss_fn(cfg)(params, batch, None)
    logits = np.asarray(apply(cfg, params, batch["tokens"], batch["segment_ids"],
                              batch["positions"]))
    ref = _reference_nll(logits, batch["tokens"], batch["segment_ids"])
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    _, weights = next_token_targets(batch)
    assert float(aux["weight"]) == float(weights.sum())


def test_chunked_logits_equal_full_and_z_loss_formula():
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, d_ff=64)
    params = init(cfg, jax.random.key(2))
    batch = SyntheticTokens(vocab_size=40, batch_size=2, seq_len=16, seed=0).batch(1)
    full = jax.value_and_grad(lm_loss_fn(cfg, z_loss=1e-2), has_aux=True)
    chunked = jax.value_and_grad(lm_loss_fn(cfg, z_loss=1e-2, logits_chunk=4), has_aux=True)
    (l1, a1), g1 = full(params, batch, None)
    (l2, _), g2 = chunked(params, batch, None)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), g1, g2)
    logits = np.asarray(apply(cfg, params, batch["tokens"], batch["segment_ids"]), np.float64)
    _, w = next_token_targets(batch)
    logz = np.log(np.exp(logits).sum(-1))
    z = (logz ** 2 * np.asarray(w)).sum() / np.asarray(w).sum()
    assert float(l1) - float(a1["nll"]) == pytest.approx(1e-2 * z, rel=1e-4)


# --- mesh and shardings ------------------------------------------------------------------------

def test_mesh_shape_resolution_and_errors():
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2,
                                                                    "tensor": 2}
    with pytest.raises(MeshError, match="3 devices"):
        mesh_shape({"data": 3}, 8)
    with pytest.raises(MeshError, match="unknown axes"):
        mesh_shape({"model": 2}, 8)


def test_params_optimizer_state_and_batch_carry_rule_shardings():
    run = build(tiny(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), None)
    p = run.state.params
    assert p["layers"]["attn"]["q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert p["layers"]["attn"]["o"]["kernel"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert p["layers"]["mlp"]["down"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert p["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert p["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert p["final_norm"]["scale"].sharding.spec == P("fsdp")
    adam = run.state.opt_state[1][0]
    assert adam.mu["layers"]["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert adam.nu["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    batch = global_batch(next(iter(run.loader)), run.mesh, run.rules)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert len(batch["tokens"].addressable_shards) == 8
    _, losses = run_steps(run, 1)
    assert np.isfinite(losses[0])


def test_eight_devices_match_one_device():
    sharded = build(tiny(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), None)
    single = build(tiny(), None, devices=jax.devices()[:1])
    assert single.mesh.size == 1 and sharded.mesh.size == 8
    _, l8 = run_steps(sharded, 5)
    _, l1 = run_steps(single, 5)
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    assert l8[-1] < l8[0]


def test_grad_accumulation_equals_one_big_batch():
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "data.batch_size": 16}
    big = build(tiny(**mesh), None)
    acc = build(tiny(**mesh, grad_accum=4), None)
    s1, l1 = run_steps(big, 2)
    s4, l4 = run_steps(acc, 2)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                 s1.params, s4.params)


def test_restore_onto_a_different_mesh(tmp_path):
    first = build(tiny(**{"mesh.data": 8}), tmp_path)
    state, _ = run_steps(first, 3)
    first.checkpointer.save(state, first.loader.get_state())
    first.checkpointer.close()
    expected = jax.tree.map(np.asarray, state.params)
    second = build(tiny(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), tmp_path)
    assert int(second.state.step) == 3 and second.loader.get_state() == {"step": 3}
    q = second.state.params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 second.state.params, expected)
    second.checkpointer.close()
    # The next step agrees with continuing on the original mesh.
    _, cont_new = run_steps(second, 1)
    first.loader.set_state({"step": 3})
    first.state = state
    _, cont_old = run_steps(first, 1)
    np.testing.assert_allclose(cont_new, cont_old, rtol=2e-5)


# --- the loop: NaN policy, metrics, config errors ----------------------------------------------

def _nan_on_some_batches(cfg):
    base = lm_loss_fn(cfg)

    def loss_fn(params, batch, rng):
        loss, aux = base(params, batch, rng)
        poisoned = batch["tokens"].sum() % 5 == 2
        return jnp.where(poisoned, jnp.nan, loss), aux
    return loss_fn


def _poisoned_steps(config, n):
    src = SyntheticTokens(vocab_size=config.model.vocab_size, batch_size=config.data.batch_size,
                          seq_len=config.data.seq_len, seed=config.seed)
    return [s + 1 for s in range(n) if src.batch(s)["tokens"].sum() % 5 == 2]


def test_nan_policy_stop_names_the_step_and_keeps_good_checkpoints(tmp_path):
    config = tiny(steps=30, checkpoint_every=1)
    bad = _poisoned_steps(config, 30)
    assert bad, "the synthetic stream should hit the poison condition within 30 steps"
    cfg = ModelConfig.from_dict(config.model.to_dict())
    with pytest.raises(NonFiniteError, match=f"step {bad[0]}"):
        train(config, tmp_path, Task(loss_fn=_nan_on_some_batches(cfg)))
    steps = Checkpointer(tmp_path / "checkpoints").all_steps()
    assert max(steps) == bad[0] - 1
    from hibari.train.checkpoint import load_params
    _, params = load_params(tmp_path)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_nan_policy_skip_counts_skipped_updates(tmp_path):
    config = tiny(steps=30, nan_policy="skip")
    bad = _poisoned_steps(config, 30)
    cfg = ModelConfig.from_dict(config.model.to_dict())
    summary = train(config, tmp_path, Task(loss_fn=_nan_on_some_batches(cfg)))
    assert summary["skipped_steps"] == len(bad) and summary["step"] == 30
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(summary["params"]))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(not np.isfinite(float(records[s - 1]["loss"])) for s in bad)


def test_loop_writes_config_metrics_eval_and_checkpoints(tmp_path):
    config = tiny(steps=8, log_every=2, eval_every=4, checkpoint_every=4)
    summary = train(config, tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all({"loss", "lr", "grad_norm"} <= set(r) for r in records)
    assert "eval_loss" in records[1] and records[-1]["mfu"] == "unknown"
    assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 64
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [4, 8]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert summary["step"] == 8


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(TrainConfigError, match="config.nan_policy"):
        build(tiny(nan_policy="ignore"), None)
    with pytest.raises(TrainConfigError, match="config.data.batch_size"):
        build(tiny(**{"data.batch_size": 6, "mesh.data": 4, "mesh.fsdp": 2}), None)
    with pytest.raises(TrainConfigError, match="config.data.seq_len"):
        build(tiny(**{"data.seq_len": 64}), None)
    with pytest.raises(MeshError):
        build(tiny(**{"mesh.data": 3}), None)
    from hibari.model import ConfigError
    with pytest.raises(ConfigError, match="model.n_heads"):
        build(tiny(**{"model.n_kv_heads": 3}), None)
    train(tiny(steps=2), tmp_path)
    with pytest.raises(TrainConfigError, match="different model config.*d_ff"):
        build(tiny(**{"model.d_ff": 256}), tmp_path)


def test_synthetic_source_is_deterministic_and_shard_consistent():
    whole = SyntheticTokens(vocab_size=64, batch_size=4, seq_len=16, seed=5).batch(3)
    halves = [SyntheticTokens(vocab_size=64, batch_size=2, seq_len=16, seed=5,
                              shard_index=i, shard_count=2).batch(3) for i in range(2)]
    for key in whole:
        np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    src = SyntheticTokens(vocab_size=64, batch_size=2, seq_len=16, seed=5)
    it = iter(src)
    next(it), next(it)
    state = src.get_state()
    after = next(it)
    src2 = SyntheticTokens(vocab_size=64, batch_size=2, seq_len=16, seed=5)
    src2.set_state(state)
    np.testing.assert_array_equal(next(iter(src2))["tokens"], after["tokens"])


def test_stop_signal_right_after_a_periodic_save_keeps_that_checkpoint(tmp_path):
    """SIGTERM arriving during a checkpoint step: the stop path must not save that step again."""
    import os
    import signal

    from hibari.train.loop import make_loader
    config = tiny(steps=8, checkpoint_every=4)

    class SignalsAtBatch4:
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for i, batch in enumerate(self.inner, 1):
                if i == 4:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state):
            self.inner.set_state(state)

    task = Task(make_loader=lambda split: SignalsAtBatch4(make_loader(config, split))
                if split == "train" else make_loader(config, split))
    summary = train(config, tmp_path, task)
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 4
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [4]
