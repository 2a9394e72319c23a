"""The quickstart's `report.md` / `report.html`: numbers per stage, loss curves (PNG), the
evaluation table, each stage's measured effect on held-out data (with standard errors), sample
generations and the command that reruns each stage alone.

The report is a list of blocks rendered twice (markdown and HTML), rebuilt from the stage
records and run directories on every quickstart run (cheap; nothing is recomputed).

    python -m hibari.quickstart_report --benchmarks runs/quickstart [--file BENCHMARKS.md]

rewrites the quickstart section of BENCHMARKS.md (between BENCH_BEGIN and BENCH_END) from
OUT/report.json, with the machine's load average during the run.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hibari.base.errors import InputNotFound, UsageError
from hibari.base.stats import mean_se, rate
from hibari.sweep import read_member_metrics
from hibari.train.metrics import metric_series, plot_panels

MODEL_TITLES = {"pretrain": "pretrained", "sft": "SFT", "dpo": "DPO"}
SECTIONS = ("Stages", "1. Data", "2. Pretraining", "3. Instruction tuning (SFT)",
            "4. Preference optimisation (DPO)", "5. Evaluation", "6. Sample generations",
            "7. Run each stage alone", "8. LLM-as-a-judge (optional stage)",
            "9. SliCK knowledge probe (optional stage)")
CHANCE = {"commonsense_qa_sample": 0.2, "piqa_sample": 0.5, "openbookqa_sample": 0.25,
          "mmlu_sample": 0.25, "boolq_sample": 0.5}

LN2 = math.log(2)  # the DPO loss of a model with no preference (reward margin 0)
# The `rule` field of align/assets/seed_pairs.jsonl (built by align/assets/build_assets.py).
PAIR_RULES = {"cut_short": "chosen = the seed task's real output, rejected = the same output "
                           "stopped before its last word (an unfinished answer; being shorter, it has the higher "
                           "summed log p unless the model learned the rule)"}
BENCH_BEGIN = "<!-- quickstart-report:begin (written by python -m hibari.quickstart_report " \
              "--benchmarks OUT; do not edit by hand) -->"
BENCH_END = "<!-- quickstart-report:end -->"

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

def reference_lines(stage: str, unigram: float | None = None, start: float | None = None
                    ) -> dict:
    """{panel: {label: y}}: the unigram baseline on pretraining loss, the starting model's
    held-out loss (`start`) on SFT loss, ln 2 (no preference) on DPO loss, 0.5 (chance) on
    preference accuracy."""
    if stage == "dpo":
        return {"DPO loss, -log sigmoid(reward margin)": {"ln 2: no preference": LN2},
                "preference accuracy": {"chance 0.5": 0.5}}
    lines = {}
    if unigram is not None:
        lines["unigram baseline, held-out"] = unigram
    if start is not None:
        lines["pretrained model, held-out instructions"] = start
    return {"loss (nats/token)": lines} if lines else {}


def _save(fig, path: Path) -> Path:
    """Lay out, write (PNG) and close a matplotlib figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_plot(plan, stage: str, records: list[dict], unigram: float | None = None,
                  start: float | None = None) -> Path | None:
    """`records`: the run's metrics.jsonl records (one per step); `start`: the held-out loss
    of the model the stage started from (a dashed line)."""
    if not records:
        return None
    loss = [("train loss", *metric_series(records, "loss"), "-"),
            ("held-out loss", *metric_series(records, heldout_key(records)), "o-")]
    panels = [("DPO loss, -log sigmoid(reward margin)" if stage == "dpo" else "loss (nats/token)",
               loss)]
    if stage == "dpo":
        panels.append(("preference accuracy", [
            ("train batch", *metric_series(records, "accuracy"), "-"),
            ("held-out pairs", *metric_series(records, "heldout_accuracy"), "o-")]))
    hlines = reference_lines(stage, unigram, start)
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
    return _save(fig, plan.dir("plots") / "eval_bpb.png")


