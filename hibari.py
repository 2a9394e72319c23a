"""The `hibari` command: one entry point, subcommands owned by each room.

Subcommands are registered as "module:function" strings and imported only when run, so
`hibari --help` is instant (no JAX import). Each function takes the remaining argv.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module:function, one-line help). Rooms add their commands here.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("train.quickstart:quickstart_main", "the whole pipeline on the bundled corpus (CPU, minutes) -> OUT/report.md"),
    "convert": ("model.cli:convert_main", "import/export Hugging Face Llama-family checkpoints"),
    "pretrain": ("train.cli:pretrain_main", "pretrain a model from a config (resumes from its workdir)"),
    "sweep": ("train.sweep_cli:sweep_main", "run a sweep of pretraining runs (grid / IsoFLOP), results table, ablation report"),
    "scaling": ("evaluation.scaling.cli:scaling_main", "fit scaling laws (Kaplan, Chinchilla 1-3) to sweep results"),
    "data": ("data.cli:data_main", "corpus cleaning, filtering, dedup, tokenizer, packing"),
    "eval": ("evaluation.cli:eval_main", "evaluate a checkpoint on tasks (multiple choice, generation, perplexity, pass@k)"),
    "generate": ("evaluation.cli:generate_main", "complete prompts with a checkpoint (KV-cache decoding)"),
    "sft": ("align.cli:sft_main", "supervised fine-tuning, response-only loss (resumes from its workdir)"),
    "dpo": ("align.cli:dpo_main", "preference optimisation: DPO / IPO / hinge / KTO"),
    "reward": ("align.cli:reward_main", "train a reward model (scalar head, Bradley-Terry)"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: hibari <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `hibari <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hibari: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
