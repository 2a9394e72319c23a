"""`hibari sweep`: run a sweep config's members, or report on a sweep directory.

    hibari sweep --config configs/sweeps/ablation_tiny.py --workdir runs/ablation [--parallel 2]
    hibari sweep --config configs/sweeps/chinchilla_tiny.py --workdir runs/chinchilla --dry-run
    hibari sweep --config configs/sweeps/chinchilla_tiny.py --workdir W --config.budgets='(1e12,)'
    hibari sweep report runs/ablation
"""
from __future__ import annotations

import sys

from absl import flags

USAGE = ("usage: hibari sweep --config FILE.py[:arg] --workdir DIR [--parallel N] [--dry-run] "
         "[--no-report] [--config.FIELD=VALUE ...]\n       hibari sweep report WORKDIR")


def parse_sweep_flags(argv: list[str]) -> flags.FlagValues:
    from hibari.base.errors import UsageError
    from hibari.train.cli import config_flag_values, parse_flag_values
    fv, argv = config_flag_values("sweep", argv, "sweep config file[:argument]")
    flags.DEFINE_string("workdir", None, "sweep directory: one run directory per member",
                        flag_values=fv)
    flags.DEFINE_integer("parallel", 1, "members trained at once (>1: separate `hibari pretrain` "
                         "processes)", flag_values=fv)
    flags.DEFINE_boolean("dry_run", False, "print the member table (N, D, FLOPs) and exit",
                         flag_values=fv)
    flags.DEFINE_boolean("report", True, "write WORKDIR/report/ at the end", flag_values=fv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\n" + USAGE)
        raise SystemExit(0)
    argv = [a.replace("--dry-run", "--dry_run").replace("--no-report", "--noreport") for a in argv]
    parse_flag_values(fv, "sweep", argv)
    if fv.config is None:
        raise UsageError(f"--config FILE.py[:arg] is required\n{USAGE}")
    if not fv.workdir and not fv.dry_run:
        raise UsageError(f"--workdir is required\n{USAGE}")
    if fv.parallel < 1:
        raise UsageError(f"--parallel={fv.parallel} must be >= 1")
    return fv


def report_main(argv: list[str]) -> int:
    from hibari.sweep_report import SweepReportError, write_report
    if len(argv) != 1 or argv[0].startswith("-"):
        raise SweepReportError(f"give one sweep directory\n{USAGE}")
    path = write_report(argv[0])
    print(f"hibari sweep: wrote {path}")
    return 0


def sweep_main(argv: list[str]) -> int:
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    from hibari.train.cli import setup_logging
    setup_logging()
    fv = parse_sweep_flags(argv)
    from hibari.sweep import expand, member_table, run_sweep
    if fv.dry_run:
        members, skipped = expand(fv.config)
        print(member_table(members, skipped))
        return 0
    summary = run_sweep(fv.config, fv.workdir, parallel=fv.parallel, report=fv.report)
    print(f"hibari sweep: {summary['members']} members ({len(summary['already_finished'])} were "
          f"finished, {len(summary['trained'])} trained); {summary['rows']} result rows in "
          f"{fv.workdir}/results.csv", file=sys.stderr)
    if summary["stopped_by"]:
        print(f"hibari sweep: stopped by {summary['stopped_by']}; rerun the same command to "
              "resume", file=sys.stderr)
    for failure in summary["failures"]:
        print(f"hibari sweep: FAILED {failure}", file=sys.stderr)
    return 1 if summary["failures"] else 0
