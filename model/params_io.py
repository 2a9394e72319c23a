"""Reading and writing model parameters, shared by every room that loads a model.

A parameters-only checkpoint (`save_params`, `hibari convert --out`) is a directory with
`model_config.json` and `params/`. `load_params` reads it, a training run directory (the newest
finished `checkpoints/<step>/params`, the model config from `config.json`; hibari.train writes
both), a single step directory, or a Hugging Face directory. A run trained with config.lora
(its `lora.json`) reads as its base with the adapters merged in. LoRA adapter exports
(`save_adapters` / `load_adapters`: lora_config.json + base_model_config.json + adapters/) live
here too; the adapter math is hibari.model.lora.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hibari.base.errors import InputNotFound, UserError
from hibari.model.config import ModelConfig
from hibari.model.lora import (
    LoraConfig,
    apply_lora,
    lora_config_from_dict,
    lora_params,
    relayout,
    replace_subtree,
    subtree,
)
from hibari.model.transformer import param_shapes

PARAMS_CONFIG = "model_config.json"
CHECKSUMS = "checksums.json"  # a params export's per-array checksums ({"params": ...})
log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the config."""


class CheckpointNotFound(CheckpointError, InputNotFound):
    """The checkpoint path given does not exist."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint's arrays differ from the checksums recorded when it was saved, hold
    non-finite values, or cannot be read."""


# ---------------------------------------------------------------------------------------------
# Per-array checksums
# ---------------------------------------------------------------------------------------------

INTEGRITY_VERSION = 1
_MULT = np.uint32(2654435761)  # Knuth's multiplicative hash constant


