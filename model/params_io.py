"""Reading and writing model parameters, shared by every room that loads a model.

A parameters-only checkpoint (`save_params`, `hibari convert --out`) is a directory with
`model_config.json` and `params/`. `load_params` reads it, a training run directory (the newest
finished `checkpoints/<step>/params`, the model config from `config.json`; hibari.train writes
both), a single step directory, or a Hugging Face directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from hibari.base.errors import UserError
from hibari.model.config import ModelConfig
from hibari.model.transformer import param_shapes

PARAMS_CONFIG = "model_config.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the config."""


def abstract_tree(tree, shardings=None):
    """ShapeDtypeStructs (with target shardings, default device 0) for restoring `tree`."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def save_params(directory: str | os.PathLike, cfg: ModelConfig, params) -> Path:
    """Write `directory/model_config.json` and `directory/params/` (refuses to overwrite)."""
    directory = Path(directory).absolute()
    if (directory / "params").exists():
        raise CheckpointError(f"{directory}/params already exists; choose a new --out directory "
                              "or delete the old one")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params)
    (directory / PARAMS_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
    return directory


def model_config_of_run(run_dir: Path) -> ModelConfig:
    """The model config recorded in a training run's `config.json` (its "model" field)."""
    config_path = run_dir / "config.json"
    try:
        model = json.loads(config_path.read_text())["model"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read the model config ({e})") from e
    return ModelConfig.from_dict(model, where=str(config_path))


def resolve_checkpoint(path: str | os.PathLike) -> tuple[str, Path, ModelConfig | None]:
    """Classify `path` -> (kind, params_dir_or_hf_dir, cfg). kind in {params, step, hf}."""
    path = Path(path).absolute()
    if (path / PARAMS_CONFIG).is_file():
        cfg = ModelConfig.from_dict(json.loads((path / PARAMS_CONFIG).read_text()),
                                    where=str(path / PARAMS_CONFIG))
        return "params", path / "params", cfg
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        steps = finished_steps(path / "checkpoints")
        if not steps:
            raise CheckpointError(f"{path}/checkpoints holds no finished checkpoint")
        return "step", path / "checkpoints" / str(max(steps)) / "params", model_config_of_run(path)
    if (path / "params").is_dir() and path.parent.name == "checkpoints":
        return "step", path / "params", model_config_of_run(path.parent.parent)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors*")):
        return "hf", path, None
    raise CheckpointError(
        f"{path} is not a checkpoint: expected a run directory (config.json + checkpoints/), a "
        f"step directory (checkpoints/<step>/), a params export ({PARAMS_CONFIG} + params/) or a "
        "Hugging Face directory (config.json + *.safetensors)")


def load_params(path: str | os.PathLike, shardings=None) -> tuple[ModelConfig, Any]:
    """(cfg, params) from any checkpoint kind; placed on `shardings` (default: device 0)."""
    kind, where, cfg = resolve_checkpoint(path)
    if kind == "hf":
        from hibari.model.hf import import_hf
        cfg, params = import_hf(where)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        return cfg, params
    return cfg, restore_tree(where, param_shapes(cfg), shardings)


def finished_steps(checkpoints_dir: str | os.PathLike) -> list[int]:
    """The steps of a run's `checkpoints/` whose save finished (orbax's finalized steps)."""
    return sorted(ocp.utils.checkpoint_steps(checkpoints_dir))


def restore_run_params(run_dir: str | os.PathLike, shapes_of: Callable[[ModelConfig], Any],
                       step: int | None = None) -> tuple[ModelConfig, Any]:
    """(cfg, params) of a training run directory whose parameter tree is `shapes_of(cfg)`
    (e.g. a transformer plus a head), from its latest finished checkpoint by default."""
    run_dir = Path(run_dir).absolute()
    cfg = model_config_of_run(run_dir)
    steps = finished_steps(run_dir / "checkpoints")
    if not steps:
        raise CheckpointError(f"{run_dir}/checkpoints holds no finished checkpoint")
    step = max(steps) if step is None else step
    return cfg, restore_tree(run_dir / "checkpoints" / str(step) / "params", shapes_of(cfg))


def restore_tree(directory: str | os.PathLike, shapes, shardings=None):
    """The arrays saved in `directory` (orbax StandardSave) with the structure of `shapes`,
    placed on `shardings` (default: device 0)."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(Path(directory).absolute(), abstract_tree(shapes, shardings))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{directory}: parameters do not match the model config "
                              f"({type(e).__name__}: {e})") from e
