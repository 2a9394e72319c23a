"""`hibari pretrain` as users run it, in subprocesses: exact resume after kill -9, SIGTERM saves
and exits 0, and a 2-process jax.distributed run that agrees with one process."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hibari.train.checkpoint import Checkpointer
from hibari.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

COMMON = ["--config", "configs/pretrain/llama.py:tiny", "--config.model.vocab_size=128",
          "--config.data.seq_len=32", "--config.model.max_seq_len=32", "--config.eval_every=0",
          "--config.log_every=1"]


def hibari(args, devices=8, **kw):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen([sys.executable, "-m", "hibari", "pretrain", *COMMON, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(workdir):
    """Per-step losses; a step logged twice (before and after a restart) keeps the last."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl")}


def wait_for_step(workdir, step, proc, timeout=300):
    path = Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and max(losses(workdir), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.01)
    pytest.fail(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: 60 steps, checkpoint every 10."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    finish(hibari(["--workdir", str(workdir), "--config.steps=60",
                   "--config.checkpoint_every=10"]))
    return losses(workdir)


def test_kill_9_and_restart_reproduces_the_uninterrupted_losses(reference, tmp_path):
    args = ["--workdir", str(tmp_path), "--config.steps=60", "--config.checkpoint_every=10"]
    proc = hibari(args)
    wait_for_step(tmp_path, 25, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must really be killed mid-way"
    killed_at = max(losses(tmp_path))
    assert killed_at < 60
    finish(hibari(args))
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(1, 61))
    assert resumed == reference  # bitwise: same floats at every step


def test_sigterm_saves_exits_zero_and_resumes(reference, tmp_path):
    args = ["--workdir", str(tmp_path), "--config.steps=60", "--config.checkpoint_every=0"]
    proc = hibari(args)
    wait_for_step(tmp_path, 15, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert "SIGTERM" in out
    saved = Checkpointer(tmp_path / "checkpoints").all_steps()
    assert len(saved) == 1 and 15 <= saved[0] < 60
    assert saved[0] == max(losses(tmp_path))
    finish(hibari(args))
    assert losses(tmp_path) == reference


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distributed_run_agrees_with_one_process(tmp_path):
    steps = ["--config.steps=8", "--config.checkpoint_every=4"]
    single = tmp_path / "single"
    finish(hibari(["--workdir", str(single), *steps]))
    multi = tmp_path / "multi"
    port = _free_port()
    procs = [hibari(["--workdir", str(multi), *steps, f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={i}"], devices=4) for i in range(2)]
    for p in procs:
        finish(p)
    one, two = losses(single), losses(multi)
    assert sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-5)
    assert Checkpointer(multi / "checkpoints").all_steps() == [4, 8]


def test_pretrain_help_and_bad_flags():
    out = subprocess.run([sys.executable, "-m", "hibari", "pretrain", "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--workdir" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "hibari", "pretrain",
                          "--config", "configs/pretrain/llama.py:tiny", "--workdir", "/tmp/x",
                          "--config.nosuchfield=1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "nosuchfield" in (bad.stderr + bad.stdout)
