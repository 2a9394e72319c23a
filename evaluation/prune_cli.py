"""`hibari prune`: zero the weights of every block linear layer (Wanda, magnitude or random) and
write a checkpoint that every hibari command loads.

    hibari prune --checkpoint runs/small --calibration data/assets/corpus/en.jsonl.gz \\
        --sparsity 0.5 --method wanda --out runs/small-wanda50
    hibari prune --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --method magnitude --sparsity 0.5 \\
        --per layer --out pruned/
    hibari eval --checkpoint runs/small-wanda50 --tasks botchan_perplexity

Wanda collects ||X_i||_2 of every linear layer's inputs over the calibration text (a .txt file:
blank-line separated documents; a .jsonl(.gz): `--calibration-field` of each record; or a task's
0-shot prompts; `hibari.evaluation.activation_data`), at most `--calibration-tokens` real tokens
packed in rows of `--seq-len`. Magnitude and random need no calibration. What is pruned and how
is `hibari.model.prune`: attn q/k/v/o and mlp gate/up/down of every block, not the embeddings
or lm_head.

The output directory is a params export (model_config.json, params/, checksums.json), the
tokenizer (tokenizer.model copied for a SentencePiece model, with the run's
tokenizer_record.json when it had one; tokenizer.json + tokenizer_config.json for an HF or GGUF
tokenizer, checked to encode the calibration text and an English and a Japanese sentence to the
same ids, under the run's --prefix), prune_report.json and
prune_report.md (achieved sparsity per matrix, zeros that were already there counted apart). It is
written to a temporary sibling directory and renamed into place when complete, so an interrupted
run leaves no half checkpoint; an existing --out is replaced only if it is a previous prune
output. `--mesh fsdp=-1` (axes data, fsdp, tensor) loads the parameters sharded over the devices
with the default logical-axis rules; statistics and masks are computed on them as placed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from hibari.base.errors import UsageError, UserError
from hibari.evaluation.tokenizer import PREFIX_MODES, save_tokenizer

REPORT = "prune_report.json"


class PruneOutputError(UserError, FileExistsError):
    """--out names a directory that holds something other than a previous prune output."""


def _parse_mesh(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    sizes = {}
    for item in text.split(","):
        axis, _, size = item.partition("=")
        try:
            sizes[axis.strip()] = int(size)
        except ValueError:
            raise UsageError(f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE] with axes data, "
                             "fsdp, tensor (e.g. fsdp=-1)") from None
    return sizes


def check_out(out: Path) -> None:
    """Refuse a non-empty --out that is not a previous prune output (before any work)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / REPORT).is_file())):
        raise PruneOutputError(f"--out {out} exists and is not a previous `hibari prune` output "
                               f"(no {REPORT}); choose a new directory")


def load_model(checkpoint: str, mesh_sizes: dict | None):
    """(cfg, params) of any checkpoint kind or a GGUF file, sharded on a mesh when given."""
    import jax
    path = Path(checkpoint)
    shardings_of = None
    if mesh_sizes is not None:
        from hibari.model.transformer import param_axes, param_shapes
        from hibari.train.sharding import (
            DEFAULT_RULES,
            logical_shardings,
            make_mesh,
            normalize_rules,
        )
        mesh, rules = make_mesh(mesh_sizes), normalize_rules(DEFAULT_RULES)

        def shardings_of(cfg):
            return logical_shardings(param_axes(cfg), param_shapes(cfg), mesh, rules)
    if path.suffix == ".gguf":
        from hibari.model.gguf import import_gguf
        cfg, params = import_gguf(path)
        return cfg, (jax.device_put(params, shardings_of(cfg)) if shardings_of else params)
    from hibari.model.params_io import load_params, resolve_checkpoint
    _, _, cfg = resolve_checkpoint(path)
    if cfg is None or shardings_of is None:  # an HF directory: the config comes with import
        cfg, params = load_params(path)
        return cfg, (jax.device_put(params, shardings_of(cfg)) if shardings_of else params)
    return load_params(path, shardings_of(cfg))


def batches_digest(batches) -> str:
    h = hashlib.sha256()
    for tokens, segments in batches:
        h.update(np.ascontiguousarray(tokens, np.int32).tobytes())
        h.update(np.ascontiguousarray(segments, np.int32).tobytes())
    return h.hexdigest()


