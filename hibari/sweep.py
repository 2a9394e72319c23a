"""Sweeps: many ordinary pretraining runs from one config, their results table, an ablation report.

    hibari sweep --config configs/sweeps/ablation_tiny.py --workdir runs/ablation [--parallel 2]
    hibari sweep --config configs/sweeps/chinchilla_tiny.py --workdir runs/chinchilla --dry-run
    hibari sweep report runs/ablation

A sweep config (`configs/sweeps/*.py`, fields documented in docs/sweeps.md) names a base pretraining
config and the axes to expand: widths (shapes from a width/depth rule), variants (ablation switches
as nested overrides), learning rates, seeds, and either token budgets (`mode="grid"`) or FLOP
budgets (`mode="isoflop"`: D = C / (6N) tokens per size). Every member is a run directory
`WORKDIR/<member>/`; a finished member (its metrics reach its last step) is skipped on a rerun and
an interrupted one resumes from its checkpoint. Results: `results.csv`/`results.jsonl` (one row per
member), `curves.csv` (one row per evaluation), `report/` (markdown + PNG), fed to
`hibari scaling fit`.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import ml_collections

from hibari.base.config_files import ConfigFileError, apply_overrides, load_python_config
from hibari.base.resources import resource_path

log = logging.getLogger(__name__)

MODES = ("grid", "isoflop")
PARAM_COUNTS = ("total", "non_embedding")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
SWITCHES = (("model", "norm"), ("model", "mlp"), ("model", "position"), ("model", "use_bias"),
            ("optim", "b2"), ("optim", "schedule"))
STATUS_FILE = "sweep_status.json"
MEMBER_CONFIG = "member_config.json"


class SweepConfigError(ConfigFileError):
    """The sweep config is invalid; the message names the field and what to do."""


@dataclasses.dataclass
class Member:
    """One run of a sweep: its name, resolved pretraining config and planned size/tokens/FLOPs."""

    name: str
    config: ml_collections.ConfigDict
    variant: str
    seed: int
    lr: float
    width: int
    budget: float | None  # the IsoFLOP target C (6ND), None in grid mode
    n_total: int
    n_non_embedding: int
    n: int  # the count used for 6ND (sweep.param_count)
    steps: int
    tokens: int  # D = steps * batch_size * seq_len
    flops_6nd: float
    flops_attention: float  # flops_per_token(cfg, seq_len) * D

    @property
    def setting(self) -> str:
        """The member's name without variant and seed: members compared in the ablation report."""
        return _join_name(self.width_tag, self.budget_tag, self.lr_tag) or "all"

    width_tag: str = ""
    budget_tag: str = ""
    lr_tag: str = ""


# ---------------------------------------------------------------------------------------------
# Loading and validating a sweep config
# ---------------------------------------------------------------------------------------------

def _require(sweep, field: str, check, what: str):
    value = sweep.get(field)
    if not check(value):
        raise SweepConfigError(f"sweep config field {field}={value!r}: {what}")
    return value


def _positive_list(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)


