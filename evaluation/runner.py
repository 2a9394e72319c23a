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

Instruction languages: `evaluate_language_grid(lm, task, ["en", "ja"], ["en", "ja"])` runs every
(instruction language, label language) cell of a task with a `languages:` mapping: the
instruction language's templates, the label language's labels as the choices. Choice tasks
score each label as the continuation (acc, acc_norm, acc_bytes); generate tasks decode greedily
and read the label from the output (`run_generate`): acc, off_label_rate, wrong_language_rate.
"""
from __future__ import annotations

import dataclasses
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
from hibari.evaluation.numeric import run_numeric
from hibari.evaluation.passk import pass_at_k
from hibari.evaluation.sandbox import humaneval_program, run_program
from hibari.evaluation.tasks import (
    TaskError,
    TaskSpec,
    Template,
    build_context,
    check_language_grid,
    match_label,
    render_target,
    select_fewshot,
    validate_examples,
    with_labels,
    wrong_script,
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


LABEL_METRICS = {"acc": "correct", "off_label_rate": "off_label",
                 "label_first_rate": "label_first",
                 "wrong_language_rate": "wrong_language"}  # metric -> its 0/1 record field


def run_generate(lm, task, template, examples, pool, k, progress=None, script=None):
    """Greedy generations scored against the answers; on choice data (classification by
    generation) also against the label set, the examples' choices:
      prediction       `tasks.match_label`: the label the output starts with (after NFKC,
                       case folding and stripping whitespace/punctuation), else the only label
                       it contains; None when it gives no label or several
      acc              prediction == gold (an output without a label counts as wrong)
      off_label_rate   prediction is None: the output is outside the label set
      label_first_rate the output starts with a label (the strict reading of "answer with
                       the label"; an output that only mentions one, e.g. a sentence or an
                       echo of the question, is on the label set but not label-first)
      wrong_language_rate  (with `script`, the label language's) fewer than half the output's
                       letters are in that script (`tasks.wrong_script`)
    each with its standard error."""
    contexts = _contexts(task, template, examples, pool, k)
    outputs = lm.generate(contexts, max_new_tokens=task.max_new_tokens, stop=task.stop,
                          **_progress(progress))
    names = [m for m in task.metrics if m in text_metrics.GENERATION_METRICS]
    labelled = all("choices" in e for e in examples)
    if labelled:
        names += [m for m in task.metrics if m in LABEL_METRICS
                  and (m != "wrong_language_rate" or script is not None)]
    records = []
    for e, ctx, out in zip(examples, contexts, outputs):
        pred = out.strip()
        answers = [e["choices"][e["gold"]]] if labelled else e["answers"]
        scores = {m: text_metrics.GENERATION_METRICS[m](pred, answers) for m in names
                  if m in text_metrics.GENERATION_METRICS}
        record = {"id": e["id"], "prompt": ctx, "output": out, "prediction": pred,
                  "answers": answers, **scores}
        if labelled:
            index, how = match_label(out, e["choices"])
            record.update(prediction=None if index is None else e["choices"][index],
                          pred=index, match=how, gold=e["gold"], correct=index == e["gold"],
                          off_label=index is None, label_first=how == "prefix")
            if script is not None:
                record["wrong_language"] = wrong_script(out, script)
        records.append(record)
    field = {m: LABEL_METRICS.get(m, m) for m in names}
    return ({m: float(np.mean([r[field[m]] for r in records])) for m in names},
            {m: mean_stderr(r[field[m]] for r in records) for m in names}, records)


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
                  progress=None, script=None):
    """(metrics, their standard errors, sample records) of one template."""
    if task.kind == "choice":
        return run_choice(lm, task, template, examples, pool, k, calibrate=calibrate,
                          permute=permute, partial=partial, progress=progress)
    if task.kind == "generate":
        return run_generate(lm, task, template, examples, pool, k, progress, script)
    if task.kind == "perplexity":
        return run_perplexity(lm, task, template, examples, progress=progress)
    if task.kind == "numeric":
        return run_numeric(lm, task, template, examples, pool, k, progress)
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


def _read(task: TaskSpec, fewshot, limit, strict):
    """(examples[:limit], few-shot pool, k, the read stats of both files)."""
    examples = task.examples(strict)
    validate_examples(task, examples)
    k = task.default_fewshot if fewshot is None else fewshot
    pool = task.fewshot_pool(strict) if k else []
    read = [examples.stats] + ([pool.stats] if k and task.fewshot_path is not None else [])
    return (examples[:limit] if limit else examples), pool, k, read


def _skipped(read) -> dict:
    return {"count": sum(s.bad for s in read),
            "rows": [row for s in read for row in s.bad_examples]}


def evaluate_language_grid(lm: LanguageModel, task: TaskSpec,
                           instruction_languages: Sequence[str],
                           label_languages: Sequence[str] | None = None, *,
                           fewshot: int | None = None, templates=None, limit: int | None = None,
                           strict: bool = False, progress: Progress | None = None) -> dict:
    """Every (instruction language, label language) cell of a task with `languages:` (label
    languages default to the instruction languages), for each selected template of the
    instruction language. `grid`: one entry per cell {instruction, labels, template, n,
    machine_translated, metrics, stderr}; `metrics` / `stderr`: the first template's cells
    flattened as "<metric>[<instruction>/<labels>]"; `records`: one per (cell, template,
    example) with its `cell` {instruction, labels}, prompt, output / log-likelihoods and
    prediction."""
    instruction_languages = list(instruction_languages)
    label_languages = list(label_languages or instruction_languages)
    check_language_grid(task, instruction_languages, label_languages)
    examples, pool, k, read = _read(task, fewshot, limit, strict)
    t0 = time.perf_counter()
    grid, records, flat, flat_se = [], [], {}, {}
    for il in instruction_languages:
        cell_task = dataclasses.replace(task, templates=list(task.languages[il].templates))
        indices = _template_indices(cell_task, templates)
        for ll in label_languages:
            lang = task.languages[ll]
            where = f"{task.source}: languages.{ll}.labels"
            ex = with_labels(examples, lang.labels, where)
            shots = with_labels(pool, lang.labels, where) if k else []
            for index in indices:
                m, se, recs = _run_template(lm, cell_task, cell_task.templates[index], ex, shots,
                                            k, False, False, (), progress, lang.script)
                cell = {"instruction": il, "labels": ll}
                grid.append({**cell, "template": index, "n": len(ex),
                             "machine_translated": {c: task.languages[c].translated_from
                                                    for c in (il, ll)
                                                    if task.languages[c].machine_translated},
                             "metrics": m, "stderr": se})
                records += [{"cell": cell, "template": index, **r} for r in recs]
                if index == indices[0]:
                    flat.update({f"{name}[{il}/{ll}]": v for name, v in m.items()})
                    flat_se.update({f"{name}[{il}/{ll}]": v for name, v in se.items()})
    return {"task": task.name, "kind": task.kind, "fewshot": k, "n": len(examples),
            "instruction_languages": instruction_languages, "label_languages": label_languages,
            "grid": grid, "metrics": flat, "stderr": flat_se, "templates": [],
            "template_spread": {}, "skipped": _skipped(read),
            "seconds": round(time.perf_counter() - t0, 3), "records": records}


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
    examples, pool, k, read = _read(task, fewshot, limit, strict)
    check_partial_input(task, examples, partial_input)
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
            "skipped": _skipped(read),
            "seconds": round(time.perf_counter() - t0, 3), "records": records}