def markdown_report(report: dict) -> str:
    c = report["calibration"]
    calibration = "none" if c is None else f"`{c['source']}`, {c['tokens']} tokens"
    lines = [f"# hibari prune: {report['method']} at {report['sparsity']:.0%} "
             f"(per {report['per']})", "",
             f"- checkpoint: `{report['checkpoint']}`",
             f"- calibration: {calibration}",
             f"- overall: {report['overall']['zeros_after']} / {report['overall']['size']} "
             f"weights zero ({report['overall']['sparsity']:.4f}); "
             f"{report['overall']['zeros_before']} were zero before", "",
             "| matrix | shape | removed | zeros before | zeros after | sparsity |",
             "|---|---|---:|---:|---:|---:|"]
    for m in report["matrices"]:
        lines.append(f"| {m['name']} | {'x'.join(map(str, m['shape']))} | {m['removed']} | "
                     f"{m['zeros_before']} | {m['zeros_after']} | {m['sparsity']:.4f} |")
    return "\n".join(lines) + "\n"


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out` (an old prune output there is swapped out, then removed)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def prune_parser() -> argparse.ArgumentParser:
    from hibari.model.prune import GROUPS, METHODS
    p = argparse.ArgumentParser(prog="hibari prune", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="run dir, checkpoints/<step> dir, params export, HF dir or *.gguf file")
    p.add_argument("--tokenizer", help="default: found beside the checkpoint")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--sparsity", type=float, required=True,
                   help="fraction of each matrix's weights to remove, in [0, 1)")
    p.add_argument("--per", choices=GROUPS, default="output",
                   help="compare weights within each output unit (Wanda's default) or across "
                   "the whole matrix")
    p.add_argument("--calibration", help="wanda: a .txt / .jsonl(.gz) file or a task name/YAML")
    p.add_argument("--calibration-field", default="text", help="JSONL field (default: text)")
    p.add_argument("--calibration-tokens", type=int, default=32768,
                   help="real calibration tokens at most (default 32768; Wanda used 128 x 2048)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="calibration row length (capped at the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration rows per batch")
    p.add_argument("--prefix", choices=PREFIX_MODES, default="auto",
                   help="what goes before each calibration document (as hibari eval --prefix)")
    p.add_argument("--seed", type=int, default=0, help="random: the seed of the scores")
    p.add_argument("--mesh", help="shard the parameters, e.g. fsdp=-1 or tensor=2,fsdp=-1")
    p.add_argument("--out", required=True, help="new directory (or a previous prune output)")
    return p


def prune_main(argv=None) -> int:
    from hibari.model.prune import check_sparsity
    args = prune_parser().parse_args(argv)

    check_sparsity(args.sparsity)
    if args.method == "wanda" and not args.calibration:
        raise UsageError("--method wanda needs --calibration (a .txt / .jsonl file or a task)")
    if args.calibration_tokens < 1 or args.seq_len < 1 or args.batch_size < 1:
        raise UsageError("--calibration-tokens, --seq-len and --batch-size must be >= 1")
    out = Path(args.out).absolute()
    check_out(out)
    mesh_sizes = _parse_mesh(args.mesh)

    from hibari.evaluation.activation_data import read_texts, token_batches
    from hibari.evaluation.tokenizer import load_tokenizer, tokenizer_for_checkpoint
    texts = None
    if args.method == "wanda":
        texts = read_texts(args.calibration, args.calibration_field)  # bad rows: before loading
    elif args.calibration:
        print(f"hibari prune: --method {args.method} uses no calibration; "
              f"ignoring {args.calibration}", file=sys.stderr)
    t0 = time.perf_counter()
    if not args.checkpoint.endswith(".gguf"):
        from hibari.model.params_io import resolve_checkpoint
        resolve_checkpoint(args.checkpoint)  # a wrong path is named as such first
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else \
        tokenizer_for_checkpoint(args.checkpoint)
    tok.set_prefix(args.prefix)
    if not args.checkpoint.endswith(".gguf"):
        from hibari.data.tokenizer import check_tokenizer_record
        check_tokenizer_record(args.checkpoint, tok.name)
    cfg, params = load_model(args.checkpoint, mesh_sizes)
    load_s = time.perf_counter() - t0

    from hibari.model.activations import dense_statistics
    from hibari.model.prune import prune_params
    calibration, statistics = None, None
    t1 = time.perf_counter()
    if texts is not None:
        batches = token_batches(tok, texts, seq_len=min(args.seq_len, cfg.max_seq_len),
                                batch_size=args.batch_size, max_tokens=args.calibration_tokens)
        if not batches:
            raise UsageError(f"--calibration {args.calibration}: its texts encode to no tokens")
        statistics = dense_statistics(cfg, params, batches)
        calibration = {"source": str(args.calibration), "field": args.calibration_field,
                       "source_documents": len(texts), "tokens": int(statistics["tokens"]),
                       "seq_len": int(batches[0][0].shape[1]), "prefix": args.prefix,
                       "sha256": batches_digest(batches)}
    pruned, matrices = prune_params(cfg, params, method=args.method, sparsity=args.sparsity,
                                    per=args.per, statistics=statistics, seed=args.seed)
    prune_s = time.perf_counter() - t1
    totals = {k: sum(m[k] for m in matrices)
              for k in ("size", "removed", "zeros_before", "zeros_after")}
    totals["sparsity"] = totals["zeros_after"] / max(totals["size"], 1)
    report = {"method": args.method, "per": args.per, "sparsity": args.sparsity,
              "seed": args.seed if args.method == "random" else None,
              "checkpoint": str(Path(args.checkpoint).absolute()),
              "calibration": calibration, "mesh": mesh_sizes,
              "pruned": "attn q/k/v/o and mlp gate/up/down of every block; not the embeddings, "
                        "lm_head, biases or norms",
              "overall": totals, "matrices": matrices,
              "seconds": {"load": round(load_s, 2), "prune": round(prune_s, 2)}}

    from hibari.model.params_io import save_params
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        save_params(tmp, cfg, pruned)
        probe = (texts or [])[:8] + ["The quick brown fox.", "吾輩は猫である。"]
        report["tokenizer"] = save_tokenizer(tok, args.checkpoint, tmp, probe)
        (tmp / "prune_report.md").write_text(markdown_report(report))
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")  # last: marks it whole
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"hibari prune: {args.method} {args.sparsity:.0%} per {args.per}: "
          f"{totals['zeros_after']}/{totals['size']} block weights zero "
          f"({totals['sparsity']:.4f}); wrote {out}")
    return 0
