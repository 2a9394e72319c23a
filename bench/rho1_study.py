"""Rho-1 on the quickstart data: all tokens vs the top 60% by excess loss over a reference model
trained on a curated subset, compared by held-out bits/byte (en and ja separately).

    hibari quickstart --out /tmp/qs_rho1 --until data        # the prepared data (~1 min)
    python bench/rho1_study.py --quickstart /tmp/qs_rho1 --out /tmp/rho1_study

Curated subset: the quality classifier of configs/data/quality.py (hashed n-gram logistic
regression, reference = the vendored corpus, other = its planted-noise copies, seed 0) scores
every training document; the reference is trained on the `--curated-share` (default 50%) of each
language's documents it rates most reference-like. Per language, because a reference that has
not seen a language gives its tokens a high reference loss, so a small excess loss, and the
selection drops them (an English-only reference: ja 1.5375 -> 1.8698 bits/byte, +0.332).
Reference, all-token and Rho-1 runs: the quickstart's pretraining config (4.3M tokens seen: 300
steps x 8 x 512, seed 0), the same steps, seed and data order; the reference has the same shape.
Held-out: the documents the data stage held out (never trained on, by any of the three), scored
whole by the evaluation harness (`hibari.evaluation.neurons.score_texts`); standard errors over
documents (delta method), and of the paired difference to the all-token run.

Measured 2026-12-01 (2-core CPU shared with other jobs, `--mode live`), the default 300 steps
(4.3M tokens per run, the quickstart's pretraining; about 8.5 min per run), bits/byte ± s.e.
over documents, the change paired with the all-token run:

| run (300 steps) | en bits/byte | en vs all tokens | ja bits/byte | ja vs all tokens |
|---|---|---|---|---|
| all tokens | 1.9109 ± 0.0617 |  | 1.5377 ± 0.0506 |  |
| top 60% (Rho-1) | 1.9081 ± 0.0689 | -0.0028 ± 0.0120 | 1.5214 ± 0.0521 | -0.0164 ± 0.0043 |
| reference (curated subset) | 1.8989 ± 0.0696 | -0.0120 ± 0.0162 | 1.4927 ± 0.0518 | -0.0450 ± 0.0061 |

    python bench/rho1_study.py --quickstart /tmp/qs_rho1 --out /tmp/rho1_study300

Top 60% leaves en unchanged (-0.003 ± 0.012) and improves ja (-0.016 ± 0.004); the curated
reference itself is better still on ja (-0.045 ± 0.006).

And with `--steps 100` (1.4M
tokens per run, a third of the quickstart's 300 steps, for CPU time), bits/byte ± s.e. over
documents (en 23, ja 33 held-out documents); the change is paired with the all-token run:

| run | en bits/byte | en vs all tokens | ja bits/byte | ja vs all tokens | train s |
|---|---|---|---|---|---|
| all tokens | 2.3433 ± 0.0661 |  | 1.9211 ± 0.0701 |  | 338 |
| top 60% (Rho-1) | 2.3822 ± 0.0696 | +0.0388 ± 0.0054 | 1.9036 ± 0.0696 | -0.0175 ± 0.0028 | 291 |
| reference (curated subset) | 2.3618 ± 0.0703 | +0.0185 ± 0.0083 | 1.8976 ± 0.0703 | -0.0235 ± 0.0041 | 404 |

    python bench/rho1_study.py --quickstart /tmp/qs_rho1 --out /tmp/rho1_study100 --steps 100

Curated subset: en 221 of 442 training documents (kjv 178, debian-reference 29, botchan 11,
manpages-ja 3: English pages of the Japanese sources), ja 334 of 668 (manpages-ja 291,
debian-reference 43). The classifier's reference is the corpus itself, so it rates typicality
(unlike planted noise), not quality: the subset leans to each language's largest source. All-token
held-out loss at step 100 (eval_nll, 12 batches): all tokens 6.2740, Rho-1 6.2752 nats/token.
At this length Rho-1 trades English (+0.039 bits/byte) for Japanese (-0.018); the reference itself,
trained on half the documents for as many steps, is better on ja and worse on en than all tokens.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time


def curated_docs(data_dir: str, share: float, seed: int = 0) -> tuple[dict[str, list], dict]:
    """The training documents (not held out) the quality classifier rates most reference-like:
    per language, the ceil(share * n) with the highest P(reference)."""
    from hibari.data import CORPUS_DIR
    from hibari.data.clean import clean_docs
    from hibari.data.pipeline import split_docs
    from hibari.data.quality import ClassifierConfig, percentile_keep, plant_noise, train_classifier
    from hibari.data.sources import read_docs
    report = json.load(open(os.path.join(data_dir, "report.json")))["config"]
    reference = list(clean_docs(read_docs([os.path.join(CORPUS_DIR, "*.jsonl.gz")],
                                          nonempty=True)))
    noisy, labels = plant_noise(reference, rate=1.0, seed=seed)
    clf = train_classifier([d["text"] for d in reference],
                           [d["text"] for d, label in zip(noisy, labels) if label],
                           ClassifierConfig(seed=seed))
    docs = list(split_docs(os.path.join(data_dir, "corpus.jsonl.gz"), report["heldout_every"],
                           heldout=False))
    langs = [d["meta"][report["source_field"]] for d in docs]
    p = clf.score(d["text"] for d in docs)
    keep = percentile_keep(-p, langs, share)  # lowest -P = highest P(reference)
    chosen: dict[str, list] = {}
    for d, lang, k in zip(docs, langs, keep):
        if k:
            chosen.setdefault(lang, []).append(d)
    stats = {lang: {"docs": int(sum(1 for x in langs if x == lang)),
                    "kept": len(chosen.get(lang, [])),
                    "sources_kept": _count(d["meta"].get("source") for d in chosen.get(lang, []))}
             for lang in sorted(set(langs))}
    return chosen, stats


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def heldout_texts(data_dir: str) -> dict[str, list[str]]:
    from hibari.data.pipeline import split_docs
    report = json.load(open(os.path.join(data_dir, "report.json")))["config"]
    texts: dict[str, list[str]] = {}
    for d in split_docs(os.path.join(data_dir, "corpus.jsonl.gz"), report["heldout_every"],
                        heldout=True):
        texts.setdefault(d["meta"][report["source_field"]], []).append(d["text"])
    return texts


def train_run(config, workdir: str, with_selection: bool) -> dict:
    from hibari.train.cli import token_selection_task
    from hibari.train.loop import train
    task = token_selection_task(config, workdir=workdir) if with_selection else None
    start = time.perf_counter()
    summary = train(config, workdir, task)
    if summary.get("stopped_by"):  # a checkpoint was saved: rerun the same command to resume
        raise SystemExit(f"{workdir}: stopped by {summary['stopped_by']}; rerun to resume")
    return {"seconds": round(time.perf_counter() - start, 1),
            **{k: v for k, v in summary.items() if isinstance(v, (int, float))}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quickstart", default="/tmp/qs_rho1",
                   help="a `hibari quickstart --until data` output directory")
    p.add_argument("--out", default="/tmp/rho1_study")
    p.add_argument("--keep-ratio", type=float, default=0.6)
    p.add_argument("--curated-share", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=0, help="0: the quickstart's pretraining steps")
    p.add_argument("--mode", choices=("live", "cached"), default="live")
    args = p.parse_args(argv)

    from hibari.data.pack import pack_corpus
    from hibari.evaluation.lm import load_lm
    from hibari.evaluation.neurons import paired_change, score_texts
    from hibari.quickstart import load_plan
    from hibari.train.cli import setup_logging
    setup_logging()
    plan = load_plan("configs/quickstart.py", args.quickstart)
    data_dir = str(plan.dir("data"))
    base = plan.train_config("pretrain")
    if args.steps:
        base.steps = args.steps
    os.makedirs(args.out, exist_ok=True)
    results: dict = {"command": " ".join(["python", "bench/rho1_study.py"] + sys.argv[1:]),
                     "steps": base.steps, "keep_ratio": args.keep_ratio,
                     "curated_share": args.curated_share, "mode": args.mode, "runs": {}}

    # 1. the curated subset and the reference trained on it
    chosen, results["curated"] = curated_docs(data_dir, args.curated_share)
    curated_dir = os.path.join(args.out, "curated_packed")
    if not os.path.exists(os.path.join(curated_dir, "manifest.json")):
        pack_corpus({lang: iter(docs) for lang, docs in sorted(chosen.items())},
                    str(plan.tokenizer), curated_dir, base.data.seq_len, "best_fit")
    ref_config = copy.deepcopy(base)
    with ref_config.unlocked():
        ref_config.data.path = curated_dir
    runs = {"reference": os.path.join(args.out, "reference"),
            "all": os.path.join(args.out, "all"), "rho1": os.path.join(args.out, "rho1")}
    results["runs"]["reference"] = train_run(ref_config, runs["reference"], False)
    # 2. all tokens vs the top keep_ratio share, same steps, seed and data order
    results["runs"]["all"] = train_run(base, runs["all"], False)
    rho1 = copy.deepcopy(base)
    with rho1.unlocked():
        rho1.loss.token_selection.enabled = True
        rho1.loss.token_selection.keep_ratio = args.keep_ratio
        rho1.loss.token_selection.reference = runs["reference"]
        rho1.loss.token_selection.mode = args.mode
    results["runs"]["rho1"] = train_run(rho1, runs["rho1"], True)

    # 3. held-out bits/byte per language, with standard errors over documents
    texts = heldout_texts(data_dir)
    scores = {}
    for name, workdir in runs.items():
        lm = load_lm(workdir, plan.tokenizer, batch_size=8)
        scores[name] = {lang: score_texts(lm, t) for lang, t in sorted(texts.items())}
    table = {}
    for name in runs:
        table[name] = {}
        for lang in sorted(texts):
            s = scores[name][lang]
            row = {"bits_per_byte": s["bits_per_byte"], "stderr": s["bits_per_byte_stderr"],
                   "documents": s["documents"]}
            if name != "all":
                change = paired_change(s, scores["all"][lang])
                row.update(change=change["bits_per_byte_change"],
                           change_stderr=change["bits_per_byte_change_stderr"])
            table[name][lang] = row
    results["heldout_bits_per_byte"] = table
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    table = results["heldout_bits_per_byte"]
    langs = sorted(next(iter(table.values())))
    names = {"all": "all tokens", "rho1": f"top {results['keep_ratio']:.0%} (Rho-1)",
             "reference": "reference (curated subset)"}
    lines = ["| run | " + " | ".join(f"{lang} bits/byte | {lang} vs all tokens" for lang in langs)
             + " | train s |", "|---" * (2 * len(langs) + 2) + "|"]
    for name in ("all", "rho1", "reference"):
        cells = []
        for lang in langs:
            r = table[name][lang]
            cells.append(f"{r['bits_per_byte']:.4f} ± {r['stderr']:.4f}")
            cells.append(f"{r['change']:+.4f} ± {r['change_stderr']:.4f}" if "change" in r
                         else "")
        lines.append(f"| {names[name]} | " + " | ".join(cells)
                     + f" | {results['runs'][name]['seconds']:.0f} |")
    docs = ", ".join(f"{lang} {table['all'][lang]['documents']}" for lang in langs)
    cur = ", ".join(f"{lang} {c['kept']}/{c['docs']} docs {c['sources_kept']}"
                    for lang, c in results["curated"].items())
    return "\n".join(lines + ["", f"held-out documents: {docs}; curated subset: {cur}; "
                              f"{results['steps']} steps each; {results['command']}"])


if __name__ == "__main__":
    sys.exit(main())