def effects_plot(plan, effects: dict) -> Path | None:
    """SFT: held-out response loss per model ± s.e.; DPO: held-out pair accuracies ± s.e.
    with the 0.5 chance line."""
    sft, dpo = effects.get("sft"), effects.get("dpo")
    if not sft and not dpo:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if sft:
        names = [m for m in ("pretrain", "sft", "dpo") if sft["response_loss"].get(m)]
        rs = [sft["response_loss"][m] for m in names]
        axes[0].bar([MODEL_TITLES[m] for m in names], [r["mean"] for r in rs],
                    yerr=[r["stderr"] for r in rs], capsize=4, color="tab:blue")
        axes[0].axhline(rs[0]["mean"], color="gray", linestyle="--", linewidth=1,
                        label="before SFT")
        lo, hi = (min(r["mean"] - r["stderr"] for r in rs), max(r["mean"] + r["stderr"] for r in rs))
        axes[0].set_ylim(max(0.0, lo - 0.3 * (hi - lo)), hi + 0.15 * (hi - lo))
        axes[0].set_ylabel("nats / response token")
        axes[0].set_title(f"held-out instructions ({rs[0]['n']}), lower is better", fontsize=9)
        axes[0].legend(fontsize=8)
    if dpo:
        bars = [(f"{MODEL_TITLES[m]}\nlog p(c) > log p(r)", dpo["pair_accuracy"][m])
                for m in ("pretrain", "sft", "dpo") if dpo["pair_accuracy"].get(m)]
        if dpo.get("reward_accuracy"):
            bars.append(("DPO implicit\nreward vs SFT", dpo["reward_accuracy"]))
        axes[1].bar([b[0] for b in bars], [b[1]["rate"] for b in bars],
                    yerr=[b[1]["stderr"] for b in bars], capsize=4, color="tab:orange")
        axes[1].axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance 0.5")
        axes[1].set_ylim(0, 1.05)
        axes[1].set_ylabel("accuracy on held-out pairs")
        axes[1].set_title(f"held-out preference pairs ({bars[0][1]['n']})", fontsize=9)
        axes[1].tick_params(axis="x", labelsize=7)
        axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, plan.dir("plots") / "effects.png")


# ---------------------------------------------------------------------------------------------
# Stage effects on held-out data
# ---------------------------------------------------------------------------------------------

def _outcomes(margin: np.ndarray) -> list[float]:
    """1 where the margin favours chosen, 0 where rejected, 1/2 for a tie (as DPO's
    `heldout_accuracy` counts)."""
    return [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in np.asarray(margin, float)]


def stage_effects(records: dict[str, Any]) -> dict:
    """Each stage's measured effect on held-out data, from the stage records (nothing is
    recomputed): {"pretrain": {loss, unigram_loss, bpb: {lang: {model, unigram}}},
    "sft": {response_loss: {model: mean_se of per-example nats/token}, difference: mean_se of
    SFT minus pretrained (paired, same examples), token_weighted: {model: x}, bpb: {lang:
    {pretrain, sft}}}, "dpo": {pair_accuracy: {model: rate}, reward_accuracy: rate,
    bpb: {lang: {sft, dpo}}}}; a stage that has not run (or predates a measurement) is absent."""
    effects: dict[str, Any] = {}
    ev = (records.get("eval") or {}).get("result")
    models = (ev or {}).get("models", {})
    bpb = {m: {name.split("_", 1)[1]: v["bits_per_byte"] for name, v in s["metrics"].items()
               if name.startswith("heldout_")} for m, s in models.items()}
    pre = (records.get("pretrain") or {}).get("result")
    if pre:
        effects["pretrain"] = {"loss": pre.get("eval_nll", pre.get("eval_loss")),
                               "unigram_loss": pre.get("unigram_eval_loss")}
        if ev and "pretrain" in bpb:
            effects["pretrain"]["bpb"] = {
                lang: {"model": v, "unigram": ev["unigram_bpb"].get(lang)}
                for lang, v in bpb["pretrain"].items()}
    held = {m: s.get("sft_heldout") for m, s in models.items() if s.get("sft_heldout")}
    if "pretrain" in held and "sft" in held:
        per = {m: np.asarray(h["nll"]) / np.maximum(np.asarray(h["tokens"]), 1)
               for m, h in held.items()}
        effects["sft"] = {
            "response_loss": {m: mean_se(v) for m, v in per.items()},
            "difference": mean_se(per["sft"] - per["pretrain"]),
            "dpo_difference": mean_se(per["dpo"] - per["sft"]) if "dpo" in per else None,
            "token_weighted": {m: float(np.sum(h["nll"]) / max(np.sum(h["tokens"]), 1))
                               for m, h in held.items()},
            "bpb": {lang: {"pretrain": v, "sft": bpb["sft"].get(lang)}
                    for lang, v in bpb.get("pretrain", {}).items()}}
    logps = {m: np.asarray(s["pairs"]["logps"]) for m, s in models.items() if s.get("pairs")}
    if "sft" in logps and "dpo" in logps:
        ref, pol = logps["sft"], logps["dpo"]
        effects["dpo"] = {
            "pair_accuracy": {m: rate(_outcomes(lp[:, 0] - lp[:, 1])) for m, lp in logps.items()},
            "reward_accuracy": rate(_outcomes((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))),
            "bpb": {lang: {"sft": v, "dpo": bpb["dpo"].get(lang)}
                    for lang, v in bpb.get("sft", {}).items()}}
    return effects


