"""Run one task on a LanguageModel -> a result dict with metrics and per-example records.

    result = evaluate_task(lm, load_task("commonsense_qa_sample"), fewshot=5,
                           templates="all", calibrate=True, permute=True)

Choice tasks score every choice as a continuation of the prompt: acc (sum log p), acc_norm
(log p per continuation token), acc_bytes (log p per UTF-8 byte). Options: `calibrate` adds
contextual (acc_cc) and batch (acc_bc) calibration; `permute` rotates each example's choices so
the gold answer sits at every position in turn -> accuracy per gold position. With several
templates, each is run and the mean and standard deviation (ddof=1) of every metric reported.
Accuracies (and generation / pass@k scores) come with the standard error of their mean.

`records` hold one sample per (template, variant, example): the prompt, each choice's target,
log-likelihood, token and byte count, the predictions and the gold answer ("variant" is
"original" or "gold_at_<position>" for the permutations); `report.write_results` writes them to
samples/<task>.jsonl.
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import numpy as np

from hibari.base.progress import Progress
from hibari.base.stats import mean_stderr
from hibari.evaluation import calibration
from hibari.evaluation import metrics as text_metrics
from hibari.evaluation.bias import bias_metrics
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


def _contexts(task: TaskSpec, template: Template, examples, pool, k, blank=()):
    """Each example's prompt with its few-shot shots; `blank`: fields emptied in the example
    and its shots after the shots are chosen (so the choice is the full-input run's)."""
    return [build_context(task, template, *_without([e], blank),
                          _without(select_fewshot(pool, e, k, task.fewshot_seed), blank))
            for e in examples]


def _progress(progress) -> dict:
    """The `progress=` keyword of an lm call, only when there is a progress (a model of
    another kind, e.g. a benchmark's wrapper, need not take it)."""
    return {} if progress is None else {"progress": progress}


def _score_choices(lm: LanguageModel, task, template, examples, contexts, progress=None):
    """Per example: (targets, logp[c], tokens[c], bytes[c]) of each choice's continuation."""
    pairs, targets = [], []
    for e, ctx in zip(examples, contexts):
        targets.append([render_target(task, template, e, j) for j in range(len(e["choices"]))])
        pairs += [(ctx, t) for t in targets[-1]]
    scores = lm.loglikelihood(pairs, **_progress(progress))
    out, at = [], 0
    for texts in targets:
        chunk = scores[at:at + len(texts)]
        at += len(texts)
        out.append((texts, np.array([s[0] for s in chunk]), np.array([s[2] for s in chunk]),
                    np.array([utf8_len(t) for t in texts])))
    return out


def _choice_records(examples, contexts, scored, variant: str) -> list[dict]:
    """One sample record per example: every number the choice metrics are computed from."""
    records = []
    for e, ctx, (texts, lp, ntok, nbytes) in zip(examples, contexts, scored):
        preds = {"pred": int(np.argmax(lp)), "pred_norm": int(np.argmax(lp / ntok)),
                 "pred_bytes": int(np.argmax(lp / nbytes))}
        records.append({"id": e["id"], "variant": variant, "prompt": ctx, "targets": texts,
                        "loglikelihoods": [float(x) for x in lp], "tokens": ntok.tolist(),
                        "bytes": nbytes.tolist(), "gold": e["gold"], **preds,
                        "correct": preds["pred"] == e["gold"],
                        **({"meta": e["meta"]} if "meta" in e else {})})
    return records


def _accuracy(records, pred_key: str) -> list[bool]:
    return [r[pred_key] == r["gold"] for r in records]


def _without(examples, fields) -> list[dict]:
    return [{**e, **{f: "" for f in fields if f in e}} for e in examples]


def baselines(examples) -> dict:
    """chance: expected accuracy of a uniform guess; majority: of always answering the most
    frequent gold label (the same choice texts in every example) or else gold position."""
    chance = float(np.mean([1 / len(e["choices"]) for e in examples]))
    same = len({tuple(e["choices"]) for e in examples}) == 1
    golds = [e["choices"][e["gold"]] if same else e["gold"] for e in examples]
    majority = max(golds.count(g) for g in set(golds)) / len(golds)
    return {"chance": chance, "majority": majority}


def run_choice(lm, task, template, examples, pool, k, *, calibrate=False, permute=False,
               partial: Sequence[str] = (), progress=None):
    contexts = _contexts(task, template, examples, pool, k)
    scored = _score_choices(lm, task, template, examples, contexts, progress)
    records = _choice_records(examples, contexts, scored, "original")
    hits = {m: _accuracy(records, key) for m, key in
            (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_bytes", "pred_bytes"))
            if m in task.metrics}  # a bias task whose gold is a convention lists none
    n_choices = {len(e["choices"]) for e in examples}
    extra = []
    if calibrate:
        probs = [calibration.choice_probs(lp) for _, lp, _, _ in scored]
        cf_logp = []
        for cf in task.content_free:
            blank = [{**e, **{f: cf for f in CONTENT_FIELDS if f in e}} for e in examples]
            cf_scored = _score_choices(lm, task, template, blank,
                                       _contexts(task, template, blank, pool, k), progress)
            cf_logp.append([lp for _, lp, _, _ in cf_scored])
        for i, r in enumerate(records):
            p_cf = np.mean([calibration.choice_probs(cfl[i]) for cfl in cf_logp], axis=0)
            r["pred_cc"] = int(np.argmax(calibration.contextual_calibrate(probs[i], p_cf)))
            r["content_free_loglikelihoods"] = {cf: [float(x) for x in cfl[i]]
                                                for cf, cfl in zip(task.content_free, cf_logp)}
        hits["acc_cc"] = _accuracy(records, "pred_cc")
        if len(n_choices) == 1:
            bc = calibration.batch_calibrate(np.stack(probs))
            for i, r in enumerate(records):
                r["pred_bc"] = int(np.argmax(bc[i]))
            hits["acc_bc"] = _accuracy(records, "pred_bc")
    result = {m: float(np.mean(v)) for m, v in hits.items()}
    stderr = {m: mean_stderr(v) for m, v in hits.items()}
    if task.bias:
        m, se = bias_metrics(task.bias, records, task.bias_score)
        result.update(m)
        stderr.update(se)
    if partial:  # the fields dropped from the example and its shots; choices kept
        part = _without(examples, partial)
        ctx = _contexts(task, template, examples, pool, k, blank=partial)
        rs = _choice_records(part, ctx, _score_choices(lm, task, template, part, ctx, progress),
                             "partial:" + "+".join(partial))
        extra += rs
        hit = _accuracy(rs, "pred")
        result.update(partial_acc=float(np.mean(hit)), **baselines(examples))
        stderr["partial_acc"] = mean_stderr(hit)
    if permute and len(n_choices) == 1:
        c = n_choices.pop()
        by_position = []
        for pos in range(c):
            rotated = []
            for e in examples:
                shift = (e["gold"] - pos) % c
                rotated.append({**e, "choices": e["choices"][shift:] + e["choices"][:shift],
                                "gold": pos})
            ctx = _contexts(task, template, rotated, pool, k)
            rs = _choice_records(rotated, ctx,
                                 _score_choices(lm, task, template, rotated, ctx, progress),
                                 f"gold_at_{pos}")
            extra += rs
            by_position.append(_accuracy(rs, "pred"))
        result["acc_by_gold_position"] = [float(np.mean(v)) for v in by_position]
        stderr["acc_by_gold_position"] = [mean_stderr(v) for v in by_position]
        result["position_bias_range"] = (max(result["acc_by_gold_position"])
                                         - min(result["acc_by_gold_position"]))
    return result, stderr, records + extra


def run_generate(lm, task, template, examples, pool, k, progress=None):
    contexts = _contexts(task, template, examples, pool, k)
    outputs = lm.generate(contexts, max_new_tokens=task.max_new_tokens, stop=task.stop,
                          **_progress(progress))
    names = [m for m in task.metrics if m in text_metrics.GENERATION_METRICS]
    records = []
    for e, ctx, out in zip(examples, contexts, outputs):
        pred = out.strip()
        scores = {m: text_metrics.GENERATION_METRICS[m](pred, e["answers"]) for m in names}
        records.append({"id": e["id"], "prompt": ctx, "output": out, "prediction": pred,
                        "answers": e["answers"], **scores})
    return ({m: float(np.mean([r[m] for r in records])) for m in names},
            {m: mean_stderr(r[m] for r in records) for m in names}, records)


def run_perplexity(lm, task, template, examples, window=None, stride=None, progress=None):
    from hibari.evaluation.tasks import render_prompt
    texts = [render_prompt(task, template, e) for e in examples]
    scored = lm.rolling_loglikelihood(texts, window or task.window, stride or task.stride,
                                      **_progress(progress))
    records = [{"id": e["id"], "loglikelihood": lp, "tokens": n, "bytes": utf8_len(t),
                "words": len(t.split())} for e, t, (lp, n) in zip(examples, texts, scored)]
    stats = perplexity_stats(*(sum(r[f] for r in records)
                               for f in ("loglikelihood", "tokens", "bytes", "words")))
    return stats, {}, records


def run_code(lm, task, template, examples, pool, k, *, seed=0, progress=None):
    contexts = _contexts(task, template, examples, pool, k)
    if task.samples == 1 and task.temperature == 0:
        completions = [[c] for c in lm.generate(contexts, max_new_tokens=task.max_new_tokens,
                                                stop=task.stop, **_progress(progress))]
    else:  # one batch of `samples` rows per problem: results depend only on (seed, problem)
        completions = [lm.generate([ctx] * task.samples, max_new_tokens=task.max_new_tokens,
                                   stop=task.stop, temperature=task.temperature,
                                   seed=seed + i, batch_size=task.samples,
                                   **_progress(progress))
                       for i, ctx in enumerate(contexts)]
    records = []
    for e, ctx, comps in zip(examples, contexts, completions):
        results = [run_program(humaneval_program(e["prompt"], c, e["test"], e["entry_point"]),
                               timeout_s=task.timeout_s) for c in comps]
        records.append({"id": e["id"], "prompt": ctx, "completions": comps,
                        "statuses": [r.status for r in results],
                        "passed": sum(r.passed for r in results)})
    n = task.samples
    per_problem = {f"pass@{kk}": [pass_at_k(n, r["passed"], kk) for r in records]
                   for kk in task.pass_k if kk <= n}
    return ({m: float(np.mean(v)) for m, v in per_problem.items()},
            {m: mean_stderr(v) for m, v in per_problem.items()}, records)


def _run_template(lm, task, template, examples, pool, k, calibrate, permute, partial,
                  progress=None):
    """(metrics, their standard errors, sample records) of one template."""
    if task.kind == "choice":
        return run_choice(lm, task, template, examples, pool, k, calibrate=calibrate,
                          permute=permute, partial=partial, progress=progress)
    if task.kind == "generate":
        return run_generate(lm, task, template, examples, pool, k, progress)
    if task.kind == "perplexity":
        return run_perplexity(lm, task, template, examples, progress=progress)
    return run_code(lm, task, template, examples, pool, k, progress=progress)


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


def check_partial_input(task: TaskSpec, examples, fields) -> None:
    if not fields:
        return
    if task.kind != "choice":
        raise TaskError(f"--partial-input needs a multiple-choice task; {task.name} is "
                        f"{task.kind!r}")
    known = sorted(set().union(*(e.keys() for e in examples)) - {"id", "gold", "choices",
                                                                  "meta"})
    bad = [f for f in fields if f not in known]
    if bad:
        raise TaskError(f"--partial-input {bad}: not a field of {task.name}'s examples; "
                        f"choose from {known}")


def evaluate_task(lm: LanguageModel, task: TaskSpec, *, fewshot: int | None = None,
                  templates=None, limit: int | None = None, calibrate: bool = False,
                  permute: bool = False, strict: bool = False,
                  partial_input: Sequence[str] = (), progress: Progress | None = None) -> dict:
    """Metrics (and standard errors) of the first listed template, every template's metrics,
    their spread, the rows skipped as malformed (`strict`: raise instead) and `records`: one
    sample record per (template, variant, example), from which every metric is recomputable.
    `partial_input`: choice tasks are also scored with these fields emptied (the choices kept):
    `partial_acc` against `chance` and `majority` (the hypothesis-only baseline generalised).
    `progress` (e.g. `hibari.base.progress.progress_bar(task.name, 0, unit=" requests")`):
    advanced per batch of model requests, its total growing with each pass; the caller
    finishes it."""
    examples = task.examples(strict)
    validate_examples(task, examples)
    check_partial_input(task, examples, partial_input)
    k = task.default_fewshot if fewshot is None else fewshot
    pool = task.fewshot_pool(strict) if k else []
    read = [examples.stats] + ([pool.stats] if k and task.fewshot_path is not None else [])
    if limit:
        examples = examples[:limit]
    t0 = time.perf_counter()
    per_template, records = [], []
    for index in _template_indices(task, templates):
        m, se, recs = _run_template(lm, task, task.templates[index], examples, pool, k,
                                    calibrate, permute, tuple(partial_input), progress)
        per_template.append({"index": index, "metrics": m, "stderr": se})
        records += [{"template": index, **r} for r in recs]
    return {"task": task.name, "kind": task.kind, "fewshot": k, "n": len(examples),
            "metrics": per_template[0]["metrics"], "stderr": per_template[0]["stderr"],
            "templates": per_template,
            "template_spread": spread([t["metrics"] for t in per_template]),
            "skipped": {"count": sum(s.bad for s in read),
                        "rows": [row for s in read for row in s.bad_examples]},
            "seconds": round(time.perf_counter() - t0, 3), "records": records}
