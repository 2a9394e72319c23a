"""Scaling-law fitting: recovery of known laws, the allocation formula, bootstrap, data errors, CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import check_grad

import hibari.cli
from hibari.base.resources import resource_path
from hibari.evaluation.scaling import (
    ParametricLaw,
    ScalingDataError,
    bootstrap,
    compute_optimal_allocation,
    fit_approach1,
    fit_approach2,
    fit_kaplan,
    fit_parametric_law,
    fit_power_law,
    load_points,
    optimal_allocation_exponents,
    pareto_frontier,
    points_from_arrays,
    report,
)
from hibari.evaluation.scaling.chinchilla import huber_objective_and_grad
from hibari.evaluation.scaling.cli import scaling_main
from hibari.evaluation.scaling.synthetic import (
    HOFFMANN_LAW,
    isoflop_sweep,
    random_sweep,
    training_curves,
)

# 32 starts spanning the region of the Hoffmann grid where LLM fits land; keeps each fit ~1 s.
SMALL_GRID = {"a": (5.0, 15.0), "b": (5.0, 15.0), "e": (0.0, 0.5), "alpha": (0.25, 0.5), "beta": (0.25, 0.5)}
CHINCHILLA_CSV = resource_path("hibari.evaluation", "scaling", "assets",
                               "chinchilla_svg_extracted_data.csv")
# Besiroglu et al. 2024, Table 1: estimate and bootstrap standard error (fit on 240 points).
BESIROGLU = {"E": (1.8172, 0.03), "A": (482.01, 124.58), "B": (2085.43, 1293.23),
             "alpha": (0.3478, 0.02), "beta": (0.3658, 0.02)}
Z80 = 1.2816  # two-sided 80% normal quantile


def test_huber_objective_gradient_matches_finite_differences():
    pts = random_sweep(HOFFMANN_LAW, 50, noise=0.02, seed=0)
    args = (np.log(pts.N), np.log(pts.D), np.log(pts.loss), 1e-3)
    f = lambda th: huber_objective_and_grad(th, *args)[0]  # noqa: E731
    g = lambda th: huber_objective_and_grad(th, *args)[1]  # noqa: E731
    for theta in ([6.0, 6.0, 0.5, 0.34, 0.28], [3.0, 9.0, -0.2, 0.6, 0.4]):
        theta = np.asarray(theta)
        assert check_grad(f, g, theta, epsilon=1e-7) < 1e-5 * max(1.0, np.linalg.norm(g(theta)))


def test_approach3_recovers_parameters_exactly_without_noise():
    law = ParametricLaw(E=2.0, A=300.0, B=1000.0, alpha=0.30, beta=0.40)
    pts = random_sweep(law, 60, noise=0.0, seed=1)
    fitted = fit_parametric_law(pts.N, pts.D, pts.loss, SMALL_GRID)
    for key, value in law.as_dict().items():
        assert getattr(fitted, key) == pytest.approx(value, rel=1e-3), key


def test_approach3_recovers_parameters_from_noisy_points():
    pts = random_sweep(HOFFMANN_LAW, 200, noise=0.005, seed=3)
    fitted = fit_parametric_law(pts.N, pts.D, pts.loss, SMALL_GRID)
    assert fitted.E == pytest.approx(HOFFMANN_LAW.E, abs=0.03)
    assert fitted.alpha == pytest.approx(HOFFMANN_LAW.alpha, abs=0.02)
    assert fitted.beta == pytest.approx(HOFFMANN_LAW.beta, abs=0.02)
    truth, found = optimal_allocation_exponents(HOFFMANN_LAW), optimal_allocation_exponents(fitted)
    assert found["a"] == pytest.approx(truth["a"], abs=0.02)


@pytest.mark.parametrize("compute", [1e19, 1e22, 5.76e23])
def test_allocation_formula_matches_brute_force(compute):
    law = HOFFMANN_LAW
    sizes = np.logspace(6, 13, 200_001)
    brute_n = sizes[np.argmin(law.loss(sizes, compute / (6 * sizes)))]
    alloc = compute_optimal_allocation(law, [compute])
    assert alloc["N_opt"][0] == pytest.approx(brute_n, rel=2e-4)
    assert 6 * alloc["N_opt"][0] * alloc["D_opt"][0] == pytest.approx(compute, rel=1e-9)
    assert alloc["tokens_per_param"][0] == pytest.approx(alloc["D_opt"][0] / alloc["N_opt"][0])
    assert alloc["loss"][0] == pytest.approx(np.min(law.loss(sizes, compute / (6 * sizes))), rel=1e-9)


def test_approach2_recovers_exponents():
    truth = optimal_allocation_exponents(HOFFMANN_LAW)
    exact, profiles, skipped = fit_approach2(isoflop_sweep(HOFFMANN_LAW, np.logspace(18, 22, 5), span_dex=0.5))
    assert len(profiles) == 5 and not skipped
    assert exact.a == pytest.approx(truth["a"], abs=0.005)
    assert exact.b == pytest.approx(truth["b"], abs=0.005)
    noisy, _, _ = fit_approach2(isoflop_sweep(HOFFMANN_LAW, np.logspace(18, 22, 5), noise=0.005, seed=1))
    assert noisy.a == pytest.approx(truth["a"], abs=0.02)
    assert noisy.b == pytest.approx(truth["b"], abs=0.02)


def test_approach2_reports_points_that_are_not_isoflop_profiles():
    # Compute rising steadily, 0.15 decades apart: no group of runs shares a budget.
    compute = np.logspace(18, 22, 27)
    sizes = np.logspace(7, 10, 27)[np.random.default_rng(2).permutation(27)]
    pts = points_from_arrays(sizes, HOFFMANN_LAW.loss(sizes, compute / (6 * sizes)), C=compute)
    with pytest.raises(report.ScalingFitError, match="IsoFLOP budgets with 3\\+ model sizes"):
        fit_approach2(pts)


def test_approach1_recovers_exponents_from_training_curves():
    truth = optimal_allocation_exponents(HOFFMANN_LAW)
    curves = training_curves(HOFFMANN_LAW, np.logspace(7, 10.5, 36), max_tokens=3e12, n_steps=80)
    assert curves.has_curves
    fit = fit_approach1(curves, n_grid=40)
    assert fit.a == pytest.approx(truth["a"], abs=0.03)
    assert fit.b == pytest.approx(truth["b"], abs=0.03)


def test_approach1_refuses_an_envelope_won_by_one_size():
    """Three sizes whose middle one is lowest at every compute: N_opt cannot be read (a = 0)."""
    sizes, runs, steps, compute, losses = [], [], [], [], []
    for n, offset in ((1e6, 0.3), (2e6, 0.0), (4e6, 0.2)):
        for i, c in enumerate(np.logspace(15, 17, 12)):
            sizes.append(n), runs.append(f"n{n:g}"), steps.append(i), compute.append(c)
            losses.append(3.0 + offset + 5.0 * (c / 1e15) ** -0.2)
    pts = points_from_arrays(np.array(sizes), np.array(losses), C=np.array(compute),
                             run=np.array(runs), step=np.array(steps, float))
    with pytest.raises(report.ScalingFitError, match="one model size .* wins the whole envelope"):
        fit_approach1(pts)


def test_kaplan_recovers_exponents():
    # Kaplan et al. 2020 joint law. L(N) takes each size's best loss, reached at the largest D, where
    # the data term is negligible; L(D) likewise takes each token count's best, at the largest N.
    alpha_n, n_c, alpha_d, d_c = 0.076, 8.8e13, 0.095, 5.4e13

    def kaplan_joint(N, D):
        return ((n_c / N) ** (alpha_n / alpha_d) + d_c / D) ** alpha_d

    N, D = (m.ravel() for m in np.meshgrid(np.logspace(6, 9, 7), np.r_[np.logspace(8, 11, 4), 1e19]))
    fits = fit_kaplan(points_from_arrays(N, kaplan_joint(N, D), D=D))
    assert fits["L(N)"].exponent == pytest.approx(alpha_n, abs=0.002)
    assert fits["L(N)"].x_c == pytest.approx(n_c, rel=0.2)
    N, D = (m.ravel() for m in np.meshgrid(np.r_[np.logspace(6, 9, 4), 1e17], np.logspace(8, 11, 7)))
    fits = fit_kaplan(points_from_arrays(N, kaplan_joint(N, D), D=D))
    assert fits["L(D)"].exponent == pytest.approx(alpha_d, abs=0.002)
    assert fits["L(D)"].x_c == pytest.approx(d_c, rel=0.2)
    # L(C_min): points on (C_c/C)^α_C plus dominated points above the frontier.
    rng = np.random.default_rng(0)
    compute = np.logspace(17, 22, 30)
    frontier_loss = (2.3e8 / compute) ** 0.050
    dominated = compute * 10 ** rng.uniform(-0.3, 0.3, 30)
    all_compute = np.r_[compute, dominated]
    pts = points_from_arrays(np.sqrt(all_compute / 120), np.r_[frontier_loss, (2.3e8 / dominated) ** 0.050 * 1.05],
                             C=all_compute)  # 20 tokens per parameter
    front = pareto_frontier(pts.C, pts.loss)
    assert set(front.tolist()) == set(range(30))
    fit = fit_power_law(pts.C[front], pts.loss[front])
    assert fit.exponent == pytest.approx(0.050, abs=1e-9)
    assert fit_kaplan(pts)["L(C_min)"].exponent == pytest.approx(0.050, abs=1e-9)


def test_bootstrap_intervals_cover_the_truth():
    # A single draw: the equal-tailed 95% percentile interval is not exact, so the data are chosen
    # informative enough (200 points, 0.5% noise) that coverage does not hinge on the seed.
    pts = random_sweep(HOFFMANN_LAW, 200, noise=0.005, seed=5)
    start = fit_parametric_law(pts.N, pts.D, pts.loss, SMALL_GRID).log_params()[None, :]

    def refit(p):
        law = fit_parametric_law(p.N, p.D, p.loss, start)
        return {"E": law.E, "alpha": law.alpha, "beta": law.beta, **optimal_allocation_exponents(law)}

    boot = bootstrap(pts, refit, n_resamples=40, seed=0)
    assert boot["failed"] == 0
    truth = {"E": HOFFMANN_LAW.E, "alpha": HOFFMANN_LAW.alpha, "beta": HOFFMANN_LAW.beta,
             "a": optimal_allocation_exponents(HOFFMANN_LAW)["a"]}
    for key, value in truth.items():
        lo, hi = boot["intervals"][key]["95%"]
        assert lo <= value <= hi, (key, lo, value, hi)
        lo80, hi80 = boot["intervals"][key]["80%"]
        assert lo <= lo80 <= hi80 <= hi  # the 80% interval nests inside the 95% one


def test_chinchilla_data_reproduces_besiroglu_within_their_intervals():
    pts = load_points(CHINCHILLA_CSV)
    assert len(pts) == 245
    used = report.drop_lowest_tokens_per_param(pts, 5)  # Besiroglu et al. fit 240 points
    assert len(used) == 240
    law, objective = fit_parametric_law(used.N, used.D, used.loss, SMALL_GRID, return_objective=True)
    for key, (estimate, se) in BESIROGLU.items():
        assert abs(getattr(law, key) - estimate) <= Z80 * se, (key, getattr(law, key), estimate)
    published = ParametricLaw(**{k: v[0] for k, v in BESIROGLU.items()})
    args = (np.log(used.N), np.log(used.D), np.log(used.loss))
    assert objective <= huber_objective_and_grad(published.log_params(), *args)[0]
    # Approach 2 on the same runs, grouped into Hoffmann et al.'s nine IsoFLOP budgets: their
    # Table 2 gives a = 0.49 with interval (0.462, 0.534).
    budgets = [6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21]
    fit, profiles, _ = fit_approach2(pts, budgets=budgets)
    assert len(profiles) == 9
    assert 0.462 <= fit.a <= 0.534


@pytest.mark.parametrize("content, suffix, message", [
    ("N,D\n1e8,2e9\n", ".csv", r"missing column\(s\) 'loss'"),
    ("N,loss\n1e8,3.0\n", ".csv", r"'D or C'"),
    ("n,D,loss\n1e8,2e9,3.0\n", ".csv", r"did you mean 'n' for 'N'"),
    ("N,D,loss\n1e8,2e9,3.0\n2e8,abc,2.9\n", ".csv", r"line 3, column 'D': 'abc' is not a number"),
    ("N,D,loss\n1e8,2e9,3.0\n2e8,4e9,\n", ".csv", r"line 3, column 'loss': empty value"),
    ("N,D,loss\n-1e8,2e9,3.0\n", ".csv", r"line 2, column 'N': '-1e8' must be a positive"),
    ("N,D,loss\n", ".csv", r"header only"),
    ('{"N": 1e8, "D": 2e9, "loss": 3.0}\n{"N": 2e8, "D": 4e9\n', ".jsonl", r"line 2 is not valid JSON"),
    ('{"N": 1e8, "D": 2e9, "loss": "nan"}\n', ".jsonl", r"line 1, column 'loss': 'nan' must be a positive"),
    ("N,D,loss\n1e8,2e9,3.0\n", ".txt", r"unknown extension '.txt'"),
])
def test_bad_results_files_name_file_row_and_column(tmp_path, content, suffix, message):
    path = tmp_path / f"results{suffix}"
    path.write_text(content)
    with pytest.raises(ScalingDataError, match=message) as info:
        load_points(path)
    assert str(path) in str(info.value)


def test_results_columns_can_be_renamed_and_c_alone_suffices(tmp_path):
    path = tmp_path / "sweep.csv"
    path.write_text("member,params,flops,eval_loss,notes\nm1,1e8,1.2e18,3.1,x\nm2,2e8,2.4e18,2.9,y\n")
    pts = load_points(path, {"N": "params", "C": "flops", "loss": "eval_loss", "run": "member"})
    np.testing.assert_allclose(pts.D, [2e9, 2e9])
    assert list(pts.run) == ["m1", "m2"]


@pytest.fixture
def small_coarse_grid(monkeypatch):
    monkeypatch.setitem(report.INIT_GRIDS, "coarse", SMALL_GRID)


@pytest.mark.slow
def test_cli_fit_writes_fits_json_summary_and_plots(tmp_path, small_coarse_grid):
    import hibari.cli

    pts = isoflop_sweep(HOFFMANN_LAW, np.logspace(18, 21, 4), sizes_per_budget=7, noise=0.003, seed=4)
    csv = tmp_path / "results.csv"
    rows = ["run,N,D,loss,notes"] + [f"{r},{float(n)!r},{float(d)!r},{float(l)!r},ignored"
                                     for r, n, d, l in zip(pts.run, pts.N, pts.D, pts.loss)]
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "fit"
    code = hibari.cli.main(["scaling", "fit", str(csv), "--out", str(out), "--bootstrap", "8", "--init-grid", "coarse",
                        "--budgets", "1e21,1e23"])
    assert code == 0
    fits = json.loads((out / "fits.json").read_text())
    assert set(fits["approaches"]) == {"kaplan", "approach1", "approach2", "approach3"}
    truth = optimal_allocation_exponents(HOFFMANN_LAW)
    assert fits["approaches"]["approach2"]["a"] == pytest.approx(truth["a"], abs=0.03)
    a3 = fits["approaches"]["approach3"]
    assert a3["alpha"] == pytest.approx(HOFFMANN_LAW.alpha, abs=0.05)
    assert [row["C"] for row in a3["allocation"]] == [1e21, 1e23]
    assert a3["intervals"]["alpha"]["95%"][0] <= a3["alpha"] <= a3["intervals"]["alpha"]["95%"][1]
    contract = json.loads((out / "fit.json").read_text())
    assert {"E", "A", "B", "alpha", "beta", "intervals"} <= set(contract)
    assert set(contract["intervals"]["E"]) == {"80%", "95%"}
    assert "Approach 3" in (out / "summary.md").read_text()
    for name in ("loss_vs_compute", "isoflop_profiles", "parametric_fit", "predicted_vs_observed",
                 "optimal_allocation"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_cli_reports_errors_without_writing(tmp_path, capsys, small_coarse_grid):
    pts = random_sweep(HOFFMANN_LAW, 30, seed=6)
    csv = tmp_path / "random.csv"
    csv.write_text("N,D,loss\n" + "".join(f"{float(n)!r},{float(d)!r},{float(l)!r}\n" for n, d, l in zip(pts.N, pts.D, pts.loss)))
    out = tmp_path / "out"
    assert hibari.cli.main(["scaling", "fit", str(csv), "--out", str(out), "--approaches", "2",
                            "--bootstrap", "0"]) == 1
    assert "approach2" in capsys.readouterr().err and not out.exists()
    assert hibari.cli.main(["scaling", "fit", str(tmp_path / "missing.csv"), "--out",
                            str(out)]) == 1
    assert "no such file" in capsys.readouterr().err
    assert hibari.cli.main(["scaling", "fit", str(csv), "--out", str(out), "--approaches",
                            "4"]) == 1
    assert "unknown approach '4'" in capsys.readouterr().err
    # The default set skips what the data cannot support and says why.
    assert scaling_main(["fit", str(csv), "--out", str(out), "--bootstrap", "0", "--init-grid", "coarse"]) == 0
    fits = json.loads((out / "fits.json").read_text())
    assert "IsoFLOP" in fits["approaches"]["approach2"]["skipped"]
    assert "E" in json.loads((out / "fit.json").read_text())


def test_vendored_chinchilla_tiny_sweep_gives_the_documented_fit():
    """docs/sweeps.md quotes these numbers from docs/results/chinchilla_tiny (a real CPU sweep)."""
    pts = load_points(Path(__file__).resolve().parents[1] / "docs/results/chinchilla_tiny/curves.csv")
    fit, profiles, skipped = fit_approach2(pts.final_points())
    assert not skipped and len(profiles) == 3
    assert fit.a == pytest.approx(0.458, abs=1e-3) and fit.b == pytest.approx(0.542, abs=1e-3)
    sizes = np.unique(pts.N)
    for p, n_opt in zip(profiles, (62.9e3, 88.3e3, 119.1e3)):
        assert sizes.min() < p.N_opt < sizes.max()  # every minimum inside the sizes trained
        assert p.N_opt == pytest.approx(n_opt, rel=2e-3)
