"""Issue 18's findings in train/ and the CLI, each reproduced and its new behaviour asserted:
one writer per workdir, no NaN ever saved, checksummed checkpoints with fallback, each metrics
step once after a resume, clear errors, clean Ctrl-C. In-process on the tiny config, except
the two-writer race and the signals, which need real processes."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import tiny

from hibari.base.runlock import DirLock, DirLocked
from hibari.model.params_io import CheckpointCorrupt, load_params
from hibari.train.checkpoint import Checkpointer, NonFiniteState
from hibari.train.loop import NonFiniteError, Task, TrainConfigError, build, train
from hibari.train.metrics import read_metrics
from hibari.train.step import apply_gradients

REPO = Path(__file__).resolve().parents[1]
ONE = jax.devices()[:1]  # one device: these tests are about files, not sharding (compiles faster)


def train1(config, workdir, task=None):
    return train(config, workdir, task, devices=ONE)


def _ckpt_steps(workdir):
    return Checkpointer(workdir / "checkpoints").all_steps()


def _data_file(step_dir: Path) -> Path:
    """The largest array data file of a step's params (where a flipped bit lands in weights)."""
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


# --- finding 3: a checkpoint can hold NaN parameters -------------------------------------------

def test_an_update_that_would_make_the_state_nonfinite_is_not_applied():
    """Adam with eps=0 turns finite gradients into 0/0 = NaN updates (the reproduction); the
    step's finite flag covers the updated parameters and state, so nothing changes."""
    params = {"w": jnp.ones((4,)), "b": jnp.zeros((2,))}
    optimizer = optax.adam(1e-3, eps=0.0)
    opt_state = optimizer.init(params)
    grads = {"w": jnp.ones((4,)), "b": jnp.zeros((2,))}  # b's 0 / sqrt(0) is NaN
    new_params, new_state, grad_norm, finite = apply_gradients(
        optimizer, params, opt_state, jnp.float32(1.0), grads)
    assert np.isfinite(float(grad_norm)) and not bool(finite)
    for new, old in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, opt_state))):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    good = {"w": jnp.ones((4,)), "b": jnp.ones((2,))}
    assert bool(apply_gradients(optimizer, params, opt_state, jnp.float32(1.0), good)[3])


def test_nonfinite_state_is_never_saved_and_an_old_nan_checkpoint_is_skipped(tmp_path):
    import orbax.checkpoint as ocp

    from hibari.train.checkpoint import _meta
    run = build(tiny(), None, devices=ONE)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(run.state.replace(step=jnp.int32(1)), {})
    poisoned = run.state.replace(
        step=jnp.int32(2), params=jax.tree.map(lambda x: x * jnp.nan, run.state.params))
    with pytest.raises(NonFiniteState, match="step 2: .* NaN or inf"):
        ckpt.save(poisoned, {})
    ckpt.wait()
    assert ckpt.all_steps() == [1]
    # a NaN step written before this guard existed (straight through orbax): resume skips it
    ckpt.manager.save(2, args=ocp.args.Composite(
        params=ocp.args.StandardSave(poisoned.params),
        opt_state=ocp.args.StandardSave(poisoned.opt_state),
        meta=ocp.args.StandardSave(_meta(poisoned)), loader=ocp.args.JsonSave({})), force=True)
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "checkpoints")
    step, state, _ = ckpt.restore_latest(run.abstract_state, run.state_shardings)
    ckpt.close()
    assert step == 1 and int(state.step) == 1
    assert "NaN" in (tmp_path / "checkpoints" / "2.corrupt" / "CORRUPT.txt").read_text()
    assert _ckpt_steps(tmp_path) == [1]


def test_skip_policy_stops_when_steps_keep_failing(tmp_path):
    """nan_policy=skip skipping (almost) every step used to end with exit 0 and a count."""
    def nan_loss(params, batch, rng):
        leaf = jax.tree.leaves(params)[0]
        return jnp.sum(leaf) * jnp.nan, {}
    config = tiny(steps=20, nan_policy="skip", nan_max_skips=3)
    with pytest.raises(NonFiniteError, match="steps 1-3: 3 non-finite steps in a row"):
        train1(config, tmp_path, Task(loss_fn=nan_loss))


# --- findings 4 and 5: a flipped bit or a truncated newest checkpoint --------------------------

