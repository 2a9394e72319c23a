"""`hibari judge`: several models answer one prompt set, a judge model grades the answers.

    from hibari.evaluation.arena import run_judge
    results = run_judge(get_config("smollm2"), "runs/judge")   # also OUT/results.json

The stages (each one batched: all the judge's requests of a stage go through one scorer call):
  prompts      sources from the config (`load_prompts`): seed tasks, NQ-open, ASDiv, any JSONL;
               ids "<source>/<index>"; NQ-open and ASDiv answers are checkable (`check_answer`)
  answers      each contestant answers every prompt through its own template (greedy by
               default), cached in OUT/answers/<name>.jsonl under a fingerprint
               (OUT/answers/<name>.json: checkpoint files' sizes and mtimes, tokenizer,
               template text, generation settings). A rerun generates only what is missing; a
               changed fingerprint regenerates that contestant and says so in one line.
  pairwise     every pair of contestants on every prompt, in both orders, without and/or with
               the reference answer in the judging prompt (`pairwise_records`); a verdict needs
               both orders to agree, else it is a tie -> win/tie/loss matrix and Bradley-Terry /
               Elo ratings with bootstrap intervals (evaluation/ratings.py), per mode
  single       each answer graded low..high: the score distribution from the judge's
               log-likelihoods of " low" ... " high" (`single_records`)
  verbosity    `verbosity.n` answers padded with repetition (`judge.pad_with_repetition`),
               judged against their originals in both orders and graded (`verbosity_records`)
  report       the bias report (position consistency, first-position rate, verbosity bias,
               self-enhancement, grading accuracy where the answer is checkable), results.json,
               report.md, samples/{pairwise,single,verbosity}.jsonl, ratings.png,
               single_scores.png

Judgments are cached too, in OUT/judgments/<judge key>.jsonl (the judge's fingerprint names
the file; each line: a hash of the judging prompt and labels -> their log-likelihoods), so a
rerun after adding a contestant judges only the new pairs, and a rerun with everything cached
loads no model at all. Progress goes to stderr as plain lines (phase, done/total, rate, ETA)
about every 10 s.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from hibari.base.config_files import resolve_path
from hibari.base.errors import InputNotFound, UsageError, UserError
from hibari.base.files import json_digest, write_atomic
from hibari.base.progress import Progress
from hibari.evaluation import judge as J
from hibari.evaluation.formats import json_records

FORMATS = ("seed_tasks", "nq_open", "asdiv", "jsonl")
DEFAULT_CATEGORY = {"seed_tasks": "open-ended", "nq_open": "open QA", "asdiv": "math",
                    "jsonl": "other"}
REFERENCE_MODES = {"both": ("without", "with"), "with": ("with",), "without": ("without",)}
ANSWERS_VERSION = 1


class JudgeConfigError(UsageError):
    """A field of the judge config is invalid; the message names it."""


class PromptFileError(UserError, ValueError):
    """A row of a prompt file is malformed; the message names file:line."""


def stderr_log(message: str) -> None:
    print(f"hibari judge: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- config

def plain_config(config) -> dict:
    """The config as plain JSON data, contestants and prompt sources in the order the config
    defines them (ConfigDict.to_dict would sort them)."""
    if hasattr(config, "to_json"):
        return json.loads(config.to_json())
    return json.loads(json.dumps(config))


def _need(cfg: dict, field: str) -> Any:
    node: Any = cfg
    for part in field.split("."):
        if not isinstance(node, dict) or part not in node:
            raise JudgeConfigError(f"config.{field} is missing")
        node = node[part]
    return node


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """An instruction template as align templates render a prompt (`InstructionTemplate`):
    `with_input` when the input is non-empty, else `without_input`; both end with the
    assistant opener. evaluation/ does not import align/: a config turns an align template
    name into this dict form (`configs/judge/arena.py: template("alpaca_en")`)."""
    name: str
    with_input: str  # format string with {instruction} and {input}
    without_input: str  # format string with {instruction}

    def render(self, instruction: str, input_text: str = "") -> str:
        input_text = input_text.strip()
        if input_text:
            return self.with_input.format(instruction=instruction, input=input_text)
        return self.without_input.format(instruction=instruction)


def _template(spec, field: str) -> PromptTemplate:
    """A config's template field -> PromptTemplate; one line naming the field when it is not
    a {name, with_input, without_input} group with only the allowed placeholders."""
    import string
    if not isinstance(spec, dict) or not all(
            isinstance(spec.get(k), str) for k in ("with_input", "without_input")):
        raise JudgeConfigError(
            f"config.{field}={spec!r}: give a group {{name, with_input, without_input}} of "
            "format strings (configs/judge/arena.py's template('alpaca_en') makes one from an "
            "align template name)"[:400])
    for key, allowed in (("with_input", {"instruction", "input"}),
                         ("without_input", {"instruction"})):
        try:
            names = {n for _, n, _, _ in string.Formatter().parse(spec[key]) if n is not None}
        except ValueError as e:
            raise JudgeConfigError(f"config.{field}.{key}: not a format string ({e})") from None
        if not names <= allowed or "instruction" not in names:
            raise JudgeConfigError(f"config.{field}.{key} has placeholders {sorted(names)}; it "
                                   f"needs {{instruction}} and may use only {sorted(allowed)}")
    return PromptTemplate(str(spec.get("name") or "custom"), spec["with_input"],
                          spec["without_input"])


def template_text(tpl: PromptTemplate) -> dict:
    """What a template renders, for fingerprints."""
    return {"with_input": tpl.with_input, "without_input": tpl.without_input}


def _checkpoint(value, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise JudgeConfigError(f"config.{field} is empty: give a run / params / HF directory or "
                               "a .gguf file")
    path = resolve_path(value)
    if not Path(path).exists():
        leave_out = (f" or --config.{field.rsplit('.', 1)[0]}.enabled=False"
                     if field.startswith("contestants.") else "")
        raise InputNotFound(f"config.{field}={value!r}: no such file or directory (relative to "
                            f"{os.getcwd()}); set --config.{field}=PATH{leave_out}")
    return str(Path(path).resolve())


def _tokenizer(value, field: str) -> str | None:
    if not value:
        return None
    path = resolve_path(value)
    if not Path(path).exists():
        raise InputNotFound(f"config.{field}={value!r}: no such file or directory")
    return str(Path(path).resolve())


def _prefix(value, field: str) -> str:
    from hibari.evaluation.tokenizer import PREFIX_MODES
    if value not in PREFIX_MODES:
        raise JudgeConfigError(f"config.{field}={value!r}; choose one of {PREFIX_MODES}")
    return value


def _int(cfg: dict, field: str, low: int) -> int:
    value = _need(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise JudgeConfigError(f"config.{field}={value!r}: give an integer >= {low}")
    return value


def _modes(cfg: dict, field: str) -> tuple[str, ...]:
    value = _need(cfg, field)
    if value not in REFERENCE_MODES:
        raise JudgeConfigError(f"config.{field}={value!r}; choose one of "
                               f"{sorted(REFERENCE_MODES)}")
    return REFERENCE_MODES[value]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A contestant or the judge, checked: resolved paths, template object."""
    name: str
    checkpoint: str
    tokenizer: str | None
    template: PromptTemplate
    prefix: str
    stop: tuple[str, ...] = ()

    @property
    def load_key(self) -> tuple:
        return (self.checkpoint, self.tokenizer, self.prefix)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked config: everything the pipeline needs, validated before any model loads."""
    config: dict
    sources: dict
    contestants: list[ModelSpec]
    judge: ModelSpec
    judge_contestant: str | None
    judge_contestant_why: str
    generation: dict
    judge_batch_size: int
    judge_max_len: int
    pairwise_primer: str
    single_primer: str
    pairwise_modes: tuple[str, ...]
    single_enabled: bool
    single_modes: tuple[str, ...]
    low: int
    high: int
    verbosity_n: int
    verbosity_repeat: int
    ratings: dict


def check_config(config) -> Plan:
    """Validate every field (paths exist, templates known, values in range) -> a Plan."""
    cfg = plain_config(config)
    contestants = []
    for name, c in (_need(cfg, "contestants") or {}).items():
        if not isinstance(c, dict):
            raise JudgeConfigError(f"config.contestants.{name} must be a group of fields")
        if not c.get("enabled", True):
            continue
        f = f"contestants.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise JudgeConfigError(f"config.{f}: a contestant's name names its answer files; "
                                   "use letters, digits, '_', '-' or '.'")
        stop = c.get("stop") or []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise JudgeConfigError(f"config.{f}.stop={stop!r}: give a list of strings")
        contestants.append(ModelSpec(
            name=name, checkpoint=_checkpoint(c.get("checkpoint"), f"{f}.checkpoint"),
            tokenizer=_tokenizer(c.get("tokenizer"), f"{f}.tokenizer"),
            template=_template(c.get("template"), f"{f}.template"),
            prefix=_prefix(c.get("prefix", "auto"), f"{f}.prefix"), stop=tuple(stop)))
    if len(contestants) < 2:
        raise JudgeConfigError(f"config.contestants: {len(contestants)} enabled; a pairwise "
                               "comparison needs at least 2")
    j = _need(cfg, "judge")
    judge = ModelSpec(name=str(j.get("name") or "judge"),
                      checkpoint=_checkpoint(j.get("checkpoint"), "judge.checkpoint"),
                      tokenizer=_tokenizer(j.get("tokenizer"), "judge.tokenizer"),
                      template=_template(j.get("template"), "judge.template"),
                      prefix=_prefix(j.get("prefix", "auto"), "judge.prefix"))
    names = [c.name for c in contestants]
    chosen = j.get("contestant", "") or ""
    if chosen == "none":
        judge_contestant, why = None, "config.judge.contestant='none'"
    elif chosen:
        if chosen not in names:
            raise JudgeConfigError(f"config.judge.contestant={chosen!r} is not an enabled "
                                   f"contestant ({names}); or '' (detect) or 'none'")
        judge_contestant, why = chosen, "config.judge.contestant"
    else:
        same = [c for c in contestants if c.load_key == judge.load_key]
        exact = [c for c in same if template_text(c.template) == template_text(judge.template)]
        pick = (exact or same or [None])[0]
        judge_contestant = pick.name if pick else None
        why = ("the same checkpoint as the judge" if pick else
               f"no contestant has the judge's checkpoint {judge.checkpoint}")
    gen = dict(_need(cfg, "generation"))
    _int(cfg, "generation.max_new_tokens", 1)
    _int(cfg, "generation.batch_size", 1)
    if not isinstance(gen.get("stop", []), (list, tuple)):
        raise JudgeConfigError(f"config.generation.stop={gen.get('stop')!r}: give a list")
    single = _need(cfg, "single")
    low, high = single.get("low", 1), single.get("high", 5)
    try:
        J.score_labels(low, high)
    except ValueError as e:
        raise JudgeConfigError(f"config.single: {e}") from None
    sources = _need(cfg, "prompts")
    for name, s in sources.items():
        if not isinstance(s, dict):
            raise JudgeConfigError(f"config.prompts.{name} must be a group of fields")
        if s.get("format") not in FORMATS:
            raise JudgeConfigError(f"config.prompts.{name}.format={s.get('format')!r}; choose "
                                   f"one of {FORMATS}")
        if s.get("enabled", True):
            if not Path(resolve_path(s.get("path") or "")).is_file():
                raise InputNotFound(f"config.prompts.{name}.path={s.get('path')!r}: no such "
                                    "file")
            _int(cfg, f"prompts.{name}.limit", 0)
    ratings = _need(cfg, "ratings")
    _int(cfg, "ratings.bootstrap_rounds", 1)
    return Plan(
        config=cfg, sources=sources, contestants=contestants, judge=judge,
        judge_contestant=judge_contestant, judge_contestant_why=why, generation=gen,
        judge_batch_size=_int(cfg, "judge.batch_size", 1),
        judge_max_len=_int(cfg, "judge.max_len", 0),
        pairwise_primer=str(j.get("pairwise_primer", J.PAIRWISE_PRIMER)),
        single_primer=str(j.get("single_primer", J.SINGLE_PRIMER)),
        pairwise_modes=_modes(cfg, "pairwise.reference"),
        single_enabled=bool(single.get("enabled", True)),
        single_modes=_modes(cfg, "single.reference"),
        low=low, high=high, verbosity_n=_int(cfg, "verbosity.n", 0),
        verbosity_repeat=_int(cfg, "verbosity.repeat", 1), ratings=ratings)


# ------------------------------------------------------------------------------------ prompts

def _text(value, what: str, where: str, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise PromptFileError(f"{where}: {what} must be a non-empty string, got {value!r}"[:300])
    return value.strip()


def parse_prompt_row(row: Any, fmt: str, where: str) -> dict:
    """One JSONL row -> {instruction, input, reference, answers, gold_number, check}."""
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: a row must be a JSON object")
    out = {"input": "", "reference": None, "answers": None, "gold_number": None, "check": None}
    if fmt == "seed_tasks":
        out["instruction"] = _text(row.get("instruction"), "'instruction'", where)
        instances = row.get("instances")
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise PromptFileError(f"{where}: 'instances' must be a non-empty list of "
                                  "{input, output}")
        out["input"] = _text(instances[0].get("input"), "'instances[0].input'", where, False)
        ref = _text(instances[0].get("output"), "'instances[0].output'", where, False)
        out["reference"] = ref or None
    elif fmt == "nq_open":
        out["instruction"] = _text(row.get("question"), "'question'", where)
        answers = row.get("answer")
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or \
                not all(isinstance(a, str) and a.strip() for a in answers):
            raise PromptFileError(f"{where}: 'answer' must be a non-empty list of strings")
        out.update(reference=answers[0], answers=answers, check="contains")
    elif fmt == "asdiv":
        passage = _text(row.get("passage"), "'passage'", where, False)
        question = _text(row.get("question"), "'question'", where)
        out["instruction"] = f"{passage} {question}".strip()
        answer = _text(row.get("answer"), "'answer'", where)
        numbers = J.numbers_in(answer)
        if not numbers:
            raise PromptFileError(f"{where}: 'answer'={answer!r} holds no number to check")
        out.update(reference=answer, gold_number=numbers[0], check="number")
    else:  # jsonl
        if row.get("prompt") is not None:
            out["instruction"] = _text(row.get("prompt"), "'prompt'", where)
        else:
            out["instruction"] = _text(row.get("instruction"), "'prompt' or 'instruction'",
                                       where)
            out["input"] = _text(row.get("input"), "'input'", where, False)
        ref = _text(row.get("reference"), "'reference'", where, False)
        out["reference"] = ref or None
        answers = row.get("answers")
        if answers is not None:
            if not isinstance(answers, list) or not answers or \
                    not all(isinstance(a, str) and a.strip() for a in answers):
                raise PromptFileError(f"{where}: 'answers' must be a non-empty list of strings")
            out.update(answers=answers, check="contains",
                       reference=out["reference"] or answers[0])
    return out


def read_source(name: str, source: dict) -> list[dict]:
    """The first `limit` prompts (0 = all) of one configured source."""
    path = resolve_path(source["path"])
    limit = source.get("limit") or 0
    fmt = source["format"]
    category = source.get("category") or DEFAULT_CATEGORY[fmt]
    prompts = []
    for where, _, row in json_records(path):  # a line that is not a JSON object: FormatError
        if limit and len(prompts) >= limit:
            break
        p = parse_prompt_row(row, fmt, where)
        p.update(id=f"{name}/{len(prompts)}", source=name, category=category)
        p["question"] = p["instruction"] + (f"\n\n{p['input']}" if p["input"] else "")
        prompts.append(p)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts read (config.prompts.{name})")
    return prompts


def load_prompts(sources: dict) -> list[dict]:
    return [p for name, s in sources.items() if s.get("enabled", True)
            for p in read_source(name, s)]


def check_answer(prompt: dict, answer: str) -> bool | None:
    """Whether an answer is correct by the prompt's reference (None: not checkable)."""
    if prompt.get("check") == "contains":
        return J.contains_answer(answer, prompt["answers"])
    if prompt.get("check") == "number":
        return J.has_number(answer, prompt["gold_number"])
    return None