def _pm(r: dict | None, digits: int = 3) -> str:
    """A rate / mean_se dict as "x ± s.e."."""
    if not r:
        return "–"
    value = r["rate"] if "rate" in r else r["mean"]
    return "–" if value is None else f"{value:.{digits}f} ± {r['stderr']:.{digits}f}"


def _above(r: dict, level: float) -> bool:
    return r["rate"] is not None and r["rate"] - 2 * r["stderr"] > level


def effect_sentences(effects: dict) -> list[str]:
    """Plain statements of each measured effect, saying when a held-out number got worse."""
    out = []
    p = effects.get("pretrain")
    if p and p.get("loss") is not None and p.get("unigram_loss") is not None:
        out.append(f"Pretraining: held-out loss {p['loss']:.3f} nats/token against "
                   f"{p['unigram_loss']:.3f} for the unigram baseline"
                   + (" (below it)." if p["loss"] < p["unigram_loss"] else
                      ": NOT below the unigram baseline."))
    s = effects.get("sft")
    if s:
        rl, d = s["response_loss"], s["difference"]
        verdict = ("lower" if d["mean"] + 2 * d["stderr"] < 0 else
                   "HIGHER (worse)" if d["mean"] - 2 * d["stderr"] > 0 else
                   "not measurably different (within 2 s.e.)")
        out.append(f"SFT: response-token loss on {rl['sft']['n']} held-out instructions "
                   f"{rl['pretrain']['mean']:.3f} → {rl['sft']['mean']:.3f} nats/token "
                   f"(paired difference {_pm(d)}): {verdict}.")
        dd = s.get("dpo_difference")
        if dd and dd["mean"] > 0:
            out.append(f"DPO raised the response-token loss on these held-out instructions from "
                       f"{rl['sft']['mean']:.3f} to {rl['dpo']['mean']:.3f} nats/token (paired "
                       f"difference {_pm(dd)}).")
        for lang, b in s["bpb"].items():
            if b["sft"] is not None and b["sft"] > b["pretrain"]:
                out.append(f"General-text bits/byte ({lang}) rose from {b['pretrain']:.3f} to "
                           f"{b['sft']:.3f} after SFT: SFT trades general text for "
                           "instructions.")
    d = effects.get("dpo")
    if d:
        pa, ra = d["pair_accuracy"], d["reward_accuracy"]
        out.append(f"DPO: on {ra['n']} held-out pairs the implicit reward accuracy against the "
                   f"SFT reference is {_pm(ra)} (chance 0.5): "
                   + ("DPO learned the preference rule beyond its training pairs." if
                      _above(ra, 0.5) else
                      "not above chance by 2 s.e.; DPO did not measurably generalise to "
                      "held-out pairs."))
        sft_acc, dpo_acc = pa["sft"], pa["dpo"]
        change = ("rose" if dpo_acc["rate"] > sft_acc["rate"] else
                  "fell" if dpo_acc["rate"] < sft_acc["rate"] else "stayed")
        out.append(f"Held-out pair accuracy, log p(chosen) > log p(rejected), {change} from "
                   f"{_pm(sft_acc)} (SFT) to {_pm(dpo_acc)} (DPO)"
                   + ("." if _above(dpo_acc, 0.5) else "; it is not above chance by 2 s.e."))
        for lang, b in d["bpb"].items():
            if b["dpo"] is not None and b["dpo"] > b["sft"]:
                out.append(f"General-text bits/byte ({lang}) rose from {b['sft']:.3f} to "
                           f"{b['dpo']:.3f} after DPO.")
    return out