def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: int = 10) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_damaged_newest_checkpoints_fall_back_and_are_kept_aside(tmp_path):
    train1(tiny(steps=4, checkpoint_every=1, keep_checkpoints=4), tmp_path)
    _flip_a_bit(_data_file(tmp_path / "checkpoints" / "4"))  # restored silently before
    _truncate(_data_file(tmp_path / "checkpoints" / "3"))  # a raw traceback on every restart
    with open(tmp_path / "metrics.jsonl", "a") as f:  # and a line torn by a kill (finding 11)
        f.write('{"step": 5, "loss": 1.0')

    summary = train1(tiny(steps=6, checkpoint_every=1, keep_checkpoints=3), tmp_path)
    assert summary["start_step"] == 2 and summary["step"] == 6
    for bad in ("3.corrupt", "4.corrupt"):  # kept, with the reason
        assert (tmp_path / "checkpoints" / bad / "CORRUPT.txt").read_text().strip()
    # the rotation keeps the newest 3 and the verified step 2 the run resumed from
    assert _ckpt_steps(tmp_path) == [2, 4, 5, 6]
    # each step appears once in metrics.jsonl, the replayed 3 and 4 included (finding 11)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_eval_falls_back_a_bad_step_is_one_line_and_no_good_step_moves_nothing(tmp_path):
    """`hibari eval` on a run whose newest step is truncated (was a raw traceback)."""
    train1(tiny(steps=2, checkpoint_every=1), tmp_path)
    _, good = load_params(tmp_path / "checkpoints" / "1")
    _truncate(_data_file(tmp_path / "checkpoints" / "2"))
    _, params = load_params(tmp_path)  # falls back to step 1, with a warning
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(good)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointCorrupt) as e:
        load_params(tmp_path / "checkpoints" / "2")
    assert "checkpoints/2/params" in str(e.value) and "\n" not in str(e.value)

    _truncate(_data_file(tmp_path / "checkpoints" / "1"))
    with pytest.raises(CheckpointCorrupt, match="step 2: .*step 1: .*nothing was moved"):
        train1(tiny(steps=4, checkpoint_every=1), tmp_path)
    assert _ckpt_steps(tmp_path) == [1, 2]


def test_random_byte_corruptions_are_detected_or_harmless(tmp_path):
    """Property: any one damaged byte (flip, overwrite, truncation) of any file of a
    checkpoint either fails restore_latest with CheckpointCorrupt or restores the exact state."""
    config = tiny(steps=1, checkpoint_every=1, **{"optim.warmup_steps": 0})
    train1(config, tmp_path / "run")
    run = build(config, None, devices=ONE)
    reference = Checkpointer(tmp_path / "run" / "checkpoints").restore_latest(
        run.abstract_state, run.state_shardings)[1]
    files = sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*")
                   if p.is_file() and "checkpoints" in p.parts)
    rng = random.Random(0)
    outcomes = {"detected": 0, "harmless": 0}
    for trial in range(16):
        work = tmp_path / f"t{trial}"
        shutil.copytree(tmp_path / "run" / "checkpoints", work / "checkpoints")
        target = work / rng.choice(files)
        data = bytearray(target.read_bytes())
        kind = rng.choice(["flip", "byte", "truncate"])
        if not data or kind == "truncate":
            data = data[: rng.randrange(len(data) or 1)]
        else:
            i = rng.randrange(len(data))
            data[i] ^= (1 << rng.randrange(8)) if kind == "flip" else rng.randrange(1, 256)
        target.write_bytes(bytes(data))
        ckpt = Checkpointer(work / "checkpoints")
        try:
            restored = ckpt.restore_latest(run.abstract_state, run.state_shardings)
        except CheckpointCorrupt:
            outcomes["detected"] += 1
            continue
        finally:
            ckpt.close()
        assert restored is not None, f"{target} ({kind}): the step vanished"
        same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                            (restored[1].params, restored[1].opt_state),
                            (reference.params, reference.opt_state))
        assert all(jax.tree.leaves(same)), f"{target} ({kind}) restored different values silently"
        outcomes["harmless"] += 1
    assert outcomes["detected"] > 0, outcomes


# --- finding 9: bad values rejected before anything is written ---------------------------------

@pytest.mark.parametrize("field,value", [("data.batch_size", 0), ("data.seq_len", 0),
                                         ("nan_max_skips", 0)])
def test_bad_sizes_are_refused_before_the_workdir_exists(tmp_path, field, value):
    with pytest.raises(TrainConfigError, match=f"config.{field} must be a positive integer"):
        train1(tiny(**{field: value}), tmp_path / "w")
    assert not (tmp_path / "w").exists()


# --- finding 1: two runs on one workdir ---------------------------------------------------------

def _hibari(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "hibari", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} early: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


