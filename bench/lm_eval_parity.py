"""hibari's evaluation harness against lm-evaluation-harness on the same model and prompts.

    python bench/lm_eval_parity.py --checkpoint HF_DIR --tasks commonsense_qa_sample \\
        botchan_perplexity --limit 20 --max-len 512 --out parity.md
    python bench/lm_eval_parity.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf ...

Each hibari task (a `choice` or `perplexity` YAML, vendored name or path) is exported as an
lm-eval task: its zero-shot prompts and targets (template 0) are rendered by hibari into a JSONL
(`prompt`, `choices` = the rendered targets, which already start with their space, `gold`; or
`text` for perplexity) and a YAML reads those fields verbatim (`target_delimiter: ""`), so both
harnesses score the same strings. lm-eval 0.4.x runs through `lm_eval.simple_evaluate` (model
"hf", float32, CPU, offline); hibari through `evaluation.runner.evaluate_task`. `compare` puts
side by side: max |delta log-likelihood| over every (document, choice) or rolling document,
acc, lm-eval's acc_norm (log p per target *character*) against hibari's acc_bytes (per UTF-8
byte) and against the same per-character rule applied to hibari's log-likelihoods, and the
perplexity metrics. A *.gguf checkpoint is given to lm-eval as `pretrained=<dir>,
gguf_file=<name>` (transformers dequantizes it; hibari's GGUF import does the same).
tests/test_lm_eval_parity.py runs this on a tiny random Llama.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from hibari.evaluation.tasks import (  # noqa: E402
    TaskSpec,
    build_context,
    load_task,
    render_target,
)

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PREFIX = "hibari_parity_"


def _task(task: TaskSpec | str | Path) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else load_task(task)


def _examples(task: TaskSpec, limit: int | None) -> list[dict]:
    examples = task.examples()
    return examples[:limit] if limit else examples


def choice_docs(task: TaskSpec, limit: int | None = None) -> list[dict]:
    """Zero-shot, template 0: the exact strings hibari scores."""
    template = task.templates[0]
    return [{"id": str(e["id"]), "prompt": build_context(task, template, e, []),
             "choices": [render_target(task, template, e, j) for j in range(len(e["choices"]))],
             "gold": int(e["gold"])} for e in _examples(task, limit)]


def perplexity_docs(task: TaskSpec, limit: int | None = None) -> list[dict]:
    template = task.templates[0]
    return [{"id": str(e["id"]), "text": build_context(task, template, e, [])}
            for e in _examples(task, limit)]


def lm_eval_task_files(task: TaskSpec | str | Path, out_dir: str | Path,
                       limit: int | None = None) -> str:
    """Write `<name>.yaml` + `<name>.jsonl` (lm-eval task + its documents) to out_dir for a
    hibari choice or perplexity task; returns the lm-eval task name."""
    task = _task(task)
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = PREFIX + task.name
    data = out_dir / f"{name}.jsonl"
    config: dict[str, Any] = {
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)},
                           "cache_dir": str(out_dir / "hf_datasets_cache")},
        "test_split": "test", "num_fewshot": 0, "metadata": {"version": 1.0}}
    if task.kind == "choice":
        docs = choice_docs(task, limit)
        # Plain field names (not "{{prompt}}"): lm-eval then returns doc[field] untouched, with
        # no Jinja rendering that could trim a trailing newline.
        config.update(output_type="multiple_choice", doc_to_text="prompt",
                      doc_to_choice="choices", doc_to_target="gold", target_delimiter="",
                      metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                   for m in ("acc", "acc_norm", "acc_bytes")])
    elif task.kind == "perplexity":
        docs = perplexity_docs(task, limit)
        config.update(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="text",
                      metric_list=[{"metric": m, "aggregation": agg, "higher_is_better": False}
                                   for m, agg in (("word_perplexity", "weighted_perplexity"),
                                                  ("byte_perplexity", "weighted_perplexity"),
                                                  ("bits_per_byte", "bits_per_byte"))])
    else:
        raise ValueError(f"{task.name}: kind {task.kind!r}; only choice and perplexity tasks "
                         "have an lm-eval log-likelihood counterpart here")
    with data.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False,
                                                         allow_unicode=True), encoding="utf-8")
    return name


@contextlib.contextmanager
def _offline_env():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metric(metrics: dict, name: str):
    for key in (f"{name},none", name):
        if key in metrics:
            return metrics[key]
    return None


def hf_model_args(checkpoint: str | Path, tokenizer: str | Path | None = None,
                  gguf_file: str | None = None) -> dict:
    """`pretrained=` (and `gguf_file=`) for lm-eval's HFLM from a hibari --checkpoint."""
    checkpoint = Path(checkpoint).absolute()
    args: dict[str, Any] = {}
    if checkpoint.suffix == ".gguf":
        args.update(pretrained=str(checkpoint.parent), gguf_file=checkpoint.name)
    else:
        args.update(pretrained=str(checkpoint))
    if gguf_file:
        args["gguf_file"] = gguf_file
    if tokenizer:
        args["tokenizer"] = str(Path(tokenizer).absolute())
    return args


