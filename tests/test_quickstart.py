"""`hibari quickstart`: stage records, resume, the report, the unigram baseline; the CI-sized
pipeline end to end with an interruption (Ctrl-C) and resumed reruns."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hibari.base.resources import resource_path
from hibari.quickstart import (
    STAGES,
    QuickstartError,
    finished,
    load_plan,
    mark_finished,
    override_flags,
    prepare_out,
)

REPO = Path(__file__).resolve().parent.parent
CI_CONFIG = "configs/quickstart.py:ci"
SECTIONS = ("## Stages", "## 1. Data", "## 2. Pretraining", "## 3. Instruction tuning (SFT)",
            "## 4. Preference optimisation (DPO)", "## 5. Evaluation",
            "## 6. Sample generations", "## 7. Run each stage alone")


def test_override_flags_flatten_nested_fields():
    assert override_flags({"steps": 3, "model": {"d_model": 64, "qk_norm": False},
                           "data": {"path": "a/b"}}) == [
        "--config.steps=3", "--config.model.d_model=64", "--config.model.qk_norm=False",
        "--config.data.path=a/b"]


def test_stage_commands_parse_to_the_configured_values(tmp_path):
    """The printed `hibari sft ...` command is what the stage runs: parsing it yields the
    quickstart's overrides on top of the base config."""
    plan = load_plan(CI_CONFIG, tmp_path)
    config = plan.train_config("sft")
    ov = plan.qc.sft.overrides
    assert config.steps == ov.steps and config.data.seq_len == ov.data.seq_len
    assert config.optim.lr == ov.optim.lr and config.init_from == str(tmp_path / "pretrain")
    assert config.data.tokenizer == str(tmp_path / "data" / "tokenizer.model")
    assert plan.command("sft").startswith("hibari sft --config configs/sft/instruct.py:")


def test_bad_override_names_the_field(tmp_path):
    cfg = tmp_path / "qs.py"
    source = (REPO / "configs" / "quickstart.py").read_text()
    cfg.write_text(source.replace("optim=dict(lr=3e-3)", "optim=dict(learning_rate=3e-3)"))
    with pytest.raises(QuickstartError, match=r"pretrain\.overrides\.optim\.learning_rate"):
        load_plan(str(cfg), tmp_path / "out")


