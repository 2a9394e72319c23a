"""Hoffmann et al. 2022 ("Chinchilla") Approaches 1-3 and the compute-optimal allocation.

Approach 1: lower envelope of the training curves over compute; at each compute C the run on the
            envelope gives N_opt(C), D_opt(C) = C/(6 N_opt); power laws N_opt ∝ C^a, D_opt ∝ C^b.
Approach 2: IsoFLOP profiles; per budget a parabola of loss in log N, its vertex is N_opt and
            D_opt = ⟨N·D⟩/N_opt; power laws over budgets give a, b.
Approach 3: L(N, D) = E + A/N^α + B/D^β fitted by minimising Σ Huber_δ(LSE(a − α log N, b − β log D, e)
            − log L) with L-BFGS from a grid of starting points; A = e^a, B = e^b, E = e^e.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from hibari.evaluation.scaling._threads import single_threaded_blas
from hibari.evaluation.scaling.data import ScalingFitError, ScalingPoints, group_by_log_gap

HUBER_DELTA = 1e-3

# Hoffmann et al. 2022, Appendix D.2 (also used by Besiroglu et al. 2024): 6·6·5·5·5 = 4500 starts.
HOFFMANN_INIT_GRID = {
    "a": tuple(np.arange(0.0, 30.0, 5.0)),
    "b": tuple(np.arange(0.0, 30.0, 5.0)),
    "e": tuple(np.arange(-1.0, 1.5, 0.5)),
    "alpha": tuple(np.arange(0.0, 2.5, 0.5)),
    "beta": tuple(np.arange(0.0, 2.5, 0.5)),
}
# A 3·3·3·3·3 = 243-start grid over the same ranges, for quick fits and tests.
COARSE_INIT_GRID = {
    "a": (0.0, 10.0, 20.0),
    "b": (0.0, 10.0, 20.0),
    "e": (-1.0, 0.0, 1.0),
    "alpha": (0.0, 0.5, 1.0),
    "beta": (0.0, 0.5, 1.0),
}
# Each start runs with L-BFGS-B defaults; the best optimum is then polished with tight tolerances,
# because the summed Huber objective is tiny (~1e-3) and flat near its minimum.
LBFGS_OPTIONS = {"maxiter": 2000}
POLISH_OPTIONS = {"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12}


# ----------------------------------------------------------------------------- Approach 3


@dataclasses.dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D) -> np.ndarray:
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_log_params(cls, theta) -> "ParametricLaw":
        a, b, e, alpha, beta = (float(v) for v in theta)
        return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)

    def log_params(self) -> np.ndarray:
        return np.array([math.log(self.A), math.log(self.B), math.log(self.E), self.alpha, self.beta])


def predicted_log_loss(theta, log_n, log_d) -> np.ndarray:
    """LSE(a − α log N, b − β log D, e) = log(A/N^α + B/D^β + E)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    return logsumexp(terms, axis=0)


def huber_objective_and_grad(theta, log_n, log_d, log_loss, delta=HUBER_DELTA):
    """Σ_i Huber_δ(LSE_i − log L_i) and its gradient in θ = (a, b, e, α, β).

    Written out by hand (no scipy.special calls): it runs millions of times in a full grid fit.
    """
    a, b, e, alpha, beta = theta
    term_n = a - alpha * log_n
    term_d = b - beta * log_d
    top = np.maximum(np.maximum(term_n, term_d), e)
    w_n, w_d, w_e = np.exp(term_n - top), np.exp(term_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    residual = top + np.log(total) - log_loss
    size = np.abs(residual)
    value = np.where(size <= delta, 0.5 * residual * residual, delta * (size - 0.5 * delta)).sum()
    slope = np.clip(residual, -delta, delta) / total  # dHuber/dr · dLSE/dterm, up to the term weight
    g_n, g_d = slope * w_n, slope * w_d
    grad = np.array([g_n.sum(), g_d.sum(), (slope * w_e).sum(), -(g_n @ log_n), -(g_d @ log_d)])
    return float(value), grad


def init_grid_points(grid: dict) -> np.ndarray:
    """The Cartesian product of a grid dict as starting vectors θ = (a, b, e, α, β)."""
    return np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])), float)


