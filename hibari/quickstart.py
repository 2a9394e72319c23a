"""`hibari quickstart`: corpus -> tokenizer -> pretraining -> SFT -> DPO -> evaluation -> report.

    hibari quickstart [--out runs/quickstart] [--config configs/quickstart.py[:ci]] [--fresh]
                      [--until STAGE] [--with judge slick]

Every stage is an ordinary hibari command (`hibari data prepare`, `hibari pretrain`, `hibari sft`,
`hibari dpo`, the `hibari eval` harness) whose arguments come from configs/quickstart.py; the
stage configs are built by parsing exactly the command lines the report prints, so each stage
can be rerun alone. A finished stage leaves `OUT/stages/<stage>.json` and is skipped on a rerun;
an interrupted training stage resumes from its checkpoint (Ctrl-C saves one). `--fresh` deletes
what the quickstart wrote in OUT and starts over. `--with judge slick` adds the optional stages
after eval: `hibari judge` (the SFT and DPO models graded by a judge model, with the judge's bias
report) and `hibari slick` (SliCK knowledge categories of one model).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import ml_collections

from hibari.base.config_files import apply_overrides, load_python_config
from hibari.base.errors import UserError

log = logging.getLogger(__name__)

STAGES = ("data", "pretrain", "sft", "dpo", "eval")
MODELS = ("pretrain", "sft", "dpo")  # the trained stages, evaluated in this order
EXTRA_STAGES = ("judge", "slick")  # optional, after eval: `--with judge slick`
# What `--fresh` removes: only what the quickstart writes.
OWNED = STAGES + EXTRA_STAGES + ("stages", "plots", "report.md", "report.html", "report.json", "quickstart.json")
STATE_FILE = "quickstart.json"
# Languages written without spaces between words: word perplexity is meaningless for them
# (a "word" is a whole sentence); bits per byte is the comparable number.
UNSEGMENTED = ("ja", "zh", "th")


class QuickstartError(UserError, ValueError):
    """A quickstart config, output directory or stage record is unusable; says what to do."""


class Interrupted(Exception):
    """A stage was stopped by SIGINT/SIGTERM after saving a resumable state."""


# ---------------------------------------------------------------------------------------------
# Stage command lines: the single source of each stage's config
# ---------------------------------------------------------------------------------------------

def override_flags(overrides, prefix: str = "--config") -> list[str]:
    """Nested {"model": {"d_model": 96}} -> ["--config.model.d_model=96"] (ml_collections flags)."""
    flags = []
    items = overrides.items() if overrides is not None else ()
    for key, value in items:
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            flags += override_flags(value, f"{prefix}.{key}")
        else:
            flags.append(f"{prefix}.{key}={value}")
    return flags


@dataclasses.dataclass
class Plan:
    """The quickstart config and where each stage writes under `out`."""
    qc: ml_collections.ConfigDict
    out: Path

    models = MODELS  # the trained stages, in order

    def dir(self, name: str) -> Path:
        return self.out / name

    @property
    def tokenizer(self) -> Path:
        return self.dir("data") / "tokenizer.model"

    def marker(self, stage: str) -> Path:
        return self.dir("stages") / f"{stage}.json"

    def argv(self, stage: str) -> list[str]:
        """The arguments of the `hibari <command>` that runs `stage` alone."""
        qc = self.qc
        if stage == "data":
            return ["prepare", "--config", f"{qc.data.base}:{self.dir('data')}",
                    "--vocab-size", str(qc.data.tokenizer_vocab_size),
                    "--seq-len", str(qc.data.seq_len)]
        if stage == "judge":  # the trained models (and their tokenizer) by absolute path
            models = {m: dict(checkpoint=str(self.dir(m).absolute()),
                              tokenizer=str(self.tokenizer.absolute())) for m in ("sft", "dpo")}
            return (["--config", qc.judge.config, "--out", str(self.dir("judge"))] +
                    override_flags(dict(contestants=models, judge=models["sft"])) +
                    override_flags(qc.judge.overrides))
        if stage == "slick":
            return ["--config", qc.slick.config,
                    "--checkpoint", str(self.dir(qc.slick.model).absolute()),
                    "--tokenizer", str(self.tokenizer.absolute()),
                    "--out", str(self.dir("slick"))] + override_flags(qc.slick.overrides)
        section = qc[stage]
        argv = ["--config", section.base, "--workdir", str(self.dir(stage)),
                f"--config.seed={qc.seed}"]
        if stage == "pretrain":
            from hibari.train.loop import packed_data_overrides
            argv += override_flags(packed_data_overrides(str(self.dir("data"))))
        else:
            previous = MODELS[MODELS.index(stage) - 1]
            argv += [f"--config.init_from={self.dir(previous)}",
                     f"--config.data.tokenizer={self.tokenizer}"]
        return argv + override_flags(section.overrides)

    def command(self, stage: str) -> str:
        return "hibari " + shlex.join([stage] + self.argv(stage))  # the stage is the command

    def eval_command(self, model: str) -> str:
        tasks = list(self.qc.eval.tasks) + [str(p) for p in heldout_task_paths(self).values()]
        argv = ["--checkpoint", str(self.dir(model)), "--tokenizer", str(self.tokenizer),
                "--tasks", *tasks, "--out", str(self.dir("eval") / model)]
        if self.qc.eval.limit:
            argv += ["--limit", str(self.qc.eval.limit)]
        return "hibari " + shlex.join(["eval"] + argv)

    def train_config(self, stage: str) -> ml_collections.ConfigDict:
        from hibari.train.cli import parse_run_flags
        return parse_run_flags(stage, self.argv(stage), default_config=None).config


def load_plan(spec: str, out: str | Path) -> Plan:
    qc = load_python_config(spec, "--config", QuickstartError)
    for field in ("data", "pretrain", "sft", "dpo", "eval", "prompts", "judge", "slick"):
        if field not in qc:
            raise QuickstartError(f"{spec}: the config has no field {field!r} "
                                  "(see configs/quickstart.py)")
    if qc.slick.model not in MODELS:
        raise QuickstartError(f"{spec}: slick.model={qc.slick.model!r}; choose one of {MODELS}")
    for stage in MODELS:  # the base configs load and the overrides name their fields
        base = load_python_config(qc[stage].base, f"{spec} field {stage}.base", QuickstartError)
        apply_overrides(base, qc[stage].overrides, f"{spec} field {stage}.overrides",
                        QuickstartError)
    return Plan(qc, Path(out))


# ---------------------------------------------------------------------------------------------
# Stage records
# ---------------------------------------------------------------------------------------------

def _section(plan: Plan, stage: str) -> dict:
    """The part of the quickstart config a stage depends on (and everything before it)."""
    upto = STAGES + (stage,) if stage in EXTRA_STAGES else STAGES[:STAGES.index(stage) + 1]
    d = {s: plan.qc[s].to_dict() for s in upto if s in plan.qc}
    d["seed"] = plan.qc.seed
    if stage in ("eval",) + EXTRA_STAGES:
        d["prompts"] = plan.qc.prompts.to_dict()
    return json.loads(json.dumps(d, default=list))


def finished(plan: Plan, stage: str) -> dict | None:
    """The stage's record if it finished with the current config; raises if it finished with
    another one (a rerun must not mix stages of different configs)."""
    path = plan.marker(stage)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QuickstartError(f"{path}: unreadable stage record ({e}); delete it to redo the "
                              f"{stage} stage") from None
    if record.get("config") != _section(plan, stage):
        raise QuickstartError(
            f"{path}: the {stage} stage finished with another quickstart config than "
            f"{plan.qc.name!r}; rerun with --fresh to start over, or use another --out")
    return record


def mark_finished(plan: Plan, stage: str, seconds: float, result: dict,
                  estimate_s: float | None = None) -> dict:
    record = {"stage": stage, "config": _section(plan, stage), "seconds": round(seconds, 1),
              "estimate": None if estimate_s is None else round(estimate_s, 1),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result,
              "loadavg": [round(x, 2) for x in os.getloadavg()],  # machine load at the end
              "command": plan.command(stage) if stage != "eval" else None}
    path = plan.marker(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str))
    tmp.replace(path)
    return record


def prepare_out(plan: Plan, fresh: bool) -> None:
    """Create OUT, refuse a non-empty directory the quickstart did not make, apply --fresh."""
    out = plan.out
    state = out / STATE_FILE
    if out.exists() and any(out.iterdir()) and not state.exists():
        raise QuickstartError(f"{out}: exists and was not written by `hibari quickstart` (no "
                              f"{STATE_FILE}); choose another --out")
    if fresh and out.exists():
        for name in OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"config": plan.qc.to_dict()}, indent=1, ensure_ascii=False,
                                default=list))


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def run_data(plan: Plan) -> dict:
    from hibari.data.cli import build_parser, prepare_config_from_args
    from hibari.data.pipeline import prepare, summary
    args = build_parser().parse_args(plan.argv("data"))
    report = prepare(prepare_config_from_args(args))
    print(summary(report), end="", file=sys.stderr)
    t = report["totals"]
    return {"read_docs": t["read_docs"], "read_chars": t["read_chars"],
            "filtered_docs": t["filtered_docs"], "dropped": t["dropped"],
            "dedup_docs": t["dedup_docs_out"], "exact_removed": t["exact_removed"],
            "near_removed": t["near_removed"], "tokenizer": report["tokenizer"]["heldout"],
            "packed": report["pack"], "packed_heldout": report.get("pack_heldout", {}),
            "summary": summary(report)}


def run_training(plan: Plan, stage: str) -> dict:
    from hibari.train.loop import train
    config = plan.train_config(stage)
    workdir = plan.dir(stage)
    if stage == "pretrain":  # config.loss.token_selection (Rho-1) as `hibari pretrain` does
        from hibari.train.cli import token_selection_task
        task = token_selection_task(config, workdir=workdir)
    elif stage == "sft":
        from hibari.align.tasks import sft_task
        task = sft_task(config)
    else:
        from hibari.align.tasks import preference_task
        task = preference_task(config, workdir)
    summary = train(config, workdir, task)
    if summary.get("stopped_by"):
        raise Interrupted(f"{stage} stopped by {summary['stopped_by']} at step "
                          f"{summary['step']} (checkpoint saved)")
    from hibari.model import ModelConfig, count_params
    cfg = ModelConfig.from_dict(config.model.to_dict())
    result = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and k != "mfu"}
    if summary.get("data_counts"):  # examples read, kept, dropped as too long or malformed
        result["data_counts"] = summary["data_counts"]
    result.update(params=count_params(cfg)._asdict(), model=cfg.to_dict(),
                  tokens=config.steps * config.data.batch_size * config.data.seq_len)
    if stage == "pretrain":
        from hibari.data.loader import unigram_cross_entropy
        result["unigram_eval_loss"] = unigram_cross_entropy(
            config.data.path, config.data.eval_path, cfg.vocab_size)
    return result


def heldout_task_paths(plan: Plan) -> dict[str, Path]:
    """One perplexity task per language of the prepared data (run after the data stage)."""
    report = json.loads((plan.dir("data") / "report.json").read_text())
    return {lang: plan.dir("eval") / "tasks" / f"heldout_{lang}.yaml"
            for lang in report["config"]["languages"]}


def write_heldout_tasks(plan: Plan) -> dict[str, list[str]]:
    """Perplexity task files over the held-out documents of each language (never trained on);
    returns their texts."""
    from hibari.data.pipeline import split_docs
    from hibari.data.sources import write_jsonl
    data_cfg = json.loads((plan.dir("data") / "report.json").read_text())["config"]
    docs = list(split_docs(str(plan.dir("data") / "corpus.jsonl.gz"), data_cfg["heldout_every"],
                           heldout=True))
    texts = {}
    for lang, yaml_path in heldout_task_paths(plan).items():
        chosen = [d for d in docs if d["meta"].get(data_cfg["source_field"]) == lang]
        if plan.qc.eval.heldout_docs:
            chosen = chosen[:plan.qc.eval.heldout_docs]
        yaml_path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(str(yaml_path.with_suffix(".jsonl")),
                    ({"id": d["id"], "text": d["text"]} for d in chosen))
        yaml_path.write_text(
            f"# Held-out documents ({lang}) of {plan.dir('data')}: never trained on.\n"
            f"name: heldout_{lang}\nkind: perplexity\n"
            f"data: {{format: text, path: {yaml_path.with_suffix('.jsonl').name}}}\n"
            "perplexity: {window: null, stride: null}\n", encoding="utf-8")
        texts[lang] = [d["text"] for d in chosen]
    return texts


def unigram_bpb(log_p, tokenizer, texts: list[str]) -> float:
    """Bits per byte of a unigram model (`log_p[v]`) on `texts`, tokenized as the harness
    tokenizes them: the context-free baseline in the harness's units."""
    from hibari.evaluation.tokenizer import utf8_len
    nll = -sum(float(log_p[tokenizer.encode(t, bos=False)].sum()) for t in texts)
    return nll / (math.log(2) * sum(utf8_len(t) for t in texts))


