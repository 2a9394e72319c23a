"""`hibari analyze`: analyses of a checkpoint's internals.

    hibari analyze neurons --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text en=data/assets/corpus/en.jsonl.gz ja=data/assets/corpus/ja.jsonl.gz \\
        --max-tokens 40000 --ablate all --heldout-max-bytes 20000 --out neurons_out

`neurons`: language-specific MLP neurons by LAPE (`hibari.evaluation.neurons`, whose docstring
gives the definitions and thresholds). Writes OUT/neurons.json (thresholds, token counts, per
layer the neurons assigned to each language with their activation probability per language and
LAPE), OUT/neurons.md (per-layer table, the lowest-LAPE neurons, the ablation table) and
OUT/neurons.png (language-specific neurons per layer).

Held-out text: with `--heldout LANG=FILE ...` the held-out documents are those files' (a document
that also occurs in the --text file is refused); otherwise each --text file is split by content:
a document is held out when sha256(text) falls in the first `--heldout-fraction` of the hash
range, and held-out documents are never used to find the neurons (the split is the same with or
without --ablate). `--ablate LANG ... | all` scores the held-out text of every language (bits per
byte, token perplexity) with the dense model, with LANG's neurons zeroed and, as the control,
with as many random non-specific neurons zeroed per layer; `--save-ablated DIR` writes each
language-ablated model as a params export DIR/LANG/, its tokenizer beside it, that
`hibari eval --checkpoint DIR/LANG` reads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hibari.base.errors import InputNotFound, UsageError
from hibari.evaluation.tokenizer import PREFIX_MODES

SUBCOMMANDS = {"neurons": "language-specific MLP neurons (LAPE) and their ablation"}


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """{"en": "FILE", ...} from ["en=FILE", ...], in the given order."""
    out: dict[str, str] = {}
    for value in values or []:
        lang, sep, path = value.partition("=")
        if not sep or not lang or not path:
            raise UsageError(f"{flag} {value!r}: expected LANG=FILE (e.g. {flag} "
                             "en=data/assets/corpus/en.jsonl.gz)")
        if lang in out:
            raise UsageError(f"{flag}: language {lang!r} given twice")
        if lang == "all":
            raise UsageError(f"{flag}: 'all' is reserved (--ablate all); name the language")
        out[lang] = path
    return out


def _check_file(path: str, flag: str) -> None:
    from hibari.evaluation.activation_data import JSONL_SUFFIXES, TEXT_SUFFIXES
    if path.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES) and not Path(path).is_file():
        raise InputNotFound(f"{flag}: {path} does not exist; check the path")


def _budget(texts: list[str], max_bytes: int | None) -> list[str]:
    """The texts in order up to `max_bytes` UTF-8 bytes in all (the last one cut there)."""
    if max_bytes is None:
        return list(texts)
    out, left = [], max_bytes
    for t in texts:
        if left <= 0:
            break
        raw = t.encode("utf-8")
        if len(raw) > left:
            t = raw[:left].decode("utf-8", errors="ignore")
        out.append(t)
        left -= len(t.encode("utf-8"))
    return [t for t in out if t]


def neurons_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hibari analyze neurons",
                                description="language-specific MLP neurons (LAPE, Tang et al. "
                                "2024) and their ablation")
    p.add_argument("--checkpoint", required=True,
                   help="run dir, checkpoints/<step> dir, params export, HF dir or *.gguf file")
    p.add_argument("--tokenizer", help="SentencePiece *.model, tokenizer.json / HF dir, or "
                   "*.gguf (default: found beside the checkpoint)")
    p.add_argument("--prefix", choices=PREFIX_MODES, default="auto",
                   help="what goes before each document (default: auto, as hibari eval)")
    p.add_argument("--text", nargs="+", required=True, metavar="LANG=FILE",
                   help="text per language: .txt (blank-line separated documents), .jsonl or "
                   ".jsonl.gz (--field of each record), or a task; two languages or more")
    p.add_argument("--field", default="text", help="JSONL field holding the text")
    p.add_argument("--max-tokens", type=int,
                   help="real tokens per language for the activation statistics (default: all)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per packed row for the statistics, and the held-out scoring "
                   "window (default 512)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-percent", type=float, default=1.0,
                   help="percent of all MLP neurons selected, lowest LAPE first (default 1)")
    p.add_argument("--filter-percentile", type=float, default=95.0,
                   help="a neuron is eligible when its largest p exceeds this percentile of all "
                   "activation probabilities (default 95)")
    p.add_argument("--assign-percentile", type=float, default=95.0,
                   help="a selected neuron belongs to each language whose p exceeds this "
                   "percentile of all activation probabilities (default 95)")
    p.add_argument("--ablate", nargs="+", metavar="LANG|all",
                   help="zero each language's neurons in turn (all: every language) and score "
                   "held-out text per language before and after, with a random control")
    p.add_argument("--heldout", nargs="+", metavar="LANG=FILE",
                   help="held-out text per language (default: split off each --text file)")
    p.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="share of --text documents held out, by content hash (default 0.1)")
    p.add_argument("--heldout-max-bytes", type=int,
                   help="score at most this many UTF-8 bytes of held-out text per language "
                   "(documents in order, the last one cut; default: all)")
    p.add_argument("--seed", type=int, default=0, help="random control's seed")
    p.add_argument("--save-ablated", metavar="DIR",
                   help="write each language-ablated model to DIR/LANG/ (params export)")
    p.add_argument("--top", type=int, default=5, help="neurons shown per layer in neurons.md")
    p.add_argument("--out", required=True, help="output directory")
    return p


def _settings(argv: list[str]):
    args = neurons_parser().parse_args(argv)
    texts = _pairs(args.text, "--text")
    heldout = _pairs(args.heldout, "--heldout")
    if len(texts) < 2:
        raise UsageError("--text needs two languages or more (e.g. --text en=EN.jsonl "
                         "ja=JA.jsonl): LAPE compares a neuron's activation across languages")
    if heldout and set(heldout) != set(texts):
        raise UsageError(f"--heldout languages {sorted(heldout)} must be the --text languages "
                         f"{sorted(texts)}")
    ablate = []
    for lang in args.ablate or []:
        if lang == "all":
            ablate += [x for x in texts if x not in ablate]
        elif lang not in texts:
            raise UsageError(f"--ablate {lang}: not a --text language ({', '.join(texts)}) "
                             "nor 'all'")
        elif lang not in ablate:
            ablate.append(lang)
    if heldout and not ablate:
        raise UsageError("--heldout is only used with --ablate LANG|all")
    if args.save_ablated and not ablate:
        raise UsageError("--save-ablated needs --ablate LANG|all")
    if not 0.0 < args.heldout_fraction < 1.0:
        raise UsageError(f"--heldout-fraction {args.heldout_fraction}: must be in (0, 1)")
    for name in ("max_tokens", "heldout_max_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be >= 1")
    if args.seq_len < 2 or args.batch_size < 1:
        raise UsageError("--seq-len must be >= 2 and --batch-size >= 1")
    from hibari.evaluation.neurons import Thresholds
    try:
        thresholds = Thresholds(args.top_percent, args.filter_percentile,
                                args.assign_percentile)
    except ValueError as e:
        raise UsageError(f"--top-percent / --filter-percentile / --assign-percentile: {e}"
                         ) from None
    if args.save_ablated:
        for lang in ablate:
            if (Path(args.save_ablated) / lang / "params").exists():
                raise UsageError(f"--save-ablated: {Path(args.save_ablated) / lang}/params "
                                 "already exists; choose a new directory")
    for flag, files in (("--text", texts), ("--heldout", heldout)):
        for path in files.values():
            _check_file(path, flag)
    return args, texts, heldout, ablate, thresholds


def neurons_main(argv: list[str]) -> int:
    args, text_files, heldout_files, ablate, thresholds = _settings(list(argv))
    from hibari.evaluation.activation_data import read_texts, token_batches
    from hibari.evaluation.neurons import split_heldout

    # read and split every file before loading the model
    found, heldout = {}, {}
    for lang, path in text_files.items():
        texts = read_texts(path, args.field)
        if heldout_files:
            found[lang] = texts
            held = read_texts(heldout_files[lang], args.field)
            shared = set(held) & set(texts)
            if shared:
                raise UsageError(f"--heldout {lang}={heldout_files[lang]}: {len(shared)} "
                                 f"document(s) also in --text {lang}={path}; held-out text must "
                                 "not be used to find the neurons")
            heldout[lang] = held
        else:
            found[lang], heldout[lang] = split_heldout(texts, args.heldout_fraction)
            if not found[lang]:
                raise UsageError(f"--text {lang}={path}: every document fell in the held-out "
                                 "split; give more documents or a smaller --heldout-fraction")
        heldout[lang] = _budget(heldout[lang], args.heldout_max_bytes)
        if ablate and not heldout[lang]:
            raise UsageError(f"no held-out {lang} text for --ablate: give --heldout {lang}=FILE "
                             "or a larger --heldout-fraction")
        _log(f"hibari analyze neurons: {lang}: {len(found[lang])} documents for the statistics"
             + (f", {len(heldout[lang])} held out" if ablate else ""))

    from hibari.evaluation.lm import load_lm
    from hibari.evaluation.neurons import (
        ablate_neurons,
        ablation_runs,
        activation_probabilities,
        markdown_report,
        plot_counts,
        select_neurons,
        selection_report,
    )
    t0 = time.perf_counter()
    lm = load_lm(args.checkpoint, args.tokenizer, batch_size=args.batch_size,
                 prefix=args.prefix)
    timing = {"load": time.perf_counter() - t0}
    t0 = time.perf_counter()
    batches = {lang: token_batches(lm.tokenizer, texts, seq_len=args.seq_len,
                                   batch_size=args.batch_size, max_tokens=args.max_tokens)
               for lang, texts in found.items()}
    probs, tokens = activation_probabilities(lm.cfg, lm.params, batches)
    timing["statistics"] = time.perf_counter() - t0
    selection = select_neurons(probs, tuple(text_files), thresholds)
    report = {"checkpoint": str(args.checkpoint), "tokenizer": lm.tokenizer.name,
              "prefix": lm.tokenizer.prefix_info(), "text": text_files,
              "documents": {lang: len(t) for lang, t in found.items()},
              "seq_len": args.seq_len, "max_tokens": args.max_tokens,
              **selection_report(selection, tokens)}
    _log(f"hibari analyze neurons: {report['selected']} neurons selected of "
         f"{report['neurons_total']:,} ({report['eligible']:,} eligible); "
         + ", ".join(f"{lang} {n}" for lang, n in report["assigned"].items())
         + f" ({timing['statistics']:.0f} s)")
    if ablate:
        t0 = time.perf_counter()
        runs = ablation_runs(lm, selection, heldout, ablate, window=args.seq_len,
                             seed=args.seed, log=_log)
        timing["ablation"] = time.perf_counter() - t0
        source = (f"--heldout files {heldout_files}" if heldout_files else
                  f"documents split off the --text files by content hash (fraction "
                  f"{args.heldout_fraction}), not used for the statistics")
        dense = runs[0]["scores"]
        report["ablation"] = {
            "window": min(args.seq_len, lm.max_len), "seed": args.seed,
            "heldout_source": source, "heldout_max_bytes": args.heldout_max_bytes,
            "heldout": {lang: {k: dense[lang][k] for k in ("documents", "tokens", "bytes")}
                        for lang in heldout},
            "runs": runs}
        if args.save_ablated:
            saved = {}
            from hibari.evaluation.tokenizer import save_tokenizer
            from hibari.model.params_io import save_params
            probe = [t for texts in found.values() for t in texts[:2]]
            for lang in ablate:
                where = Path(args.save_ablated) / lang
                save_params(where, lm.cfg, ablate_neurons(lm.cfg, lm.params,
                                                          selection.mask(lang)))
                save_tokenizer(lm.tokenizer, args.checkpoint, where, probe)
                saved[lang] = str(where)
                _log(f"hibari analyze neurons: wrote {where}; evaluate it with `hibari eval "
                     f"--checkpoint {where}`")
            report["ablation"]["saved"] = saved
    report["seconds"] = {k: round(v, 2) for k, v in timing.items()}

    from hibari.base.files import write_atomic
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "neurons.json", json.dumps(report, indent=1, ensure_ascii=False))
    markdown = markdown_report(report, top=args.top)
    write_atomic(out / "neurons.md", markdown)
    plot_counts(report, out / "neurons.png")
    if ablate:
        print(markdown[markdown.index("## Ablation"):], end="")
    _log(f"hibari analyze neurons: wrote {out}/neurons.json, neurons.md, neurons.png")
    return 0


def usage() -> str:
    lines = ["usage: hibari analyze <subcommand> [options]", "", "subcommands:"]
    lines += [f"  {name:<8}  {help_}" for name, help_ in SUBCOMMANDS.items()]
    return "\n".join(lines + ["", "Run `hibari analyze <subcommand> --help` for its options."])


def analyze_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "neurons":
        return neurons_main(argv[1:])
    raise UsageError(f"unknown subcommand {argv[0]!r}\n{usage()}")
