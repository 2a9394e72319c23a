"""`hibari judge`: answers of several models graded by a judge model, ratings and bias report.

    hibari judge --config configs/judge/arena.py --out runs/judge
    hibari judge --config configs/judge/arena.py:quickstart --out runs/qs-judge
    hibari judge --config configs/judge/arena.py --out runs/judge \\
        --config.gguf=PATH/SmolLM2-135M-Instruct.Q4_1.gguf --config.prompts.seed.limit=8

Rerunning the same command reuses OUT/answers/ and OUT/judgments/: only what a changed config
needs is generated or judged. See evaluation/arena.py for the stages and outputs.
"""
from __future__ import annotations

from absl import flags

USAGE = ("usage: hibari judge --config FILE.py[:variant] --out DIR [--config.FIELD=VALUE ...]")


def parse_judge_flags(argv: list[str]) -> flags.FlagValues:

    from hibari.base.errors import UsageError
    from hibari.train.cli import config_flag_values, parse_flag_values
    fv, argv = config_flag_values("judge", argv, "judge config file[:variant]")
    flags.DEFINE_string("out", None, "output directory (answers and judgments are cached in it)",
                        flag_values=fv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\n" + USAGE)
        raise SystemExit(0)
    parse_flag_values(fv, "judge", argv)
    if fv.config is None:
        raise UsageError(f"--config FILE.py[:variant] is required\n{USAGE}")
    if not fv.out:
        raise UsageError(f"--out DIR is required\n{USAGE}")
    return fv


def judge_main(argv: list[str]) -> int:
    fv = parse_judge_flags(list(argv))
    from hibari.evaluation.arena import command_line, run_judge
    results = run_judge(fv.config, fv.out, command=command_line(argv))
    for mode, pw in results["pairwise"].items():
        top = ", ".join(f"{r['model']} {r['bt']:.0f}" for r in pw["ratings"])
        pos = results["bias"]["position"][mode]["consistency"]
        shown = "n/a" if pos["rate"] is None else f"{100 * pos['rate']:.1f}%"
        print(f"{mode} reference: Bradley-Terry {top}; position consistency {shown} "
              f"(n={pos['n']} pairs of different answers)")
    return 0