def test_out_dir_guard_and_fresh_keep_foreign_files(tmp_path):
    plan = load_plan(CI_CONFIG, tmp_path / "out")
    foreign = tmp_path / "out"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(QuickstartError, match="not written by `hibari quickstart`"):
        prepare_out(plan, fresh=False)
    # a quickstart dir: --fresh removes what the quickstart wrote, nothing else
    (foreign / "quickstart.json").write_text("{}")
    (foreign / "pretrain").mkdir()
    (foreign / "pretrain" / "x").write_text("1")
    mark_finished(plan, "data", 1.0, {})
    prepare_out(plan, fresh=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not (foreign / "pretrain").exists() and not plan.marker("data").exists()


def test_a_stage_finished_with_another_config_is_refused(tmp_path):
    plan = load_plan(CI_CONFIG, tmp_path)
    mark_finished(plan, "data", 2.0, {"ok": 1})
    assert finished(plan, "data")["result"] == {"ok": 1}
    assert finished(plan, "pretrain") is None
    other = load_plan(CI_CONFIG, tmp_path)
    other.qc.data.tokenizer_vocab_size = 1234
    with pytest.raises(QuickstartError, match="--fresh"):
        finished(other, "data")
    plan.marker("sft").write_text("{torn")
    with pytest.raises(QuickstartError, match="sft.json: unreadable"):
        finished(plan, "sft")


def test_unigram_baseline_matches_brute_force(tmp_path):
    """Next-token targets within segments, add-one unigram of the train rows, on real text."""
    from hibari.data.loader import unigram_cross_entropy
    from hibari.data.pack import pack_corpus
    tok = str(resource_path("hibari.align", "assets", "seed_sp.model"))
    lines = [json.loads(x) for x in
             resource_path("hibari.align", "assets", "seed_sft.jsonl").read_text().splitlines()]
    docs = [{"id": r["id"], "text": r["instruction"] + "\n" + r["output"], "meta": {}}
            for r in lines]
    pack_corpus({"all": iter(docs[:120])}, tok, str(tmp_path / "train"), 64)
    pack_corpus({"all": iter(docs[120:])}, tok, str(tmp_path / "held"), 64)

    def targets(d):
        out = []
        for f in sorted(Path(d).glob("*.npy")):
            for tokens, seg in np.load(f):
                out += [int(tokens[t + 1]) for t in range(len(tokens) - 1)
                        if seg[t + 1] == seg[t] and seg[t + 1] != 0]
        return out
    train, held = targets(tmp_path / "train"), targets(tmp_path / "held")
    counts = {v: 1 for v in range(1000)}
    for v in train:
        counts[v] += 1
    total = sum(counts.values())
    expected = -sum(math.log(counts[v] / total) for v in held) / len(held)
    assert unigram_cross_entropy(tmp_path / "train", tmp_path / "held", 1000) == \
        pytest.approx(expected, rel=1e-9)


def test_data_counts_shown_in_the_report():
    from hibari.quickstart_report import data_count_rows
    counts = {"train": {"read": 175, "kept": 163, "too_long": 12, "malformed": 0},
              "examples": {"train": 137, "eval": 26}}
    assert data_count_rows(counts) == [
        ["train data: records read / kept", "175 / 163 (dropped: 12 too long)"],
        ["examples trained on / held out", "137 / 26"]]
    assert data_count_rows(None) == []


def test_optional_stages_run_after_eval_only(tmp_path):
    from hibari.quickstart import run
    with pytest.raises(QuickstartError, match="--with judge runs after eval"):
        run(load_plan(CI_CONFIG, tmp_path / "qs"), until="sft", extra=("judge",))


def test_report_renders_before_anything_ran(tmp_path):
    from hibari.quickstart_report import write_report
    plan = load_plan(CI_CONFIG, tmp_path)
    md = write_report(plan, {s: None for s in STAGES}).read_text()
    for section in SECTIONS:
        assert section in md
    assert md.count("Not run yet") >= 5
    assert "<h2>5. Evaluation</h2>" in (tmp_path / "report.html").read_text()


# ---------------------------------------------------------------------------------------------
# End to end (CI size)
# ---------------------------------------------------------------------------------------------

def _env():
    return dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")


def _quickstart(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hibari", "quickstart", "--out", str(out),
                           "--config", CI_CONFIG, *extra], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900)


def _snapshot(out: Path, stages) -> dict:
    """Contents of each stage record and mtimes of everything in its directory."""
    snap = {}
    for s in stages:
        snap[s] = (out / "stages" / f"{s}.json").read_text()
        for p in sorted((out / s).rglob("*")):
            if p.is_file():
                snap[str(p)] = p.stat().st_mtime_ns
    return snap


