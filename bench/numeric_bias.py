"""Numeric-bias study (issue 16): does alignment collapse a judge's scores onto few values?

    nice -n 5 python bench/numeric_bias.py --out /tmp/numeric_study \\
        --quickstart runs/quickstart --gguf /models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --questions 40 [--generation 30]

Runs the vendored task `numeric_graded_answers` (hibari.evaluation.numeric; 237 graded answers
to 79 questions, gold 3 > 2 > 1 by construction) with scores read from the logits on the ranges
1-5, 0-9 and 1-100, for the quickstart's pretrained, SFT and DPO models (all three prompted with
the Alpaca template the SFT and DPO stages trained on, so only the weights differ) and for
SmolLM2-135M-Instruct (its ChatML turn format). `--questions Q` keeps the first Q/2 seed-task
and the first Q/2 ASDiv questions (each with its 3 answers); `--generation N` also runs SmolLM2
with greedy generation (scores parsed) on the first N of those items. Writes
results.json (metrics and standard errors per model and read), records/<model>.jsonl,
table.md (model x range: kurtosis, entropy, modal share, Kendall tau-b with its p-value, mean
score) and histograms.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from hibari.base.files import write_atomic
from hibari.configs.judge.arena import SMOLLM2_CHATML, template
from hibari.evaluation import numeric as N
from hibari.evaluation.formats import graded_jsonl
from hibari.evaluation.lm import load_lm
from hibari.evaluation.tasks import TASK_DIR, check_wrap, load_task


def select(examples, questions: int):
    """The items of the first questions/2 questions of each source (all three answers)."""
    keep = set()
    for source in ("seed", "asdiv"):
        keep |= {f"{source}-{i}" for i in range(questions // 2)}
    return [e for e in examples if e["id"].rsplit("-", 1)[0] in keep]


def _fmt(m: dict, se: dict, key: str, digits: int = 2) -> str:
    v = m.get(key)
    if v is None:
        return "–"
    s = se.get(key)
    return f"{v:.{digits}f}" + (f" ± {s:.{digits}f}" if s else "")


def table(rows: list[tuple[str, str, dict, dict]], ranges) -> str:
    lines = ["| model | read | range | kurtosis | entropy (bits) | modal share (score) | "
             "Kendall τ-b (p) | τ-b of expected (p) | mean score | mean expected | "
             "item entropy (bits) | parse failures |", "|" + "---|" * 12]
    for name, read, m, se in rows:
        for low, high in ranges:
            r = f"{low}-{high}/"
            mm = {k[len(r):]: v for k, v in m.items() if k.startswith(r)}
            ss = {k[len(r):]: v for k, v in se.items() if k.startswith(r)}
            tau, tau_x = (("–" if mm.get(f"kendall_tau_b{x}") is None else
                           f"{mm[f'kendall_tau_b{x}']:.3f} ({mm[f'kendall_p{x}']:.1e})")
                          for x in ("", "_expected"))
            lines.append(
                f"| {name} | {read} | {low}-{high} | {_fmt(mm, ss, 'kurtosis')} | "
                f"{_fmt(mm, ss, 'entropy_bits')} | {_fmt(mm, ss, 'modal_share')} "
                f"({mm.get('modal_score')}) | {tau} | {tau_x} | {_fmt(mm, ss, 'mean_score')} | "
                f"{_fmt(mm, ss, 'mean_expected')} | {_fmt(mm, ss, 'item_entropy_bits')} | "
                f"{_fmt(mm, ss, 'parse_failure_rate')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quickstart", type=Path, default=Path("runs/quickstart"),
                   help="the quickstart run directory (pretrain/, sft/, dpo/ inside)")
    p.add_argument("--gguf", type=Path, default=None, help="SmolLM2-135M-Instruct GGUF file")
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--generation", type=int, default=0,
                   help="SmolLM2 items also judged by greedy generation (0 = none)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    task = load_task(TASK_DIR / "numeric_graded_answers.yaml")
    examples = select(graded_jsonl(task.data_path), args.questions)
    alpaca = template("alpaca_en").without_input
    chatml = template(SMOLLM2_CHATML).without_input
    models = [(stage, args.quickstart / stage, alpaca) for stage in ("pretrain", "sft", "dpo")]
    if args.gguf:
        models.append(("smollm2-instruct", args.gguf, chatml))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "records").mkdir(exist_ok=True)
    results, rows, plots = {}, [], []
    t_all = time.perf_counter()
    for name, ckpt, wrap in models:
        lm = load_lm(ckpt, batch_size=args.batch_size)
        runs = [("logits", examples)]
        if args.generation and name == "smollm2-instruct":
            runs.append(("generation", examples[:args.generation]))
        for read, items in runs:
            spec = dataclasses.replace(task.numeric, wrap=check_wrap(wrap, name), read=read)
            t = dataclasses.replace(task)
            t.numeric = spec
            if name == "smollm2-instruct":
                t.stop = ("<|im_end|>", "\n")
            t0 = time.perf_counter()
            m, se, recs = N.run_numeric(lm, t, t.templates[0], items, [], 0)
            secs = time.perf_counter() - t0
            key = f"{name}/{read}"
            results[key] = {"checkpoint": str(ckpt), "read": read, "n": len(items),
                            "seconds": round(secs, 1), "metrics": m, "stderr": se}
            rows.append((name, read, m, se))
            plots.append({"name": key, "records": recs})
            write_atomic(args.out / "records" / f"{name}-{read}.jsonl",
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
            print(f"{key}: {len(items)} items in {secs:.0f} s", flush=True)
    results["_meta"] = {"items": len(examples), "questions": args.questions,
                        "seconds": round(time.perf_counter() - t_all, 1),
                        "ranges": [list(r) for r in task.numeric.ranges]}
    write_atomic(args.out / "results.json", json.dumps(results, indent=1))
    md = table(rows, task.numeric.ranges)
    write_atomic(args.out / "table.md", md)
    N.plot_histograms([p for p in plots if p["name"].endswith("/logits")],
                      args.out / "histograms.png")
    if any(p["name"].endswith("/generation") for p in plots):
        N.plot_histograms([p for p in plots if p["name"].startswith("smollm2")],
                          args.out / "histograms_smollm2_read.png")
    print(md)


if __name__ == "__main__":
    main()
