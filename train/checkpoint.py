"""Checkpoints with orbax.

A training run keeps `workdir/checkpoints/<step>/` with four items:
  params     the model parameters (orbax StandardSave, sharded arrays)
  opt_state  the optimizer state (StandardSave)
  meta       {step, rng} and the task's `extra` state when it has one (StandardSave)
  loader     the data loader's position (JSON)
and the resolved config in `workdir/config.json` (the model config under "model").

Parameters alone (`save_params`, `load_params`, reading any kind of checkpoint for evaluation)
live in hibari.model.params_io, where every room can reach them; they are re-exported here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from hibari.model.params_io import (  # noqa: F401
    PARAMS_CONFIG,
    CheckpointError,
    abstract_tree,
    load_params,
    model_config_of_run,
    resolve_checkpoint,
    save_params,
)

ITEMS = ("params", "opt_state", "meta", "loader")


def _meta(state) -> dict:
    meta = {"step": state.step, "rng": state.rng}
    if state.extra is not None:
        meta["extra"] = state.extra
    return meta


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
            meta=ocp.args.StandardSave(_meta(state)),
            loader=ocp.args.JsonSave(loader_state),
        ), force=True)

    def restore(self, step: int, abstract_state, shardings) -> tuple[Any, dict[str, Any]]:
        """Restore step onto `shardings` (a TrainState of shardings; any mesh shape)."""
        target = abstract_tree(abstract_state, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params),
            opt_state=ocp.args.StandardRestore(target.opt_state),
            meta=ocp.args.StandardRestore(_meta(target)),
            loader=ocp.args.JsonRestore(),
        ))
        state = abstract_state.replace(
            params=restored.params, opt_state=restored.opt_state,
            step=restored.meta["step"], rng=restored.meta["rng"],
            extra=restored.meta.get("extra", abstract_state.extra))
        return state, dict(restored.loader or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
