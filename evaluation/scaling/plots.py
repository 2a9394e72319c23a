"""PNG plots of the scaling fits (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from hibari.evaluation.scaling.chinchilla import (  # noqa: E402
    AllocationFit,
    IsoFlopProfile,
    ParametricLaw,
    compute_optimal_allocation,
)
from hibari.evaluation.scaling.data import ScalingPoints  # noqa: E402
from hibari.evaluation.scaling.kaplan import PowerLawFit, pareto_frontier  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed margins: tight_layout measures every text box and costs more than the drawing itself.
    fig.subplots_adjust(left=0.1, right=0.95, bottom=0.11, top=0.92, wspace=0.25)
    for ax in fig.axes:  # over less than a decade matplotlib labels minor log ticks on top of each other
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _compute_grid(points: ScalingPoints, extend_dex: float = 0.3) -> np.ndarray:
    lo, hi = np.log10(points.C.min()) - extend_dex, np.log10(points.C.max()) + extend_dex
    return np.logspace(lo, hi, 200)


def plot_loss_vs_compute(points: ScalingPoints, path, kaplan_c: PowerLawFit | None = None,
                         envelope: dict | None = None) -> Path:
    """Loss against compute, coloured by model size, with the frontier (and training curves if any)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    if points.has_curves:
        for name in np.unique(points.run):
            rows = np.flatnonzero(points.run == name)
            rows = rows[np.argsort(points.C[rows])]
            ax.plot(points.C[rows], points.loss[rows], color="0.75", lw=0.8, zorder=1)
    sc = ax.scatter(points.C, points.loss, c=np.log10(points.N), cmap="viridis", s=12, zorder=2)
    fig.colorbar(sc, ax=ax, label="log10 N (parameters)")
    front = pareto_frontier(points.C, points.loss)
    ax.plot(points.C[front], points.loss[front], "k-", lw=1.5, label="frontier (lowest loss so far)", zorder=3)
    if envelope is not None:
        ax.plot(envelope["C"], envelope["loss"], "r.", ms=5, label="Approach 1 envelope", zorder=4)
    if kaplan_c is not None:
        grid = _compute_grid(points)
        ax.plot(grid, kaplan_c.predict(grid), "r--",
                label=f"L(C_min) = (C_c/C)^{kaplan_c.exponent:.3f}", zorder=4)
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="loss", title="Loss vs compute")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_isoflop_profiles(profiles: list[IsoFlopProfile], fit: AllocationFit, path) -> Path:
    """Left: loss against N per budget, the fitted parabolas and their minima. Right: N_opt, D_opt vs C."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    colours = plt.cm.plasma(np.linspace(0, 0.85, len(profiles)))
    for profile, colour in zip(profiles, colours):
        left.scatter(profile.N, profile.loss, color=colour, s=14)
        x = np.linspace(np.log(profile.N.min()), np.log(profile.N.max()), 100)
        left.plot(np.exp(x), np.polyval(profile.parabola_logN, x), color=colour, lw=1, label=f"C={profile.C:.2g}")
        left.plot(profile.N_opt, profile.loss_opt, "*", color=colour, ms=12, mec="k")
    left.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP profiles and minima")
    left.legend(fontsize=7, ncol=2)
    grid = np.logspace(np.log10(fit.C.min()) - 0.3, np.log10(fit.C.max()) + 0.3, 50)
    right.plot(fit.C, fit.N_opt, "o", color="tab:blue", label="N_opt (parabola minima)")
    right.plot(grid, fit.n_opt(grid), "-", color="tab:blue", label=f"N_opt ∝ C^{fit.a:.3f}")
    right.plot(fit.C, fit.D_opt, "s", color="tab:orange", label="D_opt")
    right.plot(grid, fit.d_opt(grid), "-", color="tab:orange", label=f"D_opt ∝ C^{fit.b:.3f}")
    right.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", title="Approach 2 optima")
    right.legend(fontsize=8)
    return _save(fig, path)


def plot_parametric_fit(points: ScalingPoints, law: ParametricLaw, path, n_curves: int = 6) -> Path:
    """Points (loss vs compute) with the fitted L(N, C/(6N)) for a few sizes and the optimal frontier."""
    fig, ax = plt.subplots(figsize=(7, 5))
    sc = ax.scatter(points.C, points.loss, c=np.log10(points.N), cmap="viridis", s=12, zorder=2)
    fig.colorbar(sc, ax=ax, label="log10 N (parameters)")
    grid = _compute_grid(points)
    sizes = np.quantile(points.N, np.linspace(0.02, 0.98, n_curves))
    norm = plt.Normalize(np.log10(points.N.min()), np.log10(points.N.max()))
    for size in sizes:
        tokens = grid / (6 * size)
        ax.plot(grid, law.loss(size, tokens), color=plt.cm.viridis(norm(np.log10(size))), lw=1)
    best = compute_optimal_allocation(law, grid)
    ax.plot(grid, best["loss"], "k--", lw=1.5, label="compute-optimal L(N_opt, D_opt)")
    ax.axhline(law.E, color="0.5", ls=":", lw=1, label=f"E = {law.E:.3f}")
    ax.set_ylim(min(law.E, points.loss.min()) * 0.97, points.loss.max() * 1.05)
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="loss",
           title=f"L = E + A/N^{law.alpha:.3f} + B/D^{law.beta:.3f}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_predicted_vs_observed(points: ScalingPoints, law: ParametricLaw, path) -> Path:
    """Observed loss against the Approach 3 prediction, with the identity line."""
    predicted = law.loss(points.N, points.D)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(predicted, points.loss, c=np.log10(points.N), cmap="viridis", s=12)
    lo = min(predicted.min(), points.loss.min())
    hi = max(predicted.max(), points.loss.max())
    ax.plot([lo, hi], [lo, hi], "k-", lw=1)
    rmse = float(np.sqrt(np.mean((np.log(predicted) - np.log(points.loss)) ** 2)))
    ax.set(xlabel="predicted loss", ylabel="observed loss", title=f"Approach 3 fit (RMSE of log loss {rmse:.4f})")
    return _save(fig, path)


def plot_allocations(fits: dict[str, AllocationFit], law: ParametricLaw | None, compute_range, path) -> Path:
    """N_opt(C) and D_opt(C) from every approach that produced them, on common axes."""
    grid = np.logspace(np.log10(compute_range[0]), np.log10(compute_range[1]), 100)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for name, fit in fits.items():
        line, = left.plot(grid, fit.n_opt(grid), label=f"{name}: a={fit.a:.3f}")
        left.plot(fit.C, fit.N_opt, ".", color=line.get_color())
        line, = right.plot(grid, fit.d_opt(grid), label=f"{name}: b={fit.b:.3f}")
        right.plot(fit.C, fit.D_opt, ".", color=line.get_color())
    if law is not None:
        best = compute_optimal_allocation(law, grid)
        s = law.alpha + law.beta
        left.plot(grid, best["N_opt"], "k--", label=f"Approach 3: a={law.beta / s:.3f}")
        right.plot(grid, best["D_opt"], "k--", label=f"Approach 3: b={law.alpha / s:.3f}")
    left.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N_opt", title="Optimal parameters")
    right.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="D_opt", title="Optimal tokens")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return _save(fig, path)
