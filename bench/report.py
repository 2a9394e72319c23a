"""Shared output of the benchmarks: one JSON line on stdout, optionally appended to a JSONL, and
the device and package versions each line records."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path


def emit(result: dict, out: str | None) -> dict:
    line = json.dumps(result, ensure_ascii=False)
    print(line)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    return result


def versions(*packages: str) -> dict:
    """{"python": ..., package: installed version or None} for the named distributions."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """JAX's first device kind on an accelerator, else "CPU <model>, <n> cores" (usable ones)."""
    import jax
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return dev.device_kind
    return f"CPU {cpu_model()}, {len(os.sched_getaffinity(0))} cores"