# ------------------------------------------------------------------------------- fingerprints

def path_fingerprint(path: str | None) -> dict | None:
    """A file: its size and mtime; a directory: a digest of every file's (path, size, mtime)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h, n, total = hashlib.sha256(), 0, 0
    for root, dirs, files in os.walk(p):
        dirs.sort()
        for name in sorted(files):
            f = Path(root) / name
            st = f.stat()
            h.update(f"{f.relative_to(p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            n, total = n + 1, total + st.st_size
    return {"path": str(p), "files": n, "bytes": total, "digest": h.hexdigest()[:24]}


def generation_settings(plan: Plan, spec: ModelSpec) -> dict:
    g = plan.generation
    out = {"max_new_tokens": g["max_new_tokens"], "temperature": float(g.get("temperature", 0)),
           "top_k": g.get("top_k", 0), "top_p": float(g.get("top_p", 1.0)),
           "seed": g.get("seed", 0), "stop": list(g.get("stop") or []) + list(spec.stop)}
    if out["temperature"] > 0:  # sampled answers depend on the batch composition
        out["batch_size"] = g["batch_size"]
    return out


def answers_fingerprint(plan: Plan, spec: ModelSpec) -> dict:
    return {"version": ANSWERS_VERSION, "checkpoint": path_fingerprint(spec.checkpoint),
            "tokenizer": path_fingerprint(spec.tokenizer) or "found beside the checkpoint",
            "prefix": spec.prefix, "template": template_text(spec.template),
            "generation": generation_settings(plan, spec)}


def judge_fingerprint(plan: Plan) -> dict:
    return {"checkpoint": path_fingerprint(plan.judge.checkpoint),
            "tokenizer": path_fingerprint(plan.judge.tokenizer) or "found beside the checkpoint",
            "prefix": plan.judge.prefix, "max_len": plan.judge_max_len}


# ------------------------------------------------------------------------------------- answers

def _read_jsonl(path: Path) -> list[dict]:
    """Records of a cache file; a torn last line (an interrupted append) is dropped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _changed(old: dict | None, new: dict) -> list[str]:
    if not isinstance(old, dict):
        return ["(no fingerprint)"]
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def generate_answers(plan: Plan, prompts: Sequence[dict], out: Path,
                     load: Callable[[ModelSpec], Any], log: Callable[[str], None]
                     ) -> tuple[dict[str, dict[str, str]], dict]:
    """{contestant: {prompt id: answer}} and per-contestant counts {generated, cached,
    seconds}; only prompts missing from OUT/answers/<name>.jsonl are generated."""
    folder = out / "answers"
    folder.mkdir(parents=True, exist_ok=True)
    answers, stats = {}, {}
    for spec in plan.contestants:
        fp = answers_fingerprint(plan, spec)
        meta_path, cache_path = folder / f"{spec.name}.json", folder / f"{spec.name}.jsonl"
        old = json.loads(meta_path.read_text()).get("fingerprint") if meta_path.is_file() else None
        if old != fp:
            if old is not None:
                log(f"answers {spec.name}: fingerprint changed ({', '.join(_changed(old, fp))}): "
                    "regenerating all its answers")
            write_atomic(cache_path, "")
            write_atomic(meta_path, json.dumps({"contestant": spec.name, "fingerprint": fp},
                                               indent=1))
        texts = {p["id"]: spec.template.render(p["instruction"], p["input"])
                 for p in prompts}
        cached = {r["id"]: r["answer"] for r in _read_jsonl(cache_path)
                  if r.get("id") in texts and r.get("prompt") == texts[r["id"]]}
        missing = [p["id"] for p in prompts if p["id"] not in cached]
        seconds = 0.0
        if missing:
            lm = load(spec)
            g = generation_settings(plan, spec)
            bs = plan.generation["batch_size"]
            progress = Progress(f"answers {spec.name}", len(missing), log, " prompts")
            for start in range(0, len(missing), bs):
                ids = missing[start:start + bs]
                outs = lm.generate([texts[i] for i in ids], max_new_tokens=g["max_new_tokens"],
                                   stop=g["stop"], temperature=g["temperature"],
                                   top_k=g["top_k"], top_p=g["top_p"], seed=g["seed"] + start,
                                   batch_size=bs)
                lines = []
                for i, completion in zip(ids, outs):
                    cached[i] = completion.strip()
                    lines.append(json.dumps({"id": i, "prompt": texts[i], "answer": cached[i],
                                             "completion": completion}, ensure_ascii=False))
                with open(cache_path, "a", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
                progress.advance(len(ids))
            seconds = progress.finish()
        stats[spec.name] = {"generated": len(missing), "cached": len(prompts) - len(missing),
                            "seconds": round(seconds, 2)}
        if not missing:
            log(f"answers {spec.name}: all {len(prompts)} cached")
        answers[spec.name] = {p["id"]: cached[p["id"]] for p in prompts}
    return answers, stats


# ------------------------------------------------------------------------------------ judgments

class CachedScorer:
    """An `OptionScorer` over a judgment cache file: each (context, labels) is scored once,
    ever; the model scorer is made (the judge loaded) only when something is missing. Missing
    requests are scored in chunks sorted by length, with progress lines; `scored` / `cached`
    count label sets."""

    def __init__(self, make_scorer: Callable[[], J.OptionScorer], path: Path | None,
                 log: Callable[[str], None], chunk: int = 64):
        self.make_scorer, self.path, self.log, self.chunk = make_scorer, path, log, chunk
        self.scorer: J.OptionScorer | None = None
        self.cache = {r["k"]: r["lp"] for r in _read_jsonl(path)} if path else {}
        self.scored = self.cached = 0

    def phase(self, name: str) -> J.OptionScorer:
        return lambda contexts, options: self.score(contexts, options, name)

    def score(self, contexts: Sequence[str], options: Sequence[str], phase: str = "judge"
              ) -> list[list[float]]:
        phase = f"{phase} [{'/'.join(o.strip() for o in options)}]"
        keys = [json_digest([c, list(options)])[:32] for c in contexts]
        todo = sorted({k: c for k, c in zip(keys, contexts) if k not in self.cache}.items(),
                      key=lambda kc: len(kc[1]))
        self.cached += len(keys) - len(todo)
        self.scored += len(todo)
        if todo:
            if self.scorer is None:
                self.scorer = self.make_scorer()
            progress = Progress(phase, len(todo), self.log, " judging prompts")
            for start in range(0, len(todo), self.chunk):
                chunk = todo[start:start + self.chunk]
                scores = self.scorer([c for _, c in chunk], list(options))
                for (k, _), lp in zip(chunk, scores):
                    self.cache[k] = lp
                if self.path:
                    with open(self.path, "a", encoding="utf-8") as f:
                        f.write("".join(json.dumps({"k": k, "lp": self.cache[k]}) + "\n"
                                        for k, _ in chunk))
                progress.advance(len(chunk))
            progress.finish()
        else:
            self.log(f"{phase}: all {len(keys)} judging prompts cached")
        return [self.cache[k] for k in keys]


# -------------------------------------------------------------------------------------- phases

def _pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(names, 2))


