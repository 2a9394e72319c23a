"""Results: results.json (metrics), samples/<task>.jsonl (every scored example) and a markdown
table.

results.json holds, per task, the metrics of the first template with their standard errors,
every template's metrics, their spread and the skipped rows; the per-example records go to
`samples/<task>.jsonl` beside it, one JSON line per (template, variant, example) with at least
`id`, `pred`/`prediction`, `gold`/`answers` and, for log-likelihood tasks, `loglikelihoods` (one
per choice): every number in results.json can be recomputed from them.

An instruction-language run (`runner.evaluate_language_grid`) adds a `grid` per task (one
entry per instruction language x label language x template) and each record's `cell`;
`grid_table` renders it, written to results.grid.md (`grid_path`) beside results.json. A numeric
task (hibari.evaluation.numeric) also gets its score histograms, <task>.scores.png, beside it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _with_stderr(value, stderr) -> str:
    if isinstance(value, float) and isinstance(stderr, float):
        return f"{value:.4f} ± {stderr:.4f}"
    return _fmt(value)


def markdown_table(results: Sequence[dict]) -> str:
    """One row per (task, metric): value ± standard error of the first template, and mean ± std
    over templates."""
    lines = ["| task | kind | shots | n | metric | value ± s.e. | templates: mean ± std (n) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for name, value in r["metrics"].items():
            s = r["template_spread"].get(name)
            spread = (f"{s['mean']:.4f} ± {s['std']:.4f} ({len(r['templates'])})"
                      if s and len(r["templates"]) > 1 else "")
            shown = _with_stderr(value, r.get("stderr", {}).get(name))
            lines.append(f"| {r['task']} | {r['kind']} | {r['fewshot']} | {r['n']} | {name} | "
                         f"{shown} | {spread} |")
    return "\n".join(lines) + "\n"


GRID_LABELS = {"acc": "accuracy", "off_label_rate": "off-label rate",
               "label_first_rate": "label-first rate", "wrong_language_rate": "wrong-language rate"}


def grid_table(results: Sequence[dict]) -> str:
    """One table per task that has a `grid`: a row per (instruction language, label language,
    template) with n and each metric's value ± standard error; "(MT from en)" marks a
    machine-translated language."""
    blocks = []
    for r in results:
        if not r.get("grid"):
            continue
        names = list(dict.fromkeys(m for cell in r["grid"] for m in cell["metrics"]))
        lines = [f"{r['task']} ({r['kind']}, {r['fewshot']}-shot): instruction language x "
                 "label language", "",
                 "| instruction | labels | template | n | " +
                 " | ".join(f"{GRID_LABELS.get(m, m)} ± s.e." for m in names) + " |",
                 "|---|---|---|---|" + "---|" * len(names)]
        for cell in r["grid"]:
            mt = cell.get("machine_translated", {})
            shown = [f"{c} (MT from {mt[c]})" if c in mt else c
                     for c in (cell["instruction"], cell["labels"])]
            values = [_with_stderr(cell["metrics"][m], cell["stderr"].get(m))
                      if m in cell["metrics"] else "" for m in names]
            lines.append(f"| {shown[0]} | {shown[1]} | {cell['template']} | {cell['n']} | " +
                         " | ".join(values) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def grid_path(json_path: str | Path) -> Path:
    """Where `write_results` puts the instruction-language grid tables: results.grid.md."""
    return Path(json_path).with_suffix(".grid.md")


def write_results(out: str | Path, results: Sequence[dict], meta: dict) -> tuple[Path, Path]:
    """`out` is a directory (results.json + results.md + samples/ inside) or a *.json file path
    (the table and samples/ go beside it); results.grid.md too when a result has a `grid`."""
    out = Path(out)
    json_path = out if out.suffix == ".json" else out / "results.json"
    samples_dir = json_path.parent / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    md_path = json_path.with_suffix(".md")
    summary = []
    for r in results:
        path = samples_dir / f"{r['task']}.jsonl"
        path.write_text("".join(json.dumps(rec, ensure_ascii=False, default=str) + "\n"
                                for rec in r.get("records", [])), encoding="utf-8")
        extra = {}
        if r.get("kind") == "numeric" and r.get("records"):  # the score histograms
            from hibari.evaluation.numeric import plot_histograms
            first = r["templates"][0]["index"]
            png = plot_histograms([{"name": r["task"], "records": [
                x for x in r["records"] if x.get("template", first) == first]}],
                json_path.parent / f"{r['task']}.scores.png")
            extra["histogram"] = png.name
        summary.append({**{k: v for k, v in r.items() if k != "records"},
                        "samples": str(path.relative_to(json_path.parent)), **extra})
    json_path.write_text(json.dumps({"meta": meta, "results": summary}, indent=1,
                                    ensure_ascii=False, default=str), encoding="utf-8")
    md_path.write_text(markdown_table(results), encoding="utf-8")
    if any(r.get("grid") for r in results):
        grid_path(json_path).write_text(grid_table(results), encoding="utf-8")
    return json_path, md_path


def read_samples(results_json: str | Path) -> dict[str, list[dict]]:
    """{task: its sample records} of a results.json written by `write_results`."""
    results_json = Path(results_json)
    data = json.loads(results_json.read_text(encoding="utf-8"))
    return {r["task"]: [json.loads(line) for line in
                        (results_json.parent / r["samples"]).read_text(encoding="utf-8")
                        .splitlines() if line.strip()]
            for r in data["results"]}