def _array_digest(x):
    """[sum of words, sum of words x position hash] mod 2^32 over x's raw bits, and 1 if x is
    all finite (one uint32[3]). A changed word always changes the first sum; two changed words cancelling
    in both is a 2^-32 coincidence. Elementwise + reductions: runs sharded, no gather."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        words = (x if x.dtype == unsigned else jax.lax.bitcast_convert_type(x, unsigned))
        words = words.astype(jnp.uint32)
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * np.uint32(stride)
        stride = stride * x.shape[axis] % 2 ** 32
    finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
              else jnp.bool_(True))
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                      jnp.sum(words * (index * _MULT + np.uint32(1)), dtype=jnp.uint32),
                      finite.astype(jnp.uint32)])


_tree_digest = jax.jit(lambda tree: jax.tree.map(_array_digest, tree))


def tree_checksums(tree) -> dict[str, Any]:
    """{"version", "arrays": {path: [sum, weighted sum]}, "nonfinite": [paths]} of a pytree of
    arrays (sharded or not; computed on device, a few bytes per array come back)."""
    digests = jax.device_get(_tree_digest(tree))
    arrays, nonfinite = {}, []
    for path, (total, weighted, finite) in jax.tree_util.tree_flatten_with_path(digests)[0]:
        name = jax.tree_util.keystr(path)
        arrays[name] = [int(total), int(weighted)]
        if not finite:
            nonfinite.append(name)
    return {"version": INTEGRITY_VERSION, "arrays": arrays, "nonfinite": nonfinite}


def verify_checksums(tree, recorded: dict | None, where: str) -> None:
    """Raise CheckpointCorrupt unless `tree`'s arrays match `recorded` (tree_checksums at save
    time; None: saved before checksums existed, only finiteness is checked) and are finite."""
    now = tree_checksums(tree)
    problems = []
    if recorded is not None:
        old = recorded.get("arrays", {})
        differ = [k for k in now["arrays"] if old.get(k) != now["arrays"][k]]
        missing = sorted(set(old) - set(now["arrays"]))
        if differ:
            problems.append(f"{len(differ)} array(s) differ from their saved checksums "
                            f"(e.g. {differ[0]})")
        if missing:
            problems.append(f"{len(missing)} saved array(s) not restored (e.g. {missing[0]})")
    if now["nonfinite"]:
        problems.append(f"{len(now['nonfinite'])} array(s) hold NaN or inf "
                        f"(e.g. {now['nonfinite'][0]})")
    if problems:
        raise CheckpointCorrupt(f"{where}: {'; '.join(problems)}")


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
    (directory / CHECKSUMS).write_text(json.dumps({"params": tree_checksums(params)}))
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
    """Classify `path` -> (kind, params_dir_or_hf_dir, cfg). kind in {params, step, hf}.
    A missing path raises CheckpointNotFound ("... does not exist"), naming the working
    directory a relative path was read from."""
    given = Path(path)
    path = given.absolute()
    if not path.exists():
        where = "" if given.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise CheckpointNotFound(
            f"checkpoint {given} does not exist{where}: pass a run directory, a step directory "
            "(checkpoints/<step>/), a params export or a Hugging Face directory")
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
    """(cfg, params) from any checkpoint kind; placed on `shardings` (default: device 0).
    Saved checksums are verified; a run directory whose newest step fails verification or
    reading falls back to its newest good step, with a warning naming the bad one."""
    kind, where, cfg = resolve_checkpoint(path)
    if kind == "hf":
        from hibari.model.hf import import_hf
        cfg, params = import_hf(where)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        return cfg, params
    run_dir = Path(path).absolute()
    if kind == "step":
        lora = read_lora_record(where.parent.parent.parent)
        if lora is not None:  # a LoRA run: its adapters folded into its base
            shapes = trainable_shapes(param_shapes(cfg), *lora)
            tree = (restore_newest_good(run_dir, shapes) if where.parent.parent ==
                    run_dir / "checkpoints" else restore_verified(where, shapes))
            params = merge_run(tree, *lora)
            return cfg, params if shardings is None else jax.device_put(params, shardings)
    if kind == "step" and where.parent.parent == run_dir / "checkpoints":
        return cfg, restore_newest_good(run_dir, param_shapes(cfg), shardings)
    return cfg, restore_verified(where, param_shapes(cfg), shardings)


def finished_steps(checkpoints_dir: str | os.PathLike) -> list[int]:
    """The steps of a run's `checkpoints/` whose save finished (orbax's finalized steps)."""
    return sorted(ocp.utils.checkpoint_steps(checkpoints_dir))


def restore_run_params(run_dir: str | os.PathLike, shapes_of: Callable[[ModelConfig], Any],
                       step: int | None = None) -> tuple[ModelConfig, Any]:
    """(cfg, params) of a training run directory whose parameter tree is `shapes_of(cfg)`
    (e.g. a transformer plus a head): the given step, or the newest one that verifies."""
    run_dir = Path(run_dir).absolute()
    cfg = model_config_of_run(run_dir)
    shapes, lora = shapes_of(cfg), read_lora_record(run_dir)
    if lora is not None:  # a LoRA run: checkpoints hold adapters in place of each transformer
        shapes = trainable_shapes(shapes, *lora)
    if step is not None:
        tree = restore_verified(run_dir / "checkpoints" / str(step) / "params", shapes)
    else:
        tree = restore_newest_good(run_dir, shapes)
    if lora is not None:
        tree = merge_run(tree, *lora)
    return cfg, tree


def saved_checksums(params_dir: str | os.PathLike) -> dict | None:
    """The checksums recorded for a `params/` directory when it was saved: a training step's
    `integrity` item or a params export's checksums.json (None: saved without them)."""
    params_dir = Path(params_dir)
    for path, key in ((params_dir.parent / "integrity" / "metadata", "params"),
                      (params_dir.parent / CHECKSUMS, "params")):
        if path.is_file():
            try:
                return json.loads(path.read_text())[key]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointCorrupt(f"{path}: unreadable checksum record ({e})") from e
    return None


def restore_verified(params_dir: str | os.PathLike, shapes, shardings=None):
    """restore_tree + verify_checksums against the record saved with it."""
    recorded = saved_checksums(params_dir)
    tree = restore_tree(params_dir, shapes, shardings)
    verify_checksums(tree, recorded, str(params_dir))
    return tree