def fit_parametric_law(N, D, loss, init_grid: dict | np.ndarray = HOFFMANN_INIT_GRID, delta: float = HUBER_DELTA,
                       return_objective: bool = False):
    """Approach 3: the best L-BFGS optimum of the log-space Huber objective over all starts.

    `init_grid` is a grid dict (see HOFFMANN_INIT_GRID) or an array of starting θ vectors.
    """
    N, D, loss = (np.asarray(v, dtype=float) for v in (N, D, loss))
    if len(loss) < 5:
        raise ScalingFitError(f"Approach 3 fits 5 parameters and needs at least 5 points, got {len(loss)}")
    starts = init_grid_points(init_grid) if isinstance(init_grid, dict) else np.atleast_2d(init_grid)
    data = (np.log(N), np.log(D), np.log(loss), delta)
    with single_threaded_blas():
        best = None
        for theta0 in starts:
            result = minimize(huber_objective_and_grad, theta0, args=data, jac=True, method="L-BFGS-B",
                              options=LBFGS_OPTIONS)
            if np.all(np.isfinite(result.x)) and (best is None or result.fun < best.fun):
                best = result
        if best is None:
            raise ScalingFitError("Approach 3: no starting point converged to finite parameters")
        polished = minimize(huber_objective_and_grad, best.x, args=data, jac=True, method="L-BFGS-B",
                            options=POLISH_OPTIONS)
    if np.all(np.isfinite(polished.x)) and polished.fun <= best.fun:
        best = polished
    law = ParametricLaw.from_log_params(best.x)
    return (law, float(best.fun)) if return_objective else law


# ----------------------------------------------------------------------------- allocation


def optimal_allocation_exponents(law: ParametricLaw) -> dict[str, float]:
    """a = β/(α+β), b = α/(α+β), G = (αA / (βB))^(1/(α+β))."""
    s = law.alpha + law.beta
    return {"a": law.beta / s, "b": law.alpha / s, "G": (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / s)}


def compute_optimal_allocation(law: ParametricLaw, compute) -> dict[str, np.ndarray]:
    """For budgets C (FLOPs, C = 6ND): N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, tokens/param, loss."""
    compute = np.asarray(compute, dtype=float)
    ex = optimal_allocation_exponents(law)
    n_opt = ex["G"] * (compute / 6.0) ** ex["a"]
    d_opt = (compute / 6.0) ** ex["b"] / ex["G"]
    return {"C": compute, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt,
            "loss": law.loss(n_opt, d_opt)}


# ----------------------------------------------------------------------------- power laws in C


@dataclasses.dataclass(frozen=True)
class AllocationFit:
    """N_opt = k_N C^a and D_opt = k_D C^b fitted over the optima found by Approach 1 or 2."""

    a: float
    b: float
    k_N: float
    k_D: float
    C: np.ndarray
    N_opt: np.ndarray
    D_opt: np.ndarray

    def n_opt(self, compute) -> np.ndarray:
        return self.k_N * np.asarray(compute, float) ** self.a

    def d_opt(self, compute) -> np.ndarray:
        return self.k_D * np.asarray(compute, float) ** self.b

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "k_N": self.k_N, "k_D": self.k_D,
                "optima": {"C": self.C.tolist(), "N_opt": self.N_opt.tolist(), "D_opt": self.D_opt.tolist()}}


def fit_allocation_power_laws(compute, n_opt, d_opt) -> AllocationFit:
    """Least squares of log N_opt and log D_opt on log C."""
    compute, n_opt, d_opt = (np.asarray(v, dtype=float) for v in (compute, n_opt, d_opt))
    if len(np.unique(compute)) < 2:
        raise ScalingFitError("need optima at 2 or more distinct compute budgets to fit N_opt ∝ C^a")
    a, log_kn = np.polyfit(np.log(compute), np.log(n_opt), 1)
    b, log_kd = np.polyfit(np.log(compute), np.log(d_opt), 1)
    return AllocationFit(float(a), float(b), float(np.exp(log_kn)), float(np.exp(log_kd)), compute, n_opt, d_opt)


# ----------------------------------------------------------------------------- Approach 1


