"""The `hibari` command (`hibari.cli:main`): one entry point, subcommands owned by each room.

Subcommands are registered as "module:function" strings and imported only when run, so
`hibari --help` is instant (no JAX import). Each function takes the remaining argv and raises a
`UserError` on bad input; `main` catches it here, once, and prints its message without a
traceback (exit status 1). A full disk is reported the same way; Ctrl-C before a training loop
has started exits 130 (once it has started, the loop saves a checkpoint and exits 0).

Logging is set up here for every command (`hibari.train.cli.setup_logging`): hibari's own INFO
lines and every warning; `--verbose` anywhere on the line (or HIBARI_VERBOSE=1) also shows other
libraries' INFO lines, such as JAX's backend probing.
"""
from __future__ import annotations

import errno
import importlib
import os
import re
import signal
import sys

# name -> (module:function, one-line help). Rooms add their commands here.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("hibari.quickstart:quickstart_main", "the whole pipeline on the bundled corpus (CPU, minutes) -> OUT/report.md"),
    "convert": ("hibari.model.cli:convert_main", "import/export Hugging Face Llama-family checkpoints"),
    "pretrain": ("hibari.train.cli:pretrain_main", "pretrain a model from a config (resumes from its workdir)"),
    "sweep": ("hibari.sweep_cli:sweep_main", "run a sweep of pretraining runs (grid / IsoFLOP), results table, ablation report"),
    "scaling": ("hibari.evaluation.scaling.cli:scaling_main", "fit scaling laws (Kaplan, Chinchilla 1-3) to sweep results"),
    "data": ("hibari.data_cli:data_main", "corpus cleaning, filtering, dedup, tokenizer, packing"),
    "eval": ("hibari.evaluation.cli:eval_main", "evaluate a checkpoint on tasks (multiple choice, generation, perplexity, pass@k)"),
    "generate": ("hibari.evaluation.cli:generate_main", "complete prompts with a checkpoint (KV-cache decoding)"),
    "prune": ("hibari.evaluation.prune_cli:prune_main", "prune a checkpoint's linear layers: Wanda (activation-aware, calibrated on text or a task), magnitude or random -> a checkpoint every command loads"),
    "analyze": ("hibari.evaluation.analyze_cli:analyze_main", "analyses of a checkpoint: language-specific MLP neurons (LAPE) and their ablation"),
    "lora": ("hibari.model.lora_cli:lora_main", "LoRA adapters: merge into the base, export to / import from PEFT files"),
    "judge": ("hibari.evaluation.judge_cli:judge_main", "LLM-as-a-judge: answers from several models graded pairwise and by score; ratings and the judge's bias report"),
    "slick": ("hibari.evaluation.slick_cli:slick_main", "SliCK knowledge probe: facts classified HighlyKnown / MaybeKnown / WeaklyKnown / Unknown by sampling a model"),
    "sft": ("hibari.align.cli:sft_main", "supervised fine-tuning, response-only loss (resumes from its workdir)"),
    "dpo": ("hibari.align.cli:dpo_main", "preference optimisation: DPO / IPO / hinge / KTO"),
    "reward": ("hibari.align.cli:reward_main", "train a reward model (scalar head, Bradley-Terry)"),
    "classify": ("hibari.align.cli:classify_main", "train a classifier head: plain or debiasing losses (reweight, PoE, conf-reg)"),
    "ppo": ("hibari.align.cli:ppo_main", "RL with PPO against a reward model or a programmatic reward"),
    "grpo": ("hibari.align.cli:grpo_main", "RL with GRPO (group-normalised advantages, no critic)"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: hibari [--verbose] <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `hibari <command> --help` for a command's options. --verbose (or "
              "HIBARI_VERBOSE=1) also shows other libraries' INFO lines (JAX, orbax)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:  # for this command and the processes it starts
        argv = [a for a in argv if a != "--verbose"]
        os.environ["HIBARI_VERBOSE"] = "1"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hibari: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    as_program = argv_given is None
    if as_program:  # Ctrl-C interrupts start-up even where the parent ignored SIGINT (`cmd &`)
        from hibari.base.signals import InterruptRecorder
        signal.signal(signal.SIGINT, InterruptRecorder())
    from hibari.base.errors import UserError
    from hibari.train.cli import setup_logging
    setup_logging()
    try:
        result = getattr(importlib.import_module(module), func)(rest)
    except UserError as e:
        print(f"hibari {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hibari {name}: interrupted", file=sys.stderr)
        if as_program:  # skip interpreter teardown: XLA/grain threads may be half started
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        print(f"hibari {name}: error: {full}", file=sys.stderr)
        if as_program:  # background writers (orbax) would print tracebacks at teardown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    return int(result or 0)


def _disk_full(error: BaseException) -> str | None:
    """The one-line message for a write that failed for lack of space (None: another error)."""
    codes = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code, where = None, ""
        if isinstance(error, OSError) and error.errno in codes:
            code, where = error.errno, error.filename or ""
        else:  # tensorstore (orbax) reports failed writes as ValueError text
            match = re.search(r"os_error_code='(\d+)'", str(error))
            if match and int(match.group(1)) in codes:
                code = int(match.group(1))
                found = re.search(r'Failed writing: "([^"]+)"', str(error))
                where = found.group(1) if found else ""
        if code is not None:
            return (f"{os.strerror(code).lower()}{f' writing {where}' if where else ''}: free "
                    "space (or raise the quota) and rerun the same command; finished files and "
                    "checkpoints are intact")
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
