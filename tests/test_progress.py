"""Progress that shows without a terminal (training, data stages, evaluation within a task),
the compile step left out of the ETA, the alignment data's skip notice logged once per split and
its counts in the training summary."""
import io
import itertools
import json
import logging
import re

import jax
import pytest

from hibari.base.progress import Progress, progress_bar
from hibari.base.resources import resource_path

TOKENIZER = str(resource_path("hibari.align", "assets", "seed_sp.model"))


def steady_clock(compile_s=100.0, step_s=1.0):
    """0 at creation, then the first step ends after `compile_s` and each later one `step_s`
    after the previous: a compiling first step."""
    return lambda it=itertools.chain([0.0], itertools.count(compile_s, step_s)): next(it)


# ------------------------------------------------------------------ the helper


def test_lines_without_a_terminal_exclude_the_first_step_and_carry_a_postfix():
    lines = []
    p = progress_bar("train", 11, unit=" steps", exclude_first=True, log=lines.append,
                     every=2.0, clock=steady_clock(), tty=False)
    for step in range(1, 12):
        p.set_postfix(loss=f"{10.0 / step:.2f}")
        p.update(step)
    p.finish()
    # after the compile step (t=100), one step per second: rate 1/s, ETA = steps left
    assert lines[0] == "train: 3/11 steps (1/s, ETA 8 s) loss=3.33"
    assert lines[1] == "train: 5/11 steps (1/s, ETA 6 s) loss=2.00"
    assert lines[-1] == "train: 11/11 steps in 111.0 s loss=0.91"  # the whole time, compile too
    lines.clear()  # without the exclusion the compile step dominates the rate
    p = Progress("train", 11, lines.append, " steps", every=2.0, clock=steady_clock())
    for step in range(1, 4):
        p.update(step)
    assert lines == ["train: 1/11 steps (0.01/s, ETA 1000 s)",
                     f"train: 3/11 steps ({3 / 102:.2g}/s, ETA {8 / (3 / 102):.0f} s)"]


def test_unknown_and_growing_totals_and_a_bar_on_a_terminal():
    lines = []
    p = progress_bar("pack en", None, unit=" docs", log=lines.append, every=1.0,
                     clock=steady_clock(0.0, 0.5), tty=False)
    assert list(p.track(range(4))) == [0, 1, 2, 3]
    assert lines == ["pack en: 3 docs (3/s)", "pack en: 4 docs in 2.0 s"]  # no total: no ETA
    lines.clear()
    p = progress_bar("task", 0, unit=" requests", log=lines.append, every=0.0,
                     clock=steady_clock(1.0, 1.0), tty=False)
    p.add_total(4)
    p.advance(2)
    p.add_total(4)
    p.advance(2)
    assert lines == ["task: 2/4 requests (2/s, ETA 1 s)", "task: 4/8 requests (2/s, ETA 2 s)"]
    stream, lines = io.StringIO(), []  # a terminal: the bar, no lines; its rate starts late
    p = progress_bar("train", 5, unit=" steps", exclude_first=True, stream=stream,
                     log=lines.append, every=0.0, tty=True)
    p.update(1)
    assert p.bar.initial == 1  # tqdm's rate is (n - initial) / (time since the first step)
    first = stream.getvalue().split("\r")[-1]
    assert "1/5" in first and "?steps/s" in first  # no rate / ETA from the compile step
    p.set_postfix(loss="1.00")
    p.update(5)
    p.finish()
    assert lines == [] and "train" in stream.getvalue() and "5/5" in stream.getvalue()
    quiet = progress_bar("train", 5, enabled=False, stream=stream, tty=True)
    quiet.update(5)
    assert quiet.bar is None and quiet.finish() >= 0


# ------------------------------------------------------------------ training


def test_training_without_a_terminal_logs_step_loss_rate_and_a_steady_eta(tmp_path):
    from hibari.configs.pretrain.llama import get_config
    from hibari.train.loop import train
    c = get_config("tiny")
    c.update(steps=6, log_every=1, eval_every=0, checkpoint_every=0, async_checkpoint=False)
    c.data.update(batch_size=8, seq_len=32)
    c.model.update(max_seq_len=32, vocab_size=128)
    c.optim.warmup_steps = 2
    out = io.StringIO()  # not a terminal
    summary = train(c, tmp_path / "run", progress_stream=out, progress_every=2.0,
                    clock=steady_clock(), devices=jax.devices()[:1])
    lines = out.getvalue().splitlines()
    pattern = re.compile(r"llama-tiny: (\d)/6 steps \((\S+)/s, ETA (\d+) s\) "
                         r"loss=(\S+) tokens/s=(\S+)$")
    found = [pattern.match(line) for line in lines[:-1]]
    assert [m.group(1) for m in found] == ["3", "5"]
    for m in found:  # 1 step/s after the compile step: ETA = the steps left
        done = int(m.group(1))
        assert float(m.group(2)) == 1.0 and int(m.group(3)) == 6 - done
        assert float(m.group(4)) > 0 and float(m.group(5)) > 0
    assert lines[-1].startswith("llama-tiny: 6/6 steps in 106.0 s loss=")
    assert lines[-1].endswith(f"loss={summary['loss']:.4f} tokens/s={summary['tokens_per_s']:.3g}")