EFFECTS_HEADER = ["stage", "held-out measure", "before", "after", "better"]


def effects_rows(effects: dict) -> list[list[str]]:
    """The rows (EFFECTS_HEADER) of the stage effects table."""
    rows = []
    p = effects.get("pretrain")
    if p:
        rows.append(["pretraining", "held-out loss, nats/token (unigram baseline)",
                     _f(p.get("unigram_loss"), 3), _f(p.get("loss"), 3), "lower"])
    s = effects.get("sft")
    if s:
        rl = s["response_loss"]
        rows.append(["SFT", f"response-token loss on {rl['sft']['n']} held-out instructions, "
                     "nats/token ± s.e. (pretrained → SFT)", _pm(rl["pretrain"]),
                     _pm(rl["sft"]), "lower"])
        rows.append(["SFT", "paired difference SFT − pretrained ± s.e.", "0", _pm(s["difference"]),
                     "negative"])
    d = effects.get("dpo")
    if d:
        pa = d["pair_accuracy"]
        rows.append(["DPO", f"held-out pairs ({pa['dpo']['n']}) with log p(chosen) > log "
                     "p(rejected) ± s.e. (SFT → DPO)", _pm(pa["sft"]), _pm(pa["dpo"]),
                     "higher; chance 0.5"])
        rows.append(["DPO", "implicit reward accuracy against the SFT reference ± s.e.",
                     "0.5 (chance)", _pm(d["reward_accuracy"]), "higher"])
    return rows


def effects_blocks(plan, records, effects: dict) -> list[Block]:
    """Section 5's table of each stage's effect on held-out data, its statements and plot."""
    blocks: list[Block] = [("h3", "Stage effects on held-out data")]
    rows = effects_rows(effects)
    s, d = effects.get("sft"), effects.get("dpo")
    if not rows:
        return blocks + [("p", "*No effect measured yet: the eval stage has not run.*")]
    blocks.append(("table", EFFECTS_HEADER, rows))
    rule = dpo_rule(plan) if d else None
    blocks.append(("p", " ".join(effect_sentences(effects))))
    text = []
    if d and rule:
        text.append(f"Preference pairs: {rule}.")
    if s:
        text.append("SFT's held-out examples are the Self-Instruct seed tasks its config holds "
                    "out (never trained on), templated as in training; the loss counts only "
                    "response tokens, averaged per example; the standard error of the paired "
                    "difference is over examples.")
    if text:
        blocks.append(("p", " ".join(text)))
    plot = effects_plot(plan, effects)
    if plot is not None:
        blocks.append(("img", plot, "stage effects on held-out data"))
    return blocks


def dpo_rule(plan) -> str | None:
    """The rule of the DPO stage's pairs (their `rule` field, PAIR_RULES), or None."""
    try:
        path = plan.train_config("dpo").data.train_path
        from hibari.base.config_files import resolve_path
        rules = {json.loads(line).get("rule") for line in open(resolve_path(path),
                                                                encoding="utf-8")
                 if line.strip()}
    except (OSError, ValueError):  # the pair file moved or is unreadable: no rule to state
        return None
    return "; ".join(PAIR_RULES.get(r, str(r)) for r in sorted(rules, key=str))


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


