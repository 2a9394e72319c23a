"""`hibari sft`, `hibari dpo`, `hibari reward`: config file + overrides in, a run directory out.

    hibari sft --config configs/sft/instruct.py:alpaca_ja --workdir runs/sft \\
        --config.init_from=runs/pretrain --config.data.tokenizer=tok.model
    hibari dpo --config configs/dpo/pairs.py:ipo --workdir runs/ipo --config.init_from=runs/sft
    hibari reward --config configs/reward/pairs.py --workdir runs/rm --config.init_from=runs/sft
    hibari ppo --config configs/rl/ppo.py:tiny --workdir runs/ppo-tiny
    hibari grpo --config configs/rl/grpo.py:tiny --workdir runs/grpo-tiny
    hibari classify --config configs/classify/shortcut.py:poe --workdir runs/classify-poe

A rerun with the same command resumes from the workdir's latest checkpoint (the loader position
included); DPO's precomputed reference cache is reused. Distributed flags as `hibari pretrain`.
A run recorded with another tokenizer than config.data.tokenizer (init_from's
tokenizer_record.json) is refused unless `--allow-tokenizer-mismatch` is given.
"""
from __future__ import annotations

import sys

from hibari.train.cli import parse_run_flags, setup_logging


def _run(prog: str, argv: list[str], default_config: str, make_task, after=None) -> int:
    setup_logging()
    fv = parse_run_flags(prog, argv, default_config=default_config)
    if fv.allow_tokenizer_mismatch:  # read by align.tasks.start_params; kept in config.json
        with fv.config.unlocked():
            fv.config.allow_tokenizer_mismatch = True
    from hibari.train.distributed import initialize
    initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    from hibari.train.loop import train
    task = make_task(fv.config, fv.workdir)
    summary = train(fv.config, fv.workdir, task)
    if after is not None:
        after(fv.config, fv.workdir)
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


def classify_main(argv: list[str]) -> int:
    """A k-class classifier (plain or debiasing loss); after training, the final model's
    predictions/ and results.json go into the workdir."""
    from hibari.align.classify import build_classify
    finish = None

    def make_task(config, workdir):
        nonlocal finish
        task, finish = build_classify(config, workdir)
        return task

    def after(config, workdir):
        from hibari.align.classify import load_classifier
        results = finish(load_classifier(workdir)[1])
        shown = {k: v for k, v in results.items() if k.startswith(("accuracy", "bias_acc"))}
        print(f"hibari classify: {shown}", file=sys.stderr)

    return _run("classify", argv, "configs/classify/shortcut.py", make_task, after=after)


def _rl(algorithm: str, argv: list[str]) -> int:
    from hibari.align.rl_train import plot_run, rl_task
    return _run(algorithm, argv, f"configs/rl/{algorithm}.py:tiny",
                lambda config, workdir: rl_task(config, workdir, algorithm),
                after=lambda config, workdir: plot_run(workdir, config.name))


def ppo_main(argv: list[str]) -> int:
    return _rl("ppo", argv)


def grpo_main(argv: list[str]) -> int:
    return _rl("grpo", argv)
