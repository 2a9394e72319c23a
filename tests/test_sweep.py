"""Sweeps: member expansion (names, shapes, IsoFLOP budgets), config errors, an end-to-end tiny
sweep with resume, the results tables read by evaluation.scaling, and the ablation report."""
import csv
import json
import math

import jax
import ml_collections
import numpy as np
import pytest

from hibari.configs.sweeps._common import ORIGINAL_TRANSFORMER, sweep_defaults
from hibari.sweep import (
    SweepConfigError,
    choose_steps,
    expand,
    is_finished,
    member_table,
    run_sweep,
)


def tiny_sweep(**fields) -> ml_collections.ConfigDict:
    """A sweep of very small models on the synthetic source (seq_len 32, batch 8)."""
    c = sweep_defaults()
    c.name = "t"
    c.widths = (32, 64)
    c.aspect = 32
    c.head_dim = 16
    c.overrides = ml_collections.ConfigDict(
        {"data": {"seq_len": 32}, "model": {"vocab_size": 128}, "eval_batches": 1})
    for key, value in fields.items():
        c[key] = value
    return c


def independent_param_count(config) -> int:
    """Parameters of the model's actual pytree (not model.counting)."""
    from hibari.model import param_shapes
    from hibari.train.loop import model_config
    shapes = param_shapes(model_config(config))
    return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))


def test_isoflop_members_hit_their_budgets():
    sweep = tiny_sweep(mode="isoflop", budgets=(1e10, 3e10), widths=(32, 64, 96), aspect=16,
                       min_steps=1)
    members, skipped = expand(sweep)
    assert skipped == [] and len(members) == 6
    for m in members:
        tokens_per_step = m.config.data.batch_size * m.config.data.seq_len
        n = independent_param_count(m.config)
        assert m.n == m.n_total == n
        assert m.tokens == m.config.steps * tokens_per_step
        realised = 6 * n * m.config.steps * tokens_per_step
        # steps move at most step_tolerance (2%) plus rounding to a whole step
        slack = sweep.step_tolerance + 6 * n * tokens_per_step / m.budget
        assert abs(realised / m.budget - 1) <= slack, (m.name, realised, m.budget)
        assert realised == pytest.approx(m.flops_6nd)
        assert m.config.steps % m.config.eval_every == 0


def test_isoflop_non_embedding_count_and_min_steps():
    sweep = tiny_sweep(mode="isoflop", budgets=(2e9,), param_count="non_embedding", min_steps=20)
    members, skipped = expand(sweep)
    assert [m.name for m in members] == ["d32-l1-C2e9"]
    assert skipped and skipped[0].startswith("d64-l2-C2e9: ")
    m = members[0]
    assert m.n == m.n_non_embedding < m.n_total
    assert abs(m.flops_6nd / 2e9 - 1) < 0.02 + 6 * m.n * 256 / 2e9


def test_grid_expands_to_stable_readable_names():
    variants = ml_collections.ConfigDict({"pp": {}, "orig": ORIGINAL_TRANSFORMER})
    sweep = tiny_sweep(variants=variants, seeds=(0, 1), lrs=(1e-3, 3e-3), tokens=(2560,))
    names = [m.name for m in expand(sweep)[0]]
    assert names == [f"d{d}-l{d // 32}-D2560-{v}-lr{lr}-s{s}" for d in (32, 64)
                     for v in ("orig", "pp") for lr in ("0.001", "0.003") for s in (0, 1)]
    assert names == [m.name for m in expand(sweep)[0]]  # stable
    by_name = {m.name: m for m in expand(sweep)[0]}
    orig, pp = by_name["d64-l2-D2560-orig-lr0.003-s1"], by_name["d64-l2-D2560-pp-lr0.003-s1"]
    assert (orig.config.model.norm, orig.config.model.mlp, orig.config.model.position,
            orig.config.model.use_bias, orig.config.optim.b2) == (
                "layernorm", "relu", "sinusoidal", True, 0.98)
    assert (orig.config.model.d_ff, pp.config.model.d_ff) == (256, 176)  # 4d; 8/3 d up to 16
    assert (pp.config.model.n_heads, pp.config.model.n_layers) == (4, 2)
    assert pp.config.seed == 1 and pp.config.optim.lr == 3e-3 and pp.steps == 10
    assert pp.setting == orig.setting == "d64-l2-D2560-lr0.003"


def test_single_axis_values_stay_out_of_names():
    assert [m.name for m in expand(tiny_sweep(tokens=(2560,)))[0]] == ["d32-l1-D2560",
                                                                       "d64-l2-D2560"]


@pytest.mark.parametrize("raw,points,tol", [(100, 8, 0.02), (137, 8, 0.02), (997, 10, 0.02),
                                            (10, 4, 0.0), (5000.4, 8, 0.01), (3, 8, 0.02)])
