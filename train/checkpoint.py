"""Checkpoints with orbax.

A training run keeps `workdir/checkpoints/<step>/` with four items:
  params     the model parameters (orbax StandardSave, sharded arrays)
  opt_state  the optimizer state (StandardSave)
  meta       {step, rng} (StandardSave)
  loader     the data loader's position (JSON)
and the resolved config in `workdir/config.json` (the model config under "model").

A parameters-only checkpoint (`save_params`, `hibari convert --out`) is a directory with
`model_config.json` and `params/`. `load_params` reads either kind, a single step directory, or a
Hugging Face directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from model import ModelConfig, param_shapes

ITEMS = ("params", "opt_state", "meta", "loader")
PARAMS_CONFIG = "model_config.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the config."""


def _abstract(tree, shardings=None):
    """ShapeDtypeStructs (with target shardings) for restoring `tree`'s structure."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


class Checkpointer:
    """Async orbax saves every N steps, keep last K, restore onto any mesh."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
            item_names=ITEMS,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state, loader_state: dict[str, Any]) -> None:
        """Save a TrainState (params, opt_state, step, rng) and the loader position; a step
        already saved is left as it is (e.g. a stop signal right after a periodic save)."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            loader=ocp.args.JsonSave(loader_state),
        ), force=True)

    def restore(self, step: int, abstract_state, shardings) -> tuple[Any, dict[str, Any]]:
        """Restore step onto `shardings` (a TrainState of shardings; any mesh shape)."""
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_state, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params),
            opt_state=ocp.args.StandardRestore(target.opt_state),
            meta=ocp.args.StandardRestore({"step": target.step, "rng": target.rng}),
            loader=ocp.args.JsonRestore(),
        ))
        state = abstract_state.replace(
            params=restored.params, opt_state=restored.opt_state,
            step=restored.meta["step"], rng=restored.meta["rng"])
        return state, dict(restored.loader or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------------
# Parameters only: export, import, and reading any kind of checkpoint for evaluation
# ---------------------------------------------------------------------------------------------

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


def _model_config_of_run(run_dir: Path) -> ModelConfig:
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
        steps = Checkpointer(path / "checkpoints").all_steps()
        if not steps:
            raise CheckpointError(f"{path}/checkpoints holds no finished checkpoint")
        return "step", path / "checkpoints" / str(max(steps)) / "params", _model_config_of_run(path)
    if (path / "params").is_dir() and path.parent.name == "checkpoints":
        return "step", path / "params", _model_config_of_run(path.parent.parent)
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
        from model.hf import import_hf
        cfg, params = import_hf(where)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        return cfg, params
    target = _abstract(param_shapes(cfg), shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(where, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{where}: parameters do not match the model config "
                              f"({type(e).__name__}: {e})") from e
    return cfg, params