def heldout_key(records: list[dict]) -> str:
    """"eval_nll" when the run selected tokens (Rho-1: its "eval_loss" counts only the kept
    tokens, "eval_nll" every token, comparable with an all-token run), else "eval_loss"."""
    return "eval_nll" if any("eval_nll" in r for r in records) else "eval_loss"


def _final(records: list[dict], key: str):
    xs = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return xs[-1] if xs else None


def accuracy_with_se(accuracy: float | None, n: int | None) -> str:
    """A held-out accuracy over `n` pairs as "x ± s.e." (the s.e. of its k = round(x·n) hits
    among n, as `rate` gives it); the bare value when n is unknown (eval has not run)."""
    if accuracy is None or not n:
        return _f(accuracy)
    k = int(round(accuracy * n))
    return _pm(rate([1.0] * k + [0.0] * (n - k)), 4) + f" (n={n})"


def data_count_rows(counts: dict | None) -> list[list[str]]:
    """Rows saying how many records of each data file were read, kept and dropped (and why)."""
    rows = []
    for split in ("train", "eval"):
        c = (counts or {}).get(split)
        if not c:
            continue
        dropped = [f"{c[k]} {k.replace('_', ' ')}" for k in ("too_long", "malformed") if c.get(k)]
        rows.append([f"{split} data: records read / kept", f"{c['read']} / {c['kept']}" +
                     (f" (dropped: {', '.join(dropped)})" if dropped else "")])
    examples = (counts or {}).get("examples")
    if examples:
        rows.append(["examples trained on / held out",
                     f"{examples.get('train', '–')} / {examples.get('eval', '–')}"])
    return rows


def training_section(plan, stage: str, record, title: str, unigram=None, start=None,
                     n_pairs: int | None = None) -> list[Block]:
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
            ["final held-out loss", _f(_final(metrics, heldout_key(metrics)))]]
    if unigram is not None:
        rows.append(["unigram baseline, held-out (nats/token)", _f(unigram)])
    if start is not None:
        rows.append(["pretrained model's loss on the same held-out instructions", _f(start)])
    if stage == "dpo":
        rows.append(["DPO loss of no preference (reward margin 0)", _f(LN2)])
        rows.append(["final held-out accuracy (implicit reward vs SFT)" +
                     (" ± s.e." if n_pairs else ""),
                     accuracy_with_se(_final(metrics, "heldout_accuracy"), n_pairs)])
        rows.append(["final held-out reward margin", _f(_final(metrics, "heldout_reward_margin"))])
    rows += data_count_rows(r.get("data_counts"))
    blocks.append(("table", ["metric", "value"], rows))
    plot = training_plot(plan, stage, metrics, unigram, start)
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
               "pair_acc": rate(_outcomes(logps[:, 0] - logps[:, 1])), "reward_acc": None}
        if model == "dpo" and reference is not None:
            margin = (logps[:, 0] - reference[:, 0]) - (logps[:, 1] - reference[:, 1])
            row["reward_acc"] = rate(_outcomes(margin))
        if model == "sft":
            reference = logps
        rows.append(row)
    return rows


def eval_section(plan, record, effects: dict | None = None) -> list[Block]:
    blocks: list[Block] = [("h2", SECTIONS[5])]
    if record is None:
        return blocks + _not_run("eval")
    blocks += effects_blocks(plan, record, effects or {})
    blocks.append(("h3", "All held-out measures"))
    result = record["result"]
    tasks = list(plan.qc.eval.tasks)
    table = eval_rows(result, tasks)
    langs = sorted({k for row in table for k in row["bpb"]})
    header = ([f"bits/byte held-out {lang}" for lang in langs] +
              [f"{t} acc (chance {CHANCE[t]})" if t in CHANCE else f"{t} acc" for t in tasks] +
              ["pairs: log p(chosen) > log p(rejected) ± s.e.",
               "DPO implicit reward accuracy ± s.e."])
    rows = []
    for row in table:
        rows.append([row["name"]] + [_f(row["bpb"].get(lang)) for lang in langs] +
                    [_f(row["acc"].get(t)) + (f" ± {_f(row['acc_se'][t])}"
                                              if row.get("acc_se", {}).get(t) else "")
                     for t in tasks] +
                    [_pm(row["pair_acc"], 4), _pm(row["reward_acc"], 4)])
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
                            + mc_sentence(table, tasks) + " Word perplexity is not shown for "
                            "text written without spaces between words (Japanese; in "
                            "`eval/<model>/results.md` too): bits per byte is the comparable "
                            "number."))
    blocks.append(("img", eval_plot(plan, table), "held-out bits per byte"))
    return blocks


