"""Synthetic sweeps drawn from a known L(N, D) = E + A/N^α + B/D^β, for checking the fits.

Noise is multiplicative: loss · exp(σ ε), ε ~ N(0, 1), which is additive in the log space where
Approach 3 measures its residuals.
"""
from __future__ import annotations

import numpy as np

from hibari.evaluation.scaling.chinchilla import ParametricLaw, compute_optimal_allocation
from hibari.evaluation.scaling.data import ScalingPoints, points_from_arrays

# Hoffmann et al. 2022, Approach 3 as printed in the paper.
HOFFMANN_LAW = ParametricLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _noisy(loss, noise, rng):
    return loss * np.exp(noise * rng.standard_normal(np.shape(loss))) if noise else loss


def isoflop_sweep(law: ParametricLaw, budgets, sizes_per_budget: int = 9, span_dex: float = 0.8,
                  noise: float = 0.0, seed: int = 0) -> ScalingPoints:
    """For each budget C, `sizes_per_budget` model sizes log-spaced ±`span_dex` decades around the true
    N_opt(C), trained on D = C/(6N) tokens."""
    rng = np.random.default_rng(seed)
    n_opt = compute_optimal_allocation(law, budgets)["N_opt"]
    N, C = [], []
    for budget, centre in zip(np.asarray(budgets, float), n_opt):
        sizes = centre * np.logspace(-span_dex, span_dex, sizes_per_budget)
        N.extend(sizes)
        C.extend([budget] * sizes_per_budget)
    N, C = np.asarray(N), np.asarray(C)
    D = C / (6 * N)
    return points_from_arrays(N, _noisy(law.loss(N, D), noise, rng), D=D, C=C,
                              run=[f"iso-C{c:.2g}-N{n:.3g}" for c, n in zip(C, N)], source="<isoflop_sweep>")


def random_sweep(law: ParametricLaw, n_points: int, n_range=(1e7, 1e10), tokens_per_param_range=(1.0, 200.0),
                 noise: float = 0.0, seed: int = 0) -> ScalingPoints:
    """Points with log-uniform N and tokens per parameter (D = N · ratio)."""
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(*np.log(n_range), n_points))
    D = N * np.exp(rng.uniform(*np.log(tokens_per_param_range), n_points))
    return points_from_arrays(N, _noisy(law.loss(N, D), noise, rng), D=D, source="<random_sweep>")


def training_curves(law: ParametricLaw, sizes, max_tokens: float, min_tokens: float = 1e7, n_steps: int = 60,
                    noise: float = 0.0, seed: int = 0) -> ScalingPoints:
    """One run per size, its loss logged at `n_steps` token counts log-spaced from `min_tokens` to `max_tokens`.

    Each logged point is L(N, D_seen): as if every prefix were its own fully annealed run, the idealised
    curve Approach 1 assumes (Hoffmann et al. match the schedule to each horizon for this reason).
    """
    rng = np.random.default_rng(seed)
    N, D, run, step = [], [], [], []
    tokens = np.logspace(np.log10(min_tokens), np.log10(max_tokens), n_steps)
    for size in np.asarray(sizes, float):
        N.extend([size] * n_steps)
        D.extend(tokens)
        run.extend([f"N{size:.3g}"] * n_steps)
        step.extend(range(1, n_steps + 1))
    N, D = np.asarray(N), np.asarray(D)
    return points_from_arrays(N, _noisy(law.loss(N, D), noise, rng), D=D, run=run, step=step,
                              source="<training_curves>")