def training_curve_envelope(points: ScalingPoints, n_grid: int = 40) -> dict[str, np.ndarray]:
    """The lowest loss over runs at each compute of a log-spaced grid, and the run achieving it.

    Each run's curve is interpolated linearly in (log C, loss) and only used inside its own compute
    range. Without training curves (one row per run) the Pareto frontier of the points is used.
    Returns arrays C, loss, N (of the winning run) and D = C / (6N).
    """
    if not points.has_curves:
        from hibari.evaluation.scaling.kaplan import pareto_frontier

        front = pareto_frontier(points.C, points.loss)
        return {"C": points.C[front], "loss": points.loss[front], "N": points.N[front],
                "D": points.C[front] / (6.0 * points.N[front])}
    curves = []
    for name in np.unique(points.run):
        rows = np.flatnonzero(points.run == name)
        order = rows[np.argsort(points.C[rows])]
        if len(order) >= 2:
            curves.append((np.log(points.C[order]), points.loss[order], float(np.median(points.N[order]))))
    if not curves:
        raise ScalingFitError("Approach 1 needs training curves: runs with 2 or more rows (columns run and step)")
    lo = min(c[0][0] for c in curves)
    hi = max(c[0][-1] for c in curves)
    grid = np.linspace(lo, hi, n_grid)
    best_loss = np.full(n_grid, np.inf)
    best_n = np.full(n_grid, np.nan)
    for log_c, loss, n in curves:
        inside = (grid >= log_c[0]) & (grid <= log_c[-1])
        interpolated = np.interp(grid[inside], log_c, loss)
        better = interpolated < best_loss[inside]
        idx = np.flatnonzero(inside)[better]
        best_loss[idx] = interpolated[better]
        best_n[idx] = n
    covered = np.isfinite(best_loss)
    compute = np.exp(grid[covered])
    return {"C": compute, "loss": best_loss[covered], "N": best_n[covered], "D": compute / (6.0 * best_n[covered])}


def fit_approach1(points: ScalingPoints, n_grid: int = 40, trim_edges: bool = True) -> AllocationFit:
    """Approach 1: power laws N_opt ∝ C^a, D_opt ∝ C^b over the training-curve envelope.

    With `trim_edges`, envelope points won by the smallest or the largest model are left out: there
    the optimum may lie outside the sizes trained, so the envelope says nothing about N_opt.
    """
    env = training_curve_envelope(points, n_grid)
    keep = np.ones(len(env["C"]), bool)
    if trim_edges and len(np.unique(points.N)) > 2:
        keep = (env["N"] > np.min(points.N) * (1 + 1e-9)) & (env["N"] < np.max(points.N) * (1 - 1e-9))
    if np.count_nonzero(keep) < 2:
        raise ScalingFitError("Approach 1: fewer than 2 envelope points inside the trained size range; "
                              "train more model sizes or longer curves")
    winners = np.unique(env["N"][keep])
    if len(winners) < 2:
        raise ScalingFitError(f"Approach 1: one model size (N={winners[0]:.4g}) wins the whole envelope, "
                              "so N_opt does not move with C there (a fit would give a = 0); train sizes "
                              "closer together or over a wider range of compute")
    return fit_allocation_power_laws(env["C"][keep], env["N"][keep], env["D"][keep])


# ----------------------------------------------------------------------------- Approach 2


@dataclasses.dataclass(frozen=True)
class IsoFlopProfile:
    """One compute budget: its points and the parabola loss = p[0] x² + p[1] x + p[2] in x = log N.

    D_opt = ⟨N·D⟩ / N_opt, with ⟨N·D⟩ the geometric mean over the budget's runs (C/6 on an exact
    6ND IsoFLOP; also right when C counts attention FLOPs or the budget's C is noisy).
    """

    C: float
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    parabola_logN: np.ndarray

    @property
    def N_opt(self) -> float:
        return float(np.exp(-self.parabola_logN[1] / (2 * self.parabola_logN[0])))

    @property
    def D_opt(self) -> float:
        return float(np.exp(np.mean(np.log(self.N * self.D)))) / self.N_opt

    @property
    def loss_opt(self) -> float:
        return float(np.polyval(self.parabola_logN, np.log(self.N_opt)))

    def as_dict(self) -> dict:
        return {"C": self.C, "N_opt": self.N_opt, "D_opt": self.D_opt, "loss_opt": self.loss_opt,
                "n_points": int(len(self.loss)), "parabola_logN": self.parabola_logN.tolist()}


