"""The planted-shortcut experiment: plain vs debiased classifiers on IMDB with a marker token.

    python -m hibari.align.shortcut --out runs/shortcut            # 4 losses x 3 seeds
    python -m hibari.align.shortcut --out runs/shortcut-bow --set bias.words=[]

For each seed: a plain (`ce`) run, then `reweight`, `poe` and `conf_reg` (its teacher: the
plain run of the same seed), each a `hibari classify` run of configs/classify/shortcut.py in
OUT/<loss>-s<seed> (rerunning skips finished runs and resumes unfinished ones). Then
OUT/summary.json (per-seed values; mean and standard error across seeds), OUT/table.md and
OUT/accuracy.png (bars: mean accuracy on the in-distribution and anti-biased test splits,
error bars one standard error across seeds).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from hibari.base.stats import mean_stderr

LOSSES = ("ce", "reweight", "poe", "conf_reg")
CONFIG = "configs/classify/shortcut.py"
SPLIT_NAMES = {"id": "in-distribution", "anti": "anti-biased"}


def nested(assignments: list[str]) -> dict:
    """["a.b=1", "c=[x]"] -> {"a": {"b": 1}, "c": ["x"]} (values parsed as YAML)."""
    import yaml
    out: dict = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        value = yaml.safe_load(value)
        node[leaf] = tuple(value) if isinstance(value, list) else value  # config lists: tuples
    return out


def run_one(loss: str, seed: int, out: Path, overrides: list[str], teacher: Path | None
            ) -> dict:
    from hibari.align.classify import build_classify
    from hibari.base.config_files import apply_overrides, load_python_config
    from hibari.train.loop import train
    workdir = out / f"{loss}-s{seed}"
    done = workdir / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    config = load_python_config(f"{CONFIG}:{loss}")
    extra = [f"seed={seed}"] + overrides
    if teacher is not None:
        extra.append(f"loss.teacher={teacher}")
    apply_overrides(config, nested(extra), "--set")
    start = time.perf_counter()
    task, finish = build_classify(config, workdir)
    summary = train(config, workdir, task)
    results = finish(summary["params"])
    results["seconds"] = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps(results, indent=2) + "\n")
    return results


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for loss, rs in runs.items():
        row = {"seeds": [r["seed"] for r in rs]}
        for split in ("id", "anti", "train"):
            values = [r[f"accuracy_{split}"] for r in rs]
            row[f"accuracy_{split}"] = values
            row[f"mean_{split}"] = float(np.mean(values))
            row[f"stderr_{split}"] = mean_stderr(values)
        out[loss] = row
    first = next(iter(runs.values()))[0]
    out["bias_model"] = {f"accuracy_{s}": first[f"bias_accuracy_{s}"]
                         for s in ("train", "id", "anti")}
    out["n"] = first["n"]
    return out


def table(summary: dict) -> str:
    lines = ["| loss | in-distribution acc. | anti-biased acc. | train acc. "
             "| per seed (id / anti) |", "|---|---|---|---|---|"]
    for loss in LOSSES:
        if loss not in summary:
            continue
        r = summary[loss]
        per_seed = ", ".join(f"{a:.3f} / {b:.3f}" for a, b in
                             zip(r["accuracy_id"], r["accuracy_anti"]))
        lines.append(f"| {loss} | {r['mean_id']:.3f} ± {r['stderr_id']:.3f} | "
                     f"{r['mean_anti']:.3f} ± {r['stderr_anti']:.3f} | "
                     f"{r['mean_train']:.3f} ± {r['stderr_train']:.3f} | {per_seed} |")
    b = summary["bias_model"]
    lines.append(f"| bias model | {b['accuracy_id']:.3f} | {b['accuracy_anti']:.3f} | "
                 f"{b['accuracy_train']:.3f} (out-of-fold) | |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    losses = [x for x in LOSSES if x in summary]
    x = np.arange(len(losses))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for j, split in enumerate(("id", "anti")):
        ax.bar(x + (j - 0.5) * 0.38, [summary[x_][f"mean_{split}"] for x_ in losses], 0.38,
               yerr=[summary[x_][f"stderr_{split}"] for x_ in losses], capsize=3,
               label=SPLIT_NAMES[split])
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, losses)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hibari.align.shortcut", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="experiment folder (one run dir per run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override for every run, e.g. steps=200 or bias.words=[]")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {loss: [] for loss in args.losses}
    for seed in args.seeds:
        teacher = None
        for loss in args.losses:
            if loss == "conf_reg":
                teacher = out / f"ce-s{seed}"
                if not (teacher / "results.json").exists():
                    run_one("ce", seed, out, args.set, None)
            r = run_one(loss, seed, out, args.set, teacher if loss == "conf_reg" else None)
            runs[loss].append(r)
            print(f"{loss} seed {seed}: id {r['accuracy_id']:.3f} anti {r['accuracy_anti']:.3f}"
                  f" ({r.get('seconds', '?')} s)", file=sys.stderr)
    summary = summarize(runs)
    summary["overrides"] = args.set
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(table(summary))
    plot(summary, out / "accuracy.png", f"IMDB + planted marker; {len(args.seeds)} seeds"
         + (f"; {' '.join(args.set)}" if args.set else ""))
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
