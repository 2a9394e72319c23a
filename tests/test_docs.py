"""The commands shown in README.md and docs/ stay valid: every `hibari <command>` exists, its
config file loads and every `--config.FIELD=VALUE` names a real field of it.

(What they do is exercised by the quickstart and each room's tests.)"""
import importlib
import re
import shlex
from pathlib import Path

import pytest

from hibari.cli import COMMANDS

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "data" / "README.md", REPO / "align" / "README.md",
        *sorted((REPO / "docs").glob("*.md")), REPO / "docs" / "results" / "rl" / "README.md",
        REPO / "docs" / "results" / "debias" / "README.md"]
RUN_COMMANDS = {"pretrain": None, "sft": "configs/sft/instruct.py",
                "dpo": "configs/dpo/pairs.py", "reward": "configs/reward/pairs.py",
                "ppo": "configs/rl/ppo.py", "grpo": "configs/rl/grpo.py",
                "classify": "configs/classify/shortcut.py"}

# commands whose shown flags are parsed by the command's own parser
PARSED_COMMANDS = {"eval": "hibari.evaluation.cli:eval_parser",
                   "prune": "hibari.evaluation.prune_cli:prune_parser",
                   "analyze": "hibari.evaluation.analyze_cli:neurons_parser",
                   "lora": "hibari.model.lora_cli:lora_parser"}


def shown_commands(docs=DOCS) -> list[tuple[str, str]]:
    """(doc name, command) for each `hibari ...` line of a fenced code block of `docs`
    (continuation lines joined; lines with `...` placeholders left out), in order."""
    out = []
    for doc in docs:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(), re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.strip()
                if line.startswith("echo ") and "| hibari " in line:
                    line = line.split("| ", 1)[1]
                line = line.split(" | ")[0]
                if line.startswith("hibari ") and "..." not in line:
                    out.append((doc.name, line))
    return out


COMMANDS_SHOWN = shown_commands()


def test_docs_show_the_main_commands():
    names = {shlex.split(c, comments=True)[1] for _, c in COMMANDS_SHOWN}
    assert {"quickstart", "pretrain", "sft", "dpo", "eval", "data", "sweep", "scaling",
            "convert", "reward", "ppo", "grpo", "classify", "judge", "slick", "prune",
            "analyze", "lora"} <= names


@pytest.mark.parametrize("doc,command", COMMANDS_SHOWN,
                         ids=[f"{d}:{c[:60]}" for d, c in COMMANDS_SHOWN])
def test_shown_command_is_valid(doc, command):
    argv = shlex.split(command, comments=True)[1:]
    name, rest = argv[0], argv[1:]
    assert name in COMMANDS, f"{doc}: `hibari {name}` is not a command"
    if name in RUN_COMMANDS:
        from hibari.train.cli import parse_run_flags
        rest = [a for a in rest if not a.startswith(("--coordinator", "--num_processes",
                                                     "--process_id"))]
        fv = parse_run_flags(name, rest, default_config=RUN_COMMANDS[name])
        assert fv.config is not None
    elif name in ("judge", "slick"):  # the flags parse: the config loads, overrides name fields
        from hibari.evaluation.judge_cli import parse_judge_flags
        from hibari.evaluation.slick_cli import parse_slick_flags
        fv = {"judge": parse_judge_flags, "slick": parse_slick_flags}[name](rest)
        assert fv.config is not None
    elif name in PARSED_COMMANDS:  # the flags parse (argparse exits on an unknown flag)
        module, function = PARSED_COMMANDS[name].split(":")
        parser = getattr(importlib.import_module(module), function)()
        if name == "analyze":
            assert rest[0] == "neurons", f"{doc}: `hibari analyze {rest[0]}` is not a subcommand"
            rest = rest[1:]
        parser.parse_args(rest)
    elif "--config" in rest:
        from hibari.base.config_files import load_python_config
        spec = rest[rest.index("--config") + 1]
        if name == "sweep":  # sweep configs read prepared data; each also takes `synthetic`
            spec = spec.split(":")[0] + ":synthetic"
        assert load_python_config(spec) is not None
    if name == "quickstart":
        from hibari.quickstart import load_plan
        spec = rest[rest.index("--config") + 1] if "--config" in rest else "configs/quickstart.py"
        load_plan(spec, "unused")


def test_config_reference_is_up_to_date():
    from hibari.configs.reference import main
    assert main(["--check", "--out", str(REPO / "docs" / "config_reference.md")]) == 0, \
        "run `python -m hibari.configs.reference` and commit the result"


# What `hibari quickstart` (the README's first command) leaves in runs/quickstart.
QUICKSTART_MAKES = ("runs/quickstart/data", "runs/quickstart/pretrain", "runs/quickstart/sft",
                    "runs/quickstart/dpo", "runs/quickstart/eval")
INPUT_FLAGS = ("--checkpoint", "--tokenizer", "--config.init_from", "--config.data.tokenizer",
               "--config.data.path", "--config.data.eval_path", "--config.reward.model")
OUTPUT_FLAGS = ("--workdir", "--out")


def _flag_values(argv: list[str], names: tuple[str, ...]) -> list[str]:
    values = []
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if name in names:
            values.append(value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
    return values


def test_readme_commands_run_in_order_on_what_earlier_ones_made():
    """Every `runs/...` path a README command reads was made by the quickstart or by a README
    command above it; no command writes into the quickstart's own runs (except the data command,
    which finds the quickstart's data finished and reuses it)."""
    made = set(QUICKSTART_MAKES)

    def was_made(path):
        return any(path == m or path.startswith(m + "/") for m in made)

    readme = [c for _, c in shown_commands([REPO / "README.md"])]
    assert any("--checkpoint runs/quickstart/sft" in c for c in readme)
    for command in readme:
        argv = shlex.split(command, comments=True)
        for path in _flag_values(argv, INPUT_FLAGS):
            assert not path.startswith("runs/") or was_made(path), \
                f"README.md: `{command[:70]}...` reads {path}, which no command above makes"
        outputs = _flag_values(argv, OUTPUT_FLAGS)
        if argv[1:3] == ["data", "prepare"]:
            outputs.append(_flag_values(argv, ("--config",))[0].split(":", 1)[1])
        for path in outputs:
            if argv[1] != "data" and argv[1] != "eval":
                assert not any(path == m or path.startswith(m + "/")
                               for m in QUICKSTART_MAKES), \
                    f"README.md: `{command[:70]}...` writes into the quickstart's {path}"
            made.add(path)