def assign_budgets(compute, budgets=None, budget_tol_dex: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A budget label per point and each label's budget in FLOPs.

    With `budgets`, each point goes to the nearest budget in log C. Without, sorted log10 C values are
    split wherever consecutive ones differ by more than `budget_tol_dex`, and a budget is its group's
    geometric-mean C.
    """
    compute = np.asarray(compute, dtype=float)
    if budgets is not None:
        budgets = np.sort(np.asarray(budgets, dtype=float))
        labels = np.argmin(np.abs(np.log10(compute)[:, None] - np.log10(budgets)[None, :]), axis=1)
        return labels, budgets
    labels = group_by_log_gap(compute, budget_tol_dex)
    centres = np.array([np.exp(np.mean(np.log(compute[labels == k]))) for k in range(labels.max() + 1)])
    return labels, centres


def isoflop_profiles(points: ScalingPoints, budget_tol_dex: float = 0.1, min_points: int = 3, budgets=None,
                     max_spread_dex: float = 0.15) -> tuple[list[IsoFlopProfile], list[str]]:
    """Group final points into compute budgets (see `assign_budgets`) and fit a parabola per budget.

    A budget is skipped, with the reason recorded, when it has fewer than `min_points` model sizes,
    when (budgets found from gaps only) its points' C spans more than `max_spread_dex` decades, which
    is no IsoFLOP profile, when the parabola opens downwards, or when its vertex lies outside the
    sizes trained.
    """
    final = points.final_points()
    labels, centres = assign_budgets(final.C, budgets, budget_tol_dex)
    profiles, skipped = [], []
    for label in np.unique(labels):
        members = labels == label
        budget = float(centres[label])
        n, d, loss = final.N[members], final.D[members], final.loss[members]
        spread = float(np.ptp(np.log10(final.C[members])))
        if budgets is None and spread > max_spread_dex:
            skipped.append(f"C≈{budget:.3g}: its {np.count_nonzero(members)} points span {spread:.2f} decades of "
                           f"compute, more than {max_spread_dex} (not one IsoFLOP profile; pass the budgets)")
            continue
        if len(np.unique(n)) < min_points:
            skipped.append(f"C≈{budget:.3g}: {len(np.unique(n))} model size(s), need {min_points}")
            continue
        p_n = np.polyfit(np.log(n), loss, 2)
        if p_n[0] <= 0:
            skipped.append(f"C≈{budget:.3g}: the loss is not convex in log N (no minimum)")
            continue
        profile = IsoFlopProfile(budget, n, d, loss, p_n)
        if not (n.min() <= profile.N_opt <= n.max()):
            skipped.append(f"C≈{budget:.3g}: the minimum N={profile.N_opt:.3g} lies outside the sizes trained "
                           f"[{n.min():.3g}, {n.max():.3g}]")
            continue
        profiles.append(profile)
    return profiles, skipped


def fit_approach2(points: ScalingPoints, budget_tol_dex: float = 0.1, min_points: int = 3, budgets=None
                  ) -> tuple[AllocationFit, list[IsoFlopProfile], list[str]]:
    """Approach 2: IsoFLOP parabola minima → N_opt ∝ C^a, D_opt ∝ C^b."""
    profiles, skipped = isoflop_profiles(points, budget_tol_dex, min_points, budgets)
    if len(profiles) < 2:
        raise ScalingFitError(
            f"Approach 2 needs 2 or more IsoFLOP budgets with {min_points}+ model sizes around a minimum; found "
            f"{len(profiles)}" + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
            + ". Run an IsoFLOP sweep, or name the budgets (--isoflop-budgets) when each budget's FLOPs vary")
    fit = fit_allocation_power_laws([p.C for p in profiles], [p.N_opt for p in profiles],
                                    [p.D_opt for p in profiles])
    return fit, profiles, skipped