def validate_sweep(sweep: ml_collections.ConfigDict) -> None:
    """Check every field the expansion relies on; errors name the field."""
    _require(sweep, "name", lambda v: isinstance(v, str) and bool(NAME_RE.match(v)),
             "a non-empty name of letters, digits, '_', '.', '-'")
    _require(sweep, "base", lambda v: isinstance(v, str) and (v.endswith(".py") or ".py:" in v),
             "a pretraining config 'path.py[:arg]', e.g. 'configs/pretrain/llama.py:tiny'")
    _require(sweep, "mode", lambda v: v in MODES, f"choose from {MODES}")
    _require(sweep, "widths", lambda v: _positive_list(v) and all(isinstance(w, int) for w in v),
             "a non-empty list of positive integer d_model values")
    _require(sweep, "aspect", lambda v: isinstance(v, int) and v > 0,
             "a positive integer: n_layers = round(d_model / aspect)")
    head_dim = _require(sweep, "head_dim", lambda v: isinstance(v, int) and v > 0,
                        "a positive integer: n_heads = d_model / head_dim")
    for w in sweep.widths:
        if w % head_dim:
            raise SweepConfigError(f"sweep config field widths: {w} is not a multiple of "
                                   f"head_dim={head_dim}; pick widths divisible by head_dim")
    _require(sweep, "ff_multiple", lambda v: isinstance(v, int) and v > 0,
             "a positive integer that d_ff is rounded up to")
    _require(sweep, "seeds", lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(s, int) and s >= 0 for s in v), "a non-empty list of integers >= 0")
    _require(sweep, "lrs", _positive_list, "a non-empty list of positive learning rates")
    _require(sweep, "variants", lambda v: isinstance(v, ml_collections.ConfigDict) and len(v) > 0,
             "a ConfigDict {name: overrides} with at least one variant ({} = the base as is)")
    for name in sweep.variants:
        if not NAME_RE.match(name):
            raise SweepConfigError(f"sweep config field variants.{name}: use letters, digits, "
                                   "'_', '.', '-' (it becomes part of run directory names)")
    if sweep.mode == "isoflop":
        _require(sweep, "budgets", _positive_list, "a non-empty list of FLOP budgets C = 6ND")
        _require(sweep, "param_count", lambda v: v in PARAM_COUNTS,
                 f"the N of C = 6ND; choose from {PARAM_COUNTS}")
    else:
        _require(sweep, "tokens", lambda v: v is None or _positive_list(v),
                 "None (the base config's steps) or a list of token budgets D")
    _require(sweep, "eval_points", lambda v: isinstance(v, int) and v > 0,
             "a positive integer: evaluations per run (the eval interval divides its steps)")
    _require(sweep, "step_tolerance", lambda v: isinstance(v, (int, float)) and 0 <= v < 0.5,
             "a fraction in [0, 0.5): how far steps may move to fit the eval interval")
    _require(sweep, "min_steps", lambda v: isinstance(v, int) and v > 0,
             "a positive integer; members with fewer steps are left out")
    _require(sweep, "warmup_fraction", lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
             "a fraction in [0, 1) of each member's steps")


# ---------------------------------------------------------------------------------------------
# Shapes, steps, overrides
# ---------------------------------------------------------------------------------------------

