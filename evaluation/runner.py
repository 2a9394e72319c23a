"""Run one task on a LanguageModel -> a result dict with metrics and per-example records.

    result = evaluate_task(lm, load_task("commonsense_qa_sample"), fewshot=5,
                           templates="all", calibrate=True, permute=True)

Choice tasks score every choice as a continuation of the prompt: acc (sum log p), acc_norm
(log p per continuation token), acc_bytes (log p per UTF-8 byte). Options: `calibrate` adds
contextual (acc_cc) and batch (acc_bc) calibration; `permute` rotates each example's choices so
the gold answer sits at every position in turn -> accuracy per gold position. With several
templates, each is run and the mean and standard deviation (ddof=1) of every metric reported.
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import numpy as np

from hibari.evaluation import calibration
from hibari.evaluation import metrics as text_metrics
from hibari.evaluation.lm import LanguageModel
from hibari.evaluation.loglikelihood import perplexity_stats
from hibari.evaluation.passk import pass_at_k
from hibari.evaluation.sandbox import humaneval_program, run_program
from hibari.evaluation.tasks import (
    TaskError,
    TaskSpec,
    Template,
    build_context,
    render_target,
    select_fewshot,
    validate_examples,
)
from hibari.evaluation.tokenizer import utf8_len

CONTENT_FIELDS = ("question", "passage", "context", "sentence1", "sentence2", "document")


def _contexts(task: TaskSpec, template: Template, examples, pool, k):
    return [build_context(task, template, e, select_fewshot(pool, e, k, task.fewshot_seed))
            for e in examples]


def _score_choices(lm: LanguageModel, task, template, examples, contexts):
    """Per example: (logp[c], tokens[c], bytes[c]) of each choice's continuation."""
    pairs, sizes = [], []
    for e, ctx in zip(examples, contexts):
        targets = [render_target(task, template, e, j) for j in range(len(e["choices"]))]
        pairs += [(ctx, t) for t in targets]
        sizes.append([utf8_len(t) for t in targets])
    scores = lm.loglikelihood(pairs)
    out, at = [], 0
    for e, nbytes in zip(examples, sizes):
        chunk = scores[at:at + len(nbytes)]
        at += len(nbytes)
        out.append((np.array([s[0] for s in chunk]), np.array([s[2] for s in chunk]),
                    np.array(nbytes)))
    return out


def run_choice(lm, task, template, examples, pool, k, *, calibrate=False, permute=False):
    contexts = _contexts(task, template, examples, pool, k)
    scored = _score_choices(lm, task, template, examples, contexts)
    records, hits = [], {"acc": [], "acc_norm": [], "acc_bytes": []}
    for e, (lp, ntok, nbytes) in zip(examples, scored):
        preds = {"acc": int(np.argmax(lp)), "acc_norm": int(np.argmax(lp / ntok)),
                 "acc_bytes": int(np.argmax(lp / nbytes))}
        for m, p in preds.items():
            hits[m].append(p == e["gold"])
        records.append({"id": e["id"], "gold": e["gold"], "pred": preds["acc"],
                        "pred_norm": preds["acc_norm"], "pred_bytes": preds["acc_bytes"],
                        "logp": [round(float(x), 6) for x in lp], "tokens": ntok.tolist(),
                        "correct": preds["acc"] == e["gold"]})
    result = {m: float(np.mean(v)) for m, v in hits.items()}
    n_choices = {len(e["choices"]) for e in examples}
    if calibrate:
        probs = [calibration.choice_probs(lp) for lp, _, _ in scored]
        cf_probs = []
        for cf in task.content_free:
            blank = [{**e, **{f: cf for f in CONTENT_FIELDS if f in e}} for e in examples]
            cf_scored = _score_choices(lm, task, template, blank,
                                       _contexts(task, template, blank, pool, k))
            cf_probs.append([calibration.choice_probs(lp) for lp, _, _ in cf_scored])
        cc_hits = []
        for i, e in enumerate(examples):
            p_cf = np.mean([cfp[i] for cfp in cf_probs], axis=0)
            q = calibration.contextual_calibrate(probs[i], p_cf)
            cc_hits.append(int(np.argmax(q)) == e["gold"])
            records[i]["pred_cc"] = int(np.argmax(q))
        result["acc_cc"] = float(np.mean(cc_hits))
        if len(n_choices) == 1:
            bc = calibration.batch_calibrate(np.stack(probs))
            for i, e in enumerate(examples):
                records[i]["pred_bc"] = int(np.argmax(bc[i]))
            result["acc_bc"] = float(np.mean([r["pred_bc"] == r["gold"] for r in records]))
    if permute and len(n_choices) == 1:
        c = n_choices.pop()
        by_position = []
        for pos in range(c):
            rotated = []
            for e in examples:
                shift = (e["gold"] - pos) % c
                rotated.append({**e, "choices": e["choices"][shift:] + e["choices"][:shift],
                                "gold": pos})
            rs = _score_choices(lm, task, template, rotated,
                                _contexts(task, template, rotated, pool, k))
            by_position.append(float(np.mean([int(np.argmax(lp)) == pos for lp, _, _ in rs])))
        result["acc_by_gold_position"] = by_position
        result["position_bias_range"] = max(by_position) - min(by_position)
    return result, records


