"""Knowledge probing with the SliCK categories (Gekhman et al., 2024, "Does Fine-Tuning LLMs on
New Knowledge Encourage Hallucinations?").

For a fact (q, a), P_Correct(q, a; M, T) is the fraction of correct answers the model gives
over N_ex few-shot prompts (each with different random exemplars; the paper uses N_ex = 10
prompts of 4 exemplars), with greedy decoding (T = 0, one answer per prompt) and with
temperature sampling (T > 0; the paper samples 16 answers per prompt at T = 0.5). Correct means
an exact match with a gold answer after normalisation. Categories:
  HighlyKnown   P_Correct(T=0) = 1
  MaybeKnown    0 < P_Correct(T=0) < 1
  WeaklyKnown   P_Correct(T=0) = 0 and P_Correct(T>0) > 0
  Unknown       P_Correct(T=0) = 0 and P_Correct(T>0) = 0
The paper's finding, which the categories serve: fine-tuning examples of Unknown facts are
fitted slowly and, as they are fitted, raise the model's tendency to hallucinate; early stopping
or filtering them out helps, and MaybeKnown examples matter most in the fine-tuning mix.

As a runnable evaluation (`hibari slick`, `run_slick`): a facts file and a config
(configs/slick/nq_open.py) -> OUT/
    results.json        meta (checkpoint, config, timings, prefix), category counts and shares
                        ± s.e., the per-category table, overall accuracy ± s.e.
    report.md           the same tables, the settings, and how to read them
    samples/slick.jsonl one line per fact: exemplar ids per prompt, greedy and sampled answers,
                        their correctness (exact and contains), P_Correct values, category
    slick_meta.json     the fingerprint the cached samples belong to
    slick.png           category shares with s.e. bars and a histogram of P_Correct(T=0)

Correctness: `exact` is `hibari.evaluation.metrics.exact_match` against any gold answer (the
paper's EM); `contains` (lenient, a secondary column) is a normalised gold answer appearing as
whole words inside the normalised answer, for models that answer in sentences. `config.match`
picks the one the categories use.

Generation is batched: the greedy prompts of `chunk_facts` facts go into one `lm.generate` call
(greedy answers do not depend on the batch); the sampled answers of a fact (its n_prompts
prompts × `samples` copies, prompt-major) go into one call of their own, with the batch fixed to
exactly those rows and the seed derived from (config seed, fact id): `LanguageModel.generate`
draws each token with one key for the whole batch, so samples depend on the batch's composition
and size; fixing them per fact makes a fact's samples independent of chunking, of batch_size,
of the other facts and of resuming.

Resume: facts already probed are kept in samples/slick.jsonl; slick_meta.json holds a
fingerprint of the checkpoint, the tokenizer and the config fields that change a fact's answers
(not limit/offset, batch_size, chunk_facts or match, which a rerun may change freely). A rerun
with the same fingerprint probes only the missing facts; a changed one starts over and says so.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from hibari.base.errors import InputNotFound, UserError
from hibari.base.files import json_digest, write_atomic
from hibari.base.progress import Progress
from hibari.base.stats import rate
from hibari.evaluation.metrics import exact_match, normalize

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
FORMATS = ("nq_open", "jsonl")
MATCHES = ("exact", "contains")
SAMPLES_FILE = "samples/slick.jsonl"
META_FILE = "slick_meta.json"
STOP = ("\n",)
# config fields that change a fact's answers: a change starts the probe over
FINGERPRINT_FIELDS = ("prefix", "max_len", "n_prompts", "k", "samples", "temperature",
                      "max_new_tokens", "seed", "template")


class SlickError(UserError, ValueError):
    """A bad SliCK config field or facts row; the message names the field or file:line."""


def slick_category(greedy_correct: Sequence[bool], sampled_correct: Sequence[bool]) -> str:
    """The category from the outcomes of greedy answers (one per prompt) and of sampled ones."""
    if not greedy_correct:
        raise ValueError("SliCK needs at least one greedy answer")
    p_greedy = sum(map(bool, greedy_correct)) / len(greedy_correct)
    if p_greedy == 1.0:
        return "HighlyKnown"
    if p_greedy > 0.0:
        return "MaybeKnown"
    return "WeaklyKnown" if any(sampled_correct) else "Unknown"


def fewshot_prompts(fact: dict, pool: Sequence[dict], n_prompts: int = 10, k: int = 4,
                    seed: int = 0, template: str = "Q: {question}\nA:") -> list[str]:
    """N_ex prompts, each with k exemplars (not the fact itself) drawn by Random(seed:id:i)."""
    return [build_prompt(fact, [pool[j] for j in shots], template)
            for shots in exemplar_ids(fact, pool, n_prompts, k, seed)]


def exemplar_ids(fact: dict, pool: Sequence[dict], n_prompts: int, k: int, seed: int
                 ) -> list[list[int]]:
    """For each of n_prompts prompts, k indices into `pool` drawn without replacement by
    Random(f"{seed}:{fact id}:{prompt}"), never a pool entry whose normalised question is the
    fact's own (the fact itself, or a duplicate of it)."""
    own = normalize(fact["question"])
    others = [j for j, p in enumerate(pool) if normalize(p["question"]) != own]
    if len(others) < k:
        raise SlickError(f"config.k={k}: the exemplar pool has only {len(others)} facts other "
                         f"than {fact['id']!r}; lower k or give a larger pool")
    return [random.Random(f"{seed}:{fact['id']}:{i}").sample(others, k) for i in range(n_prompts)]


