"""hibari.base: positions from segment ids (numpy and jax against a brute-force loop), paths
resolved from the working directory then the installed package, and one user-error class that
every command reports without a traceback."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hibari.cli
from hibari.base.config_files import (
    ConfigFileError,
    load_python_config,
    resolve_config_path,
    resolve_path,
)
from hibari.base.errors import InputNotFound, UserError
from hibari.base.resources import resource_path
from hibari.base.segments import positions_from_segments


def brute_positions(segment_ids: np.ndarray) -> np.ndarray:
    out = np.zeros_like(segment_ids)
    for b, row in enumerate(segment_ids):
        count = 0
        for t, seg in enumerate(row):
            count = 0 if t == 0 or seg != row[t - 1] else count + 1
            out[b, t] = count if seg != 0 else 0
    return out


def test_positions_match_a_loop_in_numpy_and_under_jit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, size=(6, 12))
    rows = []
    for row_lengths in lengths:  # documents of random lengths, then padding (segment 0)
        ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(row_lengths)])[:40]
        rows.append(np.concatenate([ids, np.zeros(48 - len(ids), ids.dtype)]))
    segment_ids = np.stack(rows).astype(np.int32)
    expected = brute_positions(segment_ids)
    assert segment_ids.min() == 0 and expected.max() > 0
    np.testing.assert_array_equal(positions_from_segments(segment_ids), expected)
    in_jit = jax.jit(lambda s: positions_from_segments(s, jnp))(jnp.asarray(segment_ids))
    np.testing.assert_array_equal(np.asarray(in_jit), expected)


def test_paths_resolve_from_the_working_directory_then_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    installed = resolve_path("align/assets/seed_sft.jsonl")
    assert installed == str(resource_path("hibari.align", "assets", "seed_sft.jsonl"))
    (tmp_path / "align" / "assets").mkdir(parents=True)
    (tmp_path / "align" / "assets" / "seed_sft.jsonl").write_text("{}\n")
    assert resolve_path("align/assets/seed_sft.jsonl") == "align/assets/seed_sft.jsonl"  # cwd wins
    assert resolve_path("align/assets/none.jsonl") == "align/assets/none.jsonl"  # caller reports
    spec = resolve_config_path("configs/pretrain/llama.py:tiny")
    assert spec == str(resource_path("hibari.configs", "pretrain", "llama.py")) + ":tiny"
    assert load_python_config("configs/pretrain/llama.py:tiny").model.d_model == 64
    with pytest.raises(ConfigFileError, match="'configs/none.py' not found"):
        resolve_config_path("configs/none.py:x")


def test_every_training_config_extends_the_base_with_the_default_rules():
    from hibari.train.sharding import DEFAULT_RULES, normalize_rules
    for spec in ("configs/pretrain/llama.py:tiny", "configs/pretrain/llama.py:1b",
                 "configs/sft/instruct.py", "configs/dpo/pairs.py:kto", "configs/reward/pairs.py"):
        config = load_python_config(spec)
        assert normalize_rules(config.rules) == normalize_rules(DEFAULT_RULES), spec
        assert {"model", "mesh", "optim", "data", "steps", "seed", "checkpoint_every"} <= \
            set(config.keys()), spec


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--config", "configs/none.py", "--workdir", "w"], "'configs/none.py' not found"),
    (["pretrain", "--config", "configs/pretrain/llama.py:tiny"], "--workdir is required"),
    (["sft", "--config", "configs/none.py", "--workdir", "w"], "'configs/none.py' not found"),
    (["dpo", "--config", "configs/dpo/pairs.py:nope", "--workdir", "w"], "unknown loss 'nope'"),
    (["sweep", "--config", "configs/none.py", "--workdir", "w"], "'configs/none.py' not found"),
    (["quickstart", "--config", "configs/none.py"], "'configs/none.py' not found"),
    (["data", "prepare", "--config", "configs/none.py"], "'configs/none.py' not found"),
    (["data", "pack", "--source", "nonsense", "--tokenizer", "t", "--out", "o", "--seq-len", "8"],
     "write NAME=GLOB"),
    (["eval", "--checkpoint", "no_such_dir", "--tasks", "piqa_sample"], "does not exist"),
    (["generate", "--checkpoint", "no_such_dir", "--prompts", "none.txt"], "no such file"),
    (["convert", "--to-hf", "no_such_dir", "--out", "o"], "does not exist"),
    (["scaling", "fit", "none.csv", "--out", "o"], "none.csv"),
])
def test_every_command_reports_bad_input_once_without_a_traceback(argv, message, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert hibari.cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hibari {argv[0]}: error: ") and message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_errors_keep_their_old_bases():
    """Callers that caught ValueError / FileNotFoundError still do."""
    from hibari.align.data import AlignDataError
    from hibari.data.sources import BadInput
    from hibari.model import ConfigError
    from hibari.model.params_io import CheckpointError
    from hibari.train.loop import TrainConfigError
    assert issubclass(InputNotFound, FileNotFoundError) and issubclass(InputNotFound, UserError)
    for cls in (AlignDataError, BadInput, ConfigError, TrainConfigError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)
    assert issubclass(CheckpointError, UserError) and issubclass(CheckpointError, RuntimeError)


def test_the_training_loaders_keep_one_protocol():
    from hibari.align.data import RowLoader
    from hibari.data.loader import Loader
    from hibari.train.synthetic import SyntheticTokens
    rows = lambda epoch: {"tokens": np.arange(6)[:, None] + 1, "segment_ids": np.ones((6, 1), int)}
    for loader in (RowLoader(rows, batch_size=2, epochs=1),
                   SyntheticTokens(vocab_size=16, batch_size=2, seq_len=8, seed=0)):
        assert isinstance(loader, Loader)
        first = next(iter(loader))
        state = loader.get_state()
        second = next(iter(loader))
        loader.set_state(state)
        again = next(iter(loader))
        assert all(np.array_equal(second[k], again[k]) for k in second), type(loader).__name__
        assert not all(np.array_equal(first[k], second[k]) for k in first)
    assert not isinstance(object(), Loader)