def round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def shape_for_width(d_model: int, aspect: int, head_dim: int, gated_mlp: bool,
                    ff_multiple: int) -> dict[str, int]:
    """Model shape from the width/depth rule: n_layers = round(d/aspect) (at least 1),
    n_heads = d/head_dim (MHA), d_ff = 8/3 d rounded up to ff_multiple (SwiGLU/GeGLU) else 4d."""
    heads = d_model // head_dim
    d_ff = round_up(8 * d_model / 3, ff_multiple) if gated_mlp else 4 * d_model
    return dict(d_model=d_model, n_layers=max(1, round(d_model / aspect)), n_heads=heads,
                n_kv_heads=heads, head_dim=head_dim, d_ff=d_ff)


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def choose_steps(raw_steps: float, eval_points: int, tolerance: float) -> tuple[int, int]:
    """(steps, eval_every): steps within `tolerance` of `raw_steps` with a divisor `eval_every`
    giving the number of evaluations closest to `eval_points`; ties go to the closest steps.
    The last step is always evaluated (the loop evaluates when step % eval_every == 0)."""
    target = max(1, round(raw_steps))
    lo = max(1, math.ceil(raw_steps * (1 - tolerance)))
    hi = max(lo, math.floor(raw_steps * (1 + tolerance)))
    best = None
    for steps in sorted(range(lo, hi + 1), key=lambda s: (abs(s - raw_steps), s)):
        for every in divisors(steps):
            key = (abs(steps // every - eval_points), abs(steps - raw_steps))
            if best is None or key < best[0]:
                best = (key, steps, every)
    if best is None:
        return target, target
    return best[1], best[2]


def format_number(x: float) -> str:
    """1e13 -> '1e13', 3.2e12 -> '3.2e12', 0.003 -> '0.003': stable, filesystem-safe names."""
    if x >= 1e4:
        mantissa, exponent = f"{x:.3g}".split("e") if "e" in f"{x:.3g}" else (f"{x:.3g}", "0")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{x:g}"


def _join_name(*parts: str) -> str:
    return "-".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------

def _member_config(base, sweep, variant: str, width: int, lr: float, seed: int):
    """The base config with shared overrides, the variant's switches, the width's shape, lr, seed."""
    config = copy.deepcopy(base)
    apply_overrides(config, sweep.get("overrides"), "sweep config field overrides",
                    SweepConfigError)
    apply_overrides(config, sweep.variants[variant], f"sweep config field variants.{variant}",
                    SweepConfigError)
    gated = config.model.mlp in ("swiglu", "geglu")
    shape = shape_for_width(width, sweep.aspect, sweep.head_dim, gated, sweep.ff_multiple)
    config.model.update(shape)
    config.model.max_seq_len = max(config.model.max_seq_len, config.data.seq_len)
    config.optim.lr = float(lr)
    config.seed = int(seed)
    return config


def _set_steps(config, sweep, steps: int, eval_every: int) -> None:
    config.steps = steps
    config.eval_every = eval_every
    config.checkpoint_every = eval_every
    config.log_every = max(1, min(config.log_every, eval_every))
    config.optim.warmup_steps = int(round(sweep.warmup_fraction * steps))


def _counts(config, param_count: str) -> tuple[int, int, int, float]:
    from hibari.model.counting import count_params, flops_per_token
    from hibari.train.loop import model_config
    cfg = model_config(config)
    total, non_embedding = count_params(cfg)
    n = total if param_count == "total" else non_embedding
    return total, non_embedding, n, flops_per_token(cfg, config.data.seq_len)


def expand(sweep: ml_collections.ConfigDict) -> tuple[list[Member], list[str]]:
    """All members of a sweep, in a stable order, and notes on members left out (too few steps)."""
    validate_sweep(sweep)
    base = load_python_config(sweep.base, "sweep config field base", SweepConfigError)
    param_count = sweep.get("param_count", "total")
    many = {axis: len(sweep[axis]) > 1 for axis in ("variants", "lrs", "seeds")}
    budgets = list(sweep.budgets) if sweep.mode == "isoflop" else list(sweep.tokens or [None])
    members, skipped = [], []
    for budget in budgets:
        for width in sweep.widths:
            for variant in sweep.variants:
                for lr in sweep.lrs:
                    for seed in sweep.seeds:
                        config = _member_config(base, sweep, variant, width, lr, seed)
                        member = _plan_member(sweep, config, budget, width, variant, lr, seed,
                                              param_count, many)
                        if member.steps < sweep.min_steps:
                            skipped.append(f"{member.name}: {member.steps} steps < "
                                           f"min_steps={sweep.min_steps}")
                        else:
                            members.append(member)
    names = [m.name for m in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SweepConfigError(f"sweep config: members {duplicates} share a name; make widths, "
                               "budgets, tokens, lrs, seeds and variants distinct")
    return members, skipped


def _plan_member(sweep, config, budget, width, variant, lr, seed, param_count, many) -> Member:
    total, non_embedding, n, per_token = _counts(config, param_count)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    if sweep.mode == "isoflop":
        raw_steps = budget / (6.0 * n) / tokens_per_step
        budget_tag = f"C{format_number(budget)}"
    elif budget is not None:
        raw_steps = budget / tokens_per_step
        budget_tag = f"D{format_number(budget)}"
    else:
        raw_steps, budget_tag = config.steps, ""
    steps, eval_every = choose_steps(raw_steps, sweep.eval_points, sweep.step_tolerance)
    _set_steps(config, sweep, steps, eval_every)
    tokens = steps * tokens_per_step
    width_tag = f"d{width}-l{config.model.n_layers}"
    lr_tag = f"lr{format_number(lr)}" if many["lrs"] else ""
    name = _join_name(width_tag, budget_tag, variant if many["variants"] else "", lr_tag,
                      f"s{seed}" if many["seeds"] else "")
    config.name = f"{sweep.name}/{name}"
    return Member(name=name, config=config, variant=variant, seed=seed, lr=float(lr), width=width,
                  budget=float(budget) if sweep.mode == "isoflop" else None, n_total=total,
                  n_non_embedding=non_embedding, n=n, steps=steps, tokens=tokens,
                  flops_6nd=6.0 * n * tokens, flops_attention=per_token * tokens,
                  width_tag=width_tag, budget_tag=budget_tag, lr_tag=lr_tag)


def member_table(members: list[Member], skipped: Iterable[str] = ()) -> str:
    """The dry-run table: one line per member with its shape, N, D, FLOPs and steps."""
    header = (f"{'member':<34} {'layers':>6} {'d_ff':>5} {'N':>10} {'N_non_emb':>10} {'D':>10} "
              f"{'6ND':>9} {'C_attn':>9} {'budget':>9} {'steps':>6} {'eval_every':>10}")
    lines = [header]
    for m in members:
        budget = f"{m.budget:.2e}" if m.budget else "-"
        lines.append(f"{m.name:<34} {m.config.model.n_layers:>6} {m.config.model.d_ff:>5} "
                     f"{m.n_total:>10,} {m.n_non_embedding:>10,} {m.tokens:>10,} "
                     f"{m.flops_6nd:>9.2e} {m.flops_attention:>9.2e} {budget:>9} {m.steps:>6} "
                     f"{m.config.eval_every:>10}")
    total = sum(m.flops_attention for m in members)
    lines.append(f"{len(members)} members, {sum(m.tokens for m in members):,} tokens, "
                 f"{total:.2e} training FLOPs (attention-inclusive)")
    lines += [f"left out: {s}" for s in skipped]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _dedup_by_step(records: list[dict]) -> list[dict]:
    """metrics.jsonl after a resume repeats steps; the last record of each step wins."""
    by_step = {}
    for r in records:
        if isinstance(r.get("step"), int):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def read_member_metrics(run_dir: Path) -> list[dict]:
    from hibari.train.metrics import read_metrics
    path = run_dir / "metrics.jsonl"
    return _dedup_by_step(read_metrics(path)) if path.exists() else []


def is_finished(run_dir: Path, steps: int) -> bool:
    """A member is finished when its metrics reach its last step."""
    return any(r["step"] >= steps for r in read_member_metrics(run_dir))


def _read_status(run_dir: Path) -> dict:
    path = run_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else {"wall_s": 0.0, "sessions": 0}


def _record_wall_time(run_dir: Path, seconds: float) -> None:
    status = _read_status(run_dir)
    status["wall_s"] = status["wall_s"] + seconds
    status["sessions"] += 1
    (run_dir / STATUS_FILE).write_text(json.dumps(status))


def _write_member_config(member: Member, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / MEMBER_CONFIG
    path.write_text(member.config.to_json_best_effort(indent=2))
    return path


def _pretrain_command(config_path: Path, run_dir: Path) -> list[str]:
    member_config = resource_path("hibari", "sweep_member.py")
    return [sys.executable, "-m", "hibari", "pretrain", "--config",
            f"{member_config}:{config_path}", "--workdir", str(run_dir)]


def _run_in_process(member: Member, run_dir: Path) -> str | None:
    """Train one member here; returns the signal name if SIGTERM/SIGINT stopped it."""
    from hibari.train.cli import token_selection_task
    from hibari.train.loop import train
    start = time.perf_counter()
    task = token_selection_task(member.config, workdir=run_dir)  # as `hibari pretrain` does
    summary = train(member.config, run_dir, task)
    _record_wall_time(run_dir, time.perf_counter() - start)
    return summary.get("stopped_by")


def _run_subprocesses(pending: list[tuple[Member, Path]], parallel: int) -> list[str]:
    """Run members as `hibari pretrain` processes, `parallel` at a time; returns failures."""
    queue, running, failures = list(pending), [], []
    while queue or running:
        while queue and len(running) < parallel:
            member, run_dir = queue.pop(0)
            config_path = _write_member_config(member, run_dir)
            logfile = open(run_dir / "sweep.log", "a")
            proc = subprocess.Popen(_pretrain_command(config_path, run_dir), stdout=logfile,
                                    stderr=subprocess.STDOUT, cwd=os.getcwd())
            running.append((member, run_dir, proc, logfile, time.perf_counter()))
            log.info("started %s (pid %d)", member.name, proc.pid)
        time.sleep(0.5)
        for item in list(running):
            member, run_dir, proc, logfile, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logfile.close()
            _record_wall_time(run_dir, time.perf_counter() - start)
            if proc.returncode != 0:
                failures.append(f"{member.name}: exit status {proc.returncode}, see "
                                f"{run_dir / 'sweep.log'}")
    return failures


def run_sweep(sweep: ml_collections.ConfigDict, workdir: str | Path, parallel: int = 1,
              report: bool = True) -> dict[str, Any]:
    """Train every unfinished member, then write the results tables (and the report)."""
    workdir = Path(workdir)
    members, skipped = expand(sweep)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sweep_config.json").write_text(sweep.to_json_best_effort(indent=2))
    done = [m.name for m in members if is_finished(workdir / m.name, m.steps)]
    pending = [m for m in members if m.name not in done]
    log.info("sweep %s: %d members, %d already finished\n%s", sweep.name, len(members), len(done),
             member_table(members, skipped))
    failures, stopped_by, trained = [], None, []
    if parallel > 1:
        failures = _run_subprocesses([(m, workdir / m.name) for m in pending], parallel)
        trained = [m.name for m in pending]
    else:
        for member in pending:
            trained.append(member.name)
            log.info("sweep %s: training %s (%d steps)", sweep.name, member.name, member.steps)
            _write_member_config(member, workdir / member.name)
            stopped_by = _run_in_process(member, workdir / member.name)
            write_results(members, workdir)
            if stopped_by:
                log.warning("sweep %s: stopped by %s during %s; rerun to resume", sweep.name,
                            stopped_by, member.name)
                break
    rows = write_results(members, workdir)
    if report and rows:
        from hibari.sweep_report import write_report
        write_report(workdir)
    return {"members": len(members), "skipped": skipped, "already_finished": done,
            "trained": trained, "failures": failures, "rows": len(rows),
            "stopped_by": stopped_by}


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

RESULT_COLUMNS = (
    "run", "setting", "variant", "seed", "lr", "budget", "d_model", "n_layers", "n_heads", "d_ff",
    "norm", "mlp", "position", "use_bias", "b2", "schedule",
    "N", "N_total", "N_non_embedding", "D", "C", "C_attention", "loss", "best_eval_loss",
    "final_train_loss", "step", "batch_size", "seq_len", "wall_s")
CURVE_COLUMNS = ("run", "variant", "seed", "setting", "step", "tokens", "N", "D", "C",
                 "C_attention", "loss")


def _switches(config) -> dict[str, Any]:
    return {field: config[section][field] for section, field in SWITCHES}


def heldout_loss(record: dict) -> float:
    """The all-token held-out loss of an evaluation record: "eval_nll" when the run selected
    tokens (Rho-1: its "eval_loss" counts only the kept tokens), else "eval_loss"."""
    value = record.get("eval_nll")
    return value if isinstance(value, (int, float)) else record["eval_loss"]


def member_result(member: Member, run_dir: Path) -> tuple[dict | None, list[dict]]:
    """(results row, curve rows) of a finished member; (None, []) if it has not finished.
    Losses are `heldout_loss`: comparable between all-token and token-selection members."""
    records = read_member_metrics(run_dir)
    final = [r for r in records if r["step"] == member.steps]
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if not final or not evals or "eval_loss" not in final[0]:
        return None, []
    tokens_per_step = member.config.data.batch_size * member.config.data.seq_len
    per_token = member.flops_attention / member.tokens
    model = member.config.model
    row = dict(run=member.name, setting=member.setting, variant=member.variant, seed=member.seed,
               lr=member.lr,
               budget=member.budget if member.budget is not None else "",
               d_model=model.d_model, n_layers=model.n_layers, n_heads=model.n_heads,
               d_ff=model.d_ff, **_switches(member.config), N=member.n, N_total=member.n_total,
               N_non_embedding=member.n_non_embedding, D=member.tokens, C=member.flops_6nd,
               C_attention=member.flops_attention, loss=heldout_loss(final[0]),
               best_eval_loss=min(heldout_loss(r) for r in evals),
               final_train_loss=final[0].get("loss", ""), step=member.steps,
               batch_size=member.config.data.batch_size, seq_len=member.config.data.seq_len,
               wall_s=round(_read_status(run_dir)["wall_s"], 2))
    curve = [dict(run=member.name, variant=member.variant, seed=member.seed,
                  setting=member.setting, step=r["step"], tokens=r["step"] * tokens_per_step,
                  N=member.n, D=r["step"] * tokens_per_step,
                  C=6.0 * member.n * r["step"] * tokens_per_step,
                  C_attention=per_token * r["step"] * tokens_per_step, loss=heldout_loss(r))
             for r in evals]
    return row, curve


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def write_results(members: list[Member], workdir: Path) -> list[dict]:
    """results.csv / results.jsonl (one row per finished member) and curves.csv."""
    rows, curves = [], []
    for member in members:
        row, curve = member_result(member, workdir / member.name)
        if row is not None:
            rows.append(row)
            curves.extend(curve)
    _write_csv(workdir / "results.csv", RESULT_COLUMNS, rows)
    with (workdir / "results.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    _write_csv(workdir / "curves.csv", CURVE_COLUMNS, curves)
    return rows