def mc_sentence(table: list[dict], tasks: list[str]) -> str:
    """Whether any model's multiple-choice accuracy is above chance by 2 s.e."""
    above = [f"{row['name']} on {t}" for row in table for t in tasks
             if t in CHANCE and row["acc"].get(t) is not None
             and row["acc"][t] - 2 * (row["acc_se"].get(t) or 0) > CHANCE[t]]
    if above:
        return "Multiple-choice accuracy above chance by 2 s.e.: " + ", ".join(above) + "."
    return ("At this size no multiple-choice score is above chance by 2 s.e.: those rows show "
            "the harness working, not a capable model.")


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


def build(plan, records: dict[str, Any], effects: dict | None = None) -> list[Block]:
    unigram = (records["pretrain"] or {}).get("result", {}).get("unigram_eval_loss")
    effects = stage_effects(records) if effects is None else effects
    start = (effects.get("sft") or {}).get("token_weighted", {}).get("pretrain")
    return (header(plan, records) + data_section(plan, records["data"]) +
            training_section(plan, "pretrain", records["pretrain"], SECTIONS[2], unigram) +
            training_section(plan, "sft", records["sft"], SECTIONS[3], start=start) +
            training_section(plan, "dpo", records["dpo"], SECTIONS[4], n_pairs=(
                effects.get("dpo") or {}).get("reward_accuracy", {}).get("n")) +
            eval_section(plan, records["eval"], effects) +
            generations_section(plan, records["eval"]) +
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


def machine() -> dict:
    import jax
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "devices": f"{jax.device_count()} {jax.default_backend()}",
            "python": platform.python_version()}


def write_report(plan, records: dict[str, Any]) -> Path:
    """report.md, report.html and report.json (the stage records without their configs under
    their stage names, plus `effects` (stage_effects), `machine` and `config`)."""
    effects = stage_effects(records)
    blocks = build(plan, records, effects)
    md = plan.out / "report.md"
    md.write_text(to_markdown(blocks, plan.out), encoding="utf-8")
    (plan.out / "report.html").write_text(to_html(blocks, plan.out), encoding="utf-8")
    doc = {s: (r and {k: v for k, v in r.items() if k != "config"}) for s, r in records.items()}
    doc.update(effects=effects, machine=machine(), config=plan.qc.name,
               pair_rule=dpo_rule(plan) if "dpo" in effects else None)
    (plan.out / "report.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False,
                                                     default=str), encoding="utf-8")
    return md


# ---------------------------------------------------------------------------------------------
# BENCHMARKS.md's quickstart section, from a run's report.json
# ---------------------------------------------------------------------------------------------

def _md_table(header: list, rows: list[list]) -> str:
    return "\n".join("| " + " | ".join(_md_cell(c) for c in r) + " |"
                     for r in [header, ["---"] * len(header)] + rows)


