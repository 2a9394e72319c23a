"""Metrics: JSONL + TensorBoard event files, and model FLOP utilisation (MFU)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

from hibari.base.files import write_atomic

# Dense bf16 peak FLOP/s per device (vendor datasheets), matched by substring of device_kind.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card's 756e12 is matched first below
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown (CPUs)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    if device.platform == "cpu":
        return None
    if "H100" in kind and "PCIe" in kind:
        return 756e12
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def mfu(tokens_per_second: float, flops_per_token: float, n_devices: int) -> float | None:
    peak = peak_flops_per_device()
    if peak is None or not tokens_per_second:
        return None
    return tokens_per_second * flops_per_token / (peak * n_devices)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends `{"step": s, ...}` lines to metrics.jsonl and scalars to TensorBoard (tb/).

    `resume_step`: the step the run restarts from. Records after it (written before a crash
    and about to be replayed) are cut from metrics.jsonl, and TensorBoard purges them, so each
    step appears once. Only process 0 writes; other processes get a writer that does nothing."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            path = workdir / "metrics.jsonl"
            if resume_step is not None and path.exists():
                truncate_metrics(path, resume_step)
            self._jsonl = open(path, "a", buffering=1)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(workdir / "tb"), purge_step=(
                None if resume_step is None else resume_step + 1))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def truncate_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Keep the records of metrics.jsonl up to `last_step` (and none torn by a kill); returns
    how many were cut. Rewritten through a temporary file: a crash leaves the old or the new."""
    path = Path(path)
    kept, cut = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                cut += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) \
                    and record["step"] > last_step:
                cut += 1
                continue
            kept.append(line if line.endswith(b"\n") else line + b"\n")
    if cut:
        write_atomic(path, b"".join(kept))
    return cut


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line from a kill is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# ---------------------------------------------------------------------------------------------
# Plots of metrics.jsonl
# ---------------------------------------------------------------------------------------------

def plot_panels(path: Path, title: str, panels: list[tuple[str, list[tuple]]],
                hlines: dict | None = None) -> None:
    """One PNG with one panel per (ylabel, [(label, xs, ys, style)]); `hlines`: {ylabel:
    {label: y}} reference lines (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        for label, xs, ys, style in series:
            if xs:
                ax.plot(xs, ys, style, label=label, markersize=4)
        for label, y in (hlines or {}).get(ylabel, {}).items():
            ax.axhline(y, color="gray", linestyle="--", linewidth=1, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metric_series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records of metrics.jsonl that hold a number under `key`."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]