def instruction_prompt(template_name: str, instruction: str) -> str:
    from hibari.align.templates import get_template
    return "".join(s.text for s in get_template(template_name).prompt({"instruction": instruction}))


def without_word_perplexity(result: dict) -> dict:
    """A harness result of a held-out text task without `word_perplexity` when its language is
    written without word boundaries (UNSEGMENTED)."""
    lang = result["task"].split("_", 1)[1] if result["task"].startswith("heldout_") else ""
    if lang not in UNSEGMENTED:
        return result
    drop = lambda d: {k: v for k, v in d.items() if k != "word_perplexity"}
    return {**result, "metrics": drop(result["metrics"]),
            "stderr": drop(result.get("stderr") or {})}


def evaluate_model(plan: Plan, model: str, score_pairs: Callable, template: str,
                   score_sft: Callable | None = None) -> dict:
    """Harness tasks, held-out pair log-probs (`score_pairs(cfg)` -> (ids, score(params))),
    the held-out SFT examples' response-token loss (`score_sft(cfg)` -> (ids, score(params)
    -> (nll, tokens))) and greedy generations through the SFT `template` of one model."""
    import numpy as np

    from hibari.base.progress import progress_bar
    from hibari.evaluation.lm import load_lm
    from hibari.evaluation.report import write_results
    from hibari.evaluation.runner import evaluate_task
    from hibari.evaluation.tasks import load_task
    qc, out = plan.qc, plan.dir("eval") / model
    lm = load_lm(plan.dir(model), plan.tokenizer, batch_size=qc.eval.batch_size)
    tasks = [load_task(n) for n in qc.eval.tasks] + \
        [load_task(p) for p in heldout_task_paths(plan).values()]
    results = []
    steps = progress_bar(f"eval {model}", len(tasks) + 2, unit=" steps")
    for task in tasks:  # progress within each task too (requests scored or generated)
        within = progress_bar(f"eval {model} {task.name}", 0, unit=" requests")
        results.append(without_word_perplexity(
            evaluate_task(lm, task, limit=qc.eval.limit or None, progress=within)))
        within.finish()
        steps.advance(1)
    write_results(out, results, {"checkpoint": str(plan.dir(model)), "command":
                                 plan.eval_command(model)})
    ids, score = score_pairs(lm.cfg)
    logps = score(lm.params)
    np.save(out / "pair_logps.npy", logps)
    sft_heldout = None
    if score_sft is not None:
        sft_ids, sft_score = score_sft(lm.cfg)
        nll, n_tokens = sft_score(lm.params)
        sft_heldout = {"ids": sft_ids, "nll": [float(x) for x in nll],
                       "tokens": [int(x) for x in n_tokens]}
    steps.advance(1)
    generations = []
    for kind, prompts in (("text", qc.prompts.text), ("instruction", qc.prompts.instruction)):
        shown = [p if kind == "text" else instruction_prompt(template, p) for p in prompts]
        outs = lm.generate(shown, max_new_tokens=qc.eval.max_new_tokens)
        generations += [{"kind": kind, "prompt": p, "completion": o}
                        for p, o in zip(prompts, outs)]
    steps.advance(1)
    steps.finish()
    summary = {"metrics": {r["task"]: r["metrics"] for r in results},
               "stderr": {r["task"]: r["stderr"] for r in results},
               "n": {r["task"]: r["n"] for r in results},
               "pairs": {"ids": ids, "logps": logps.tolist()}, "sft_heldout": sft_heldout,
               "generations": generations, "command": plan.eval_command(model)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def run_judge_stage(plan: Plan) -> dict:
    """`hibari judge` on the SFT and DPO models (configs/quickstart.py field `judge`)."""
    from hibari.evaluation.arena import run_judge
    from hibari.evaluation.judge_cli import parse_judge_flags
    fv = parse_judge_flags(plan.argv("judge"))
    results = run_judge(fv.config, plan.dir("judge"), command=plan.command("judge"))
    return {k: results[k] for k in ("pairwise", "single", "bias", "judge", "prompts")}


def run_slick_stage(plan: Plan) -> dict:
    """`hibari slick` on one trained model (configs/quickstart.py field `slick`)."""
    from hibari.evaluation.slick import run_slick
    from hibari.evaluation.slick_cli import parse_slick_flags
    fv = parse_slick_flags(plan.argv("slick"))
    config = fv.config
    config.checkpoint, config.tokenizer = fv.checkpoint, fv.tokenizer
    return run_slick(config, plan.dir("slick"))


def run_eval(plan: Plan) -> dict:
    import numpy as np

    from hibari.data.loader import target_counts, unigram_probs
    from hibari.evaluation.tokenizer import load_tokenizer
    texts = write_heldout_tasks(plan)
    tokenizer = load_tokenizer(plan.tokenizer)
    log_p = np.log(unigram_probs(target_counts(str(plan.dir("data") / "packed"),
                                               tokenizer.vocab_size)))
    baseline = {lang: unigram_bpb(log_p, tokenizer, t) for lang, t in texts.items() if t}
    from hibari.align.tasks import heldout_pair_scorer, heldout_sft_scorer
    dpo_config = plan.train_config("dpo")
    sft_config = plan.train_config("sft")
    template = sft_config.data.template
    # The models share one shape: the pairs / SFT examples are tokenized and the scorers
    # compiled once.
    score_pairs = functools.lru_cache(lambda cfg: heldout_pair_scorer(dpo_config, cfg))
    score_sft = functools.lru_cache(lambda cfg: heldout_sft_scorer(sft_config, cfg))
    models = {}
    for model in MODELS:
        path = plan.dir("eval") / model / "summary.json"
        if path.exists():  # finished before an interruption
            models[model] = json.loads(path.read_text())
            continue
        models[model] = evaluate_model(plan, model, score_pairs, template, score_sft)
    return {"unigram_bpb": baseline, "models": models}


# ---------------------------------------------------------------------------------------------
# Estimate
# ---------------------------------------------------------------------------------------------

# Fitted to a fresh-clone default quickstart on an idle 2-core machine (BENCHMARKS.md,
# "Quickstart"; 2026-12-01: data 9 s, pretrain 183 s, sft 39 s, dpo 31 s, eval 30 s): achieved
# training FLOP/s is this fraction of a large float32 matmul's; other overheads in seconds.
TRAIN_EFFICIENCY = 0.16
COMPILE_S = {"pretrain": 15.0, "sft": 10.0, "dpo": 8.0}
DATA_S = 10.0
EVAL_S_PER_MODEL = 10.0
EXTRA_S = {"judge": 15.0, "slick": 12.0}  # the optional stages (`--with`): 11.7 s, 10.1 s idle
EXTRA_S_CI = {"judge": 10.0, "slick": 5.0}


def matmul_flops_per_s() -> float:
    """float32 matmul FLOP/s of this machine's default device (about half a second)."""
    import jax
    import jax.numpy as jnp
    a, b = jnp.ones((1024, 512)), jnp.ones((512, 1024))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        f(a, b).block_until_ready()
        n += 1
    return n * 2 * 1024 * 512 * 1024 / (time.perf_counter() - start)


def estimate(plan: Plan) -> dict[str, float]:
    """Seconds per stage on this machine, from the models' FLOPs and a measured matmul rate."""
    from hibari.model import ModelConfig, flops_per_token
    rate = matmul_flops_per_s() * TRAIN_EFFICIENCY
    qc = plan.qc
    base = load_python_config(qc.pretrain.base, "pretrain.base", QuickstartError)
    apply_overrides(base, qc.pretrain.overrides, "pretrain.overrides", QuickstartError)
    model = base.model.to_dict()
    model.update(vocab_size=qc.data.tokenizer_vocab_size, max_seq_len=qc.data.seq_len)
    cfg = ModelConfig.from_dict(model)
    seconds = {"data": DATA_S}
    for stage in MODELS:
        ov = qc[stage].overrides
        seq = ov.get("data", {}).get("seq_len", qc.data.seq_len)
        batch = ov.get("data", {}).get("batch_size", base.data.batch_size)
        tokens = ov.steps * batch * seq
        seconds[stage] = COMPILE_S[stage] + tokens * flops_per_token(cfg, seq) / rate
    seconds["eval"] = EVAL_S_PER_MODEL * len(MODELS) * (0.3 if qc.eval.limit else 1.0)
    seconds.update(EXTRA_S_CI if qc.eval.limit else EXTRA_S)
    return seconds


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def run(plan: Plan, fresh: bool = False, until: str | None = None,
        extra: tuple[str, ...] = ()) -> Path:
    """Run (or resume) every stage up to `until` and the `extra` stages (after eval), then
    write the report; returns its path."""
    from hibari.quickstart_report import write_report
    prepare_out(plan, fresh)
    todo = STAGES[:STAGES.index(until) + 1] if until else STAGES
    extra = tuple(s for s in EXTRA_STAGES if s in extra)
    if extra and "eval" not in todo:
        raise QuickstartError(f"--with {' '.join(extra)} runs after eval; drop --until {until}")
    todo += extra
    shown = STAGES + tuple(s for s in EXTRA_STAGES if s in extra or plan.marker(s).exists())
    records = {s: finished(plan, s) for s in shown}
    pending = [s for s in todo if records[s] is None]
    guess = estimate(plan) if pending else {}
    if pending:
        print(f"hibari quickstart: {len(pending)} stage(s) to run ({', '.join(pending)}); "
              f"estimated {sum(guess[s] for s in pending) / 60:.1f} min on this machine: "
              + ", ".join(f"{s} {guess[s]:.0f} s" for s in pending), file=sys.stderr)
    runners = {"data": run_data, "eval": run_eval, "judge": run_judge_stage,
               "slick": run_slick_stage,
               **{m: (lambda p, m=m: run_training(p, m)) for m in MODELS}}
    for i, stage in enumerate(todo, 1):
        if records[stage] is not None:
            print(f"[{i}/{len(todo)}] {stage}: finished earlier "
                  f"({records[stage]['seconds']:.0f} s), skipped", file=sys.stderr)
            continue
        print(f"[{i}/{len(todo)}] {stage}: {plan.command(stage) if stage != 'eval' else 'evaluating ' + ', '.join(MODELS)}",
              file=sys.stderr)
        start = time.perf_counter()
        result = runners[stage](plan)
        records[stage] = mark_finished(plan, stage, time.perf_counter() - start, result,
                                       guess.get(stage))
    return write_report(plan, records)


def quickstart_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="hibari quickstart",
        description="the whole pipeline on the bundled bilingual corpus (CPU, minutes): data, "
                    "tokenizer, pretraining, SFT, DPO, evaluation, OUT/report.md")
    p.add_argument("--out", default="runs/quickstart", help="output directory (resumed if it "
                   "holds an earlier quickstart)")
    p.add_argument("--config", default="configs/quickstart.py",
                   help="quickstart config file[:size], e.g. configs/quickstart.py:ci")
    p.add_argument("--fresh", action="store_true",
                   help="delete what an earlier quickstart wrote in OUT and start over")
    p.add_argument("--until", choices=STAGES, help="stop after this stage (the report covers "
                   "the stages done so far)")
    p.add_argument("--with", dest="extra", nargs="+", default=[], choices=EXTRA_STAGES,
                   help="optional stages after eval: judge (LLM-as-a-judge on the SFT and DPO "
                   "models, with the judge's bias report), slick (SliCK knowledge categories)")
    args = p.parse_args(argv)
    from hibari.train.cli import setup_logging
    setup_logging()
    try:
        report = run(load_plan(args.config, args.out), args.fresh, args.until,
                     tuple(args.extra))
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"\nhibari quickstart: interrupted ({e or 'Ctrl-C'}); rerun the same command to "
              "resume: finished stages are kept", file=sys.stderr)
        return 130
    print(f"hibari quickstart: report at {report}")
    return 0