def benchmarks_markdown(report: dict, out: str) -> str:
    """The quickstart section's generated part: stage seconds with the printed estimates and
    the machine's load average when each stage ended, and the stage effects with their
    standard errors."""
    stages = [(s, r) for s, r in report.items()
              if isinstance(r, dict) and "seconds" in r and "stage" in r]
    m = report.get("machine", {})
    loads = [r["loadavg"][0] for _, r in stages if r.get("loadavg")]
    cpus = m.get("cpus") or 1
    # the quickstart itself keeps every core busy (load ~ cpus); more than that is other work
    busy = loads and max(loads) > 1.25 * cpus
    lines = [f"Generated from `{out}/report.json` (config `{report.get('config')}`) by "
             f"`python -m hibari.quickstart_report --benchmarks {out}`. Machine: "
             f"{m.get('machine')}, {m.get('cpus')} CPU cores, Python {m.get('python')}, JAX "
             f"{m.get('jax')} on {m.get('devices')} device(s)."]
    if loads:
        lines.append(f"Load average (1 min) when the stages ended: {min(loads):.2f} to "
                     f"{max(loads):.2f} on {cpus} cores"
                     + (": the machine was shared, so these timings are slower than an idle "
                        "machine's and are not a calibration of the estimate." if busy else
                        ": an otherwise idle machine."))
    else:
        lines.append("The machine's load was not recorded for this run (stage records written "
                     "before loads were recorded): the timings may not be an idle machine's.")
    rows = [[s, _f(r["seconds"], 1), _f(r.get("estimate"), 1),
             _f(r["loadavg"][0], 2) if r.get("loadavg") else "–", r.get("finished", "")]
            for s, r in stages]
    rows.append(["**total**", f"**{sum(r['seconds'] for _, r in stages):.1f}**",
                 _f(sum(r.get("estimate") or 0 for _, r in stages), 1), "", ""])
    parts = [" ".join(lines), _md_table(["stage", "seconds", "estimate printed at the start (s)",
                                          "load average (1 min) at its end", "finished at"],
                                         rows)]
    effects = report.get("effects") or {}
    if effects_rows(effects):
        parts.append("Stage effects on held-out data (± standard error):")
        parts.append(_md_table(EFFECTS_HEADER, effects_rows(effects)))
        text = effect_sentences(effects)
        if report.get("pair_rule"):
            text.append(f"Preference pairs: {report['pair_rule']}.")
        parts.append(" ".join(text))
    return "\n\n".join(parts)


def replace_between_markers(text: str, body: str, where: str) -> str:
    """`text` with what lies between BENCH_BEGIN and BENCH_END replaced by `body`."""
    start, end = text.find(BENCH_BEGIN), text.find(BENCH_END)
    if start < 0 or end < start:
        raise UsageError(f"{where}: no quickstart markers; add the two lines {BENCH_BEGIN!r} and "
                         f"{BENCH_END!r} around the generated part of the Quickstart section")
    return text[:start + len(BENCH_BEGIN)] + "\n\n" + body + "\n\n" + text[end:]


def update_benchmarks(out: str | Path, file: str | Path = "BENCHMARKS.md") -> Path:
    """Rewrite the quickstart section of `file` between the markers from OUT/report.json."""
    report_path, file = Path(out) / "report.json", Path(file)
    if not report_path.exists():
        raise InputNotFound(f"{report_path}: does not exist; run `hibari quickstart --out {out}` "
                            "first")
    if not file.exists():
        raise InputNotFound(f"{file}: does not exist; pass --file BENCHMARKS.md's path")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    body = benchmarks_markdown(report, str(out))
    file.write_text(replace_between_markers(file.read_text(encoding="utf-8"), body, str(file)),
                    encoding="utf-8")
    return file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hibari.quickstart_report",
                                description="rewrite BENCHMARKS.md's quickstart section from a "
                                            "quickstart run's report.json")
    p.add_argument("--benchmarks", metavar="OUT", required=True,
                   help="the quickstart's output directory (holds report.json)")
    p.add_argument("--file", default="BENCHMARKS.md", help="the file to rewrite between the "
                   "quickstart markers (default: BENCHMARKS.md)")
    args = p.parse_args(argv)
    try:
        path = update_benchmarks(args.benchmarks, args.file)
    except (InputNotFound, UsageError) as e:
        print(f"python -m hibari.quickstart_report: {e}", file=sys.stderr)
        return 2
    print(f"{path}: quickstart section rewritten from {args.benchmarks}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
