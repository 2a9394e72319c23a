"""Run the requested fits on a results table and write fits.json, fit.json, summary.md and PNGs."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from hibari.evaluation.scaling import chinchilla, kaplan
from hibari.evaluation.scaling.bootstrap import bootstrap
from hibari.evaluation.scaling.data import ScalingFitError, ScalingPoints

APPROACHES = ("kaplan", "1", "2", "3")
INIT_GRIDS = {"hoffmann": chinchilla.HOFFMANN_INIT_GRID, "coarse": chinchilla.COARSE_INIT_GRID}
PARAMETRIC_KEYS = ("E", "A", "B", "alpha", "beta")


@dataclasses.dataclass
class FitSettings:
    approaches: Sequence[str] = APPROACHES
    strict: bool = False  # a requested approach that cannot run is an error (else: skipped, reason kept)
    n_bootstrap: int = 200
    seed: int = 0
    init_grid: str = "hoffmann"
    huber_delta: float = chinchilla.HUBER_DELTA
    budget_tol_dex: float = 0.1
    isoflop_budgets: Sequence[float] | None = None  # Approach 2: group runs by the nearest of these
    size_tol_dex: float = 0.01
    envelope_grid: int = 40
    budgets: Sequence[float] | None = None  # compute budgets for the allocation table
    drop_lowest_tokens_per_param: int = 0


def default_budgets(points: ScalingPoints) -> list[float]:
    """Powers of ten from the smallest compute in the data to 1000x the largest."""
    lo = math.floor(math.log10(points.C.min()))
    hi = math.ceil(math.log10(points.C.max())) + 3
    return [10.0 ** k for k in range(lo, hi + 1)]


def drop_lowest_tokens_per_param(points: ScalingPoints, count: int) -> ScalingPoints:
    """Leave out the `count` points with the fewest tokens per parameter (Besiroglu et al. drop 5)."""
    if count <= 0:
        return points
    if count >= len(points):
        raise ScalingFitError(f"cannot drop {count} of {len(points)} points")
    keep = np.sort(np.argsort(points.D / points.N, kind="stable")[count:])
    return points.subset(keep)


def _parametric_scalars(law: chinchilla.ParametricLaw, budgets) -> dict[str, float]:
    out = law.as_dict()
    out.update(chinchilla.optimal_allocation_exponents(law))
    alloc = chinchilla.compute_optimal_allocation(law, budgets)
    for c, n, d in zip(budgets, alloc["N_opt"], alloc["D_opt"]):
        out[f"N_opt@{c:.3g}"] = float(n)
        out[f"D_opt@{c:.3g}"] = float(d)
        out[f"tokens_per_param@{c:.3g}"] = float(d / n)
    return out


def fit_kaplan_section(points: ScalingPoints, s: FitSettings) -> tuple[dict, dict]:
    fits = kaplan.fit_kaplan(points, s.size_tol_dex)
    section = {name: fit.as_dict() for name, fit in fits.items()}
    if s.n_bootstrap:
        boot = bootstrap(points.final_points(), lambda p: kaplan.kaplan_summary(kaplan.fit_kaplan(p, s.size_tol_dex)),
                         s.n_bootstrap, s.seed, unit="point")
        section["intervals"], section["bootstrap_failed"] = boot["intervals"], boot["failed"]
    return section, {"kaplan": fits}


def fit_approach1_section(points: ScalingPoints, s: FitSettings) -> tuple[dict, dict]:
    fit = chinchilla.fit_approach1(points, s.envelope_grid)
    section = fit.as_dict()
    if s.n_bootstrap:
        unit = "run" if points.has_curves else "point"
        boot = bootstrap(points, lambda p: _ab(chinchilla.fit_approach1(p, s.envelope_grid)), s.n_bootstrap,
                         s.seed, unit=unit)
        section["intervals"], section["bootstrap_failed"], section["bootstrap_unit"] = (
            boot["intervals"], boot["failed"], unit)
    envelope = chinchilla.training_curve_envelope(points, s.envelope_grid)
    return section, {"approach1": fit, "envelope": envelope}


def _ab(fit: chinchilla.AllocationFit) -> dict[str, float]:
    return {"a": fit.a, "b": fit.b}


def fit_approach2_section(points: ScalingPoints, s: FitSettings) -> tuple[dict, dict]:
    fit, profiles, skipped = chinchilla.fit_approach2(points, s.budget_tol_dex, budgets=s.isoflop_budgets)
    section = fit.as_dict()
    section["profiles"] = [p.as_dict() for p in profiles]
    section["skipped_budgets"] = skipped
    if s.n_bootstrap:
        boot = bootstrap(points.final_points(), lambda p: _ab(chinchilla.fit_approach2(p, s.budget_tol_dex, budgets=s.isoflop_budgets)[0]),
                         s.n_bootstrap, s.seed, unit="point")
        section["intervals"], section["bootstrap_failed"] = boot["intervals"], boot["failed"]
    return section, {"approach2": fit, "profiles": profiles}


def fit_approach3_section(points: ScalingPoints, s: FitSettings, budgets) -> tuple[dict, dict]:
    final = drop_lowest_tokens_per_param(points.final_points(), s.drop_lowest_tokens_per_param)
    grid = INIT_GRIDS[s.init_grid]
    law, objective = chinchilla.fit_parametric_law(final.N, final.D, final.loss, grid, s.huber_delta,
                                                   return_objective=True)
    section = {**law.as_dict(), **chinchilla.optimal_allocation_exponents(law), "objective": objective,
               "huber_delta": s.huber_delta, "init_grid": s.init_grid,
               "n_starts": len(chinchilla.init_grid_points(grid)), "n_points": len(final),
               "dropped_lowest_tokens_per_param": s.drop_lowest_tokens_per_param}
    alloc = chinchilla.compute_optimal_allocation(law, budgets)
    section["allocation"] = [{k: float(v[i]) for k, v in alloc.items()} for i in range(len(budgets))]
    if s.n_bootstrap:
        start = law.log_params()[None, :]

        def refit(p: ScalingPoints) -> dict[str, float]:
            return _parametric_scalars(chinchilla.fit_parametric_law(p.N, p.D, p.loss, start, s.huber_delta),
                                       budgets)

        boot = bootstrap(final, refit, s.n_bootstrap, s.seed, unit="point")
        section["intervals"], section["bootstrap_failed"] = boot["intervals"], boot["failed"]
        section["bootstrap_start"] = "full-data optimum"
    return section, {"approach3": law, "approach3_points": final}


def fit_all(points: ScalingPoints, settings: FitSettings) -> tuple[dict, dict]:
    """Run the requested approaches. Returns (JSON-ready report, fitted objects for plotting)."""
    budgets = list(settings.budgets) if settings.budgets else default_budgets(points)
    report = {"source": points.source, "n_rows": len(points), "n_final_points": len(points.final_points()),
              "has_training_curves": points.has_curves, "settings": dataclasses.asdict(settings),
              "allocation_budgets": budgets, "approaches": {}}
    report["settings"]["approaches"] = list(settings.approaches)
    runners = {"kaplan": lambda: fit_kaplan_section(points, settings),
               "1": lambda: fit_approach1_section(points, settings),
               "2": lambda: fit_approach2_section(points, settings),
               "3": lambda: fit_approach3_section(points, settings, budgets)}
    fitted: dict = {}
    for name in settings.approaches:
        key = "kaplan" if name == "kaplan" else f"approach{name}"
        try:
            section, objects = runners[name]()
        except ScalingFitError as e:
            if settings.strict:
                raise ScalingFitError(f"{key}: {e}") from None
            report["approaches"][key] = {"skipped": str(e)}
            continue
        report["approaches"][key] = section
        fitted.update(objects)
    if not fitted:
        reasons = "; ".join(f"{k}: {v['skipped']}" for k, v in report["approaches"].items())
        raise ScalingFitError(f"no approach could be fitted ({reasons})")
    return report, fitted


def contract_fit(report: dict) -> dict | None:
    """fit.json: the Approach 3 parameters at top level (E, A, B, alpha, beta) and their intervals."""
    section = report["approaches"].get("approach3")
    if not section or "skipped" in section:
        return None
    out = {k: section[k] for k in (*PARAMETRIC_KEYS, "a", "b", "G", "n_points", "objective", "huber_delta")}
    out["intervals"] = {k: v for k, v in section.get("intervals", {}).items() if k in (*PARAMETRIC_KEYS, "a", "b")}
    out["source"] = report["source"]
    return out


def _interval_text(section: dict, key: str, level: str = "95%") -> str:
    interval = section.get("intervals", {}).get(key, {}).get(level)
    return f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "–"


def summary_markdown(report: dict) -> str:
    """A short human-readable summary of every fitted approach."""
    lines = [f"# Scaling-law fits: `{report['source']}`", "",
             f"{report['n_rows']} rows, {report['n_final_points']} final points"
             f"{' (training curves present)' if report['has_training_curves'] else ''}. "
             f"Intervals: bootstrap percentiles, {report['settings']['n_bootstrap']} resamples.", ""]
    approaches = report["approaches"]
    for key, section in approaches.items():
        if "skipped" in section:
            lines += [f"## {key}: skipped", "", section["skipped"], ""]
    if "kaplan" in approaches and "skipped" not in approaches["kaplan"]:
        k = approaches["kaplan"]
        lines += ["## Kaplan power laws L(X) = (X_c / X)^α_X", "",
                  "| law | α | 95% CI | X_c | points |", "|---|---|---|---|---|"]
        for law, sym in (("L(N)", "N"), ("L(D)", "D"), ("L(C_min)", "C")):
            lines.append(f"| {law} | {k[law]['exponent']:.4f} | {_interval_text(k, f'alpha_{sym}')} | "
                         f"{k[law]['x_c']:.3g} | {k[law]['n_points']} |")
        lines.append("")
    rows = []
    for key, label in (("approach1", "Approach 1 (envelope)"), ("approach2", "Approach 2 (IsoFLOP)"),
                       ("approach3", "Approach 3 (parametric)")):
        section = approaches.get(key)
        if section and "skipped" not in section:
            rows.append(f"| {label} | {section['a']:.4f} | {_interval_text(section, 'a')} | {section['b']:.4f} | "
                        f"{_interval_text(section, 'b')} |")
    if rows:
        lines += ["## Compute-optimal exponents N_opt ∝ C^a, D_opt ∝ C^b", "",
                  "| approach | a | 95% CI | b | 95% CI |", "|---|---|---|---|---|", *rows, ""]
    if "approach3" in approaches and "skipped" not in approaches["approach3"]:
        s = approaches["approach3"]
        lines += ["## Approach 3: L(N, D) = E + A/N^α + B/D^β", "",
                  f"Huber δ = {s['huber_delta']:g} on log-loss residuals, L-BFGS from {s['n_starts']} starts "
                  f"({s['init_grid']} grid), {s['n_points']} points"
                  + (f" ({s['dropped_lowest_tokens_per_param']} lowest tokens/param dropped)"
                     if s['dropped_lowest_tokens_per_param'] else "") + ".", "",
                  "| parameter | estimate | 80% CI | 95% CI |", "|---|---|---|---|"]
        for key in PARAMETRIC_KEYS:
            lines.append(f"| {key} | {s[key]:.4g} | {_interval_text(s, key, '80%')} | {_interval_text(s, key)} |")
        lines += ["", "### Compute-optimal allocation (C = 6ND)", "",
                  "| C (FLOPs) | N_opt | D_opt | tokens/param | loss |", "|---|---|---|---|---|"]
        for row in s["allocation"]:
            lines.append(f"| {row['C']:.3g} | {row['N_opt']:.3g} | {row['D_opt']:.3g} | "
                         f"{row['tokens_per_param']:.1f} | {row['loss']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(points: ScalingPoints, report: dict, fitted: dict, out_dir: Path) -> list[Path]:
    """fits.json, fit.json (when Approach 3 ran), summary.md and the PNG plots into `out_dir`."""
    from hibari.evaluation.scaling import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "fits.json", out_dir / "summary.md"]
    written[0].write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    written[1].write_text(summary_markdown(report))
    contract = contract_fit(report)
    if contract is not None:
        (out_dir / "fit.json").write_text(json.dumps(contract, indent=2, default=_json_default) + "\n")
        written.append(out_dir / "fit.json")
    kaplan_c = fitted["kaplan"]["L(C_min)"] if "kaplan" in fitted else None
    written.append(plots.plot_loss_vs_compute(points, out_dir / "loss_vs_compute.png", kaplan_c,
                                              fitted.get("envelope")))
    if "approach2" in fitted:
        written.append(plots.plot_isoflop_profiles(fitted["profiles"], fitted["approach2"],
                                                   out_dir / "isoflop_profiles.png"))
    law = fitted.get("approach3")
    if law is not None:
        used = fitted["approach3_points"]
        written.append(plots.plot_parametric_fit(used, law, out_dir / "parametric_fit.png"))
        written.append(plots.plot_predicted_vs_observed(used, law, out_dir / "predicted_vs_observed.png"))
    allocation_fits = {name: fitted[key] for key, name in (("approach1", "Approach 1"), ("approach2", "Approach 2"))
                       if key in fitted}
    if allocation_fits or law is not None:
        budgets = report["allocation_budgets"]
        span = (min(points.C.min(), min(budgets)), max(points.C.max(), max(budgets)))
        written.append(plots.plot_allocations(allocation_fits, law, span, out_dir / "optimal_allocation.png"))
    return written


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
