"""`hibari eval` and `hibari generate`.

    hibari eval --checkpoint runs/small --tasks mmlu_sample commonsense_qa_sample --fewshot 5 \\
        --out eval_out/ [--templates all] [--calibrate] [--permute-choices] [--limit 20]
    hibari eval --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --tasks my_task.yaml [--prefix auto]
    hibari eval --checkpoint model.gguf --tasks imdb_sentiment_xlang --instruction-language en ja \
        [--label-language en ja] --limit 60      # the instruction x label language grid
    echo "The capital of France is" | hibari generate --checkpoint DIR --max-new-tokens 16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hibari.base.errors import InputNotFound, UsageError
from hibari.evaluation.tokenizer import PREFIX_MODES


def _model_args(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True,
                   help="run dir, checkpoints/<step> dir, params export, HF dir or *.gguf file")
    p.add_argument("--tokenizer", help="SentencePiece *.model, tokenizer.json / HF dir, or "
                   "*.gguf (default: found beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, help="context limit (default: model max_seq_len)")
    p.add_argument("--prefix", choices=PREFIX_MODES, default="auto",
                   help="what goes before each context: auto (BOS only if the tokenizer adds "
                   "it, as lm-evaluation-harness does), bos, eos or none (default: auto)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="use a tokenizer whose content differs from the one the run recorded "
                   "(tokenizer_record.json); refused by default (results.json records it)")


def _split(names):
    return [n for item in names for n in item.split(",") if n]


def eval_parser() -> argparse.ArgumentParser:
    from hibari.evaluation.tasks import list_tasks
    p = argparse.ArgumentParser(prog="hibari eval", description="evaluate a checkpoint on tasks")
    _model_args(p)
    p.add_argument("--tasks", nargs="+", help=f"vendored names or YAML files: {list_tasks()}")
    p.add_argument("--fewshot", type=int, help="shots per example (default: each task's k)")
    p.add_argument("--out", default="eval_results", help="directory, or a *.json file path")
    p.add_argument("--limit", type=int, help="first N examples of each task")
    p.add_argument("--templates", default="default",
                   help="'default' (the first), 'all' (mean ± std over them) or e.g. 0,2")
    p.add_argument("--calibrate", action="store_true",
                   help="choice tasks: contextual and batch calibration (acc_cc, acc_bc)")
    p.add_argument("--permute-choices", action="store_true",
                   help="choice tasks: accuracy with the gold answer at each position")
    p.add_argument("--partial-input", nargs="+", default=[], metavar="FIELD",
                   help="choice tasks: also score with these example fields emptied (e.g. "
                   "question passage), choices kept: partial_acc vs chance and majority")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first malformed data row (default: skip it, count it in "
                   "results.json and name its file:line)")
    p.add_argument("--instruction-language", nargs="+", default=[], metavar="LANG",
                   help="run each task (with a `languages:` mapping) once per instruction "
                   "language x label language, e.g. en ja ja-mt; writes results.grid.md")
    p.add_argument("--label-language", nargs="+", default=[], metavar="LANG",
                   help="label languages of the grid (default: the instruction languages)")
    return p


def eval_main(argv=None) -> int:
    p = eval_parser()
    args = p.parse_args(argv)
    if not args.tasks:
        p.error("--tasks is required")
    instruction, label_langs = _split(args.instruction_language), _split(args.label_language)
    if label_langs and not instruction:
        raise UsageError("--label-language needs --instruction-language")
    if instruction and (args.calibrate or args.permute_choices or args.partial_input):
        raise UsageError("--instruction-language runs the plain language grid; drop "
                         "--calibrate, --permute-choices and --partial-input")
    templates = args.templates if args.templates in ("default", "all") else \
        [int(i) for i in args.templates.split(",")]
    from hibari.evaluation.lm import load_lm
    from hibari.evaluation.report import grid_path, grid_table, markdown_table, write_results
    from hibari.evaluation.runner import (
        check_partial_input,
        evaluate_language_grid,
        evaluate_task,
    )
    from hibari.evaluation.tasks import check_language_grid, load_task
    tasks = [load_task(n) for n in _split(args.tasks)]
    for t in tasks:  # validate every file before loading the model
        if instruction:
            check_language_grid(t, instruction, label_langs or instruction)
        examples = t.examples(args.strict)
        check_partial_input(t, examples, args.partial_input)
        stats = examples.stats
        if stats.bad:
            print(f"{t.name}: skipping {stats.bad} malformed row(s), e.g. "
                  f"{stats.bad_examples[0]} (counted in results.json; --strict to fail "
                  "instead)", file=sys.stderr)
    t0 = time.perf_counter()
    lm = load_lm(args.checkpoint, args.tokenizer, batch_size=args.batch_size,
                 max_len=args.max_len, prefix=args.prefix,
                 allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    load_s = time.perf_counter() - t0
    from hibari.base.progress import progress_bar
    results = []
    for t in tasks:  # requests done/total within each task: a bar on a tty, else lines
        progress = progress_bar(t.name, 0, unit=" requests")
        if instruction:
            r = evaluate_language_grid(lm, t, instruction, label_langs or instruction,
                                       fewshot=args.fewshot, templates=templates,
                                       limit=args.limit, strict=args.strict, progress=progress)
        else:
            r = evaluate_task(lm, t, fewshot=args.fewshot, templates=templates,
                              limit=args.limit, calibrate=args.calibrate,
                              permute=args.permute_choices, strict=args.strict,
                              partial_input=args.partial_input, progress=progress)
        progress.finish()
        print(f"{t.name}: {json.dumps(r['metrics'])} ({r['seconds']} s)", file=sys.stderr)
        results.append(r)
    meta = {"checkpoint": str(args.checkpoint), "tokenizer": lm.tokenizer.name,
            "prefix": lm.tokenizer.prefix_info(), "batch_size": args.batch_size,
            "fewshot": args.fewshot, "templates": args.templates, "strict": args.strict,
            "partial_input": args.partial_input,
            **({"instruction_languages": instruction,
                "label_languages": label_langs or instruction} if instruction else {}),
            "load_seconds": round(load_s, 2), "model": lm.cfg.to_dict()}
    if lm.tokenizer_mismatch:  # --allow-tokenizer-mismatch let a different tokenizer through
        meta["tokenizer_mismatch"] = lm.tokenizer_mismatch
    json_path, md_path = write_results(args.out, results, meta)
    print(markdown_table(results), end="")
    if instruction:
        print("\n" + grid_table(results), end="")
        md_path = f"{md_path}, {grid_path(json_path)}"
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


def _read_prompts(path: str | None) -> list[str]:
    """One prompt per line of a text file / stdin, or JSONL with a "prompt" field; a literal
    "\\n" inside a line is a line break."""
    if path and not Path(path).is_file():
        raise InputNotFound(f"--prompts {path}: no such file")
    text = Path(path).read_text(encoding="utf-8") if path else sys.stdin.read()
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError) as e:
                raise UsageError(f"{path or '<stdin>'}:{n}: a JSON line needs a 'prompt' "
                                 f"field ({e})") from e
        else:
            prompts.append(line.replace("\\n", "\n"))
    return prompts


def generate_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hibari generate",
                                description="complete prompts with a checkpoint (KV cache)")
    _model_args(p)
    p.add_argument("--prompts", help="text file (one prompt per line) or JSONL; default stdin")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--jsonl", action="store_true", help="print {prompt, completion} lines")
    args = p.parse_args(argv)
    prompts = _read_prompts(args.prompts)
    if not prompts:
        raise UsageError("no prompts given (use --prompts FILE or pipe them on stdin)")
    from hibari.evaluation.lm import load_lm
    lm = load_lm(args.checkpoint, args.tokenizer, batch_size=args.batch_size,
                 max_len=args.max_len, prefix=args.prefix,
                 allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    t0 = time.perf_counter()
    outs = lm.generate(prompts, max_new_tokens=args.max_new_tokens, stop=args.stop,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed)
    seconds = time.perf_counter() - t0
    for prompt, out in zip(prompts, outs):
        print(json.dumps({"prompt": prompt, "completion": out}, ensure_ascii=False)
              if args.jsonl else out)
    print(f"{len(prompts)} prompts in {seconds:.2f} s", file=sys.stderr)
    return 0
