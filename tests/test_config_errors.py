"""Config errors that help (issue 18, finding 9): an unknown `--config.FIELD` names the nearest
valid fields in one line; every numeric optimizer field is checked before anything is built."""
import math

import ml_collections
import pytest

from hibari.base.config_files import ConfigFileError
from hibari.base.errors import UserError
from hibari.configs.pretrain.llama import get_config
from hibari.train.cli import parse_run_flags
from hibari.train.optim import LR_MAX, OptimConfigError, make_optimizer

LLAMA = "configs/pretrain/llama.py:tiny"


# --- unknown --config.FIELD ---------------------------------------------------------------------

@pytest.mark.parametrize("override,nearest", [
    ("--config.no_such_field=1", None),
    ("--config.stepz=5", "steps"),
    ("--config.data.seqlen=3", "data.seq_len"),
    ("--config.optim.lrr=0.1", "optim.lr"),
    ("--config.warmup_steps=3", "optim.warmup_steps"),  # a nested field given at the top
    ("--config.model.nope.x=1", None),
    ("--config.steps.x=1", "steps"),  # below a leaf
    ("--noconfig.asyncc_checkpoint", "async_checkpoint"),
])
def test_unknown_override_is_one_line_with_the_nearest_fields(override, nearest):
    with pytest.raises(ConfigFileError) as e:
        parse_run_flags("pretrain", ["--config", LLAMA, "--workdir", "w", override], None)
    message = str(e.value)
    field = override.split("=")[0].replace("--noconfig.", "--config.")
    assert "\n" not in message, message
    assert message.startswith(f"{field}: no such field in {LLAMA}; nearest: "), message
    names = message.split("nearest: ")[1].split(", ")
    assert len(names) == 5
    known = set(get_config("tiny").keys()) | {"data.seq_len", "optim.lr", "optim.warmup_steps",
                                              "async_checkpoint", "steps"}
    assert all(n.split(".")[0] in known for n in names), names
    if nearest:
        assert names[0] == nearest, message


def test_unknown_override_of_a_default_config_file():
    """`hibari sft` without --config: its default file is loaded as the flag is defined."""
    with pytest.raises(ConfigFileError, match=r"^--config\.data\.tokenizr: no such field in "
                       r"configs/sft/instruct\.py; nearest: data\.tokenizer, "):
        parse_run_flags("sft", ["--workdir", "w", "--config.data.tokenizr=x"],
                        "configs/sft/instruct.py")


def test_valid_overrides_and_other_flag_errors_are_unchanged():
    fv = parse_run_flags("pretrain", ["--config", LLAMA, "--workdir", "w", "--config.steps=7",
                                      "--config.rules[0][0]=batch"], None)
    assert fv.config.steps == 7
    with pytest.raises(ConfigFileError, match="could not convert string to float"):
        parse_run_flags("pretrain", ["--config", LLAMA, "--workdir", "w",
                                     "--config.optim.lr=abc"], None)


def test_cli_prints_the_unknown_field_without_traceback(capsys):
    from hibari.cli import main
    assert main(["pretrain", "--config", LLAMA, "--workdir", "w", "--config.stepz=5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hibari pretrain: error: --config.stepz: no such field in "
                          f"{LLAMA}; nearest: steps, ") and "\n" not in err, err


# --- optimizer fields ---------------------------------------------------------------------------

def optim(**fields):
    """The tiny config's optimizer fields, any of them replaced (by a value of any type, as a
    config.json or a hand-made config could hold)."""
    return ml_collections.ConfigDict({**get_config("tiny").optim.to_dict(), **fields},
                                     type_safe=False)


def test_default_optimizer_builds():
    opt, schedule = make_optimizer(optim(), 50)
    assert math.isclose(float(schedule(50)), 3e-3 * 0.1, rel_tol=1e-5)
    make_optimizer(optim(clip_norm=0.0), 50)  # 0 = no clipping
    make_optimizer(optim(clip_norm=None), 50)
    make_optimizer(optim(warmup_steps=5.0, lr=LR_MAX, b1=0.0, weight_decay=0.0), 50)


@pytest.mark.parametrize("field,value,allowed", [
    ("lr", -1e-3, "in (0, 10]"),
    ("lr", 0.0, "in (0, 10]"),
    ("lr", 1e39, "in (0, 10]"),  # inf in float32: NaN weights
    ("lr", float("inf"), "must be a finite number in (0, 10]"),
    ("lr", float("nan"), "must be a finite number in (0, 10]"),
    ("lr", "3e-4", "must be a number in (0, 10]"),
    ("b1", 1.0, "in [0, 1)"),
    ("b1", -0.1, "in [0, 1)"),
    ("b2", 1.5, "in [0, 1)"),
    ("eps", 0.0, "finite and >= 1e-30"),  # made NaN updates
    ("eps", 1e-50, "finite and >= 1e-30"),  # 0 in float32
    ("eps", -1e-8, "finite and >= 1e-30"),
    ("eps", float("inf"), "finite number"),
    ("weight_decay", -0.1, "finite and >= 0"),
    ("weight_decay", float("nan"), "finite number"),
    ("clip_norm", -1.0, "finite and > 0, or 0 / None for no clipping"),
    ("clip_norm", float("inf"), "finite number"),
    ("warmup_steps", -1, "an integer in [0, steps=50]"),
    ("warmup_steps", 2.5, "an integer in [0, steps=50]"),
    ("warmup_steps", 51, "an integer in [0, steps=50]"),
    ("min_lr_ratio", 1.5, "in [0, 1]"),
    ("min_lr_ratio", -0.1, "in [0, 1]"),
    ("decay_fraction", 2.0, "in [0, 1]"),
    ("schedule", "linear", "choose from"),
    ("decay_embeddings", "yes", "True or False"),
])
def test_invalid_optimizer_field_is_refused_naming_it(field, value, allowed):
    with pytest.raises(OptimConfigError) as e:
        make_optimizer(optim(**{field: value}), 50)
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message
    assert message.startswith(f"config.optim.{field}={value!r}"), message
    assert allowed in message, message


def test_cli_refuses_an_overflowing_lr_before_writing(tmp_path, capsys):
    from hibari.cli import main
    workdir = tmp_path / "w"
    assert main(["pretrain", "--config", LLAMA, "--workdir", str(workdir),
                 "--config.optim.lr=1e39"]) == 1
    assert "config.optim.lr=1e+39 must be in (0, 10]" in capsys.readouterr().err
    assert not workdir.exists()
