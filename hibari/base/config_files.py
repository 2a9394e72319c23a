"""Python config files (`path.py[:arg]` -> `get_config(arg)`) and nested overrides on them.

Every command that reads a config file finds it here: `resolve_config_path` looks relative to
the working directory first, then inside the installed package (`configs/pretrain/llama.py` is
`hibari.configs`' `pretrain/llama.py`), so the documented commands work from any folder after
`pip install .`."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ml_collections

from hibari.base.errors import UserError
from hibari.base.resources import resource_path

# Top-level folders of the repository, installed as hibari.<name>: a path that starts with one
# of them and is not found relative to the working directory is looked up in the package.
ROOMS = ("model", "data", "train", "align", "evaluation", "configs")


class ConfigFileError(UserError, ValueError):
    """A config file or an override of one is invalid; the message names the field."""


def package_file(path: str | os.PathLike) -> Path | None:
    """The installed file a repository path names (`align/assets/x` -> hibari.align's
    `assets/x`), whether or not it exists; None when `path` does not start with a room."""
    room, _, rest = Path(path).as_posix().partition("/")
    return resource_path(f"hibari.{room}", *rest.split("/")) if room in ROOMS and rest else None


def resolve_path(path: str | os.PathLike) -> str:
    """`path` as given when it exists (relative to the working directory or absolute), else the
    file of the installed package it names (`package_file`); unchanged when neither exists
    (the caller reports the missing file)."""
    path = str(path)
    if not path or Path(path).exists() or os.path.isabs(path):
        return path
    candidate = package_file(path)
    return str(candidate) if candidate is not None and candidate.exists() else path


def resolve_config_path(spec: str) -> str:
    """`path.py[:arg]` relative to the cwd, else to the installed `hibari.configs` package."""
    path, sep, arg = spec.partition(":")
    resolved = resolve_path(path)
    if not Path(resolved).exists():
        raise ConfigFileError(f"config file {path!r} not found (relative to {os.getcwd()} or "
                              "the installed hibari.configs package)")
    return resolved + sep + arg


def load_python_config(spec: str, where: str = "config", error: type = ConfigFileError
                       ) -> ml_collections.ConfigDict:
    """`path.py[:arg]` -> `get_config(arg)` (path relative to the cwd or the installed package);
    `where` names the field that gave `spec` in error messages."""
    try:
        path, _, arg = resolve_config_path(spec).partition(":")
    except ConfigFileError as e:
        raise error(f"{where}={spec!r}: {e}") from None
    if not path.endswith(".py"):
        raise error(f"{where}={spec!r}: not a Python file")
    module_spec = importlib.util.spec_from_file_location(f"_hibari_cfg_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise error(f"{path}: no get_config(arg) function")
    return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides, where: str,
                    error: type = ConfigFileError) -> None:
    """Set nested `overrides` ({"model": {"norm": ...}}) on `config`; every key must exist.
    `where` names the overrides in error messages (e.g. "sweep config field overrides")."""
    items = overrides.items() if overrides is not None else ()
    for key, value in items:
        if key not in config:
            raise error(f"{where}.{key}: the base config has no field "
                        f"{key!r} here (fields: {sorted(config.keys())})")
        if isinstance(value, (dict, ml_collections.ConfigDict)) and \
                isinstance(config[key], ml_collections.ConfigDict):
            apply_overrides(config[key], value, f"{where}.{key}", error)
            continue
        try:
            config[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
        except TypeError as e:
            raise error(f"{where}.{key}={value!r}: {e}") from None


def resolve_config_flag(argv: list[str]) -> list[str]:
    """argv with the file of `--config FILE[:arg]` / `--config=FILE[:arg]` resolved
    (`resolve_config_path`), for ml_collections' config flags."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            a = "--config=" + resolve_config_path(a.split("=", 1)[1])
        elif i > 0 and argv[i - 1] == "--config":
            a = resolve_config_path(a)
        out.append(a)
    return out
