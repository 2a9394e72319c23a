"""`hibari scaling fit RESULTS [options]`: fit Kaplan and Chinchilla scaling laws to a results table."""
from __future__ import annotations

import argparse
import sys

from hibari.evaluation.scaling.data import ScalingDataError, load_points
from hibari.evaluation.scaling.report import (
    APPROACHES,
    INIT_GRIDS,
    FitSettings,
    fit_all,
    write_outputs,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hibari scaling", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit scaling laws to a results CSV/JSONL and write fits, a summary and plots",
                         description="Columns: N, loss, and D or C (C defaults to 6ND); optional run, step "
                                     "(training curves, used by Approach 1). Other columns are ignored.")
    fit.add_argument("results", help="results table (.csv or .jsonl)")
    fit.add_argument("--out", default="scaling_fit", help="output directory (default: ./scaling_fit)")
    fit.add_argument("--approaches", default=None,
                     help=f"comma-separated subset of {','.join(APPROACHES)} (default: all that the data supports)")
    fit.add_argument("--approach", action="append", default=None, choices=APPROACHES,
                     help="one approach to run (repeatable); same as --approaches")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for intervals (0: none)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.add_argument("--init-grid", choices=sorted(INIT_GRIDS), default="hoffmann",
                     help="Approach 3 L-BFGS starting grid: hoffmann (4500 starts) or coarse (243)")
    fit.add_argument("--huber-delta", type=float, default=1e-3, help="Huber δ on log-loss residuals")
    fit.add_argument("--budget-tol-dex", type=float, default=0.1,
                     help="Approach 2: runs whose log10 C differ by less than this share a budget")
    fit.add_argument("--isoflop-budgets", default=None,
                     help="Approach 2: comma-separated FLOP budgets; each run joins the nearest (default: "
                          "budgets found from gaps in C)")
    fit.add_argument("--budgets", default=None,
                     help="comma-separated FLOP budgets for the allocation table, e.g. 1e21,5.76e23")
    fit.add_argument("--drop-lowest-tokens-per-param", type=int, default=0, metavar="K",
                     help="Approach 3: leave out the K points with the fewest tokens per parameter")
    fit.add_argument("--rename", default=None, metavar="FIELD=COLUMN,...",
                     help="map fields to your column names, e.g. loss=eval_loss,N=params")
    return parser


def _parse_approaches(args) -> tuple[list[str], bool]:
    chosen: list[str] = []
    if args.approaches:
        for item in args.approaches.split(","):
            item = item.strip().lower()
            if item not in APPROACHES:
                raise ScalingDataError(f"--approaches: unknown approach {item!r}; choose from {','.join(APPROACHES)}")
            chosen.append(item)
    chosen += args.approach or []
    if not chosen:
        return list(APPROACHES), False
    return list(dict.fromkeys(chosen)), True


def _parse_rename(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ScalingDataError(f"--rename: {item!r} is not FIELD=COLUMN (e.g. loss=eval_loss)")
        mapping[field.strip()] = column.strip()
    return mapping


def _parse_budgets(text: str | None, option: str) -> list[float] | None:
    if not text:
        return None
    try:
        budgets = [float(v) for v in text.split(",")]
    except ValueError:
        raise ScalingDataError(f"{option}: {text!r} must be comma-separated numbers such as 1e21,1e23") from None
    if any(not b > 0 for b in budgets):
        raise ScalingDataError(f"{option}: every budget must be a positive number of FLOPs")
    return budgets


def fit_command(args) -> int:
    approaches, strict = _parse_approaches(args)
    if args.bootstrap < 0:
        raise ScalingDataError("--bootstrap must be 0 or more")
    if not args.huber_delta > 0:
        raise ScalingDataError("--huber-delta must be positive")
    settings = FitSettings(approaches=approaches, strict=strict, n_bootstrap=args.bootstrap, seed=args.seed,
                           init_grid=args.init_grid, huber_delta=args.huber_delta,
                           budget_tol_dex=args.budget_tol_dex,
                           isoflop_budgets=_parse_budgets(args.isoflop_budgets, "--isoflop-budgets"),
                           budgets=_parse_budgets(args.budgets, "--budgets"),
                           drop_lowest_tokens_per_param=args.drop_lowest_tokens_per_param)
    points = load_points(args.results, _parse_rename(args.rename))
    report, fitted = fit_all(points, settings)
    written = write_outputs(points, report, fitted, args.out)
    for key, section in report["approaches"].items():
        if "skipped" in section:
            print(f"{key}: skipped ({section['skipped']})")
        elif key == "kaplan":
            print("kaplan: " + ", ".join(f"{law} α={section[law]['exponent']:.4f}"
                                         for law in ("L(N)", "L(D)", "L(C_min)")))
        elif key == "approach3":
            print(f"approach3: E={section['E']:.4g} A={section['A']:.4g} B={section['B']:.4g} "
                  f"alpha={section['alpha']:.4f} beta={section['beta']:.4f} a={section['a']:.4f} b={section['b']:.4f}")
        else:
            print(f"{key}: a={section['a']:.4f} b={section['b']:.4f}")
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def scaling_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "fit":
        return fit_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(scaling_main())