def restore_newest_good(run_dir: str | os.PathLike, shapes, shardings=None):
    """The params of a run's newest step that reads and verifies; older steps are tried in
    turn (each failure is logged as a warning naming the step and why)."""
    run_dir = Path(run_dir)
    steps = finished_steps(run_dir / "checkpoints")
    if not steps:
        raise CheckpointError(f"{run_dir}/checkpoints holds no finished checkpoint")
    failures = []
    for step in reversed(steps):
        params_dir = run_dir / "checkpoints" / str(step) / "params"
        try:
            tree = restore_verified(params_dir, shapes, shardings)
        except CheckpointCorrupt as e:
            failures.append(str(e))
            log.warning("checkpoint step %d is unusable, trying the previous step: %s", step, e)
            continue
        if failures:
            log.warning("using step %d of %s: the newer step(s) failed verification", step, run_dir)
        return tree
    raise CheckpointCorrupt(f"{run_dir}: no checkpoint step reads and verifies: "
                            + " | ".join(failures))


def restore_tree(directory: str | os.PathLike, shapes, shardings=None):
    """The arrays saved in `directory` (orbax StandardSave) with the structure of `shapes`,
    placed on `shardings` (default: device 0)."""
    directory = Path(directory).absolute()
    target = abstract_tree(shapes, shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(directory, target)
    except (ValueError, KeyError) as e:
        if any(w in str(e).lower() for w in ("shape", "dtype", "tree structure")):
            raise CheckpointError(f"{directory}: parameters do not match the model config "
                                  f"({type(e).__name__}: {e})") from e
        raise CheckpointCorrupt(f"{directory}: cannot read the saved arrays "
                                f"({type(e).__name__}: {error_line(e)})") from e
    except Exception as e:  # tensorstore/zarr decode errors of damaged files have many types
        raise CheckpointCorrupt(f"{directory}: cannot read the saved arrays "
                                f"({type(e).__name__}: {error_line(e)})") from e


def error_line(error: BaseException, limit: int = 300) -> str:
    """An exception's text on one line (tensorstore appends pages of spec)."""
    text = " ".join(str(error).split())
    return text.split(" See full TensorStore details")[0][:limit]


LORA_CONFIG = "lora_config.json"  # files of a hibari adapter export (`save_adapters`)
BASE_CONFIG = "base_model_config.json"
ADAPTERS = "adapters"


# ---------------------------------------------------------------------------------------------
# A hibari adapter export: lora_config.json + base_model_config.json + adapters/ (orbax)
# ---------------------------------------------------------------------------------------------

def save_adapters(directory: str | os.PathLike, cfg: ModelConfig, lora_cfg: LoraConfig,
                  adapters) -> Path:
    """Write `directory/{lora_config.json, base_model_config.json, adapters/, checksums.json}`
    (refuses to overwrite). The base model's config is recorded to check shapes on load."""
    directory = Path(directory).absolute()
    if (directory / ADAPTERS).exists():
        raise CheckpointError(f"{directory}/{ADAPTERS} already exists; choose a new --out "
                              "directory or delete the old one")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / ADAPTERS, adapters)
    (directory / CHECKSUMS).write_text(json.dumps({"params": tree_checksums(adapters)}))
    (directory / LORA_CONFIG).write_text(json.dumps(lora_cfg.to_dict(), indent=2) + "\n")
    (directory / BASE_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return directory


def load_adapters(directory: str | os.PathLike, cfg: ModelConfig, shardings=None):
    """(lora_cfg, adapters) of a `save_adapters` directory, for the base model `cfg` (the
    recorded base config must agree on shapes; scanned/unscanned may differ)."""
    directory = Path(directory).absolute()
    if not (directory / LORA_CONFIG).is_file():
        raise InputNotFound(f"{directory}: no {LORA_CONFIG}; pass a directory written by "
                            "save_adapters / `hibari lora import`")
    try:
        lora_cfg = lora_config_from_dict(json.loads((directory / LORA_CONFIG).read_text()),
                                         where=str(directory / LORA_CONFIG))
        base = ModelConfig.from_dict(json.loads((directory / BASE_CONFIG).read_text()),
                                     where=str(directory / BASE_CONFIG))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}: cannot read the adapter configs ({e})") from e
    shape_fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "d_ff", "mlp")
    differ = [f for f in shape_fields if getattr(base, f) != getattr(cfg, f)]
    if differ:
        raise CheckpointError(
            f"{directory / BASE_CONFIG}: the adapters were made for a different model ("
            + ", ".join(f"{f}={getattr(base, f)} vs {getattr(cfg, f)}" for f in differ)
            + "); pass the base checkpoint they were trained on")
    shapes = jax.eval_shape(lambda k: lora_params(base, lora_cfg, k), jax.random.key(0))
    adapters = relayout(restore_verified(directory / ADAPTERS, shapes), base, cfg)
    if shardings is not None:
        adapters = jax.device_put(adapters, shardings)
    return lora_cfg, adapters