def test_choose_steps_divides_and_stays_close(raw, points, tol):
    steps, every = choose_steps(raw, points, tol)
    assert steps % every == 0
    assert abs(steps - raw) <= max(tol * raw, 0.5) + 1e-9
    if tol * raw >= 20:  # enough room to find a good divisor
        assert abs(steps // every - points) <= 1


@pytest.mark.parametrize("field,value,message", [
    ("mode", "random", "mode='random'"),
    ("widths", (40,), "widths: 40 is not a multiple of head_dim=16"),
    ("seeds", (), "seeds=()"),
    ("variants", ml_collections.ConfigDict({"bad": {"model": {"nrom": "layernorm"}}}),
     "variants.bad.model.nrom"),
    ("variants", ml_collections.ConfigDict({"bad": {"optim": {"b2": "high"}}}),
     "variants.bad.optim.b2='high'"),
    ("variants", ml_collections.ConfigDict({"a b": {}}), "variants.a b"),
    ("base", "configs/pretrain/llama", "base="),
])
def test_bad_sweep_config_names_the_field(field, value, message):
    sweep = tiny_sweep()
    sweep[field] = value
    with pytest.raises(SweepConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand(sweep)


def test_isoflop_without_budgets_names_the_field():
    with pytest.raises(SweepConfigError, match="budgets"):
        expand(tiny_sweep(mode="isoflop", budgets=(0.0,)))


def test_is_finished_needs_the_last_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10)) + '{"step": 2')
    assert is_finished(tmp_path, 10) and not is_finished(tmp_path, 12)
    assert not is_finished(tmp_path / "missing", 1)


def test_dry_run_prints_the_member_table(capsys):
    from hibari.sweep_cli import sweep_main
    assert sweep_main(["--config", "configs/sweeps/chinchilla_tiny.py:synthetic", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "d64-l4-C2e12" in out and "members" in out and "6ND" in out
    from hibari.configs.sweeps.chinchilla_tiny import get_config
    members, _ = expand(get_config("synthetic"))
    assert member_table(members).splitlines()[1].split()[0] == members[0].name


@pytest.mark.slow
def test_tiny_sweep_runs_resumes_and_reports(tmp_path):
    from hibari.evaluation.scaling import load_points
    from hibari.model.counting import count_params
    from hibari.train.loop import model_config
    from hibari.train.metrics import read_metrics
    variants = ml_collections.ConfigDict({"pp": {}, "orig": ORIGINAL_TRANSFORMER})
    sweep = tiny_sweep(widths=(32,), variants=variants, tokens=(2560,), eval_points=2)
    summary = run_sweep(sweep, tmp_path)
    assert summary["trained"] == ["d32-l1-D2560-orig", "d32-l1-D2560-pp"] and not summary["failures"]

    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == summary["trained"]
    for row in rows:
        run_dir = tmp_path / row["run"]
        config = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
        total, non_embedding = count_params(model_config(config))
        assert (int(row["N"]), int(row["N_total"]), int(row["N_non_embedding"])) == (
            total, total, non_embedding)
        assert int(row["D"]) == int(row["step"]) * 8 * 32 == 2560
        assert float(row["C"]) == pytest.approx(6 * total * 2560)
        metrics = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
        assert float(row["loss"]) == pytest.approx(metrics[10]["eval_loss"])
        assert float(row["best_eval_loss"]) == pytest.approx(
            min(r["eval_loss"] for r in metrics.values() if "eval_loss" in r))
        assert float(row["final_train_loss"]) == pytest.approx(metrics[10]["loss"])
        assert float(row["wall_s"]) > 0 and math.isfinite(float(row["loss"]))
    assert rows[0]["norm"] == "layernorm" and rows[1]["norm"] == "rmsnorm"
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2

    curves = load_points(tmp_path / "curves.csv")  # the scaling fit's reader
    assert curves.has_curves and len(curves) == 4 and len(curves.final_points()) == 2
    finals = load_points(tmp_path / "results.csv")
    assert sorted(finals.loss) == sorted(float(r["loss"]) for r in rows)

    report = (tmp_path / "report" / "report.md").read_text()
    assert "| d32-l1-D2560 | orig | 1 |" in report and "| d32-l1-D2560 | pp | 1 |" in report
    assert (tmp_path / "report" / "d32-l1-D2560.png").stat().st_size > 1000

    before = {r["run"]: (tmp_path / r["run"] / "metrics.jsonl").read_bytes() for r in rows}
    again = run_sweep(sweep, tmp_path)
    assert again["trained"] == [] and again["already_finished"] == summary["trained"]
    assert before == {r: (tmp_path / r / "metrics.jsonl").read_bytes() for r in before}


def test_member_config_round_trips_for_subprocess_runs(tmp_path):
    """--parallel runs `hibari pretrain --config hibari/sweep_member.py:JSON`: same config back."""
    from hibari.sweep import _pretrain_command, _write_member_config
    from hibari.sweep_member import get_config
    from hibari.train.loop import model_config, validate_config
    member = expand(tiny_sweep(variants=ml_collections.ConfigDict({"orig": ORIGINAL_TRANSFORMER})))[0][1]
    path = _write_member_config(member, tmp_path / member.name)
    loaded = get_config(str(path))
    assert loaded.to_dict() == json.loads(member.config.to_json())
    assert model_config(loaded) == validate_config(member.config)
    command = _pretrain_command(path, tmp_path / member.name)
    assert command[2:5] == ["hibari", "pretrain", "--config"]
    assert command[5].endswith(f"hibari/sweep_member.py:{path}")