PRETRAIN = ["pretrain", "--config", "configs/pretrain/llama.py:tiny", "--config.steps=100000",
            "--config.log_every=1", "--config.checkpoint_every=0", "--config.eval_every=0"]


@pytest.mark.slow
def test_second_writer_is_refused_and_sigint_in_training_saves_and_exits_0(tmp_path):
    workdir = tmp_path / "run"
    first = _hibari(*PRETRAIN, "--workdir", str(workdir))
    try:
        metrics = workdir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, first)
        config_before = (workdir / "config.json").read_text()
        second = _hibari(*PRETRAIN, "--workdir", str(workdir), "--config.seed=7")
        _, err = second.communicate(timeout=180)
        assert second.returncode == 1, err
        assert f"in use by pid {first.pid}" in err and "Traceback" not in err
        assert (workdir / "config.json").read_text() == config_before
        first.send_signal(signal.SIGINT)  # finding 10, once training has started
        _, err = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0, err[-2000:]
    assert "received SIGINT" in err
    steps = _ckpt_steps(workdir)
    records = read_metrics(workdir / "metrics.jsonl")
    assert steps and steps[-1] == records[-1]["step"]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # not interleaved


@pytest.mark.slow
def test_sigint_before_training_exits_130_even_when_the_parent_ignores_it(tmp_path):
    """Finding 10: at start-up SIGINT segfaulted or, when the parent ignored SIGINT (`cmd &` in
    a script), was ignored and the run trained on. Sent once the run holds its workdir lock,
    while it builds a model large enough that building outlasts the signal's delivery."""
    workdir = tmp_path / "run"
    quoted = " ".join(f"'{a}'" for a in [sys.executable, "-m", "hibari", *PRETRAIN,
                                         "--config.model.d_model=512", "--config.model.n_layers=8",
                                         "--config.model.d_ff=2048", "--config.model.vocab_size=32000",
                                         "--workdir", str(workdir)])
    proc = subprocess.Popen(["sh", "-c", f"trap '' INT; exec {quoted}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (workdir / ".hibari.lock").exists(), proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if proc.returncode == 0:  # the build won the race: then it must have saved and stopped
        assert "received SIGINT" in err
    else:
        assert proc.returncode == 130, err[-2000:]
        assert err.rstrip().endswith("hibari pretrain: interrupted") and "Traceback" not in err


# --- the lock itself -----------------------------------------------------------------------------

def test_lock_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    with DirLock(tmp_path / "w", what="--workdir"):
        with pytest.raises(DirLocked, match=r"directory .* in use by pid \d+ on .* since"):
            DirLock(tmp_path / "w").acquire()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from hibari.base.runlock import DirLock; "
        f"DirLock({str(tmp_path / 'd')!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DirLocked, match=f"pid {holder.pid}"):
        DirLock(tmp_path / "d").acquire()
    holder.kill()
    holder.wait()
    with DirLock(tmp_path / "d"):  # the kernel released the dead holder's lock
        assert json.loads((tmp_path / "d" / ".hibari.lock").read_text())["pid"] == os.getpid()


def test_a_failed_build_releases_the_lock_and_keeps_the_workdir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": {"d_model": 1}}))
    with pytest.raises(TrainConfigError, match="different model config"):
        train1(tiny(steps=2), tmp_path)
    assert (tmp_path / "config.json").exists()
    DirLock(tmp_path).acquire().release()  # free again


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the __del__
def test_an_interrupt_swallowed_before_training_still_stops_the_loop():
    """A KeyboardInterrupt raised inside a finalizer is only printed; the SIGINT handler
    hibari.cli installs remembers it, and the loop's handler refuses to start training."""
    from hibari.base.signals import InterruptRecorder
    from hibari.train.loop import StopSignal
    recorder = InterruptRecorder()
    before = signal.signal(signal.SIGINT, recorder)
    try:
        class Finalized:
            def __del__(self):
                recorder(signal.SIGINT, None)  # raises inside __del__: printed, not propagated

        Finalized()
        assert recorder.received
        stopped = False
        try:  # (pytest.raises lets KeyboardInterrupt through)
            with StopSignal():
                raise AssertionError("the loop body must not run")
        except KeyboardInterrupt:
            stopped = True
        assert stopped
        assert signal.getsignal(signal.SIGINT) is recorder  # handlers restored
        recorder.received = False  # without a recorded interrupt the loop runs as before
        with StopSignal() as stop:
            pass
        assert stop.received is None
    finally:
        signal.signal(signal.SIGINT, before)
