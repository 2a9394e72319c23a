"""Ablation report of a finished (or partly finished) sweep: `WORKDIR/report/`.

Members that differ only in their variant and seed share a *setting* (same width, budget, lr).
For each setting: a markdown table of the variants' final eval loss (mean ± std, min/max over
seeds), best loss, and loss at equal FLOPs; and a PNG with eval-loss curves against tokens and
against training FLOPs (attention-inclusive), the mean over seeds with ±std and min/max bands.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from hibari.base.errors import UserError


class SweepReportError(UserError, ValueError):
    """The sweep directory has no results to report; the message says what to do."""


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        raise SweepReportError(f"{path}: not found; run `hibari sweep --config ... --workdir "
                               f"{path.parent}` first (it writes results.csv and curves.csv)")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _curves_by_setting(curve_rows: list[dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """setting -> variant -> seed -> {"step", "tokens", "flops", "loss"} arrays sorted by step."""
    grouped: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in curve_rows:
        grouped[r["setting"]][r["variant"]][r["seed"]].append(
            (int(r["step"]), float(r["tokens"]), float(r["C_attention"]), float(r["loss"])))
    out: dict = {}
    for setting, variants in grouped.items():
        out[setting] = {}
        for variant, seeds in variants.items():
            out[setting][variant] = {}
            for seed, points in seeds.items():
                step, tokens, flops, loss = map(np.asarray, zip(*sorted(points)))
                out[setting][variant][seed] = dict(step=step, tokens=tokens, flops=flops, loss=loss)
    return out


def seed_spread(seeds: dict[str, dict]) -> dict[str, np.ndarray]:
    """Mean, std, min, max of the loss over seeds at the eval steps all seeds share."""
    common = sorted(set.intersection(*(set(c["step"].tolist()) for c in seeds.values())))
    first = next(iter(seeds.values()))
    index = {s: i for i, s in enumerate(first["step"].tolist())}
    losses = np.stack([np.asarray([c["loss"][c["step"].tolist().index(s)] for s in common])
                       for c in seeds.values()])
    pick = [index[s] for s in common]
    return dict(step=np.asarray(common), tokens=first["tokens"][pick], flops=first["flops"][pick],
                mean=losses.mean(0), std=losses.std(0, ddof=1) if len(losses) > 1 else
                np.zeros(len(common)), min=losses.min(0), max=losses.max(0), n=len(losses))


def loss_at_flops(spread: dict, flops: float) -> float:
    """The mean curve interpolated linearly in log FLOPs; NaN outside the evaluated range."""
    x = np.log(spread["flops"])
    if not x[0] <= math.log(flops) <= x[-1]:
        return math.nan
    return float(np.interp(math.log(flops), x, spread["mean"]))


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def setting_table(setting: str, spreads: dict[str, dict], results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows comparing the variants of one setting (the first variant is the reference)."""
    equal_flops = min(s["flops"][-1] for s in spreads.values())
    reference = None
    lines = []
    for variant, spread in spreads.items():
        rows = results.get(variant, [])
        best = [float(r["best_eval_loss"]) for r in rows]
        at_c = loss_at_flops(spread, equal_flops)
        final = spread["mean"][-1]
        reference = final if reference is None else reference
        n_total = rows[0]["N_total"] if rows else ""
        lines.append(
            f"| {setting} | {variant} | {spread['n']} | {n_total} | {int(spread['tokens'][-1]):,} | "
            f"{spread['flops'][-1]:.3g} | {_fmt(final, spread['std'][-1], spread['n'])} | "
            f"{spread['min'][-1]:.4f} – {spread['max'][-1]:.4f} | "
            f"{min(best):.4f} | {at_c:.4f} @ {equal_flops:.3g} | {final - reference:+.4f} |"
            if best else f"| {setting} | {variant} | {spread['n']} | | | | | | | | |")
    return lines


def plot_setting(setting: str, spreads: dict[str, dict], path: Path) -> None:
    """Eval loss vs tokens and vs FLOPs: mean over seeds, ±std band, min/max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "tokens", "tokens"),
                           (axes[1], "flops", "training FLOPs (attention-inclusive)")):
        for i, (variant, s) in enumerate(spreads.items()):
            color = f"C{i}"
            ax.plot(s[key], s["mean"], color=color, marker="o", ms=3,
                    label=f"{variant} (n={s['n']})")
            if s["n"] > 1:
                ax.fill_between(s[key], s["mean"] - s["std"], s["mean"] + s["std"], color=color,
                                alpha=0.3, lw=0)
                ax.fill_between(s[key], s["min"], s["max"], color=color, alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle(f"{setting}: eval loss (mean over seeds; bands ±std and min/max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(workdir: str | Path) -> Path:
    """Write `WORKDIR/report/report.md` and one PNG per setting; returns the markdown path."""
    workdir = Path(workdir)
    results = _read_csv(workdir / "results.csv")
    curves = _curves_by_setting(_read_csv(workdir / "curves.csv"))
    if not curves:
        raise SweepReportError(f"{workdir}/curves.csv has no rows: no member has finished yet")
    out = workdir / "report"
    out.mkdir(exist_ok=True)
    by_setting: dict = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_setting[r["setting"]][r["variant"]].append(r)
    lines = [f"# Sweep report: {workdir.name}", "",
             "Final eval loss per variant (mean ± sample std over seeds, min – max); Δ is the "
             "final mean minus the first variant's. *At equal FLOPs*: each variant's mean curve "
             "interpolated (in log FLOPs) at the smallest final training-FLOP count of the "
             "setting's variants.", "",
             "| setting | variant | seeds | N | D | FLOPs | final eval loss | min – max | best | "
             "at equal FLOPs | Δ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    plots = []
    for setting in sorted(curves):
        spreads = {v: seed_spread(seeds) for v, seeds in curves[setting].items()}
        lines += setting_table(setting, spreads, by_setting[setting])
        png = out / f"{setting}.png"
        plot_setting(setting, spreads, png)
        plots.append(png.name)
    lines += ["", "## Curves", ""] + [f"![{p}]({p})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
