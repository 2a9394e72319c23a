"""`hibari slick`: the SliCK knowledge probe of a checkpoint, from a config.

    hibari slick --config configs/slick/nq_open.py --checkpoint runs/small --out slick_out
    hibari slick --config configs/slick/nq_open.py:paper --checkpoint model.gguf --out OUT \\
        --config.facts.limit=100 --config.match=contains [--tokenizer T]

Writes OUT/results.json, report.md, samples/slick.jsonl and slick.png
(`hibari.evaluation.slick`); a rerun with the same checkpoint, tokenizer and settings probes
only the facts not yet in OUT/samples/slick.jsonl.
"""
from __future__ import annotations

import sys

from absl import flags

USAGE = ("usage: hibari slick --config FILE.py[:variant] --checkpoint CKPT --out DIR "
         "[--tokenizer T] [--config.FIELD=VALUE ...]")


def parse_slick_flags(argv: list[str]) -> flags.FlagValues:
    from hibari.base.errors import UsageError
    from hibari.train.cli import config_flag_values, parse_flag_values
    fv, argv = config_flag_values("slick", argv, "SliCK config file[:variant]")
    flags.DEFINE_string("checkpoint", None, "run dir, checkpoints/<step> dir, params export, HF "
                        "dir or *.gguf file (overrides config.checkpoint)", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "SentencePiece *.model, tokenizer.json / HF dir or "
                        "*.gguf (overrides config.tokenizer; default: beside the checkpoint)",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "output directory (reused: cached facts are not probed "
                        "again)", flag_values=fv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\n" + USAGE)
        raise SystemExit(0)
    parse_flag_values(fv, "slick", argv)
    if fv.config is None:
        raise UsageError(f"--config FILE.py[:variant] is required (e.g. "
                         f"configs/slick/nq_open.py)\n{USAGE}")
    if not fv.out:
        raise UsageError(f"--out DIR is required\n{USAGE}")
    return fv


def slick_main(argv: list[str]) -> int:
    fv = parse_slick_flags(list(argv))
    config = fv.config
    with config.unlocked():
        if fv.checkpoint:
            config.checkpoint = fv.checkpoint
        if fv.tokenizer:
            config.tokenizer = fv.tokenizer
    from hibari.evaluation.slick import CATEGORIES, run_slick
    results = run_slick(config, fv.out)
    s = results["summary"]
    shares = ", ".join(f"{c} {s['counts'][c]} ({100 * s['shares'][c]['rate']:.0f}%)"
                       for c in CATEGORIES)
    acc = s["overall"]["greedy_accuracy_exact"]
    print(f"hibari slick: {s['facts']} facts ({s['match']} match): {shares}; greedy EM "
          f"{100 * acc['rate']:.1f} ± {100 * acc['stderr']:.1f}%", file=sys.stderr)
    print(f"hibari slick: wrote {fv.out}/results.json, report.md, samples/slick.jsonl, slick.png",
          file=sys.stderr)
    return 0
