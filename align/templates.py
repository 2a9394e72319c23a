"""Prompt templates: examples -> text segments, each marked prompt or response.

A rendered example is a list of `Segment(text, is_response)`. Tokenizing it segment by segment
(align/sft.py) gives the loss mask from token spans, never from string search on decoded text.

    tpl = get_template("alpaca_ja")
    segments = tpl.render({"instruction": "...", "input": "...", "output": "..."})
    chat = get_template("chat").render({"messages": [{"role": "user", "content": "..."}, ...]})

Templates are named here (`TEMPLATES`) and chosen by a config field (`config.data.template`); a
config may also give its own instruction template as a dict of the `InstructionTemplate` fields.

FLAN-style conversion (`flan_instructions`): records of a task dataset become instruction
triples through several phrasings per task; the phrasing of each example is a pure function of
(seed, example id), so a dataset converts identically on every host and rerun.

Text fields are strings: a record whose `instruction` / `input` / `output` / message `content`
(or a preference `prompt` / `chosen` / `rejected` / `completion`) holds a number, a list or an
object is a bad record (`TemplateError` naming the field and the type), never stringified.
"""
from __future__ import annotations

import dataclasses
import hashlib
import string
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

from hibari.base.errors import UserError
from hibari.data.tokenizer import CHAT_TOKENS

SYSTEM, USER, ASSISTANT, END = CHAT_TOKENS  # "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class TemplateError(UserError, ValueError):
    """A record does not fit its template; the message names the field."""


class Segment(NamedTuple):
    text: str
    is_response: bool