def pairwise_records(judge: J.Judge, prompts: Sequence[dict], answers: dict[str, dict[str, str]],
                     names: Sequence[str], modes: Sequence[str]) -> list[dict]:
    """Every pair of `names` on every prompt, both orders, per reference mode ("with" only on
    prompts with a reference): one record per (mode, prompt, pair) with P(a better | a first),
    P(b better | b first), their order-average and the verdict ("a", "b" or "tie" when the
    orders disagree)."""
    items, requests = [], []
    for mode in modes:
        for p in prompts:
            if mode == "with" and p["reference"] is None:
                continue
            ref = p["reference"] if mode == "with" else None
            for a, b in _pairs(names):
                x, y = answers[a][p["id"]], answers[b][p["id"]]
                items.append((mode, p, a, b, x, y))
                requests += [J.PairRequest(p["question"], x, y, ref),
                             J.PairRequest(p["question"], y, x, ref)]
    probs = judge.prefer(requests) if requests else []
    out = []
    for n, (mode, p, a, b, x, y) in enumerate(items):
        p_ab, p_ba = float(probs[2 * n]), float(probs[2 * n + 1])
        verdict = {"x": "a", "y": "b", "tie": "tie"}[J.pair_verdict(p_ab, p_ba)]
        out.append({"mode": mode, "prompt_id": p["id"], "source": p["source"],
                    "category": p["category"], "model_a": a, "model_b": b,
                    "prompt": p["question"], "answer_a": x, "answer_b": y,
                    "reference": p["reference"], "p_a_first": p_ab, "p_b_first": p_ba,
                    "p_a_better": (p_ab + 1.0 - p_ba) / 2, "verdict": verdict,
                    "winner": {"a": a, "b": b, "tie": "tie"}[verdict],
                    "first_won": [p_ab > 0.5, p_ba > 0.5], "identical": x == y,
                    "correct_a": check_answer(p, x), "correct_b": check_answer(p, y)})
    return out


