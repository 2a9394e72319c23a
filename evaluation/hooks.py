"""Evaluation during training: `Task.on_eval` for `train.loop.train`.

    hook = make_eval_hook(["mmlu_sample", "botchan_perplexity"], tokenizer, cfg,
                          limit=50, out_dir=workdir)
    train(config, workdir, Task(on_eval=hook))

Every `config.eval_every` steps the loop calls `hook(step, params)`; it returns flat float
metrics named `eval/<task>/<metric>` (merged into metrics.jsonl) and, with `out_dir`, writes
the full results with per-example records to `out_dir/eval/<step>.json` (process 0 only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import jax

from hibari.evaluation.lm import LanguageModel
from hibari.evaluation.runner import evaluate_task
from hibari.evaluation.tasks import load_task
from hibari.evaluation.tokenizer import EvalTokenizer, load_tokenizer
from hibari.model import ModelConfig


def make_eval_hook(task_names: Sequence[str], tokenizer: EvalTokenizer | str, cfg: ModelConfig,
                   *, fewshot: int | None = None, limit: int | None = 100,
                   batch_size: int = 8, out_dir: str | Path | None = None
                   ) -> Callable[[int, object], dict]:
    """(step, params) -> {"eval/<task>/<metric>": float}; tasks are loaded (and their files
    validated) now, before training starts."""
    tasks = [load_task(n) for n in task_names]
    for t in tasks:
        t.examples()  # fail before the first step, not at the first evaluation
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer

    def on_eval(step: int, params, frozen=None) -> dict:
        lm = LanguageModel(cfg, params, tok, batch_size=batch_size)
        results = [evaluate_task(lm, t, fewshot=fewshot, limit=limit) for t in tasks]
        flat = {}
        for r in results:
            for name, value in r["metrics"].items():
                if isinstance(value, (int, float)):
                    flat[f"eval/{r['task']}/{name}"] = float(value)
        if out_dir is not None and jax.process_index() == 0:
            path = Path(out_dir) / "eval" / f"{step}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"step": step, "results": results}, ensure_ascii=False,
                                       default=str))
        return flat
    return on_eval
