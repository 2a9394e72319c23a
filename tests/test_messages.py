"""What a newcomer sees: quiet logs by default, help without `(default: 'None')`, paths in run
directories that hold from any folder, "does not exist" for a missing path."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hibari.base.config_files import package_file
from hibari.cli import main
from hibari.train.cli import (
    absolute_path,
    make_paths_absolute,
    own_or_warning,
    parse_run_flags,
    verbose_requested,
)

REPO = Path(__file__).resolve().parent.parent
TPU_LINE = re.compile(r"\btpu\b|libtpu", re.I)  # not "output"
SEED_TOKENIZER = REPO / "align" / "assets" / "seed_sp.model"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "HIBARI_VERBOSE")}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # JAX probes every backend
    return {**env, **extra}


# ---------------------------------------------------------------------------------------------
# 1. Quiet by default
# ---------------------------------------------------------------------------------------------

def _record(name, level):
    return logging.LogRecord(name, level, __file__, 1, "m", None, None)


def test_own_info_lines_and_every_warning_pass_other_info_does_not():
    assert own_or_warning(_record("hibari.train.loop", logging.INFO))
    assert own_or_warning(_record("hibari", logging.INFO))
    assert own_or_warning(_record("jax._src.xla_bridge", logging.WARNING))
    assert not own_or_warning(_record("jax._src.xla_bridge", logging.INFO))
    assert not own_or_warning(_record("orbax.checkpoint", logging.INFO))
    assert not own_or_warning(_record("hibarix", logging.INFO))


def test_verbose_switch_reads_the_environment():
    assert not verbose_requested({}) and not verbose_requested({"HIBARI_VERBOSE": "0"})
    assert verbose_requested({"HIBARI_VERBOSE": "1"})


_PROBE = ("import sys; from hibari.train.cli import setup_logging; "
          "setup_logging(); import jax; jax.devices(); "
          "import logging; logging.getLogger('hibari.x').info('own line')")


def test_jax_backend_probing_shows_only_when_verbose():
    quiet = subprocess.run([sys.executable, "-c", _PROBE], env=_env(), capture_output=True,
                           text=True, timeout=120)
    loud = subprocess.run([sys.executable, "-c", _PROBE], env=_env(HIBARI_VERBOSE="1"),
                          capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "xla_bridge" in loud.stderr and "'tpu'" in loud.stderr  # the probe does log
    assert TPU_LINE.search(loud.stderr)
    assert not TPU_LINE.search(quiet.stderr) and "xla_bridge" not in quiet.stderr
    assert "hibari.x: own line" in quiet.stderr and "hibari.x: own line" in loud.stderr


@pytest.mark.slow
def test_a_cpu_pretrain_prints_no_tpu_line_and_says_its_tokens_are_synthetic(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hibari", "pretrain", "--config",
                        "configs/pretrain/llama.py:tiny", "--workdir", str(tmp_path / "tiny"),
                        "--config.steps=1", "--config.model.n_layers=1",
                        "--config.checkpoint_every=0"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not TPU_LINE.search(r.stderr), r.stderr
    notices = [line for line in r.stderr.splitlines() if "synthetic tokens" in line]
    assert len(notices) == 1 and "--config.data.kind=packed" in notices[0]


# ---------------------------------------------------------------------------------------------
# 2. Help
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prog,default", [("pretrain", None),
                                          ("sft", "configs/sft/instruct.py")])
def test_run_help_shows_no_none_default(prog, default, capsys):
    with pytest.raises(SystemExit) as e:
        parse_run_flags(prog, ["--help"], default_config=default)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config: config file" in out and "--workdir" in out
    assert "'None'" not in out


# ---------------------------------------------------------------------------------------------
# 3. Paths recorded in run directories
# ---------------------------------------------------------------------------------------------

def test_path_fields_become_absolute_at_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fv = parse_run_flags("sft", [
        "--config", "configs/sft/instruct.py:alpaca_en", "--workdir", "runs/sft",
        "--config.init_from=runs/quickstart/pretrain",
        "--config.data.tokenizer=runs/quickstart/data/tokenizer.model",
        "--config.data.eval_path=../held.jsonl"], default_config="configs/sft/instruct.py")
    c = fv.config
    assert c.init_from == str(tmp_path / "runs" / "quickstart" / "pretrain")
    assert c.data.tokenizer == str(tmp_path / "runs" / "quickstart" / "data" / "tokenizer.model")
    assert c.data.eval_path == str(tmp_path.parent / "held.jsonl")
    # the vendored default is not under tmp_path: kept as the repository path the package finds
    assert c.data.train_path == "align/assets/seed_sft.jsonl"
    assert package_file(c.data.train_path).is_file()


def test_absolute_path_rules(tmp_path):
    (tmp_path / "align" / "assets").mkdir(parents=True)
    (tmp_path / "align" / "assets" / "seed_sp.model").write_bytes(b"")
    assert absolute_path("", tmp_path) == ""
    assert absolute_path("gs://bucket/x", tmp_path) == "gs://bucket/x"
    assert absolute_path("/abs/x", tmp_path) == "/abs/x"
    assert absolute_path("a/../b", tmp_path) == str(tmp_path / "b")
    # a vendored path that exists under the working directory is that file
    assert absolute_path("align/assets/seed_sp.model", tmp_path) == \
        str(tmp_path / "align" / "assets" / "seed_sp.model")
    assert absolute_path("align/assets/seed_sp.model", tmp_path / "align") == \
        "align/assets/seed_sp.model"


def test_make_paths_absolute_handles_lists_and_reports_changes(tmp_path):
    import ml_collections
    c = ml_collections.ConfigDict(dict(data=dict(train_path=["a.jsonl", "/b.jsonl"],
                                                 tokenizer="", kind="packed"),
                                       init_from="runs/x", steps=3))
    assert make_paths_absolute(c, tmp_path) == ["data.train_path", "init_from"]
    assert list(c.data.train_path) == [str(tmp_path / "a.jsonl"), "/b.jsonl"]
    assert c.init_from == str(tmp_path / "runs" / "x") and c.data.kind == "packed"


def _old_run(start: Path) -> Path:
    """A run recorded before paths were absolute: started in `start` with
    --config.data.tokenizer=runs/q/data/tok.model --workdir runs/q/sft."""
    (start / "runs" / "q" / "data").mkdir(parents=True)
    shutil.copy(SEED_TOKENIZER, start / "runs" / "q" / "data" / "tok.model")
    run = start / "runs" / "q" / "sft"
    (run / "checkpoints" / "7").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"tokenizer": "runs/q/data/tok.model"}}))
    return run


def test_an_old_runs_tokenizer_is_found_from_another_folder(tmp_path, monkeypatch):
    from hibari.evaluation.tokenizer import tokenizer_for_checkpoint
    run = _old_run(tmp_path / "start")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    want = str(tmp_path / "start" / "runs" / "q" / "data" / "tok.model")
    assert tokenizer_for_checkpoint("../start/runs/q/sft").name == want
    assert tokenizer_for_checkpoint(run / "checkpoints" / "7").name == want
    monkeypatch.chdir(tmp_path / "start")  # where it was started: the same file
    assert Path(tokenizer_for_checkpoint("runs/q/sft").name).resolve() == Path(want).resolve()


def test_a_recorded_tokenizer_that_exists_nowhere_is_named(tmp_path, monkeypatch):
    from hibari.evaluation.tokenizer import TokenizerError, tokenizer_for_checkpoint
    run = _old_run(tmp_path / "start")
    os.remove(tmp_path / "start" / "runs" / "q" / "data" / "tok.model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TokenizerError) as e:
        tokenizer_for_checkpoint(run)
    message = str(e.value)
    assert "data.tokenizer='runs/q/data/tok.model'" in message and "does not exist" in message
    assert "--tokenizer" in message and "\n" not in message


def test_a_relative_tokenizer_record_is_found_beside_the_run(tmp_path, monkeypatch):
    from hibari.data.tokenizer import TOKENIZER_RECORD, recorded_tokenizer
    run = _old_run(tmp_path / "start")
    (run / TOKENIZER_RECORD).write_text(json.dumps({"sha256": "0" * 64,
                                                    "path": "runs/q/data/tok.model"}))
    monkeypatch.chdir(tmp_path)
    record = recorded_tokenizer(run / "checkpoints" / "7")
    assert record["path"] == str(tmp_path / "start" / "runs" / "q" / "data" / "tok.model")


# ---------------------------------------------------------------------------------------------
# 4. A missing path says "does not exist"
# ---------------------------------------------------------------------------------------------

def test_a_missing_checkpoint_does_not_exist(tmp_path, monkeypatch):
    from hibari.base.errors import InputNotFound
    from hibari.model.params_io import CheckpointError, resolve_checkpoint
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputNotFound) as e:
        resolve_checkpoint("runs/sft")
    assert isinstance(e.value, CheckpointError)
    assert str(e.value).startswith("checkpoint runs/sft does not exist")
    assert str(tmp_path) in str(e.value)
    (tmp_path / "empty").mkdir()  # an existing folder that is no checkpoint: the old message
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        resolve_checkpoint("empty")


@pytest.mark.parametrize("argv", [
    ["generate", "--checkpoint", "runs/sft", "--prompts", "p.txt"],
    ["eval", "--checkpoint", "runs/sft", "--tasks", "piqa_sample", "--limit", "1"],
])
def test_commands_say_a_missing_checkpoint_does_not_exist(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("Hello\n")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "checkpoint runs/sft does not exist" in err and "Traceback" not in err
