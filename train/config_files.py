"""Python config files (`path.py[:arg]` -> `get_config(arg)`) and nested overrides on them,
shared by the commands that build runs from other configs (`hibari sweep`, `hibari quickstart`)."""
from __future__ import annotations

import importlib.util

import ml_collections


class ConfigFileError(ValueError):
    """A config file or an override of one is invalid; the message names the field."""


def load_python_config(spec: str, where: str = "config", error: type = ConfigFileError
                       ) -> ml_collections.ConfigDict:
    """`path.py[:arg]` -> `get_config(arg)` (path relative to the cwd or the installed repo);
    `where` names the field that gave `spec` in error messages."""
    from train.cli import resolve_config_path
    try:
        path, _, arg = resolve_config_path(spec).partition(":")
    except SystemExit as e:
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