def _score_entry(probs: Sequence[float], low: int) -> dict:
    probs = [float(q) for q in probs]
    return {"probs": probs, "score": low + max(range(len(probs)), key=probs.__getitem__),
            "expected": sum((low + i) * q for i, q in enumerate(probs))}


def single_records(judge: J.Judge, prompts: Sequence[dict], answers: dict[str, dict[str, str]],
                   names: Sequence[str], modes: Sequence[str], low: int, high: int
                   ) -> list[dict]:
    """Every answer graded low..high per reference mode: the score distribution, its argmax
    (`score`) and its mean (`expected`)."""
    items, requests = [], []
    for mode in modes:
        for p in prompts:
            if mode == "with" and p["reference"] is None:
                continue
            for name in names:
                answer = answers[name][p["id"]]
                items.append((mode, p, name, answer))
                requests.append(J.GradeRequest(p["question"], answer,
                                               p["reference"] if mode == "with" else None))
    dists = judge.grade(requests, low, high) if requests else []
    return [{"mode": mode, "prompt_id": p["id"], "source": p["source"], "category": p["category"],
             "model": name, "prompt": p["question"], "answer": answer, "reference": p["reference"],
             **_score_entry(dist, low), "correct": check_answer(p, answer)}
            for (mode, p, name, answer), dist in zip(items, dists)]


