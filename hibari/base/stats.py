"""Summary statistics shared by the rooms' reports."""
from __future__ import annotations

import math
from typing import Iterable


def mean_stderr(values: Iterable[float]) -> float:
    """Standard error of the mean: sample standard deviation (ddof=1) / sqrt(n), as
    lm-evaluation-harness reports `acc_stderr`; 0.0 for fewer than two values."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n < 2:
        return 0.0
    mean = sum(xs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)


def rate(values: Iterable[float]) -> dict:
    """{"rate", "stderr", "n"} of 0/1 (or fractional) outcomes: the form every report uses for
    a rate with its standard error; rate None when n = 0."""
    xs = [float(v) for v in values]
    return {"rate": sum(xs) / len(xs) if xs else None, "stderr": mean_stderr(xs), "n": len(xs)}


def mean_se(values: Iterable[float]) -> dict:
    """{"mean", "stderr", "n"} of any values; mean None when n = 0."""
    xs = [float(v) for v in values]
    return {"mean": sum(xs) / len(xs) if xs else None, "stderr": mean_stderr(xs), "n": len(xs)}