# ------------------------------------------------------------------ data stages


def test_data_stages_log_lines_without_a_terminal(tmp_path, capsys):
    from hibari.data.dedup import NearDedupConfig, compute_signatures
    from hibari.data.pack import pack_corpus
    docs = [{"id": f"d{i}", "text": f"document number {i} says hello to the world"}
            for i in range(6)]
    paths = []
    for k in range(2):
        paths.append(str(tmp_path / f"in{k}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs[3 * k:3 * k + 3])
    compute_signatures(paths, str(tmp_path / "sig"), NearDedupConfig(num_perm=16))
    pack_corpus({"en": docs}, TOKENIZER, str(tmp_path / "packed"), 32)
    err = capsys.readouterr().err
    assert re.search(r"^minhash: 2/2 shards in \d+\.\d s$", err, re.M)
    assert re.search(r"^pack en: 6 docs in \d+\.\d s$", err, re.M)


def test_clean_and_filter_log_lines_without_a_terminal(tmp_path, capsys):
    from hibari.data.pipeline import PrepareConfig, prepare
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": (f"Paragraph {i}. " +
                                       "The quick brown fox jumps over the lazy dog. " * 8)})
                           + "\n" for i in range(5)))
    prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "out")))
    assert re.search(r"^clean\+filter: 1/1 shards in \d+\.\d s$", capsys.readouterr().err, re.M)


# ------------------------------------------------------------------ evaluation within a task


@pytest.fixture(scope="module")
def tiny_lm():
    from hibari.evaluation.lm import LanguageModel
    from hibari.evaluation.tokenizer import load_tokenizer
    from hibari.model import ModelConfig, init
    tok = load_tokenizer(TOKENIZER)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                      max_seq_len=256)
    return LanguageModel(cfg, init(cfg, jax.random.key(0)), tok, batch_size=2)


@pytest.mark.parametrize("name,limit", [("commonsense_qa_sample", 3), ("nq_open_sample", 3)])
def test_evaluation_shows_requests_done_within_a_task(tiny_lm, name, limit):
    from hibari.evaluation.runner import evaluate_task
    from hibari.evaluation.tasks import load_task
    task = load_task(name)
    examples = task.examples()[:limit]
    # one request per choice (choice tasks) or per prompt (generation)
    total = sum(len(e["choices"]) for e in examples) if task.kind == "choice" else limit
    lines = []
    progress = Progress(name, 0, lines.append, " requests", every=0.0,
                        clock=steady_clock(0.0, 1.0))
    evaluate_task(tiny_lm, task, limit=limit, progress=progress)
    progress.finish()
    counts = [tuple(map(int, re.match(rf"{name}: (\d+)/(\d+) requests", line).groups()))
              for line in lines]
    assert counts[-1] == (total, total)
    assert all(t == total for _, t in counts)
    done = [d for d, _ in counts]
    assert done == sorted(done) and len(done) >= 2 and done[0] < total  # lines within the task


# ------------------------------------------------------------------ alignment data


def test_skip_notice_logged_once_per_split_and_counts_in_the_summary(tmp_path, caplog):
    from hibari.align import tasks
    from hibari.configs.base import align_config
    from hibari.train.loop import train
    good = [{"instruction": f"Name colour {i}.", "output": "Red and blue."} for i in range(12)]
    long = {"instruction": "Say it.", "output": "Red. " * 200}
    train_lines = [json.dumps(r) for r in good + [long, long, {"instruction": "No output."}]]
    train_lines.insert(3, "{not json")
    (tmp_path / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in good[:4] + [long])
                                         + "\n")
    c = align_config("sft-test", steps=2, seq_len=64, batch_size=4)
    c.mesh.data = 1
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64)
    c.data.update(tokenizer=TOKENIZER, train_path=str(tmp_path / "train.jsonl"),
                  eval_path=str(tmp_path / "eval.jsonl"), template="alpaca_en")
    c.update(log_every=1, eval_every=0, checkpoint_every=0, async_checkpoint=False)
    with caplog.at_level(logging.WARNING):
        task = tasks.sft_task(c)
        summary = train(c, tmp_path / "run", task, progress_stream=io.StringIO(),
                        devices=jax.devices()[:1])
    notices = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(notices) == 2  # one per split
    train_notice = [n for n in notices if "train.jsonl" in n]
    eval_notice = [n for n in notices if "eval.jsonl" in n]
    assert len(train_notice) == 1 and len(eval_notice) == 1
    assert "skipped 4 of 16 examples (2 too long, 2 malformed)" in train_notice[0]
    assert "skipped 1 of 5 examples (1 too long, 0 malformed)" in eval_notice[0]
    counts = summary["data_counts"]
    pick = lambda d: {k: d[k] for k in ("read", "kept", "too_long", "malformed")}  # noqa: E731
    assert pick(counts["train"]) == {"read": 16, "kept": 12, "too_long": 2, "malformed": 2}
    assert pick(counts["eval"]) == {"read": 5, "kept": 4, "too_long": 1, "malformed": 0}
    assert counts["examples"] == {"train": 12, "eval": 4}
    assert sum(counts["train"]["reasons"].values()) == 4
    assert json.loads((tmp_path / "run" / "data_counts.json").read_text()) == counts
