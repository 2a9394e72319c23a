"""The quickstart's measured stage effects: the preference pairs' rule on the real seed tasks,
the effect numbers with standard errors in the report (from synthetic stage records, checked
against hand computations), reference lines, word perplexity hidden for Japanese, and
BENCHMARKS.md's quickstart section rewritten between its markers."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from hibari.quickstart import STAGES, load_plan, mark_finished, without_word_perplexity
from hibari.quickstart_report import (
    BENCH_BEGIN,
    BENCH_END,
    LN2,
    main,
    reference_lines,
    stage_effects,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "align" / "assets"
CI_CONFIG = "configs/quickstart.py:ci"


def _build_assets():
    spec = importlib.util.spec_from_file_location("build_assets", ASSETS / "build_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_follow_one_rule_on_the_real_seed_tasks():
    """Every pair: chosen is the task's real output, rejected is it minus its last word; one
    pair per output of two words or more; the shipped file is what the builder writes."""
    from hibari.align.templates import seed_task_records
    build = _build_assets()
    tasks = [json.loads(line) for line in open(ASSETS / "seed_tasks.jsonl", encoding="utf-8")]
    records = list(seed_task_records(tasks))
    pairs = build.preference_pairs(records)
    outputs = {r["id"]: r["output"] for r in records}
    assert len(pairs) == sum(len(o.split()) >= 2 for o in outputs.values()) == 150
    for p in pairs:
        words = p["chosen"].split()
        assert p["chosen"] == outputs[p["id"]] and p["rule"] == "cut_short"
        assert p["rejected"].split() == words[:-1]  # the same words, the last one missing
        assert p["chosen"].startswith(p["rejected"])  # a prefix: only the ending differs
    shipped = [json.loads(line) for line in open(ASSETS / "seed_pairs.jsonl", encoding="utf-8")]
    assert shipped == pairs


def test_word_perplexity_is_dropped_for_unsegmented_languages_only():
    result = {"task": "heldout_ja", "metrics": {"bits_per_byte": 1.5, "word_perplexity": 6e11},
              "stderr": {}}
    assert without_word_perplexity(result)["metrics"] == {"bits_per_byte": 1.5}
    en = dict(result, task="heldout_en")
    assert without_word_perplexity(en) is en


def test_reference_lines_on_the_training_plots():
    dpo = reference_lines("dpo")
    assert list(dpo["DPO loss, -log sigmoid(reward margin)"].values()) == [math.log(2)]
    assert list(dpo["preference accuracy"].values()) == [0.5]
    assert reference_lines("pretrain", unigram=7.0) == {
        "loss (nats/token)": {"unigram baseline, held-out": 7.0}}
    assert reference_lines("sft", start=5.8) == {
        "loss (nats/token)": {"pretrained model, held-out instructions": 5.8}}


# Synthetic eval records: 4 held-out SFT examples and 4 held-out pairs per model.
NLL = {"pretrain": [12.0, 30.0, 8.0, 20.0], "sft": [10.0, 24.0, 6.0, 20.0],
       "dpo": [10.0, 25.0, 6.0, 21.0]}
TOKENS = [2, 5, 2, 4]
# columns: log p(chosen), log p(rejected)
LOGPS = {"pretrain": [[-10, -9], [-5, -6], [-8, -7], [-4, -3]],
         "sft": [[-10, -9], [-5, -6], [-8, -7], [-4, -3]],
         "dpo": [[-9, -10], [-4, -6], [-8, -8], [-4, -2]]}
BPB = {"pretrain": {"en": 1.9, "ja": 1.5}, "sft": {"en": 2.0, "ja": 1.4},
       "dpo": {"en": 2.0, "ja": 1.45}}


def _eval_result():
    models = {}
    for m in ("pretrain", "sft", "dpo"):
        models[m] = {
            "metrics": {"commonsense_qa_sample": {"acc": 0.2}, "piqa_sample": {"acc": 0.5},
                        **{f"heldout_{k}": {"bits_per_byte": v} for k, v in BPB[m].items()}},
            "stderr": {"commonsense_qa_sample": {"acc": 0.05}, "piqa_sample": {"acc": 0.07}},
            "n": {"commonsense_qa_sample": 8, "piqa_sample": 8},
            "pairs": {"ids": ["a", "b", "c", "d"], "logps": LOGPS[m]},
            "sft_heldout": {"ids": ["e", "f", "g", "h"], "nll": NLL[m], "tokens": TOKENS},
            "generations": []}
    return {"unigram_bpb": {"en": 2.7, "ja": 2.1}, "models": models}


def _records(plan):
    records = {s: None for s in STAGES}
    records["pretrain"] = {"stage": "pretrain", "seconds": 10.0, "estimate": None,  # no packed
                           "finished": "2026-01-01 00:00:00", "loadavg": [1.0, 1.0, 1.0],
                           "result": {"eval_loss": 5.0, "unigram_eval_loss": 7.0, "step": 30,
                                      "tokens": 1000, "params": {"total": 9, "non_embedding": 3},
                                      "model": {"d_model": 8, "n_layers": 1, "n_heads": 1,
                                                "vocab_size": 6}}}
    records["eval"] = mark_finished(plan, "eval", 5.0, _eval_result(), estimate_s=6.0)
    return records


def test_training_accuracy_gets_its_standard_error():
    from hibari.quickstart_report import accuracy_with_se
    # 14 of 15: p = 14/15, s.e. = sqrt(p (1 - p) / (n - 1)) for 0/1 outcomes (ddof 1)
    p = 14 / 15
    assert accuracy_with_se(p, 15) == f"{p:.4f} ± {math.sqrt(p * (1 - p) / 14):.4f} (n=15)"
    assert accuracy_with_se(0.5, None) == "0.5000"


def test_stage_effects_match_hand_computations(tmp_path):
    effects = stage_effects(_records(load_plan(CI_CONFIG, tmp_path)))
    # SFT: per-example nats/token; pretrained [6, 6, 4, 5], SFT [5, 4.8, 3, 5]
    pre, sft = effects["sft"]["response_loss"]["pretrain"], effects["sft"]["response_loss"]["sft"]
    assert pre["mean"] == pytest.approx(5.25) and sft["mean"] == pytest.approx(4.45)
    diff = np.array([-1.0, -1.2, -1.0, 0.0])  # SFT minus pretrained, per example
    d = effects["sft"]["difference"]
    assert d["mean"] == pytest.approx(diff.mean())
    assert d["stderr"] == pytest.approx(diff.std(ddof=1) / 2) and d["n"] == 4
    assert effects["sft"]["token_weighted"]["pretrain"] == pytest.approx(70 / 13)
    # DPO: pair accuracy (ties 1/2), implicit reward accuracy against SFT
    acc = effects["dpo"]["pair_accuracy"]
    assert acc["sft"]["rate"] == pytest.approx(0.25)  # only pair b prefers chosen
    assert acc["dpo"]["rate"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    # margins vs SFT: a +2, b +1, c +1, d -1 -> 3 of 4
    reward = effects["dpo"]["reward_accuracy"]
    assert reward["rate"] == pytest.approx(0.75) and reward["stderr"] == pytest.approx(0.25)


def test_report_states_effects_with_standard_errors(tmp_path):
    plan = load_plan(CI_CONFIG, tmp_path)
    md = write_report(plan, _records(plan)).read_text()
    assert "### Stage effects on held-out data" in md
    assert "| SFT | response-token loss on 4 held-out instructions" in md
    assert "5.250 ± " in md and "4.450 ± " in md
    assert "0.750 ± 0.250" in md  # implicit reward accuracy
    assert "0.2500 ± 0.2500" in md  # the SFT row's pair accuracy in the full table
    assert "General-text bits/byte (en) rose from 1.900 to 2.000 after SFT" in md
    # DPO per example [5, 5, 3, 5.25] against SFT's [5, 4.8, 3, 5]: differences [0, .2, 0, .25]
    d = np.array([0.0, 0.2, 0.0, 0.25])
    assert (f"from 4.450 to 4.562 nats/token (paired difference {d.mean():.3f} ± "
            f"{d.std(ddof=1) / 2:.3f})") in md
    assert "(ja) rose from 1.500 to 1.400" not in md  # it fell: not reported as worse
    assert "General-text bits/byte (ja) rose from 1.400 to 1.450 after DPO" in md
    assert "0.2000 ± 0.0500" in md  # multiple-choice rows carry their standard error
    assert "not above chance by 2 s.e." in md  # 0.75 ± 0.25 with 4 pairs
    assert "stopped before its last word" in md  # the pairs' rule is stated
    assert (tmp_path / "plots" / "effects.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["effects"]["dpo"]["reward_accuracy"]["n"] == 4
    assert report["eval"]["loadavg"] and len(report["eval"]["loadavg"]) == 3
    assert LN2 == pytest.approx(0.6931, abs=1e-4)


def test_benchmarks_section_rewritten_between_markers(tmp_path, capsys):
    plan = load_plan(CI_CONFIG, tmp_path / "qs")
    write_report(plan, _records(plan))
    bench = tmp_path / "BENCHMARKS.md"
    before, after = "# Benchmarks\n\n## Quickstart\n\nhand-written intro\n\n", "\n\n## Next\nx\n"
    bench.write_text(before + BENCH_BEGIN + "\nstale numbers\n" + BENCH_END + after)
    assert main(["--benchmarks", str(tmp_path / "qs"), "--file", str(bench)]) == 0
    text = bench.read_text()
    assert text.startswith(before + BENCH_BEGIN) and text.endswith(BENCH_END + after)
    assert "stale numbers" not in text
    assert "Load average (1 min) when the stages ended" in text
    assert "| eval | 5.0 | 6.0 |" in text and "0.750 ± 0.250" in text
    # idempotent: a second run gives the same file
    assert main(["--benchmarks", str(tmp_path / "qs"), "--file", str(bench)]) == 0
    assert bench.read_text() == text
    bench.write_text("no markers here")
    assert main(["--benchmarks", str(tmp_path / "qs"), "--file", str(bench)]) == 2
    assert "no quickstart markers" in capsys.readouterr().err
    assert main(["--benchmarks", str(tmp_path / "nothing"), "--file", str(bench)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_heldout_sft_scorer_matches_a_per_example_forward_pass():
    """The held-out SFT examples' response loss equals a brute-force forward pass of each
    example alone: -sum of log softmax at the response (loss-masked) targets."""
    import jax

    from hibari.align import sft
    from hibari.align.tasks import encoder_of, heldout_sft_scorer, split_data
    from hibari.base.config_files import load_python_config
    from hibari.model import apply, init
    from hibari.train.loop import model_config
    config = load_python_config("configs/sft/instruct.py:alpaca_en", "test")
    config.model.update(dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                             d_ff=64))
    config.data.update(dict(seq_len=256, batch_size=8))
    cfg = model_config(config)
    params = init(cfg, jax.random.key(0))
    ids, score = heldout_sft_scorer(config, cfg)
    nll, tokens = score(params)
    encoder = encoder_of(config, cfg)
    _, held = split_data(config, lambda paths, skipped: sft.load_examples(
        paths, encoder, config.data.template, config.data.seq_len, skipped))
    assert ids == [x.id for x in held] and len(ids) >= 5
    for i, x in enumerate(held[:5]):
        logits = np.asarray(apply(cfg, params, np.asarray(x.tokens)[None]), np.float64)[0]
        top = logits.max(-1, keepdims=True)
        log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        targets = np.flatnonzero(np.asarray(x.loss_mask)[1:])  # predictions of masked tokens
        expected = -sum(log_p[t, x.tokens[t + 1]] for t in targets)
        assert tokens[i] == len(targets)
        assert nll[i] == pytest.approx(expected, rel=2e-4)
