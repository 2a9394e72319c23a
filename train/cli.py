"""`hibari pretrain`: config file + overrides in, a run directory out.

    hibari pretrain --config configs/pretrain/llama.py:tiny --workdir runs/tiny \\
        --config.steps=100 --config.mesh.fsdp=2

Multi-host: on TPU pods and SLURM clusters `jax.distributed` is initialised automatically;
elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I on each host.
"""
from __future__ import annotations

import logging
import sys

from absl import flags

from hibari.base.config_files import ConfigFileError, resolve_config_flag
from hibari.base.errors import UsageError


def parse_flag_values(fv: flags.FlagValues, prog: str, argv: list[str]) -> None:
    """Parse argv into `fv`; a bad flag or config override is a ConfigFileError naming it."""
    try:
        fv([f"hibari {prog}"] + argv)
    except (flags.Error, ValueError, KeyError, AttributeError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        if "Traceback (most recent call last):" in lines:  # ml_collections embeds one
            lines = [lines[0], lines[-1]]
        raise ConfigFileError("\n  ".join(lines)) from None


def parse_run_flags(prog: str, argv: list[str], default_config: str):
    """Parse `--config FILE[:arg] --config.x=... --workdir DIR` and distributed flags."""
    from ml_collections import config_flags
    fv = flags.FlagValues()
    argv = resolve_config_flag(argv)
    config_flags.DEFINE_config_file("config", default_config, "config file[:argument]",
                                    flag_values=fv, lock_config=True,
                                    sys_argv=[f"hibari {prog}"] + argv)
    flags.DEFINE_string("workdir", None, "run directory (resumes if it has checkpoints)",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "jax.distributed process count", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "jax.distributed process id", flag_values=fv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: hibari {prog} --config FILE.py[:arg] --workdir DIR [--config.FIELD=VALUE ...]")
        print(fv.get_help().split("absl.flags:")[0].replace("\n-:\n", "\n", 1))
        print("Every field of the config file can be overridden, e.g. --config.steps=1000 "
              "--config.mesh.fsdp=8 --config.model.remat=full; the resolved config is saved "
              "to WORKDIR/config.json.")
        raise SystemExit(0)
    parse_flag_values(fv, prog, argv)
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