@pytest.mark.slow
def test_quickstart_end_to_end_interrupt_resume_and_report(tmp_path):
    out = tmp_path / "qs"
    # 1. Ctrl-C during pretraining: exit 130, a checkpoint is left, nothing is marked done.
    log = tmp_path / "first.log"
    with open(log, "w") as f:  # a file, not a pipe: progress bars would fill a pipe's buffer
        proc = subprocess.Popen([sys.executable, "-m", "hibari", "quickstart", "--out",
                                 str(out), "--config", CI_CONFIG], cwd=REPO, env=_env(),
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not list((out / "pretrain" / "checkpoints").glob("1*")) and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "rerun the same command to resume" in err
    assert (out / "stages" / "data.json").exists()
    assert not (out / "stages" / "pretrain.json").exists()

    # 2. Resume, stopping after SFT: pretraining continues from its checkpoint.
    r = _quickstart(out, "--until", "sft")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[1/3] data: finished earlier" in r.stderr
    pretrain = json.loads((out / "stages" / "pretrain.json").read_text())["result"]
    assert pretrain["start_step"] > 0 and pretrain["step"] == 30
    md = (out / "report.md").read_text()
    assert all(s in md for s in SECTIONS) and "Not run yet" in md
    before = _snapshot(out, ("data", "pretrain", "sft"))

    # 3. The rest, with the optional judge and SliCK stages: earlier stages untouched.
    r = _quickstart(out, "--with", "judge", "slick")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f"hibari quickstart: report at {out / 'report.md'}"
    assert _snapshot(out, ("data", "pretrain", "sft")) == before
    md = (out / "report.md").read_text()
    assert all(s in md for s in SECTIONS) and "Not run yet" not in md
    for png in ("pretrain", "sft", "dpo", "eval_bpb"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png}.png" in md
    assert "| unigram baseline |" in md and "| DPO |" in md
    assert md.count("**pretrained**") == len(_ci_prompts())
    assert "hibari dpo --config configs/dpo/pairs.py:dpo" in md
    assert "## 8. LLM-as-a-judge" in md and "## 9. SliCK" in md and "position consistency" in md
    assert "train data: records read / kept" in md  # SFT's and DPO's dropped examples counted
    assert "hibari judge --config configs/judge/arena.py:quickstart" in md
    judged = json.loads((out / "judge" / "results.json").read_text())
    assert [row["model"] for row in judged["pairwise"]["without"]["ratings"]] != []
    assert sum(json.loads((out / "slick" / "results.json").read_text())["summary"]["counts"]
               .values()) == 3
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="plots/dpo.png"' in html
    evaluation = json.loads((out / "stages" / "eval.json").read_text())["result"]
    for model in ("pretrain", "sft", "dpo"):
        metrics = evaluation["models"][model]["metrics"]
        assert 0 < metrics["heldout_en"]["bits_per_byte"] < 10
        assert 0 <= metrics["piqa_sample"]["acc"] <= 1

    # 4. Everything finished: a rerun recomputes nothing.
    everything = _snapshot(out, STAGES)
    r = _quickstart(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("finished earlier") == len(STAGES)
    assert _snapshot(out, STAGES) == everything

    # 5. The README's `hibari eval` / `hibari generate` examples on the quickstart's models, as
    # the README shows them (runs/quickstart -> this quickstart, relative to another folder, so
    # each run's tokenizer must be found from its recorded paths), --limit 2 to keep it short.
    import re
    import shlex

    from test_docs import shown_commands
    readme_text = (REPO / "README.md").read_text()
    examples = [shlex.split(c, comments=True) for _, c in shown_commands([REPO / "README.md"])]
    examples = [a for a in examples if a[1] in ("eval", "generate")
                and a[a.index("--checkpoint") + 1].startswith("runs/quickstart/")]
    assert sorted({a[1] for a in examples}) == ["eval", "generate"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probing = {k: v for k, v in _env().items() if k != "JAX_PLATFORMS"}  # JAX probes for a TPU
    for argv in examples:
        argv = [a.replace("runs/quickstart", "../qs") for a in argv[1:]]
        prompt = None
        if argv[0] == "eval":
            argv += ["--limit", "2"]
        else:
            echoed = re.search(r'echo "([^"]*)" \| hibari generate', readme_text)
            prompt = echoed.group(1) + "\n"
        r = subprocess.run([sys.executable, "-m", "hibari", *argv], cwd=elsewhere, env=probing,
                           input=prompt, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"hibari {shlex.join(argv)}\n{r.stderr[-3000:]}"
        assert not re.search(r"\btpu\b|libtpu", r.stderr, re.I), r.stderr[-2000:]
        if argv[0] == "eval":
            out_dir = elsewhere / argv[argv.index("--out") + 1]
            results = json.loads((out_dir / "results.json").read_text())
            assert "mmlu_sample" in json.dumps(results)
        else:  # one completion line (the CI model may well complete with spaces)
            assert r.stdout.endswith("\n") and r.stdout.count("\n") == 1, r.stdout


def _ci_prompts():
    from hibari.quickstart import load_plan as lp
    qc = lp(CI_CONFIG, "unused").qc
    return list(qc.prompts.text) + list(qc.prompts.instruction)


def test_report_reads_the_all_token_heldout_loss_of_a_token_selection_run():
    from hibari.quickstart_report import _final, heldout_key
    plain = [{"step": 5, "eval_loss": 3.0}]
    selective = [{"step": 5, "eval_loss": 2.0, "eval_nll": 3.5}]  # kept tokens vs all tokens
    assert _final(plain, heldout_key(plain)) == 3.0
    assert _final(selective, heldout_key(selective)) == 3.5