@dataclasses.dataclass(frozen=True)
class InstructionTemplate:
    """Alpaca-style: a prompt with or without an input block, then the response."""
    name: str
    with_input: str  # format string with {instruction} and {input}
    without_input: str  # format string with {instruction}

    def prompt(self, record: Mapping[str, Any]) -> list[Segment]:
        instruction = required_text(record, "instruction")
        extra = optional_text(record, "input")
        text = (self.with_input.format(instruction=instruction, input=extra) if extra
                else self.without_input.format(instruction=instruction))
        return [Segment(text, False)]

    def render(self, record: Mapping[str, Any]) -> list[Segment]:
        return self.prompt(record) + [Segment(required_text(record, "output"), True)]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """`<|role|>content<|end|>` per turn with the tokenizer's role tokens; the content and
    `<|end|>` of every assistant turn are response, the role tokens are prompt."""
    name: str = "chat"
    separator: str = "\n"  # after each <|end|>

    def _turn(self, message: Mapping[str, Any], i: int) -> list[Segment]:
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise TemplateError(f"messages[{i}].role={role!r}; choose one of {sorted(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise TemplateError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if not content or not content.strip():
            raise TemplateError(f"messages[{i}].content is missing or empty")
        if role == "assistant":
            return [Segment(ASSISTANT, False), Segment(content + END, True),
                    Segment(self.separator, False)]
        return [Segment(ROLES[role] + content + END + self.separator, False)]

    def _messages(self, record: Mapping[str, Any]) -> list:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise TemplateError("field 'messages' must be a non-empty list of {role, content}")
        return messages

    def prompt(self, record: Mapping[str, Any]) -> list[Segment]:
        """All turns, then the assistant role token that opens the reply to generate."""
        segments = [s for i, m in enumerate(self._messages(record)) for s in self._turn(m, i)]
        return _merge(segments + [Segment(ASSISTANT, False)])

    def render(self, record: Mapping[str, Any]) -> list[Segment]:
        messages = self._messages(record)
        if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
            raise TemplateError("a chat needs at least one assistant turn (nothing to learn)")
        return _merge([s for i, m in enumerate(messages) for s in self._turn(m, i)])

    def wrap_response(self, text: str) -> str:
        """A preference/KTO completion as an assistant turn's body."""
        return text + END


def as_chat(record: Mapping[str, Any], with_output: bool = True) -> dict:
    """An instruction triple as a chat: the user turn holds instruction and input, the
    assistant turn the output."""
    user = required_text(record, "instruction")
    extra = optional_text(record, "input")
    messages = [{"role": "user", "content": user + ("\n\n" + extra if extra else "")}]
    if with_output:
        messages.append({"role": "assistant", "content": required_text(record, "output")})
    return {"messages": messages}


def required_text(record: Mapping[str, Any], name: str) -> str:
    """A required text field: a non-empty string (anything else is a bad record, never
    stringified)."""
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise TemplateError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value or not value.strip():
        raise TemplateError(f"field {name!r} is missing or empty")
    return value


def optional_text(record: Mapping[str, Any], name: str) -> str:
    """An optional text field, stripped: missing, null or "" give ""; a non-string is an error."""
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TemplateError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours of the same kind (fewer, longer pieces to tokenize)."""
    out: list[Segment] = []
    for s in segments:
        if out and out[-1].is_response == s.is_response:
            out[-1] = Segment(out[-1].text + s.text, s.is_response)
        elif s.text:
            out.append(s)
    return out


ALPACA_EN = InstructionTemplate(
    name="alpaca_en",
    with_input=("Below is an instruction that describes a task, paired with an input that "
                "provides further context. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                "### Response:\n"),
    without_input=("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "### Response:\n"))

ALPACA_JA = InstructionTemplate(
    name="alpaca_ja",
    with_input=("以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。"
                "要求を適切に満たす応答を書きなさい。\n\n### 指示:\n{instruction}\n\n"
                "### 入力:\n{input}\n\n### 応答:\n"),
    without_input=("以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n"
                   "### 指示:\n{instruction}\n\n### 応答:\n"))

# A bare template (no preamble): short rows for tiny CPU models and tests.
MINIMAL = InstructionTemplate(
    name="minimal", with_input="{instruction}\n{input}\n=> ", without_input="{instruction}\n=> ")

TEMPLATES: dict[str, InstructionTemplate | ChatTemplate] = {
    t.name: t for t in (ALPACA_EN, ALPACA_JA, MINIMAL, ChatTemplate())}


def get_template(spec: str | Mapping[str, Any]) -> InstructionTemplate | ChatTemplate:
    """A template by name, or an instruction template from a dict {name, with_input,
    without_input} (e.g. a config's `data.template` ConfigDict)."""
    if isinstance(spec, str):
        if spec not in TEMPLATES:
            raise TemplateError(f"unknown template {spec!r}; choose one of {sorted(TEMPLATES)} "
                                "or give {name, with_input, without_input}")
        return TEMPLATES[spec]
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    missing = {"with_input", "without_input"} - set(spec)
    if missing:
        raise TemplateError(f"custom template lacks fields {sorted(missing)}")
    return InstructionTemplate(name=spec.get("name", "custom"), with_input=spec["with_input"],
                               without_input=spec["without_input"])


# ---------------------------------------------------------------------------------------------
# FLAN-style conversion of task datasets
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Phrasing:
    """Format strings over a task record's fields -> (instruction, input, output)."""
    instruction: str
    input: str = ""
    output: str = "{answer}"


# Several phrasings per task family (FLAN: ~10 per task; a few suffice for the formats here).
TASK_PHRASINGS: dict[str, tuple[Phrasing, ...]] = {
    "self_instruct": (
        Phrasing("{instruction}", "{input}", "{output}"),
        Phrasing("Complete the following task.\n{instruction}", "{input}", "{output}"),
        Phrasing("Task: {instruction}\nAnswer carefully.", "{input}", "{output}"),
        Phrasing("You are given a task. {instruction}", "{input}", "{output}"),
    ),
    "qa": (
        Phrasing("Answer the question.", "{question}"),
        Phrasing("{question}"),
        Phrasing("Read the question and give a short answer.\nQuestion: {question}"),
        Phrasing("次の質問に答えてください。", "{question}"),
    ),
    "multiple_choice": (
        Phrasing("Choose the correct answer.", "{question}\nOptions:\n{options}"),
        Phrasing("{question}\nWhich of these is right?\n{options}"),
        Phrasing("Pick one option.\nQuestion: {question}", "{options}"),
        Phrasing("次の問題の正しい選択肢を選んでください。", "{question}\n{options}"),
    ),
}


def _format_fields(p: Phrasing) -> set[str]:
    return {name for text in (p.instruction, p.input, p.output)
            for _, name, _, _ in string.Formatter().parse(text) if name}


def phrasing_index(seed: int, example_id: str, n: int) -> int:
    """A stable choice in [0, n) from (seed, example id) (not Python's salted hash)."""
    digest = hashlib.sha256(f"{seed}\x00{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n


def flan_instructions(records: Iterable[Mapping[str, Any]], task: str, seed: int = 0,
                      phrasings: tuple[Phrasing, ...] | None = None) -> Iterator[dict]:
    """Instruction triples {id, instruction, input, output} from task records (each with an
    `id` and the fields its phrasings name; `options` may be a list, shown one per line)."""
    phrasings = phrasings or TASK_PHRASINGS.get(task)
    if not phrasings:
        raise TemplateError(f"no phrasings for task {task!r}; known: {sorted(TASK_PHRASINGS)}")
    for i, record in enumerate(records):
        example_id = str(record.get("id", i))
        fields = dict(record)
        if isinstance(fields.get("options"), (list, tuple)):
            fields["options"] = "\n".join(f"- {o}" for o in fields["options"])
        p = phrasings[phrasing_index(seed, example_id, len(phrasings))]
        for name in _format_fields(p):
            value = fields.get(name)
            if name in fields and not isinstance(value, str) and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TemplateError(f"record {example_id!r} of task {task!r}: field {name!r} must be a "
                                    f"string (or a number), got {type(value).__name__}")
        try:
            yield {"id": example_id, "instruction": p.instruction.format(**fields),
                   "input": p.input.format(**fields), "output": p.output.format(**fields)}
        except KeyError as e:
            raise TemplateError(f"record {example_id!r} of task {task!r} lacks field {e}") from None


def seed_task_records(tasks: Iterable[Mapping[str, Any]]) -> Iterator[dict]:
    """Self-Instruct seed tasks {id, instruction, instances: [{input, output}]} -> one flat
    record {id, instruction, input, output} per instance."""
    for task in tasks:
        for j, inst in enumerate(task.get("instances") or []):
            yield {"id": f"{task.get('id')}/{j}", "instruction": task.get("instruction"),
                   "input": inst.get("input", ""), "output": inst.get("output")}