def build_prompt(fact: dict, shots: Sequence[dict], template: str = "Q: {question}\nA:") -> str:
    """The exemplars (template + " " + their first gold answer) and the fact's question, blank
    lines between."""
    parts = [template.format(question=s["question"]) + " " + s["answers"][0] for s in shots]
    return "\n\n".join(parts + [template.format(question=fact["question"])])


def contains_gold(prediction: str, references: Sequence[str]) -> bool:
    """A normalised gold answer occurs as whole words inside the normalised prediction."""
    p = f" {normalize(prediction)} "
    return any(g and f" {g} " in p for g in (normalize(r) for r in references))


def is_correct(prediction: str, references: Sequence[str], match: str = "exact") -> bool:
    if match == "exact":
        return bool(exact_match(prediction, references))
    return contains_gold(prediction, references)


def probe_facts(lm, facts: Sequence[dict], pool: Sequence[dict] | None = None, *,
                n_prompts: int = 10, k: int = 4, samples: int = 16, temperature: float = 0.5,
                max_new_tokens: int = 16, seed: int = 0) -> list[dict]:
    """Classify each {id, question, answers} fact with `lm` (a LanguageModel): the records of
    `probe` with exact match, the paper's settings by default."""
    settings = dict(n_prompts=n_prompts, k=k, samples=samples, temperature=temperature,
                    max_new_tokens=max_new_tokens, seed=seed, template="Q: {question}\nA:",
                    batch_size=getattr(lm, "batch_size", 8), chunk_facts=8)
    pool = list(pool if pool is not None else facts)
    return [score_record(r, "exact") for r in probe(lm, facts, pool, settings)]


def category_counts(records: Sequence[dict]) -> dict[str, int]:
    counts = Counter(r["category"] for r in records)
    return {c: counts.get(c, 0) for c in CATEGORIES}


# ------------------------------------------------------------------------------- facts files

def load_facts(path: str | Path, fmt: str = "nq_open", *, where: str = "config.facts"
               ) -> list[dict]:
    """[{id, question, answers, line}] from a JSONL file. `nq_open`: {"question", "answer":
    [gold, ...]}; `jsonl`: {"question", "answer" | "answers": gold or [gold, ...], "id"?}. Ids:
    the row's "id" (jsonl) or "<file stem>:<line>". A bad row raises naming file:line."""
    from hibari.base.config_files import resolve_path
    if fmt not in FORMATS:
        raise SlickError(f"{where}.format={fmt!r}: choose one of {FORMATS}")
    resolved = Path(resolve_path(path))
    if not str(path) or not resolved.is_file():
        raise InputNotFound(f"{where}.path={str(path)!r}: no such file")
    from hibari.evaluation.formats import json_records
    facts, seen = [], {}
    for at, n, row in json_records(resolved):  # a line that is not a JSON object: FormatError
        facts.append(_fact_row(row, at, fmt, f"{resolved.stem}:{n}", n))
        fid = facts[-1]["id"]
        if fid in seen:
            raise SlickError(f"{at}: id {fid!r} repeats line {seen[fid]}; ids must be unique")
        seen[fid] = n
    if not facts:
        raise SlickError(f"{where}.path={str(path)!r}: the file holds no facts")
    return facts


