"""Nonparametric bootstrap: resample points (or whole runs) with replacement, refit, take percentiles."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from hibari.evaluation.scaling.data import ScalingFitError, ScalingPoints

DEFAULT_LEVELS = (0.8, 0.95)


def resample_index(points: ScalingPoints, rng: np.random.Generator, unit: str = "point") -> np.ndarray:
    """Row indices of one bootstrap sample: `unit="point"` draws rows, `unit="run"` draws whole runs."""
    if unit == "point":
        return rng.integers(0, len(points), len(points))
    if unit == "run":
        names = np.unique(points.run)
        drawn = rng.choice(names, size=len(names), replace=True)
        return np.concatenate([np.flatnonzero(points.run == name) for name in drawn])
    raise ValueError(f"unit must be 'point' or 'run', got {unit!r}")


def percentile_intervals(samples: dict[str, np.ndarray], levels: Sequence[float] = DEFAULT_LEVELS
                         ) -> dict[str, dict[str, list[float]]]:
    """{name: {"80%": [lo, hi], "95%": [lo, hi], ...}} from equal-tailed percentiles of each sample."""
    out = {}
    for name, values in samples.items():
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        out[name] = {f"{round(100 * level)}%": [float(np.percentile(values, 50 * (1 - level))),
                                                float(np.percentile(values, 50 * (1 + level)))]
                     for level in levels} if len(values) else {}
    return out


def bootstrap(points: ScalingPoints, fit: Callable[[ScalingPoints], dict[str, float]], n_resamples: int,
              seed: int = 0, unit: str = "point", levels: Sequence[float] = DEFAULT_LEVELS) -> dict:
    """Refit `fit` (points -> named scalars) on `n_resamples` resamples.

    Resamples the fit cannot handle (ScalingFitError, e.g. an IsoFLOP budget left with 2 sizes) are
    counted in `failed` and left out. Returns {"intervals", "n_resamples", "failed", "samples"}.
    """
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    failed = 0
    for _ in range(n_resamples):
        try:
            values = fit(points.subset(resample_index(points, rng, unit)))
        except ScalingFitError:
            failed += 1
            continue
        for name, value in values.items():
            samples.setdefault(name, []).append(float(value))
    arrays = {name: np.asarray(v) for name, v in samples.items()}
    return {"intervals": percentile_intervals(arrays, levels), "n_resamples": n_resamples, "failed": failed,
            "samples": arrays}