def run_generate(lm, task, template, examples, pool, k):
    contexts = _contexts(task, template, examples, pool, k)
    outputs = lm.generate(contexts, max_new_tokens=task.max_new_tokens, stop=task.stop)
    names = [m for m in task.metrics if m in text_metrics.GENERATION_METRICS]
    records, sums = [], {m: 0.0 for m in names}
    for e, out in zip(examples, outputs):
        pred = out.strip()
        scores = {m: text_metrics.GENERATION_METRICS[m](pred, e["answers"]) for m in names}
        for m in names:
            sums[m] += scores[m]
        records.append({"id": e["id"], "prediction": pred, "answers": e["answers"], **scores})
    return {m: v / len(examples) for m, v in sums.items()}, records


def run_perplexity(lm, task, template, examples, window=None, stride=None):
    from hibari.evaluation.tasks import render_prompt
    texts = [render_prompt(task, template, e) for e in examples]
    scored = lm.rolling_loglikelihood(texts, window or task.window, stride or task.stride)
    records = [{"id": e["id"], "logp": lp, "tokens": n, "bytes": utf8_len(t)}
               for e, t, (lp, n) in zip(examples, texts, scored)]
    stats = perplexity_stats(sum(r["logp"] for r in records), sum(r["tokens"] for r in records),
                             sum(r["bytes"] for r in records), sum(len(t.split()) for t in texts))
    return stats, records


def run_code(lm, task, template, examples, pool, k, *, seed=0):
    contexts = _contexts(task, template, examples, pool, k)
    if task.samples == 1 and task.temperature == 0:
        completions = [[c] for c in lm.generate(contexts, max_new_tokens=task.max_new_tokens,
                                                stop=task.stop)]
    else:  # one batch of `samples` rows per problem: results depend only on (seed, problem)
        completions = [lm.generate([ctx] * task.samples, max_new_tokens=task.max_new_tokens,
                                   stop=task.stop, temperature=task.temperature,
                                   seed=seed + i, batch_size=task.samples)
                       for i, ctx in enumerate(contexts)]
    records, outcomes = [], []
    for e, comps in zip(examples, completions):
        results = [run_program(humaneval_program(e["prompt"], c, e["test"], e["entry_point"]),
                               timeout_s=task.timeout_s) for c in comps]
        outcomes.append([r.passed for r in results])
        records.append({"id": e["id"], "completions": comps,
                        "statuses": [r.status for r in results],
                        "passed": sum(r.passed for r in results)})
    n = task.samples
    metrics = {f"pass@{kk}": float(np.mean([pass_at_k(n, sum(o), kk) for o in outcomes]))
               for kk in task.pass_k if kk <= n}
    return metrics, records


def _run_template(lm, task, template, examples, pool, k, calibrate, permute):
    if task.kind == "choice":
        return run_choice(lm, task, template, examples, pool, k, calibrate=calibrate,
                          permute=permute)
    if task.kind == "generate":
        return run_generate(lm, task, template, examples, pool, k)
    if task.kind == "perplexity":
        return run_perplexity(lm, task, template, examples)
    return run_code(lm, task, template, examples, pool, k)


def _template_indices(task: TaskSpec, templates) -> list[int]:
    if templates in (None, "default"):
        return [0]
    if templates == "all":
        return list(range(len(task.templates)))
    indices = [int(i) for i in templates]
    bad = [i for i in indices if not 0 <= i < len(task.templates)]
    if bad:
        raise TaskError(f"{task.source}: template index {bad} out of range "
                        f"(the task has {len(task.templates)} templates)")
    return indices


def spread(per_template: Sequence[dict]) -> dict:
    """{metric: {mean, std (ddof=1; 0 for one template), min, max}} over templates."""
    out = {}
    for name in per_template[0]:
        values = [m[name] for m in per_template if isinstance(m.get(name), (int, float))]
        if len(values) == len(per_template):
            out[name] = {"mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "min": min(values), "max": max(values)}
    return out


def evaluate_task(lm: LanguageModel, task: TaskSpec, *, fewshot: int | None = None,
                  templates=None, limit: int | None = None, calibrate: bool = False,
                  permute: bool = False) -> dict:
    """Metrics of the first listed template, every template's metrics, their spread and the
    per-example records of the first listed template."""
    examples = task.examples()
    validate_examples(task, examples)
    k = task.default_fewshot if fewshot is None else fewshot
    pool = task.fewshot_pool() if k else []
    if limit:
        examples = examples[:limit]
    t0 = time.perf_counter()
    per_template, records = [], None
    for index in _template_indices(task, templates):
        m, recs = _run_template(lm, task, task.templates[index], examples, pool, k,
                                calibrate, permute)
        per_template.append({"index": index, "metrics": m})
        records = records if records is not None else recs
    return {"task": task.name, "kind": task.kind, "fewshot": k, "n": len(examples),
            "metrics": per_template[0]["metrics"], "templates": per_template,
            "template_spread": spread([t["metrics"] for t in per_template]),
            "seconds": round(time.perf_counter() - t0, 3), "records": records}