def run_lm_eval(model_dir: str | Path, include_dir: str | Path, task_names: Sequence[str], *,
                max_length: int, batch_size: int = 1, gguf_file: str | None = None,
                tokenizer: str | Path | None = None) -> dict[str, dict]:
    """{task: {"metrics": {...}, "docs": {id: [logp per choice] | logp of the document},
    "arguments": {id: the request arguments}}} from lm_eval.simple_evaluate (model "hf")."""
    with _offline_env():
        import lm_eval
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(include_dir), include_defaults=False)
        model_args = hf_model_args(model_dir, tokenizer, gguf_file)
        model_args.update(dtype="float32", max_length=max_length)  # device: simple_evaluate
        out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(task_names),
                                      num_fewshot=0, batch_size=batch_size, device="cpu",
                                      log_samples=True, task_manager=manager,
                                      bootstrap_iters=1000)
    return lm_eval_results(out, task_names)


def lm_eval_results(out: dict, task_names: Sequence[str]) -> dict[str, dict]:
    """The per-task metrics and per-document log-likelihoods of a simple_evaluate result."""
    results = {}
    for name in task_names:
        metrics = out["results"][name]
        keep = {m: _metric(metrics, m) for m in
                ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_bytes",
                 "acc_bytes_stderr", "word_perplexity", "byte_perplexity", "bits_per_byte")}
        docs, arguments = {}, {}
        for s in out["samples"][name]:
            doc_id = str(s["doc"]["id"])
            resps = s["resps"]
            if "choices" in s["doc"]:
                docs[doc_id] = [float(r[0][0]) for r in resps]
            else:
                first = resps[0][0]
                docs[doc_id] = float(first[0] if isinstance(first, (list, tuple)) else first)
            arguments[doc_id] = s.get("arguments")
        results[name] = {"metrics": {k: v for k, v in keep.items() if v is not None},
                         "docs": docs, "arguments": arguments}
    return results


def hibari_results(result: dict, task: TaskSpec, limit: int | None = None) -> dict:
    """The same shape as `lm_eval_results` from an `evaluate_task` result (template 0, the
    original choice order)."""
    metrics = dict(result["metrics"])
    for name, se in (result.get("stderr") or {}).items():
        if isinstance(se, (int, float)):
            metrics[f"{name}_stderr"] = se
    records = [r for r in result["records"]
               if r["template"] == 0 and r.get("variant", "original") == "original"]
    if task.kind == "choice":
        docs = {str(r["id"]): [float(x) for x in r["loglikelihoods"]] for r in records}
        by_id = {d["id"]: d for d in choice_docs(task, limit)}
        hits = []
        for doc_id, lp in docs.items():
            d = by_id[doc_id]
            per_char = np.asarray(lp) / np.array([len(c) for c in d["choices"]], float)
            hits.append(int(np.argmax(per_char)) == d["gold"])
        metrics["acc_chars"] = float(np.mean(hits))  # lm-eval's acc_norm rule, hibari's logp
        preds = {str(r["id"]): int(r["pred"]) for r in records}
        return {"metrics": metrics, "docs": docs, "pred": preds}
    docs = {str(r["id"]): float(r["loglikelihood"]) for r in records}
    return {"metrics": metrics, "docs": docs}


def run_hibari(checkpoint: str | Path, tokenizer: str | Path | None,
               task_names_or_yaml: Sequence[str | Path | TaskSpec], *, max_len: int,
               limit: int | None = None, batch_size: int = 8, lm=None) -> dict[str, dict]:
    """{lm-eval task name: hibari_results(...)} with fp32 ('highest') matmuls."""
    import jax

    from hibari.evaluation.lm import load_lm
    from hibari.evaluation.runner import evaluate_task

    with jax.default_matmul_precision("highest"):
        lm = lm or load_lm(checkpoint, tokenizer, batch_size=batch_size, max_len=max_len)
        out = {}
        for t in task_names_or_yaml:
            task = _task(t)
            result = evaluate_task(lm, task, fewshot=0, limit=limit)
            out[PREFIX + task.name] = hibari_results(result, task, limit)
    return out


def _max_delta(a: dict, b: dict) -> tuple[float, int]:
    """max |a - b| over every (document, choice) both have, and the count of values."""
    worst, n = 0.0, 0
    for doc_id, x in a.items():
        y = b[doc_id]
        xs, ys = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
        if xs.shape != ys.shape:
            raise ValueError(f"document {doc_id}: {len(xs)} vs {len(ys)} choices")
        worst = max(worst, float(np.max(np.abs(xs - ys))))
        n += len(xs)
    return worst, n


