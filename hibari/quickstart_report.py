"""The quickstart's `report.md` / `report.html`: numbers per stage, loss curves (PNG), the
evaluation table, sample generations and the command that reruns each stage alone.

The report is a list of blocks rendered twice (markdown and HTML), rebuilt from the stage
records and run directories on every quickstart run (cheap; nothing is recomputed).
"""
from __future__ import annotations

import html
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from hibari.sweep import read_member_metrics
from hibari.train.metrics import metric_series, plot_panels

MODEL_TITLES = {"pretrain": "pretrained", "sft": "SFT", "dpo": "DPO"}
SECTIONS = ("Stages", "1. Data", "2. Pretraining", "3. Instruction tuning (SFT)",
            "4. Preference optimisation (DPO)", "5. Evaluation", "6. Sample generations",
            "7. Run each stage alone", "8. LLM-as-a-judge (optional stage)",
            "9. SliCK knowledge probe (optional stage)")
CHANCE = {"commonsense_qa_sample": 0.2, "piqa_sample": 0.5, "openbookqa_sample": 0.25,
          "mmlu_sample": 0.25, "boolq_sample": 0.5}

Block = tuple  # ("h1" | "h2" | "h3" | "p" | "pre", text) | ("table", header, rows) | ("img", path, alt)


def _f(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def training_plot(plan, stage: str, records: list[dict], unigram: float | None = None
                  ) -> Path | None:
    """`records`: the run's metrics.jsonl records (one per step)."""
    if not records:
        return None
    loss = [("train loss", *metric_series(records, "loss"), "-"),
            ("held-out loss", *metric_series(records, "eval_loss"), "o-")]
    panels = [("DPO loss, -log sigmoid(reward margin)" if stage == "dpo" else "loss (nats/token)",
               loss)]
    if stage == "dpo":
        panels.append(("preference accuracy", [
            ("train batch", *metric_series(records, "accuracy"), "-"),
            ("held-out pairs", *metric_series(records, "heldout_accuracy"), "o-")]))
    hlines = {"loss (nats/token)": {"unigram baseline": unigram}} if unigram else None
    path = plan.dir("plots") / f"{stage}.png"
    plot_panels(path, f"{MODEL_TITLES[stage]} ({plan.dir(stage)})", panels, hlines)
    return path


def eval_plot(plan, table: list[dict]) -> Path:
    """Bits per byte on held-out text per language and model, unigram baseline included."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    langs = sorted({k for row in table for k in row["bpb"]})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / max(len(table), 1)
    for i, row in enumerate(table):
        xs = np.arange(len(langs)) + i * width
        ax.bar(xs, [row["bpb"].get(lang, np.nan) for lang in langs], width, label=row["name"])
    ax.set_xticks(np.arange(len(langs)) + 0.4 - width / 2)
    ax.set_xticklabels([f"held-out {lang}" for lang in langs])
    ax.set_ylabel("bits per byte (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = plan.dir("plots") / "eval_bpb.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def _not_run(stage: str) -> list[Block]:
    return [("p", f"*Not run yet: rerun `hibari quickstart` to run the {stage} stage.*")]


def header(plan, records) -> list[Block]:
    import jax
    done = [s for s, r in records.items() if r]
    total = sum(records[s]["seconds"] for s in done)
    blocks = [("h1", "hibari quickstart report"),
              ("p", f"Config `{plan.qc.name}`, output `{plan.out}`, written "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Machine: {platform.machine()}, "
                    f"{os.cpu_count()} CPU cores, JAX {jax.__version__} on "
                    f"{jax.device_count()} {jax.default_backend()} device(s). "
                    f"{len(done)} of {len(records)} stages finished, {total / 60:.1f} min of "
                    "stage time in all."),
              ("h2", SECTIONS[0])]
    rows = []
    for stage, r in records.items():
        if r is None:
            rows.append([stage, "not run", "–", "–", "–"])
        else:
            rows.append([stage, "finished", _f(r["seconds"], 1), _f(r.get("estimate"), 1),
                         r["finished"]])
    blocks.append(("table", ["stage", "status", "seconds", "estimated s", "finished at"], rows))
    return blocks


def data_section(plan, record) -> list[Block]:
    blocks: list[Block] = [("h2", SECTIONS[1])]
    if record is None:
        return blocks + _not_run("data")
    r = record["result"]
    tok = r["tokenizer"]
    rows = [["read", r["read_docs"], f"{r['read_chars']:,} chars"],
            ["after cleaning + quality filters", r["filtered_docs"],
             f"{r['read_docs'] - r['filtered_docs']} dropped"],
            ["after exact + MinHash near-dedup", r["dedup_docs"],
             f"exact -{r['exact_removed']}, near -{r['near_removed']}"]]
    for split, key in (("training", "packed"), ("held out", "packed_heldout")):
        for lang, e in r[key].items():
            rows.append([f"packed {split} ({lang})", e["docs"],
                         f"{e['tokens']:,} tokens in {e['rows']} rows of {e['seq_len']}, "
                         f"{e['chars_per_token']} chars/token"])
    blocks.append(("table", ["stage", "documents", "detail"], rows))
    reasons = list(r["dropped"].items())[:6]
    if reasons:
        blocks.append(("p", "Most frequent filter reasons: " + ", ".join(
            f"{name} ({d['docs']} docs)" for name, d in reasons) + "."))
    blocks.append(("p", f"Tokenizer: SentencePiece unigram, {tok['vocab_size']} pieces, "
                        f"{tok['chars_per_token']} characters per token on held-out documents, "
                        f"byte fallback on {tok['byte_fallback_share']:.2%} of tokens, CJK "
                        f"character coverage {tok['cjk_coverage']:.2%}."))
    return blocks


def _final(records: list[dict], key: str):
    xs = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return xs[-1] if xs else None


def training_section(plan, stage: str, record, title: str, unigram=None) -> list[Block]:
    blocks: list[Block] = [("h2", title)]
    if record is None:
        return blocks + _not_run(stage)
    r = record["result"]
    m = r["model"]
    metrics = read_member_metrics(plan.dir(stage))
    blocks.append(("p", f"{r['params']['total']:,} parameters ({r['params']['non_embedding']:,} "
                        f"without embeddings; d_model {m['d_model']}, {m['n_layers']} "
                        f"layers, {m['n_heads']} heads, vocabulary {m['vocab_size']}); "
                        f"{r['step']} steps, {r['tokens']:,} tokens of rows; "
                        f"{record['seconds']:.0f} s. Run directory `{plan.dir(stage)}` "
                        "(checkpoints, `metrics.jsonl`, TensorBoard events in `tb/`)."))
    rows = [["final train loss", _f(_final(metrics, "loss"))],
            ["final held-out loss", _f(_final(metrics, "eval_loss"))]]
    if unigram is not None:
        rows.append(["unigram baseline, held-out (nats/token)", _f(unigram)])
    if stage == "dpo":
        for key in ("heldout_accuracy", "heldout_reward_margin"):
            rows.append([f"final {key.replace('_', ' ')}", _f(_final(metrics, key))])
    blocks.append(("table", ["metric", "value"], rows))
    plot = training_plot(plan, stage, metrics, unigram)
    if plot is not None:
        blocks.append(("img", plot, f"{stage} loss curves"))
    return blocks


def eval_rows(result: dict, tasks: list[str]) -> list[dict]:
    rows = [{"name": "unigram baseline", "bpb": result["unigram_bpb"], "acc": {},
             "pair_acc": None, "reward_acc": None}]
    reference = None
    for model, s in result["models"].items():
        bpb = {name.split("_", 1)[1]: m["bits_per_byte"] for name, m in s["metrics"].items()
               if name.startswith("heldout_")}
        logps = np.asarray(s["pairs"]["logps"])
        row = {"name": MODEL_TITLES[model], "bpb": bpb,
               "acc": {t: s["metrics"][t].get("acc") for t in tasks if t in s["metrics"]},
               "acc_se": {t: s.get("stderr", {}).get(t, {}).get("acc") for t in tasks},
               "pair_acc": float(np.mean(logps[:, 0] > logps[:, 1])), "reward_acc": None}
        if model == "dpo" and reference is not None:
            margin = (logps[:, 0] - reference[:, 0]) - (logps[:, 1] - reference[:, 1])
            row["reward_acc"] = float(np.mean(margin > 0))
        if model == "sft":
            reference = logps
        rows.append(row)
    return rows


def eval_section(plan, record) -> list[Block]:
    blocks: list[Block] = [("h2", SECTIONS[5])]
    if record is None:
        return blocks + _not_run("eval")
    result = record["result"]
    tasks = list(plan.qc.eval.tasks)
    table = eval_rows(result, tasks)
    langs = sorted({k for row in table for k in row["bpb"]})
    header = ([f"bits/byte held-out {lang}" for lang in langs] +
              [f"{t} acc (chance {CHANCE[t]})" if t in CHANCE else f"{t} acc" for t in tasks] +
              ["pairs: log p(chosen) > log p(rejected)", "DPO implicit reward accuracy"])
    rows = []
    for row in table:
        rows.append([row["name"]] + [_f(row["bpb"].get(lang)) for lang in langs] +
                    [_f(row["acc"].get(t)) + (f" ± {_f(row['acc_se'][t])}"
                                              if row.get("acc_se", {}).get(t) else "")
                     for t in tasks] +
                    [_f(row["pair_acc"]), _f(row["reward_acc"])])
    blocks.append(("table", ["model"] + header, rows))
    first = next(iter(result["models"].values()), None)
    if first:
        n = first["n"]
        blocks.append(("p", "Bits per byte: every token of the held-out documents (never "
                            "trained on) predicted once, nats / (ln 2 × UTF-8 bytes); the unigram "
                            "row is the add-one unigram model of the training rows. Multiple "
                            "choice: `acc` (sum of log p per choice) ± its standard error, "
                            "zero-shot, examples per task: "
                            + ", ".join(f"{t} {n[t]}" for t in tasks if t in n) +
                            f". Pairs: the {len(first['pairs']['ids'])} held-out preference pairs "
                            "of the DPO stage; the implicit reward accuracy compares DPO with its "
                            "SFT reference (β·log π/π_ref of chosen above rejected); with "
                            f"{len(first['pairs']['ids'])} pairs an accuracy near 0.5 has a "
                            f"standard error of ±{0.5 / math.sqrt(len(first['pairs']['ids'])):.2f}. "
                            "At this size the multiple-choice scores are near chance and DPO "
                            "fits its training pairs without generalising to held-out ones: the "
                            "table shows the pipeline and harness working, not a capable model."))
    blocks.append(("img", eval_plot(plan, table), "held-out bits per byte"))
    return blocks


def generations_section(plan, record) -> list[Block]:
    blocks: list[Block] = [("h2", SECTIONS[6])]
    if record is None:
        return blocks + _not_run("eval")
    models = record["result"]["models"]
    first = next(iter(models.values()))
    blocks.append(("p", f"Greedy decoding, at most {plan.qc.eval.max_new_tokens} new tokens. "
                        "Text prompts are continued as they are; instruction prompts go through "
                        "the SFT template."))
    for i, g in enumerate(first["generations"]):
        blocks.append(("h3", f"{g['kind']}: {g['prompt']}"))
        for model, s in models.items():
            blocks.append(("p", f"**{MODEL_TITLES[model]}**"))
            blocks.append(("pre", s["generations"][i]["completion"].strip() or "(empty)"))
    return blocks


def commands_section(plan, records) -> list[Block]:
    lines = [plan.command("data")]
    if records.get("data"):  # the training commands read the packed shards' seq_len and vocab
        lines += [plan.command(s) for s in plan.models] + [plan.eval_command(m)
                                                          for m in plan.models]
        lines += [plan.command(s) for s in ("judge", "slick") if s in records]
    else:
        lines.append("# the other commands are listed once the data stage has run")
    return [("h2", SECTIONS[7]),
            ("p", "The quickstart ran these commands' code with these exact arguments; each "
                  "resumes from its directory, and any `--config.FIELD=VALUE` can be changed."),
            ("pre", "\n".join(lines))]


def _se(r: dict | None, pct: bool = True) -> str:
    """A {rate|mean, stderr, n} dict as "x ± s.e. (n=N)"."""
    value = None if not r else next((r[k] for k in ("rate", "mean") if k in r), None)
    if value is None:
        return "–"
    scale, digits = (100, 1) if pct else (1, 3)
    n = f" (n={r['n']})" if "n" in r else ""
    return f"{value * scale:.{digits}f} ± {r['stderr'] * scale:.{digits}f}{n}"


def judge_section(plan, record) -> list[Block]:
    blocks: list[Block] = [("h2", SECTIONS[8])]
    if record is None:
        return blocks + _not_run("judge")
    from hibari.evaluation.arena import weak_judge_paragraph
    r = record["result"]
    prompts = ", ".join(f"{p['n']} {p['category']}" for p in r["prompts"].values())
    blocks.append(("p", f"Judge `{r['judge']['name']}` ({r['judge']['checkpoint']}); the SFT and "
                        f"DPO models answered {prompts} prompts (greedy, cached in "
                        f"`{plan.dir('judge')}/answers/`). Each pair was judged in both orders; "
                        "a model wins a prompt only if preferred in both, else a tie. Ratings: "
                        "Bradley-Terry on the Elo scale with 95% bootstrap intervals. Full "
                        f"tables and every judgment: `{plan.dir('judge')}/report.md`, "
                        "`samples/`."))
    rows = []
    for mode, table in r["pairwise"].items():
        for row in table["ratings"]:
            rows.append([mode, row["model"], f"{row['bt']:.0f} [{row['bt_lo']:.0f}, "
                         f"{row['bt_hi']:.0f}]" if row["bt_lo"] is not None else
                         f"{row['bt']:.0f}", f"{row['wins']}/{row['ties']}/{row['losses']}",
                         _se({"rate": row["win_rate"], "stderr": row["win_rate_stderr"]})])
    blocks.append(("table", ["reference answer shown", "model", "Bradley-Terry rating [95% CI]",
                             "wins/ties/losses", "win rate % ± s.e."], rows))
    bias, rows = r["bias"], []
    for mode, p in bias["position"].items():
        rows.append([f"position consistency ({mode} reference)", _se(p["consistency"]),
                     "100%: the verdict survives swapping the answers"])
        rows.append([f"first answer preferred ({mode} reference)", _se(p["first_position_rate"]),
                     "50%"])
    if bias.get("verbosity"):
        rows.append(["padded answer wins (repetition added)",
                     _se(bias["verbosity"]["padded_win_rate"]), "0%"])
    se = bias["self_enhancement"]
    if se.get("measured"):
        for mode, m in se["modes"].items():
            rows.append([f"judge picks its own answer, equally correct pairs ({mode} reference)",
                         _se(m["own_pick_equally_correct"]), "50%"])
    else:
        rows.append(["self-enhancement", se.get("why", "not measured"), ""])
    for mode, cats in bias["grading_accuracy"].items():
        for cat, g in (cats or {}).items():
            rows.append([f"picks the correct answer, {cat} ({mode} reference)",
                         _se(g["picks_correct"]), "100% (chance 50%)"])
    blocks.append(("table", ["judge bias measure", "% ± s.e. (n)", "an unbiased judge"], rows))
    blocks.append(("p", weak_judge_paragraph(r)))
    return blocks


def slick_section(plan, record) -> list[Block]:
    blocks: list[Block] = [("h2", SECTIONS[9])]
    if record is None:
        return blocks + _not_run("slick")
    s = record["result"]["summary"]
    c = record["result"]["meta"]["config"]
    blocks.append(("p", f"SliCK (Gekhman et al. 2024) on the {s['facts']} NQ-open facts of "
                        f"`{c['facts']['path']}` for the `{plan.qc.slick.model}` model: "
                        f"{c['n_prompts']} few-shot prompts of {c['k']} exemplars per fact, a "
                        f"greedy answer and {c['samples']} samples at T={c['temperature']} per "
                        f"prompt; correct = {s['match']} match. HighlyKnown: every greedy answer "
                        "right; MaybeKnown: some; WeaklyKnown: none greedy, some sampled; "
                        f"Unknown: none. Per fact: `{plan.dir('slick')}/samples/slick.jsonl`."))
    rows = [[cat, str(t["n"]), _se(t["share"]), _se(t["p_correct_greedy"]),
             _se(t["p_correct_sampled"])] for cat, t in s["per_category"].items()]
    blocks.append(("table", ["category", "facts", "share % ± s.e.", "P_correct(T=0) %",
                             "P_correct(T>0) %"], rows))
    png = plan.dir("slick") / "slick.png"
    if png.exists():
        blocks.append(("img", png, "SliCK category shares"))
    counts = s["counts"]
    blocks.append(("p", f"{counts['Unknown']} of {s['facts']} facts are Unknown to this model and "
                        f"{counts['HighlyKnown'] + counts['MaybeKnown']} known (greedy answer "
                        "right at least once). The categories are what SliCK is for: the paper "
                        "finds fine-tuning examples of Unknown facts are learned slowly and, "
                        "once learned, raise hallucination on the known ones."))
    return blocks


def build(plan, records: dict[str, Any]) -> list[Block]:
    unigram = (records["pretrain"] or {}).get("result", {}).get("unigram_eval_loss")
    return (header(plan, records) + data_section(plan, records["data"]) +
            training_section(plan, "pretrain", records["pretrain"], SECTIONS[2], unigram) +
            training_section(plan, "sft", records["sft"], SECTIONS[3]) +
            training_section(plan, "dpo", records["dpo"], SECTIONS[4]) +
            eval_section(plan, records["eval"]) + generations_section(plan, records["eval"]) +
            commands_section(plan, records) +
            (judge_section(plan, records["judge"]) if "judge" in records else []) +
            (slick_section(plan, records["slick"]) if "slick" in records else []))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], root: Path) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "pre":
            out.append("```\n" + b[1] + "\n```")
        elif kind == "img":
            out.append(f"![{b[2]}]({os.path.relpath(b[1], root)})")
        elif kind == "table":
            rows = [b[1], ["---"] * len(b[1])] + b[2]
            out.append("\n".join("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows))
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escape, then the two inline markups the blocks use: **bold** and `code`."""
    parts = html.escape(text).split("`")
    parts = [f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)]
    text = "".join(parts)
    bold = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(bold))


def to_html(blocks: list[Block], root: Path) -> str:
    body = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(b[1].strip('*') if b[1].startswith('*Not') else b[1])}</p>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "img":
            body.append(f'<img src="{html.escape(os.path.relpath(b[1], root))}" '
                        f'alt="{html.escape(b[2])}">')
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) +
                           "</tr>" for r in b[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em}"
             "pre{background:#f4f4f4;padding:.6em;white-space:pre-wrap}img{max-width:100%}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>hibari quickstart report"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(body) +
            "\n</body></html>\n")


def write_report(plan, records: dict[str, Any]) -> Path:
    blocks = build(plan, records)
    md = plan.out / "report.md"
    md.write_text(to_markdown(blocks, plan.out), encoding="utf-8")
    (plan.out / "report.html").write_text(to_html(blocks, plan.out), encoding="utf-8")
    (plan.out / "report.json").write_text(json.dumps(
        {s: (r and {k: v for k, v in r.items() if k != "config"}) for s, r in records.items()},
        indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    return md