def verbosity_sample(prompts: Sequence[dict], answers: dict[str, dict[str, str]],
                     names: Sequence[str], n: int) -> list[tuple[dict, str]]:
    """n (prompt, contestant) pairs with a non-empty answer, spread evenly over the prompts,
    the contestant rotating from prompt to prompt (deterministic). Round r pairs prompt i with
    contestant (i + r) mod C; rounds are used up in order, the last one evenly subsampled."""
    chosen: list[tuple[dict, str]] = []
    for r in range(len(names)):
        need = n - len(chosen)
        if need <= 0:
            break
        rnd = [(p, names[(i + r) % len(names)]) for i, p in enumerate(prompts)
               if answers[names[(i + r) % len(names)]][p["id"]].strip()]
        chosen += rnd if need >= len(rnd) else [rnd[k * len(rnd) // need] for k in range(need)]
    return chosen


def verbosity_records(judge: J.Judge, prompts: Sequence[dict],
                      answers: dict[str, dict[str, str]], names: Sequence[str], n: int,
                      repeat: int, low: int | None = None, high: int | None = None
                      ) -> list[dict]:
    """MT-bench's repetitive-list attack: n answers vs `pad_with_repetition(answer, repeat)`,
    judged in both orders without a reference; with `low`/`high` both are also graded."""
    chosen = verbosity_sample(prompts, answers, names, n)
    requests, grades = [], []
    for p, name in chosen:
        original = answers[name][p["id"]]
        padded = J.pad_with_repetition(original, repeat)
        requests += [J.PairRequest(p["question"], padded, original),
                     J.PairRequest(p["question"], original, padded)]
        grades += [J.GradeRequest(p["question"], original), J.GradeRequest(p["question"], padded)]
    probs = judge.prefer(requests) if requests else []
    dists = judge.grade(grades, low, high) if grades and low is not None else []
    out = []
    for i, (p, name) in enumerate(chosen):
        original = answers[name][p["id"]]
        p_pf, p_of = float(probs[2 * i]), float(probs[2 * i + 1])
        verdict = {"x": "padded", "y": "original", "tie": "tie"}[J.pair_verdict(p_pf, p_of)]
        rec = {"prompt_id": p["id"], "source": p["source"], "category": p["category"],
               "model": name, "prompt": p["question"], "original": original,
               "padded": J.pad_with_repetition(original, repeat), "repeat": repeat,
               "p_padded_first": p_pf, "p_original_first": p_of,
               "p_padded_better": (p_pf + 1.0 - p_of) / 2, "verdict": verdict,
               "score_original": None, "score_padded": None}
        if dists:
            rec["score_original"] = _score_entry(dists[2 * i], low)["expected"]
            rec["score_padded"] = _score_entry(dists[2 * i + 1], low)["expected"]
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------- results

def battles(pair_records: Sequence[dict], mode: str, averaged: bool = False
            ) -> list[tuple[str, str, str]]:
    """(a, b, outcome) per judged pair of `mode`: the consistent verdict (a tie unless both
    orders agree), or with `averaged` the side of P(a better) averaged over both orders, which
    cancels a constant position bias (a tie at exactly 0.5, and always for two identical
    answers, whose P differs from 0.5 only by float rounding)."""
    if not averaged:
        return [(r["model_a"], r["model_b"], r["verdict"]) for r in pair_records
                if r["mode"] == mode]
    return [(r["model_a"], r["model_b"], "tie" if r.get("identical") else
             "a" if r["p_a_better"] > 0.5 else "b" if r["p_a_better"] < 0.5 else "tie")
            for r in pair_records if r["mode"] == mode]


def summarize_judgments(pair_recs: Sequence[dict], single_recs: Sequence[dict],
                        verbosity_recs: Sequence[dict], names: Sequence[str],
                        judge_contestant: str | None, why_not: str, ratings: dict,
                        low: int, high: int) -> dict:
    """The result tables: per pairwise mode the win matrix and rating table; the single-grade
    table; the bias report."""
    from hibari.evaluation.ratings import rating_table, win_matrix, win_matrix_markdown
    pairwise = {}
    for mode in dict.fromkeys(r["mode"] for r in pair_recs):
        bs, avg = battles(pair_recs, mode), battles(pair_recs, mode, averaged=True)
        table = functools.partial(rating_table, models=list(names),
                                  rounds=ratings.get("bootstrap_rounds", 1000),
                                  seed=ratings.get("seed", 0), prior=ratings.get("prior", 0.5),
                                  k=ratings.get("elo_k", 4.0))
        pairwise[mode] = {
            "pairs": len(bs), "win_matrix": win_matrix(bs, list(names)),
            "win_matrix_markdown": win_matrix_markdown(bs, list(names)),
            "ratings": table(bs), "ratings_order_averaged": table(avg)}
    return {"pairwise": pairwise,
            "single": J.single_report(single_recs, low, high) if single_recs else {},
            "bias": {"position": J.position_report(pair_recs),
                     "verbosity": J.verbosity_report(verbosity_recs) if verbosity_recs else None,
                     "self_enhancement": J.self_enhancement_report(pair_recs, judge_contestant,
                                                                   why_not),
                     "grading_accuracy": J.grading_accuracy_report(pair_recs)}}


def _finite(value):
    """NaN / inf -> None, recursively (results.json stays strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(_finite(r), ensure_ascii=False) + "\n" for r in records)


def run_judge(config, out: str | Path, *, log: Callable[[str], None] = stderr_log,
              command: str | None = None) -> dict:
    """The whole pipeline (see the module docstring) -> the results dict, also written to
    OUT/results.json with report.md, samples/, ratings.png and single_scores.png."""
    t_start = time.monotonic()
    plan = check_config(config)
    prompts = load_prompts(plan.sources)  # every file checked before a model loads
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in plan.contestants]
    by_source: dict[str, int] = {}
    for p in prompts:
        by_source[p["source"]] = by_source.get(p["source"], 0) + 1
    log(f"{len(prompts)} prompts ({', '.join(f'{k}: {v}' for k, v in by_source.items())}), "
        f"{len(names)} contestants ({', '.join(names)}), judge {plan.judge.name}"
        + (f" (also contestant {plan.judge_contestant})" if plan.judge_contestant else ""))

    loaded: dict[tuple, Any] = {}

    def load(spec: ModelSpec):
        if spec.load_key not in loaded:
            from hibari.evaluation.lm import load_lm
            t0 = time.monotonic()
            loaded[spec.load_key] = load_lm(spec.checkpoint, spec.tokenizer, prefix=spec.prefix,
                                            batch_size=plan.generation["batch_size"])
            log(f"loaded {spec.name} ({spec.checkpoint}) in {time.monotonic() - t0:.1f} s")
        return loaded[spec.load_key]

    timings = {}
    answers, answer_stats = generate_answers(plan, prompts, out, load, log)
    timings["answers"] = round(time.monotonic() - t_start, 2)
    for key in [k for k in loaded if k != plan.judge.load_key]:
        del loaded[key]  # contestants' parameters are not needed any more

    judge_fp = judge_fingerprint(plan)
    judge_key = json_digest(judge_fp)[:16]
    jdir = out / "judgments"
    jdir.mkdir(exist_ok=True)
    judge_meta_path = jdir / f"{judge_key}.json"
    judge_meta = json.loads(judge_meta_path.read_text()) if judge_meta_path.is_file() else {}

    def make_scorer() -> J.OptionScorer:
        lm = load(plan.judge)
        lm = dataclasses.replace(lm, batch_size=plan.judge_batch_size,
                                 max_len=plan.judge_max_len or lm.cfg.max_seq_len)
        from hibari.model import count_params
        judge_meta.update(fingerprint=judge_fp, params=count_params(lm.cfg).total,
                          max_len=lm.max_len)
        write_atomic(judge_meta_path, json.dumps(judge_meta, indent=1))
        return lambda contexts, options: J.option_logprobs(lm, contexts, options)

    scorer = CachedScorer(make_scorer, jdir / f"{judge_key}.jsonl", log,
                          chunk=2 * plan.judge_batch_size)
    base_judge = J.LMJudge(score=scorer.phase("judge"), render=plan.judge.template.render,
                           pairwise_primer=plan.pairwise_primer, single_primer=plan.single_primer)

    def phase_judge(name: str) -> J.LMJudge:
        return dataclasses.replace(base_judge, score=scorer.phase(name))

    t0 = time.monotonic()
    pair_recs = pairwise_records(phase_judge("pairwise"), prompts, answers, names,
                                 plan.pairwise_modes)
    timings["pairwise"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    single_recs = (single_records(phase_judge("single"), prompts, answers, names,
                                  plan.single_modes, plan.low, plan.high)
                   if plan.single_enabled else [])
    timings["single"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    verb_recs = (verbosity_records(phase_judge("verbosity"), prompts, answers, names,
                                   plan.verbosity_n, plan.verbosity_repeat,
                                   *((plan.low, plan.high) if plan.single_enabled else ()))
                 if plan.verbosity_n else [])
    timings["verbosity"] = round(time.monotonic() - t0, 2)

    why_not = ("" if plan.judge_contestant else
               f"the judge is not a contestant ({plan.judge_contestant_why})")
    results = summarize_judgments(pair_recs, single_recs, verb_recs, names,
                                  plan.judge_contestant, why_not, plan.ratings, plan.low,
                                  plan.high)
    results["prompts"] = {name: {"n": by_source.get(name, 0), "path": s["path"],
                                 "format": s["format"],
                                 "category": s.get("category") or DEFAULT_CATEGORY[s["format"]]}
                          for name, s in plan.sources.items() if s.get("enabled", True)}
    results["judge"] = {"name": plan.judge.name, "checkpoint": plan.judge.checkpoint,
                        "params": judge_meta.get("params"), "contestant": plan.judge_contestant,
                        "contestant_why": plan.judge_contestant_why,
                        "template": template_text(plan.judge.template)}
    results["contestants"] = [{"name": c.name, "checkpoint": c.checkpoint,
                               "template": template_text(c.template),
                               "generation": generation_settings(plan, c)}
                              for c in plan.contestants]
    files = write_outputs(out, results, pair_recs, single_recs, verb_recs)
    timings["total"] = round(time.monotonic() - t_start, 2)
    results["files"] = files
    results["meta"] = {
        "config": plan.config, "command": command or f"hibari.evaluation.arena.run_judge(config, "
        f"{str(out)!r})", "timings_s": timings, "answers": answer_stats,
        "judgments": {"scored": scorer.scored, "cached": scorer.cached, "cache": str(
            (jdir / f"{judge_key}.jsonl").relative_to(out))}}
    results = _finite(results)
    write_atomic(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
    report = markdown_report(results)
    write_atomic(out / "report.md", report)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'} "
        f"({timings['total']:.1f} s; {scorer.scored} judging prompts scored, {scorer.cached} "
        "cached)")
    return results


def write_outputs(out: Path, results: dict, pair_recs, single_recs, verb_recs) -> list[str]:
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    files = []
    for name, recs in (("pairwise", pair_recs), ("single", single_recs),
                       ("verbosity", verb_recs)):
        write_atomic(samples / f"{name}.jsonl", _jsonl(recs))
        files.append(f"samples/{name}.jsonl")
    if results["pairwise"]:
        plot_ratings(results["pairwise"], out / "ratings.png")
        files.append("ratings.png")
    if results["single"]:
        plot_single(results["single"], out / "single_scores.png")
        files.append("single_scores.png")
    return files + ["results.json", "report.md"]


# -------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ratings(pairwise: dict, path: Path) -> None:
    """Bradley-Terry ratings with their bootstrap intervals, one panel per reference mode."""
    plt = _pyplot()
    modes = list(pairwise)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 0.5 + 0.5 * max(
        len(pairwise[m]["ratings"]) for m in modes) + 1), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = pairwise[mode]["ratings"][::-1]
        ys = range(len(rows))
        bt = [r["bt"] for r in rows]

        def err(r, side):
            v = r[f"bt_{side}"]
            return 0.0 if v is None or not math.isfinite(v) else abs(r["bt"] - v)
        ax.errorbar(bt, list(ys), xerr=[[err(r, "lo") for r in rows],
                                        [err(r, "hi") for r in rows]],
                    fmt="o", capsize=4)
        ax.set_yticks(list(ys), [r["model"] for r in rows])
        ax.axvline(1000, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("Bradley-Terry rating (Elo scale), 95% bootstrap CI")
        ax.set_title(f"pairwise, {mode} reference ({pairwise[mode]['pairs']} pairs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_single(single: dict, path: Path) -> None:
    """Histograms of the chosen single-answer scores, one panel per reference mode."""
    plt = _pyplot()
    modes = list(single)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        models = list(single[mode])
        width = 0.8 / max(len(models), 1)
        for i, m in enumerate(models):
            hist = single[mode][m]["histogram"]
            ks = [int(k) for k in hist]
            ax.bar([k - 0.4 + width * (i + 0.5) for k in ks], list(hist.values()), width,
                   label=m)
        ax.set_xlabel("chosen score")
        ax.set_ylabel("answers")
        ax.set_title(f"single-answer grades, {mode} reference")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------- report

def _pct(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "n/a (n=0)"
    return f"{100 * r['rate']:.1f}% ± {100 * r['stderr']:.1f} (n={r['n']})"


def _mean(r: dict | None, digits: int = 3) -> str:
    if not r or r.get("mean") is None:
        return "n/a (n=0)"
    return f"{r['mean']:.{digits}f} ± {r['stderr']:.{digits}f} (n={r['n']})"


def _num(v, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2g}M"


def weak_judge_paragraph(results: dict) -> str:
    """Plain words on how far the judge can be trusted, with the numbers that show it."""
    bias = results["bias"]
    params = results["judge"].get("params")
    size = f"{_millions(params)}-parameter " if params else ""
    mode = "without" if "without" in bias["position"] else next(iter(bias["position"]), None)
    facts = []
    if mode:
        pos = bias["position"][mode]
        first = pos["first_position_rate"]
        side = "first"
        if first.get("rate") is not None and first["rate"] < 0.5:  # name the favoured side
            side, first = "second", {**first, "rate": 1.0 - first["rate"]}
        facts.append(f"its verdict survives swapping the two answers in only "
                     f"{_pct(pos['consistency'])} of the pairs (judged {mode} a reference), and "
                     f"it prefers whichever answer is shown {side} in {_pct(first)} of "
                     "single-order judgments (50% = no position bias)")
    verb = bias.get("verbosity")
    if verb:
        facts.append(f"an answer padded with repetitions of itself beats the original in both "
                     f"orders in {_pct(verb['padded_win_rate'])} of the pairs")
    acc = bias["grading_accuracy"].get(mode or "", {})
    for cat in [c for c in acc if c != "all"]:
        facts.append(f"where exactly one answer is correct it picks that one in "
                     f"{_pct(acc[cat]['picks_correct'])} of the {cat} pairs")
    weak = not params or params < 1e9
    head = (f"**Read the bias report, not the ranking.** The judge ({results['judge']['name']}, "
            f"a {size}model) is {'a weak judge at this size' if weak else 'a model judge'}: "
            if facts else "**Read the bias report, not the ranking.** ")
    tail = (" Verdicts that flip with the order become ties, so the ratings above mostly "
            "measure the judge's biases and are pulled toward each other; the bias report is the "
            "point of this run." if weak else " Check these numbers before trusting the ranking.")
    return head + "; ".join(facts) + "." + tail


def _rating_row(r: dict) -> str:
    return (f"| {r['model']} | {_num(r['bt'])} [{_num(r['bt_lo'])}, {_num(r['bt_hi'])}] | "
            f"{_num(r['elo'])} [{_num(r['elo_lo'])}, {_num(r['elo_hi'])}] | "
            f"{r['wins']}/{r['ties']}/{r['losses']} | {_num(r['win_rate'], 3)} ± "
            f"{_num(r['win_rate_stderr'], 3)} |")


def markdown_report(results: dict) -> str:
    meta = results["meta"]
    judge = results["judge"]
    lines = ["# LLM-as-a-judge", ""]
    lines.append(f"Judge: **{judge['name']}** ({judge['checkpoint']}"
                 + (f", {_millions(judge['params'])} parameters" if judge.get("params") else "")
                 + "). " + (f"The judge is also the contestant `{judge['contestant']}` "
                            f"({judge['contestant_why']})." if judge["contestant"] else
                            f"The judge is not a contestant ({judge['contestant_why']})."))
    lines.append("")
    lines.append("Contestants: " + ", ".join(f"`{c['name']}` ({c['checkpoint']})"
                                             for c in results["contestants"]) + ".")
    lines.append("")
    lines.append("Prompts: " + ", ".join(f"{k}: {v['n']} ({v['category']}, {v['path']})"
                                         for k, v in results["prompts"].items()) + ".")
    lines.append("")
    lines.append(f"Command: `{meta['command']}`")
    lines += ["", weak_judge_paragraph(results), ""]
    for mode, pw in results["pairwise"].items():
        lines += [f"## Pairwise, {mode} reference ({pw['pairs']} pairs, both orders each)", "",
                  "Wins/ties/losses of the row model against the column model (a tie: the two "
                  "orders disagreed):", "", pw["win_matrix_markdown"].rstrip(),
                  "", "| model | Bradley-Terry [95% CI] | Elo [95% CI] | W/T/L | win rate "
                  "± s.e. |", "|---|---|---|---|---|"]
        for r in pw["ratings"]:
            lines.append(_rating_row(r))
        if pw.get("ratings_order_averaged"):
            lines += ["", "Order-averaged verdicts (the side of P(better) averaged over both "
                      "orders; a constant position bias cancels, so fewer ties):", "",
                      "| model | Bradley-Terry [95% CI] | Elo [95% CI] | W/T/L | win rate "
                      "± s.e. |", "|---|---|---|---|---|"]
            lines += [_rating_row(r) for r in pw["ratings_order_averaged"]]
        lines.append("")
    for mode, table in results["single"].items():
        lines += [f"## Single-answer grades, {mode} reference", "",
                  "Score distribution: the softmax of the judge's log-likelihoods of the labels "
                  f"{', '.join(repr(' ' + k) for k in next(iter(table.values()))['histogram'])} "
                  "after the grading prompt (one scored continuation per label; labels that "
                  "differ only in their last token share one forward pass); `chosen` is its "
                  "argmax.", "",
                  "| model | expected score ± s.e. (n) | chosen score ± s.e. | histogram of "
                  "chosen | kurtosis |", "|---|---|---|---|---|"]
        for model, s in table.items():
            hist = " ".join(f"{k}:{v}" for k, v in s["histogram"].items())
            lines.append(f"| {model} | {_mean(s['expected'], 2)} | {_mean(s['chosen'], 2)} | "
                         f"{hist} | {_num(s['kurtosis'], 2)} |")
        lines.append("")
    bias = results["bias"]
    lines += ["## The judge's bias report", "", "### Position", "",
              "| reference | consistency (verdict survives the swap) | first-position rate | "
              "identical pairs skipped |", "|---|---|---|---|"]
    for mode, pos in bias["position"].items():
        lines.append(f"| {mode} | {_pct(pos['consistency'])} | "
                     f"{_pct(pos['first_position_rate'])} | {pos['identical_pairs_skipped']} |")
    lines += ["", "### Verbosity (padded with repetition vs the original, both orders)", ""]
    verb = bias.get("verbosity")
    if verb:
        lines += [f"- padded answer wins: {_pct(verb['padded_win_rate'])}",
                  f"- original wins: {_pct(verb['original_win_rate'])}",
                  f"- mean P(padded better): {_mean(verb['mean_p_padded_better'])}",
                  f"- single score, padded - original: {_mean(verb['single_score_gap'])}"]
    else:
        lines.append("- not run (config.verbosity.n = 0)")
    lines += ["", "### Self-enhancement", ""]
    se = bias["self_enhancement"]
    if not se["measured"]:
        lines.append(f"- not measured: {se['why']}")
    else:
        for mode, m in se["modes"].items():
            vs = ", ".join(f"vs {o}: {_pct(r)}" for o, r in m["win_rate_vs"].items())
            eq = m["equally_correct_pairs"]
            lines += [f"- {mode} reference: `{se['judge_contestant']}`'s win rate (ties half) "
                      f"{vs}",
                      f"  - on checkable prompts where both answers are equally correct "
                      f"({eq['both_correct']} both right, {eq['both_wrong']} both wrong): the "
                      f"judge gives its own answer {_pct(m['own_pick_equally_correct'])} "
                      "(50% = no self-preference)"]
    lines += ["", "### Grading accuracy (pairs where exactly one answer is correct)", "",
              "| reference | category | picks the correct answer | ties | mean P(correct "
              "better) |", "|---|---|---|---|---|"]
    for mode, cats in bias["grading_accuracy"].items():
        for cat, a in cats.items():
            lines.append(f"| {mode} | {cat} | {_pct(a['picks_correct'])} | {_pct(a['ties'])} | "
                         f"{_mean(a['mean_p_correct'])} |")
    if not any(bias["grading_accuracy"].values()):
        lines.append("| - | - | no pair with exactly one correct answer | | |")
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in results["files"]) + ".", ""]
    return "\n".join(lines)


def command_line(argv: Sequence[str]) -> str:
    return "hibari judge " + " ".join(shlex.quote(a) for a in argv)