def compare(hibari: dict[str, dict], lm_eval: dict[str, dict]) -> list[dict]:
    """One row per task present on both sides."""
    rows = []
    for name in hibari:
        if name not in lm_eval:
            continue
        h, e = hibari[name], lm_eval[name]
        missing = sorted(set(h["docs"]) ^ set(e["docs"]))
        if missing:
            raise ValueError(f"{name}: documents on one side only: {missing[:5]}")
        delta, n_values = _max_delta(h["docs"], e["docs"])
        hm, em = h["metrics"], e["metrics"]
        row = {"task": name[len(PREFIX):] if name.startswith(PREFIX) else name,
               "n": len(h["docs"]), "values": n_values, "max_abs_delta_logp": delta}
        if "acc" in em:
            preds_e = {k: int(np.argmax(v)) for k, v in e["docs"].items()}
            row.update(acc_hibari=hm.get("acc"), acc_lm_eval=em.get("acc"),
                       acc_stderr_hibari=hm.get("acc_stderr"),
                       acc_stderr_lm_eval=em.get("acc_stderr"),
                       pred_disagreements=sum(preds_e[k] != p for k, p in h["pred"].items()),
                       acc_norm_lm_eval=em.get("acc_norm"), acc_chars_hibari=hm.get("acc_chars"),
                       acc_bytes_hibari=hm.get("acc_bytes"), acc_bytes_lm_eval=em.get("acc_bytes"),
                       acc_norm_tokens_hibari=hm.get("acc_norm"))
        else:
            rel = max(abs(h["docs"][k] - e["docs"][k]) / max(abs(e["docs"][k]), 1e-12)
                      for k in h["docs"])
            row.update(max_rel_delta_logp=rel,
                       bits_per_byte_hibari=hm.get("bits_per_byte"),
                       bits_per_byte_lm_eval=em.get("bits_per_byte"),
                       word_perplexity_hibari=hm.get("word_perplexity"),
                       word_perplexity_lm_eval=em.get("word_perplexity"))
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.4f}" if not math.isnan(v) else "nan"
    return str(v)


def markdown_table(rows: Sequence[dict]) -> str:
    """Choice rows and perplexity rows as two Markdown tables."""
    choice = [r for r in rows if "acc_hibari" in r]
    ppl = [r for r in rows if "bits_per_byte_hibari" in r]
    out = []
    if choice:
        cols = [("task", "task"), ("n", "n"), ("values", "(doc, choice)"),
                ("max_abs_delta_logp", "max abs Δ logp"), ("acc_hibari", "acc hibari"),
                ("acc_lm_eval", "acc lm-eval"), ("acc_stderr_hibari", "stderr hibari"),
                ("acc_stderr_lm_eval", "stderr lm-eval"), ("pred_disagreements", "pred diff"),
                ("acc_norm_lm_eval", "lm-eval acc_norm (chars)"),
                ("acc_chars_hibari", "hibari per-char"), ("acc_bytes_hibari", "hibari acc_bytes"),
                ("acc_bytes_lm_eval", "lm-eval acc_bytes"),
                ("acc_norm_tokens_hibari", "hibari acc_norm (tokens)")]
        out.append(_table(choice, cols))
    if ppl:
        cols = [("task", "task"), ("n", "docs"), ("max_abs_delta_logp", "max abs Δ logp(doc)"),
                ("max_rel_delta_logp", "max rel Δ"), ("bits_per_byte_hibari", "bpb hibari"),
                ("bits_per_byte_lm_eval", "bpb lm-eval"),
                ("word_perplexity_hibari", "word ppl hibari"),
                ("word_perplexity_lm_eval", "word ppl lm-eval")]
        out.append(_table(ppl, cols))
    return "\n\n".join(out) + "\n"


def _table(rows, cols) -> str:
    lines = ["| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF directory or *.gguf file")
    p.add_argument("--tokenizer", help="HF tokenizer dir (default: the checkpoint's own)")
    p.add_argument("--tasks", nargs="+", default=["commonsense_qa_sample", "botchan_perplexity"])
    p.add_argument("--limit", type=int, help="first N documents of each task")
    p.add_argument("--max-len", type=int, default=512, help="context / rolling window length")
    p.add_argument("--batch-size", type=int, default=8, help="hibari batch size")
    p.add_argument("--lm-eval-batch-size", type=int, default=1)
    p.add_argument("--workdir", help="where the lm-eval task files go (default: a temp dir)")
    p.add_argument("--out", help="write the Markdown table here too")
    args = p.parse_args(argv)

    import tempfile

    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        names = [lm_eval_task_files(t, workdir, args.limit) for t in args.tasks]
        t0 = time.perf_counter()
        ours = run_hibari(args.checkpoint, args.tokenizer, args.tasks, max_len=args.max_len,
                          limit=args.limit, batch_size=args.batch_size)
        t1 = time.perf_counter()
        theirs = run_lm_eval(args.checkpoint, workdir, names, max_length=args.max_len,
                             batch_size=args.lm_eval_batch_size, tokenizer=args.tokenizer)
        t2 = time.perf_counter()
    table = markdown_table(compare(ours, theirs))
    table += f"\nhibari {t1 - t0:.1f} s, lm-eval {t2 - t1:.1f} s (max_len {args.max_len})\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
