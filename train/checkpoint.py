"""Checkpoints with orbax.

A training run keeps `workdir/checkpoints/<step>/` with five items:
  params     the model parameters (orbax StandardSave, sharded arrays)
  opt_state  the optimizer state (StandardSave)
  meta       {step, rng} and the task's `extra` state when it has one (StandardSave)
  loader     the data loader's position (JSON)
  integrity  per-array checksums of params, opt_state and meta (JSON; see
             hibari.model.params_io.tree_checksums), computed on device at save time
and the resolved config in `workdir/config.json` (the model config under "model").

Integrity: a step whose arrays are not all finite is never written. `restore_latest` verifies
the checksums and finiteness of what it reads; a step that fails verification or cannot be read
is moved aside to `checkpoints/<step>.corrupt` (kept for inspection, never deleted) and the next
older step is tried, with a warning naming the bad one. The rotation (keep the newest K) never
deletes the step the run was restored from, the last one verified by reading it back.

Parameters alone (`save_params`, `load_params`, reading any kind of checkpoint for evaluation)
live in hibari.model.params_io, where every room can reach them; they are re-exported here.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

from hibari.model.params_io import (  # noqa: F401
    PARAMS_CONFIG,
    CheckpointCorrupt,
    CheckpointError,
    abstract_tree,
    error_line,
    load_params,
    model_config_of_run,
    resolve_checkpoint,
    save_params,
    tree_checksums,
    verify_checksums,
)

ITEMS = ("params", "opt_state", "meta", "loader", "integrity")
CHECKED = ("params", "opt_state", "meta")  # the items with checksums
log = logging.getLogger(__name__)


class NonFiniteState(CheckpointError):
    """A state to be saved holds NaN or inf (the step's finite flag should have caught it)."""


@dataclasses.dataclass
class _KeepVerified:
    """Orbax preservation policy: keep the step the run was restored from (verified)."""
    owner: Any

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        return [c.step == self.owner.verified_step for c in checkpoints]


def _meta(state) -> dict:
    meta = {"step": state.step, "rng": state.rng}
    if state.extra is not None:
        meta["extra"] = state.extra
    return meta


class Checkpointer:
    """Async orbax saves every N steps, keep last K, restore onto any mesh, verified."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.verified_step: int | None = None
        policies = ocp.checkpoint_managers
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # a killed save's leftovers (the run dir is locked)
                preservation_policy=policies.AnyPreservationPolicy(
                    [policies.LatestN(n=keep), _KeepVerified(self)])),
            item_names=ITEMS,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state, loader_state: dict[str, Any]) -> None:
        """Save a TrainState (params, opt_state, step, rng), the loader position and per-array
        checksums; a step already saved is left as it is (e.g. a stop signal right after a
        periodic save). Raises NonFiniteState (writing nothing) if an array is not finite."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        items = {"params": state.params, "opt_state": state.opt_state, "meta": _meta(state)}
        integrity = {name: tree_checksums(tree) for name, tree in items.items()}
        bad = [f"{name}{path}" for name in CHECKED for path in integrity[name]["nonfinite"]]
        if bad:
            raise NonFiniteState(f"step {step}: {len(bad)} array(s) hold NaN or inf (e.g. "
                                 f"{bad[0]}); not saved, earlier checkpoints are intact")
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.StandardSave(items["meta"]),
            loader=ocp.args.JsonSave(loader_state),
            integrity=ocp.args.JsonSave(integrity),
        ), force=True)

    def restore(self, step: int, abstract_state, shardings) -> tuple[Any, dict[str, Any]]:
        """Restore step onto `shardings` (a TrainState of shardings; any mesh shape) and verify
        it: CheckpointCorrupt if an array differs from its saved checksum or is not finite
        (steps saved before checksums existed are only checked for finiteness)."""
        target = abstract_tree(abstract_state, shardings)
        has_integrity = (self.directory / str(step) / "integrity").is_dir()
        args = dict(params=ocp.args.StandardRestore(target.params),
                    opt_state=ocp.args.StandardRestore(target.opt_state),
                    meta=ocp.args.StandardRestore(_meta(target)),
                    loader=ocp.args.JsonRestore())
        if has_integrity:
            args["integrity"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        recorded = restored.integrity if has_integrity else {}
        for name in CHECKED:
            verify_checksums(getattr(restored, name), recorded.get(name) if has_integrity else None,
                             f"{self.directory / str(step) / name}")
        state = abstract_state.replace(
            params=restored.params, opt_state=restored.opt_state,
            step=restored.meta["step"], rng=restored.meta["rng"],
            extra=restored.meta.get("extra", abstract_state.extra))
        return state, dict(restored.loader or {})

    def restore_latest(self, abstract_state, shardings) -> tuple[int, Any, dict] | None:
        """(step, state, loader state) of the newest step that reads and verifies, or None when
        there is no checkpoint. Bad newer steps are moved to `<step>.corrupt` with a warning;
        if no step is good, nothing is moved and CheckpointCorrupt lists why each failed."""
        failures: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, loader_state = self.restore(step, abstract_state, shardings)
            except Exception as e:  # noqa: BLE001 -- a damaged step fails in many ways
                why = f"{type(e).__name__}: {error_line(e)}"
                failures.append((step, why))
                log.warning("checkpoint step %d of %s cannot be used (%s); trying the previous "
                            "step", step, self.directory, why)
                continue
            for bad, why in failures:
                self._quarantine(bad, why)
            self.verified_step = step
            return step, state, loader_state
        if failures:
            raise CheckpointCorrupt(
                f"{self.directory}: no checkpoint reads and verifies ("
                + "; ".join(f"step {s}: {why}" for s, why in failures)
                + "); nothing was moved or deleted: inspect them, or train in a new --workdir")
        return None

    def _quarantine(self, step: int, why: str) -> None:
        """Move a bad step aside as `<step>.corrupt[-N]` with the reason (never deleted)."""
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.directory / f"{step}.corrupt"
            n = 1
            while target.exists():
                n += 1
                target = self.directory / f"{step}.corrupt-{n}"
            os.replace(source, target)
            (target / "CORRUPT.txt").write_text(why + "\n")
            log.warning("moved the unusable checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"hibari-quarantine-{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