# ---------------------------------------------------------------------------------------------
# A training run with config.lora: its checkpoints hold the trainable tree (adapters in place of
# each adapted Transformer); lora.json names the frozen base of each
# ---------------------------------------------------------------------------------------------

LORA_RUN = "lora.json"


def write_lora_record(run_dir: str | os.PathLike, lora_cfg: LoraConfig,
                      bases: dict[str, tuple[str, ModelConfig]]) -> None:
    """Record in `run_dir/lora.json` which subtrees of the run's parameters are adapters, the
    LoRA config, and each one's base checkpoint and model config (`bases`: path -> (checkpoint,
    cfg)), so `load_params` / `restore_run_params` can rebuild the merged model."""
    from hibari.base.files import write_atomic
    record = {"lora": lora_cfg.to_dict(),
              "bases": {path: {"checkpoint": str(Path(ckpt).absolute()), "model": cfg.to_dict()}
                        for path, (ckpt, cfg) in bases.items()}}
    write_atomic(Path(run_dir) / LORA_RUN, json.dumps(record, indent=2) + "\n")


def read_lora_record(run_dir: str | os.PathLike
                     ) -> tuple[LoraConfig, dict[str, tuple[str, ModelConfig]]] | None:
    """(lora_cfg, {path: (base checkpoint, base cfg)}) of a LoRA training run; None for others."""
    path = Path(run_dir) / LORA_RUN
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        lora_cfg = lora_config_from_dict(record["lora"], where=str(path))
        bases = {p: (b["checkpoint"], ModelConfig.from_dict(b["model"], where=str(path)))
                 for p, b in record["bases"].items()}
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the LoRA record ({type(e).__name__}: {e})"
                              ) from e
    return lora_cfg, bases


def trainable_shapes(shapes, lora_cfg: LoraConfig, bases: dict[str, tuple[str, ModelConfig]]):
    """The checkpointed tree of a LoRA run whose full parameter tree is `shapes`."""
    for path, (_, cfg) in bases.items():
        adapters = jax.eval_shape(lambda k, c=cfg: lora_params(c, lora_cfg, k),
                                  jax.random.key(0))
        shapes = replace_subtree(shapes, path, adapters)
    return shapes


def merge_run(trainable, lora_cfg: LoraConfig, bases: dict[str, tuple[str, ModelConfig]]):
    """The full, merged parameter tree of a LoRA run's checkpointed `trainable` tree: each
    base read back (`load_params`, LoRA runs included) and its adapters folded in."""
    for path, (checkpoint, cfg) in bases.items():
        base_cfg, base = load_params(checkpoint)
        if param_shapes(base_cfg) != param_shapes(cfg):
            raise CheckpointError(f"{checkpoint}: the LoRA run's base no longer matches the "
                                  "model it was trained on (another model was saved there?)")
        adapters = jax.device_put(subtree(trainable, path), jax.devices()[0])
        trainable = replace_subtree(trainable, path, apply_lora(base, adapters, lora_cfg))
    return trainable
