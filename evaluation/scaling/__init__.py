"""Scaling-law fitting: Kaplan power laws, Chinchilla Approaches 1-3, compute-optimal allocation.

See docs/scaling.md for the methods and `hibari scaling fit --help` for the command.
"""
from hibari.evaluation.scaling.bootstrap import bootstrap, percentile_intervals
from hibari.evaluation.scaling.chinchilla import (
    COARSE_INIT_GRID,
    HOFFMANN_INIT_GRID,
    HUBER_DELTA,
    AllocationFit,
    IsoFlopProfile,
    ParametricLaw,
    compute_optimal_allocation,
    fit_approach1,
    fit_approach2,
    fit_parametric_law,
    isoflop_profiles,
    optimal_allocation_exponents,
    training_curve_envelope,
)
from hibari.evaluation.scaling.data import (
    ScalingDataError,
    ScalingFitError,
    ScalingPoints,
    load_points,
    points_from_arrays,
)
from hibari.evaluation.scaling.kaplan import PowerLawFit, fit_kaplan, fit_power_law, pareto_frontier

__all__ = [
    "AllocationFit", "COARSE_INIT_GRID", "HOFFMANN_INIT_GRID", "HUBER_DELTA", "IsoFlopProfile", "ParametricLaw",
    "PowerLawFit", "ScalingDataError", "ScalingFitError", "ScalingPoints", "bootstrap", "compute_optimal_allocation",
    "fit_approach1", "fit_approach2", "fit_kaplan", "fit_parametric_law", "fit_power_law", "isoflop_profiles",
    "load_points", "optimal_allocation_exponents", "pareto_frontier", "percentile_intervals", "points_from_arrays",
    "training_curve_envelope",
]