def _fact_row(row: dict, at: str, fmt: str, default_id: str, n: int) -> dict:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise SlickError(f"{at}: 'question' must be a non-empty string")
    keys = ("answer",) if fmt == "nq_open" else ("answers", "answer")
    key = next((k for k in keys if k in row), None)
    answers = row.get(key) if key else None
    if fmt == "jsonl" and isinstance(answers, str):
        answers = [answers]
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        want = ("a non-empty list of strings" if fmt == "nq_open"
                else "a string or a list of strings")
        raise SlickError(f"{at}: '{key or keys[0]}' must be {want} (the gold answers)")
    fid = row.get("id") if fmt == "jsonl" else None
    fid = default_id if fid is None else str(fid)
    return {"id": fid, "question": question.strip(), "answers": [a.strip() for a in answers],
            "line": n}


# ------------------------------------------------------------------------------------ config

def check_config(config) -> None:
    """Every field `run_slick` reads, checked before any file is read or a model loaded."""
    def need(ok: bool, field: str, what: str):
        if not ok:
            raise SlickError(f"config.{field}={_get(config, field)!r}: {what}")

    for field in ("checkpoint", "tokenizer", "prefix", "template", "match", "facts.path",
                  "facts.format", "pool.path", "pool.format"):
        need(isinstance(_get(config, field), str), field, "must be a string")
    need(bool(config.checkpoint), "checkpoint", "give the model to probe (--checkpoint)")
    need(config.facts.format in FORMATS, "facts.format", f"choose one of {FORMATS}")
    need(config.pool.format in FORMATS + ("",), "pool.format",
         f"choose one of {FORMATS} or '' (= facts.format)")
    need(config.match in MATCHES, "match", f"choose one of {MATCHES}")
    for field, low in (("n_prompts", 1), ("k", 0), ("samples", 1), ("max_new_tokens", 1),
                       ("batch_size", 1), ("chunk_facts", 1), ("facts.limit", 0),
                       ("facts.offset", 0), ("max_len", 0), ("seed", 0)):
        value = _get(config, field)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= low, field,
             f"must be an integer >= {low}")
    need(isinstance(config.temperature, (int, float)) and config.temperature > 0,
         "temperature", "must be > 0 (the greedy answers are T = 0 already)")
    need(isinstance(config.progress_every, (int, float)) and config.progress_every > 0,
         "progress_every", "must be > 0 seconds")
    try:
        ok = "{question}" in config.template and isinstance(config.template.format(question="q"),
                                                            str)
    except (KeyError, IndexError, ValueError):
        ok = False
    need(ok, "template", "must contain {question} and no other {field} (write {{ for a brace)")


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


# ------------------------------------------------------------------------------------ probing

