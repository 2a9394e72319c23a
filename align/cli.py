"""`hibari sft`, `hibari dpo`, `hibari reward`: config file + overrides in, a run directory out.

    hibari sft --config configs/sft/instruct.py:alpaca_ja --workdir runs/sft \\
        --config.init_from=runs/pretrain --config.data.tokenizer=tok.model
    hibari dpo --config configs/dpo/pairs.py:ipo --workdir runs/ipo --config.init_from=runs/sft
    hibari reward --config configs/reward/pairs.py --workdir runs/rm --config.init_from=runs/sft

A rerun with the same command resumes from the workdir's latest checkpoint (the loader position
included); DPO's precomputed reference cache is reused. Distributed flags as `hibari pretrain`.
"""
from __future__ import annotations

import sys

from hibari.train.cli import parse_run_flags, setup_logging


def _run(prog: str, argv: list[str], default_config: str, make_task) -> int:
    setup_logging()
    fv = parse_run_flags(prog, argv, default_config=default_config)
    from hibari.train.distributed import initialize
    initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    from hibari.train.loop import train
    task = make_task(fv.config, fv.workdir)
    summary = train(fv.config, fv.workdir, task)
    shown = {k: v for k, v in summary.items() if k != "params"}
    print(f"hibari {prog}: {shown}", file=sys.stderr)
    return 0


def sft_main(argv: list[str]) -> int:
    from hibari.align.tasks import sft_task
    return _run("sft", argv, "configs/sft/instruct.py", lambda config, _: sft_task(config))


def dpo_main(argv: list[str]) -> int:
    from hibari.align.tasks import preference_task
    return _run("dpo", argv, "configs/dpo/pairs.py", preference_task)


def reward_main(argv: list[str]) -> int:
    from hibari.align.tasks import reward_task
    return _run("reward", argv, "configs/reward/pairs.py", lambda config, _: reward_task(config))
