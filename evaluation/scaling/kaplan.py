"""Kaplan-style single-variable power laws L(X) = (X_c / X)^α_X, fitted in log space.

log L = α log X_c − α log X is a straight line in (log X, log L), so ordinary least squares on the
logs gives α = −slope and X_c = exp(intercept / α). Which points enter each fit:
  L(N):     per model size (sizes within `size_tol_dex` are one size), the lowest loss reached,
            standing in for the converged loss of Kaplan et al. 2020;
  L(D):     per token count, the lowest loss over model sizes (the data-limited frontier);
  L(C_min): the Pareto frontier of (C, loss): points no cheaper point beats.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hibari.evaluation.scaling.data import ScalingFitError, ScalingPoints, group_by_log_gap


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """L(X) = (x_c / X)^exponent over the fitted points `x`, `loss`."""

    x_c: float
    exponent: float
    x: np.ndarray
    loss: np.ndarray

    def predict(self, x) -> np.ndarray:
        return (self.x_c / np.asarray(x, dtype=float)) ** self.exponent

    def as_dict(self) -> dict:
        return {"x_c": self.x_c, "exponent": self.exponent, "n_points": int(len(self.x))}


def fit_power_law(x, loss) -> PowerLawFit:
    """Least squares of log L on log X; needs two distinct X and a loss that falls with X."""
    x = np.asarray(x, dtype=float)
    loss = np.asarray(loss, dtype=float)
    if len(np.unique(x)) < 2:
        raise ScalingFitError(f"a power law needs at least 2 distinct x values, got {len(np.unique(x))}")
    slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
    if slope >= 0:
        raise ScalingFitError(f"loss does not decrease with x (log-log slope {slope:.3g}); no power law L = (x_c/x)^a")
    exponent = -slope
    with np.errstate(over="ignore"):  # a near-flat law puts x_c beyond float range: inf
        x_c = float(np.exp(intercept / exponent))
    return PowerLawFit(x_c=x_c, exponent=float(exponent), x=x, loss=loss)


def lowest_loss_per_group(x, loss, tol_dex: float) -> tuple[np.ndarray, np.ndarray]:
    """For each cluster of x (within `tol_dex` decades), the geometric-mean x and the lowest loss."""
    labels = group_by_log_gap(x, tol_dex)
    xs, ls = [], []
    for label in np.unique(labels):
        members = labels == label
        xs.append(np.exp(np.mean(np.log(x[members]))))
        ls.append(np.min(loss[members]))
    return np.asarray(xs), np.asarray(ls)


def pareto_frontier(cost, loss) -> np.ndarray:
    """Indices of points on the lower-left frontier: each has lower loss than every cheaper point."""
    order = np.lexsort((loss, cost))
    frontier, best = [], np.inf
    for i in order:
        if loss[i] < best:
            frontier.append(i)
            best = loss[i]
    return np.asarray(frontier, dtype=int)


def fit_kaplan(points: ScalingPoints, size_tol_dex: float = 0.01) -> dict[str, PowerLawFit]:
    """The three Kaplan fits L(N), L(D), L(C_min) on the final point of each run."""
    final = points.final_points()
    fits = {}
    n, l_n = lowest_loss_per_group(final.N, final.loss, size_tol_dex)
    fits["L(N)"] = fit_power_law(n, l_n)
    d, l_d = lowest_loss_per_group(final.D, final.loss, size_tol_dex)
    fits["L(D)"] = fit_power_law(d, l_d)
    source = points if points.has_curves else final
    front = pareto_frontier(source.C, source.loss)
    fits["L(C_min)"] = fit_power_law(source.C[front], source.loss[front])
    return fits


def kaplan_summary(fits: dict[str, PowerLawFit]) -> dict[str, float]:
    """Flat scalars for reports and bootstrap: alpha_N, N_c, alpha_D, D_c, alpha_C, C_c."""
    out = {}
    for key, symbol in (("L(N)", "N"), ("L(D)", "D"), ("L(C_min)", "C")):
        out[f"alpha_{symbol}"] = fits[key].exponent
        out[f"{symbol}_c"] = fits[key].x_c
    return out