def fact_seed(seed: int, fact_id: str) -> int:
    """The sampling seed of one fact: a hash of (config seed, fact id), in [0, 2**31)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{fact_id}".encode()).digest()[:4], "big") >> 1


def probe(lm, facts: Sequence[dict], pool: Sequence[dict], cfg, *,
          on_record: Callable[[dict], None] | None = None,
          progress: Callable[[int], None] | None = None) -> list[dict]:
    """Raw records (answers, no scores) of `facts` probed with `lm`: anything with
    `generate(prompts, *, max_new_tokens, stop, temperature, seed, batch_size) -> [str]`.

    `cfg` (a ConfigDict or dict) gives n_prompts, k, samples, temperature, max_new_tokens, seed,
    template, batch_size, chunk_facts. Per chunk of `chunk_facts` facts: one greedy call for
    all their prompts; then, per fact, one sampled call of n_prompts × samples rows (the batch
    fixed to that fact, seed `fact_seed`). `on_record(record)` gets each finished record,
    `progress(facts done)` is called after each fact."""
    get = cfg.__getitem__
    n_prompts, samples, template = get("n_prompts"), get("samples"), get("template")
    gen = dict(max_new_tokens=get("max_new_tokens"), stop=list(STOP))
    records, chunk = [], get("chunk_facts")
    for start in range(0, len(facts), chunk):
        block = facts[start:start + chunk]
        shots = [exemplar_ids(f, pool, n_prompts, get("k"), get("seed")) for f in block]
        prompts = [[build_prompt(f, [pool[j] for j in ids], template) for ids in fact_shots]
                   for f, fact_shots in zip(block, shots)]
        flat = [p for ps in prompts for p in ps]
        greedy = lm.generate(flat, temperature=0.0, seed=0, batch_size=get("batch_size"), **gen)
        for i, fact in enumerate(block):
            rows = [p for p in prompts[i] for _ in range(samples)]
            sampled = lm.generate(rows, temperature=float(get("temperature")),
                                  seed=fact_seed(get("seed"), fact["id"]),
                                  batch_size=len(rows), **gen)
            record = {"id": fact["id"], "question": fact["question"],
                      "answers": list(fact["answers"]),
                      "exemplars": [[pool[j]["id"] for j in ids] for ids in shots[i]],
                      "greedy": [_answer(a) for a in greedy[i * n_prompts:(i + 1) * n_prompts]],
                      "sampled": [[_answer(a) for a in sampled[p * samples:(p + 1) * samples]]
                                  for p in range(n_prompts)]}
            records.append(record)
            if on_record:
                on_record(record)
            if progress:
                progress(start + i + 1)
    return records


def _answer(completion: str) -> str:
    """The answer in a completion: up to the first newline (`generate` stops there already),
    stripped."""
    return completion.split("\n", 1)[0].strip()


def score_record(record: dict, match: str = "exact") -> dict:
    """`record` with correctness (exact and contains), P_Correct values and the category
    under `match` (and under both criteria) added; raw fields unchanged."""
    gold = record["answers"]
    out = {k: v for k, v in record.items() if k in ("id", "question", "answers", "exemplars",
                                                    "greedy", "sampled")}
    for crit in MATCHES:
        g = [is_correct(a, gold, crit) for a in record["greedy"]]
        s = [[is_correct(a, gold, crit) for a in row] for row in record["sampled"]]
        flat = [x for row in s for x in row]
        out[f"greedy_{crit}"], out[f"sampled_{crit}"] = g, s
        out[f"p_greedy_{crit}"] = sum(g) / len(g)
        out[f"p_sampled_{crit}"] = sum(flat) / len(flat) if flat else 0.0
        out[f"category_{crit}"] = slick_category(g, flat)
    out["match"] = match
    out["p_correct_greedy"] = out[f"p_greedy_{match}"]
    out["p_correct_sampled"] = out[f"p_sampled_{match}"]
    out["category"] = out[f"category_{match}"]
    return out


# ------------------------------------------------------------------------------------ summary

def summarize(records: Sequence[dict], match: str = "exact") -> dict:
    """Category counts and shares (± s.e. over the facts' 0/1 indicators), the per-category
    table and overall accuracies of scored records (`score_record`)."""
    n = len(records)
    cats = [r[f"category_{match}"] for r in records]
    first = {c: [r[f"greedy_{c}"][0] for r in records] for c in MATCHES}
    table = {}
    for cat in CATEGORIES:
        mine = [r for r in records if r[f"category_{match}"] == cat]
        table[cat] = {
            "n": len(mine),
            "share": rate([c == cat for c in cats]),
            "p_correct_greedy": rate([r[f"p_greedy_{match}"] for r in mine]),
            "p_correct_sampled": rate([r[f"p_sampled_{match}"] for r in mine]),
            "greedy_accuracy_exact": rate([r["greedy_exact"][0] for r in mine]),
            "greedy_accuracy_contains": rate([r["greedy_contains"][0] for r in mine])}
    return {
        "facts": n, "match": match,
        "counts": {c: table[c]["n"] for c in CATEGORIES},
        "shares": {c: table[c]["share"] for c in CATEGORIES},
        "per_category": table,
        "overall": {
            "greedy_accuracy_exact": rate(first["exact"]),
            "greedy_accuracy_contains": rate(first["contains"]),
            "p_correct_greedy": rate([r[f"p_greedy_{match}"] for r in records]),
            "p_correct_sampled": rate([r[f"p_sampled_{match}"] for r in records])},
        "counts_other_match": {c: sum(r[f"category_{m}"] == c for r in records)
                               for m in MATCHES if m != match for c in CATEGORIES},
    }


def _pm(rate: dict, pct: bool = True) -> str:
    if rate["rate"] is None:
        return "–"
    scale = 100 if pct else 1
    fmt = "{:.1f} ± {:.1f}" if pct else "{:.3f} ± {:.3f}"
    return fmt.format(rate["rate"] * scale, rate["stderr"] * scale)


def render_report(results: dict) -> str:
    """report.md: the settings, the category shares, the per-category table, how to read it."""
    s, meta = results["summary"], results["meta"]
    c = meta["config"]
    other = [m for m in MATCHES if m != s["match"]][0]
    lines = [
        f"# SliCK knowledge probe: {c.get('name', 'slick')}", "",
        f"Model `{meta['checkpoint']}` (tokenizer `{meta.get('tokenizer')}`, prefix "
        f"`{(meta.get('prefix') or {}).get('mode', c.get('prefix'))}`); facts "
        f"`{c['facts']['path']}` ({s['facts']} facts, offset {c['facts']['offset']}); "
        f"exemplar pool `{c['pool']['path'] or c['facts']['path']}`.", "",
        f"Settings: N_ex = {c['n_prompts']} few-shot prompts of k = {c['k']} exemplars per fact; "
        f"one greedy answer (T = 0) and {c['samples']} sampled answers at T = "
        f"{c['temperature']} per prompt; at most {c['max_new_tokens']} new tokens, answers end "
        f"at the first newline; seed {c['seed']}. Correct = **{s['match']}** "
        + ("(exact match with a gold answer after normalisation, the paper's criterion)."
           if s["match"] == "exact" else
           "(a normalised gold answer occurs as whole words in the answer: lenient, not the "
           "paper's criterion)."), "",
        "## Categories", "",
        "| category | definition | facts | share (%) |", "|---|---|---:|---:|"]
    defs = {"HighlyKnown": "P(T=0) = 1", "MaybeKnown": "0 < P(T=0) < 1",
            "WeaklyKnown": "P(T=0) = 0, P(T>0) > 0", "Unknown": "P(T=0) = 0, P(T>0) = 0"}
    for cat in CATEGORIES:
        lines.append(f"| {cat} | {defs[cat]} | {s['counts'][cat]} | {_pm(s['shares'][cat])} |")
    lines += ["", "## Per category", "",
              f"P_Correct under `{s['match']}`. Greedy accuracy: the first prompt's greedy answer, "
              "exact match (EM, the paper's) and, as a lenient secondary column, gold contained "
              "in the answer.", "",
              "| category | n | share (%) | mean P_Correct(T=0) | mean P_Correct(T>0) | "
              "greedy EM (%) | greedy contains (%) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for cat in CATEGORIES:
        t = s["per_category"][cat]
        lines.append(f"| {cat} | {t['n']} | {_pm(t['share'])} | {_pm(t['p_correct_greedy'], False)}"
                     f" | {_pm(t['p_correct_sampled'], False)} | {_pm(t['greedy_accuracy_exact'])}"
                     f" | {_pm(t['greedy_accuracy_contains'])} |")
    o = s["overall"]
    lines.append(f"| all | {s['facts']} | 100 | {_pm(o['p_correct_greedy'], False)} | "
                 f"{_pm(o['p_correct_sampled'], False)} | {_pm(o['greedy_accuracy_exact'])} | "
                 f"{_pm(o['greedy_accuracy_contains'])} |")
    counts_other = ", ".join(f"{cat} {s['counts_other_match'][cat]}" for cat in CATEGORIES)
    timing = meta["timings"]
    lines += [
        "", f"Under `{other}` instead the categories would be: {counts_other}.", "",
        "All ± values are standard errors over facts (shares and accuracies: of the 0/1 "
        "indicators).", "",
        "## Reading it", "",
        "SliCK (Gekhman et al., 2024, \"Does Fine-Tuning LLMs on New Knowledge Encourage "
        "Hallucinations?\") sorts facts by how reliably the model already produces them, to "
        "choose fine-tuning data. In the paper, fine-tuning examples whose facts are Unknown to "
        "the model are fitted much more slowly than known ones, and as they are eventually "
        "fitted the model's tendency to hallucinate (on facts it did know) rises linearly: "
        "fine-tuning teaches it to produce answers its knowledge does not ground. Early "
        "stopping, or filtering Unknown facts out, limits the damage; MaybeKnown facts matter "
        "most for the tuned model to use knowledge it holds only partly. A large Unknown share "
        "here means that most of this fact set would be new knowledge to the model. Small "
        "models that answer in sentences score low on EM; the contains column shows how much "
        "of that is format rather than knowledge.", "",
        "## Run", "",
        f"{timing['facts_probed']} facts probed in {timing['probe_seconds']} s "
        f"({timing['facts_cached']} reused from an earlier run with the same fingerprint); "
        f"model load {timing['load_seconds']} s. Per-fact answers: `{SAMPLES_FILE}`.", ""]
    return "\n".join(lines)


def plot_slick(summary: dict, records: Sequence[dict], path: str | Path) -> Path:
    """slick.png: category shares with s.e. bars, and a histogram of P_Correct(T=0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    shares = [summary["shares"][c]["rate"] or 0.0 for c in CATEGORIES]
    errors = [summary["shares"][c]["stderr"] for c in CATEGORIES]
    left.bar(CATEGORIES, shares, yerr=errors, capsize=4,
             color=["#2b8a3e", "#74b816", "#f59f00", "#c92a2a"])
    left.set_ylim(0, 1)
    left.set_ylabel("share of facts (± s.e.)")
    left.set_title(f"SliCK categories ({summary['facts']} facts, {summary['match']} match)")
    left.tick_params(axis="x", labelsize=8)
    p0 = [r["p_correct_greedy"] for r in records]
    n_prompts = max((len(r["greedy"]) for r in records), default=1)
    right.hist(p0, bins=[(i - 0.5) / n_prompts for i in range(n_prompts + 2)], color="#1971c2",
               rwidth=0.85)
    right.set_xticks([i / n_prompts for i in range(n_prompts + 1)])
    right.set_xlabel("P_Correct(T=0)")
    right.set_ylabel("facts")
    right.set_title("greedy correctness over the prompts")
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.13, top=0.9, wspace=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ the whole run

def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _file_sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _checkpoint_id(checkpoint: str) -> str:
    """The checkpoint as the fingerprint names it: a run directory's newest finished step,
    else the absolute path."""
    p = Path(checkpoint)
    if p.is_dir():
        try:
            from hibari.model.params_io import resolve_checkpoint
            return str(resolve_checkpoint(p)[1])
        except (UserError, OSError):
            pass
    return str(p.absolute()) if p.exists() else checkpoint


def fingerprint_fields(config, facts_path: str, pool_path: str) -> dict:
    """What the cached answers depend on: checkpoint, tokenizer, the facts and pool files (the
    pool by content) and the generation settings."""
    fields = {"checkpoint": _checkpoint_id(config.checkpoint),
              "tokenizer": str(Path(config.tokenizer).absolute()) if config.tokenizer else "",
              "facts": [str(Path(facts_path).absolute()), config.facts.format],
              "pool": [str(Path(pool_path).absolute()), config.pool.format or config.facts.format,
                       _file_sha(pool_path)]}
    fields.update({f: config[f] for f in FINGERPRINT_FIELDS})
    return fields


def _read_cache(out: Path, fields: dict, log) -> tuple[dict[str, dict], dict]:
    """({id: raw record}, stored lm info) from an earlier run with the same fingerprint."""
    meta_path, samples_path = out / META_FILE, out / SAMPLES_FILE
    if not meta_path.is_file():
        return {}, {}
    try:
        meta = json.loads(meta_path.read_text())
        old = meta["fingerprint_fields"]
    except (json.JSONDecodeError, KeyError, TypeError):
        log(f"slick: {meta_path} is unreadable; starting over")
        return {}, {}
    if old != fields:
        changed = sorted(k for k in set(old) | set(fields) if old.get(k) != fields.get(k))
        log(f"slick: the fingerprint changed ({', '.join(changed)}) since the samples in {out} "
            "were probed; starting over")
        return {}, {}
    cache = {}
    if samples_path.is_file():
        for line in samples_path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                cache[r["id"]] = {k: r[k] for k in ("id", "question", "answers", "exemplars",
                                                    "greedy", "sampled")}
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line of an interrupted run: that fact is probed again
    return cache, meta.get("lm", {})


def _cached_ok(record: dict | None, fact: dict, pool: Sequence[dict], config) -> bool:
    """A cached record still answers this fact: same question, gold answers and exemplars."""
    if record is None or record["question"] != fact["question"] or \
            record["answers"] != fact["answers"]:
        return False
    ids = exemplar_ids(fact, pool, config.n_prompts, config.k, config.seed)
    return (record["exemplars"] == [[pool[j]["id"] for j in shots] for shots in ids]
            and len(record["greedy"]) == config.n_prompts
            and all(len(row) == config.samples for row in record["sampled"]))


def _lm_info(lm) -> dict:
    tok = getattr(lm, "tokenizer", None)
    info = {"tokenizer": getattr(tok, "name", None),
            "prefix": tok.prefix_info() if hasattr(tok, "prefix_info") else None}
    if getattr(lm, "tokenizer_mismatch", None):
        info["tokenizer_mismatch"] = lm.tokenizer_mismatch
    return info


def run_slick(config, out: str | Path, *, log: Callable[[str], None] = _stderr_log,
              lm=None) -> dict:
    """Probe config.checkpoint on the config's facts (see the module docstring); write OUT/
    results.json, report.md, samples/slick.jsonl, slick_meta.json, slick.png; return the
    results. `lm`: an already loaded model to use instead of loading config.checkpoint (the
    fingerprint still names config.checkpoint)."""
    from hibari.base.config_files import resolve_path
    check_config(config)
    out = Path(out)
    facts_path = resolve_path(config.facts.path)
    pool_path = resolve_path(config.pool.path or config.facts.path)
    facts = load_facts(config.facts.path, config.facts.format)
    offset, limit = config.facts.offset, config.facts.limit
    selected = facts[offset:offset + limit] if limit else facts[offset:]
    if not selected:
        raise SlickError(f"config.facts.offset={offset}: the file holds only {len(facts)} facts")
    pool = (facts if pool_path == facts_path and not config.pool.format
            else load_facts(config.pool.path or config.facts.path,
                            config.pool.format or config.facts.format, where="config.pool"))
    for f in selected:  # too small a pool fails here, before the model loads
        exemplar_ids(f, pool, 1, config.k, config.seed)
    fields = fingerprint_fields(config, facts_path, pool_path)
    cache, lm_info = _read_cache(out, fields, log)
    todo = [f for f in selected if not _cached_ok(cache.get(f["id"]), f, pool, config)]
    if len(todo) < len(selected):
        log(f"slick: {len(selected) - len(todo)} of {len(selected)} facts reused from "
            f"{out / SAMPLES_FILE}")
    load_s = 0.0
    if todo and lm is None:
        from hibari.evaluation.lm import load_lm
        t0 = time.perf_counter()
        lm = load_lm(config.checkpoint, config.tokenizer or None, batch_size=config.batch_size,
                     max_len=config.max_len or None, prefix=config.prefix,
                     allow_tokenizer_mismatch=config.allow_tokenizer_mismatch)
        load_s = time.perf_counter() - t0
    if todo:
        lm_info = _lm_info(lm)
    (out / SAMPLES_FILE).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out / META_FILE, json.dumps({"fingerprint": json_digest(fields)[:16],
                                              "fingerprint_fields": fields, "lm": lm_info},
                                             indent=2))
    # the samples file restarts as the still valid records; new ones are appended as they finish
    redo = {f["id"] for f in todo}
    valid = {i: r for i, r in cache.items() if i not in redo}
    write_atomic(out / SAMPLES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in valid.values()))
    t0 = time.perf_counter()
    new: dict[str, dict] = {}
    if todo:
        log(f"slick: probing {len(todo)} facts ({config.n_prompts} prompts × (1 greedy + "
            f"{config.samples} sampled) answers each)")
        with open(out / SAMPLES_FILE, "a", encoding="utf-8") as f:
            def keep(record):
                new[record["id"]] = record
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
            progress = Progress("slick", len(todo), log, " facts probed",
                                every=config.progress_every)
            probe(lm, todo, pool, config, on_record=keep, progress=progress.update)
            progress.finish()
    probe_s = time.perf_counter() - t0
    raw = {**valid, **new}
    records = [score_record(raw[f["id"]], config.match) for f in selected]
    chosen = {f["id"] for f in selected}
    others = [score_record(r, config.match) for i, r in raw.items() if i not in chosen]
    summary = summarize(records, config.match)
    results = {
        "meta": {"checkpoint": config.checkpoint, "fingerprint": json_digest(fields)[:16],
                 "tokenizer": lm_info.get("tokenizer"), "prefix": lm_info.get("prefix"),
                 "config": config.to_dict(),
                 "timings": {"load_seconds": round(load_s, 2), "probe_seconds": round(probe_s, 2),
                             "facts_probed": len(todo), "facts_cached": len(selected) - len(todo),
                             "seconds_per_fact": round(probe_s / len(todo), 3) if todo else None},
                 "samples": SAMPLES_FILE},
        "summary": summary}
    write_atomic(out / SAMPLES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in records + others))
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    write_atomic(out / "report.md", render_report(results))
    plot_slick(summary, records, out / "slick.png")
    return results
