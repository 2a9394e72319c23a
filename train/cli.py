"""`hibari pretrain`: config file + overrides in, a run directory out.

    hibari pretrain --config configs/pretrain/llama.py:tiny --workdir runs/tiny \\
        --config.steps=100 --config.mesh.fsdp=2

Multi-host: on TPU pods and SLURM clusters `jax.distributed` is initialised automatically;
elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I on each host.
"""
from __future__ import annotations

import difflib
import logging
import re
import sys

from absl import flags

from hibari.base.config_files import ConfigFileError, resolve_config_flag, resolve_config_path
from hibari.base.errors import UsageError


def config_field_names(config, prefix: str = "") -> list[str]:
    """Every dotted field name of a ConfigDict, nested ConfigDicts and their fields included."""
    import ml_collections
    names = []
    for key in config.keys():
        names.append(prefix + key)
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            names.extend(config_field_names(value, f"{prefix}{key}."))
    return names


def nearest_fields(name: str, names: list[str], n: int = 5) -> list[str]:
    """The `n` names most like `name`, by difflib's ratio on the whole dotted name or on its
    last part (so `--config.warmup_steps` finds optim.warmup_steps)."""
    last = name.rsplit(".", 1)[-1]

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, name, candidate).ratio()
        part = difflib.SequenceMatcher(None, last, candidate.rsplit(".", 1)[-1]).ratio()
        return max(whole, 0.95 * part)

    return sorted(names, key=score, reverse=True)[:n]


def _config_spec(argv: list[str]) -> str | None:
    """The value of `--config FILE[:arg]` / `--config=FILE[:arg]` in argv."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _missing_field(path: str, config) -> bool:
    """Whether the dotted override `path` (`a.b`, `rules[0]`) names no field of `config`."""
    import ml_collections
    node = config
    for part in path.split("."):
        key = re.sub(r"\[.*$", "", part)
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            return True
        node = node[key]
    return False


def unknown_override(argv: list[str], spec: str, shown: str | None = None) -> str | None:
    """One line naming the first `--config.FIELD` override of `argv` that is no field of the
    config file `spec` (`path.py[:arg]`), with the nearest valid dotted names; None when every
    override names a field (or the file cannot be read: its own error is reported instead).
    `shown`: the config file as the user wrote it (default: `spec`)."""
    from hibari.base.config_files import load_python_config
    try:
        config = load_python_config(spec)
    except Exception:  # noqa: BLE001 - the parse error itself is reported instead
        return None
    for a in argv:
        m = re.match(r"--(?:no)?config\.([^=\s]+)", a)
        if m and _missing_field(m.group(1), config):
            near = nearest_fields(m.group(1), config_field_names(config))
            return (f"--config.{m.group(1)}: no such field in {shown or spec}; nearest: "
                    f"{', '.join(near)}")
    return None


FLAG_ERRORS = (flags.Error, ValueError, KeyError, AttributeError)


def _flag_error(e: Exception, argv: list[str], spec: str | None,
                shown: str | None) -> ConfigFileError:
    """The one ConfigFileError to raise for a failed parse of argv."""
    if isinstance(e, (KeyError, AttributeError)) and spec:
        message = unknown_override(argv, spec, shown)
        if message:
            return ConfigFileError(message)
    lines = [line for line in str(e).splitlines() if line.strip()]
    if "Traceback (most recent call last):" in lines:  # ml_collections embeds one
        lines = [lines[0], lines[-1]]
    return ConfigFileError("\n  ".join(lines))


def parse_flag_values(fv: flags.FlagValues, prog: str, argv: list[str],
                      config_name: str | None = None, default_config: str | None = None
                      ) -> None:
    """Parse argv into `fv`; a bad flag or config override is a ConfigFileError naming it (an
    unknown `--config.FIELD`: one line with the nearest valid field names of the config file,
    `--config` in argv or `default_config`; `config_name`: that file as the user gave it)."""
    try:
        fv([f"hibari {prog}"] + argv)
    except FLAG_ERRORS as e:
        raise _flag_error(e, argv, _config_spec(argv) or default_config, config_name) from None


def config_flag_values(prog: str, argv: list[str], help_: str
                       ) -> tuple[flags.FlagValues, list[str]]:
    """New FlagValues with `--config FILE[:arg]` defined (its `--config.FIELD=VALUE` overrides
    read from this argv, not the process's), and argv with the config path resolved
    (`resolve_config_flag`). The caller defines its other flags, then `parse_flag_values`."""
    from ml_collections import config_flags
    fv = flags.FlagValues()
    argv = resolve_config_flag(argv)
    config_flags.DEFINE_config_file("config", None, help_, flag_values=fv, lock_config=True,
                                    sys_argv=[f"hibari {prog}"] + argv)
    return fv, argv


def parse_run_flags(prog: str, argv: list[str], default_config: str):
    """Parse `--config FILE[:arg] --config.x=... --workdir DIR`, distributed flags and
    `--allow-tokenizer-mismatch` (fv.allow_tokenizer_mismatch)."""
    from ml_collections import config_flags
    fv = flags.FlagValues()
    config_name = _config_spec(argv) or default_config
    argv = [a.replace("--allow-tokenizer-mismatch", "--allow_tokenizer_mismatch", 1)
            if a.startswith("--allow-tokenizer-mismatch") else a for a in resolve_config_flag(argv)]
    if default_config:  # found in the installed package when not under the working directory
        default_config = resolve_config_path(default_config)
    try:  # a default config file is loaded, and argv's overrides applied, right here
        config_flags.DEFINE_config_file("config", default_config, "config file[:argument]",
                                        flag_values=fv, lock_config=True,
                                        sys_argv=[f"hibari {prog}"] + argv)
    except FLAG_ERRORS as e:
        raise _flag_error(e, argv, _config_spec(argv) or default_config, config_name) from None
    flags.DEFINE_string("workdir", None, "run directory (resumes if it has checkpoints)",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "jax.distributed process count", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "jax.distributed process id", flag_values=fv)
    flags.DEFINE_boolean("allow_tokenizer_mismatch", False,
                         "start from config.init_from although its recorded tokenizer differs "
                         "from config.data.tokenizer (--allow-tokenizer-mismatch)", flag_values=fv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: hibari {prog} --config FILE.py[:arg] --workdir DIR [--config.FIELD=VALUE ...]")
        print(fv.get_help().split("absl.flags:")[0].replace("\n-:\n", "\n", 1))
        print("Every field of the config file can be overridden, e.g. --config.steps=1000 "
              "--config.mesh.fsdp=8 --config.model.remat=full; the resolved config is saved "
              "to WORKDIR/config.json.")
        raise SystemExit(0)
    if config_name is None:
        raise UsageError("--config FILE.py[:arg] is required")
    parse_flag_values(fv, prog, argv, config_name, default_config)
    if fv.config is None:
        raise UsageError("--config FILE.py[:arg] is required")
    if not fv.workdir:
        raise UsageError("--workdir is required")
    return fv


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax is chatty at INFO


def pretrain_main(argv: list[str]) -> int:
    setup_logging()
    fv = parse_run_flags("pretrain", argv, default_config=None)
    from hibari.train.distributed import initialize
    initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    from hibari.train.loop import train
    summary = train(fv.config, fv.workdir)
    shown = {k: v for k, v in summary.items() if k != "params"}
    print(f"hibari pretrain: {shown}", file=sys.stderr)
    return 0
