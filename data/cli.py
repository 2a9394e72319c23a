"""`hibari data <stage> ...`: each pipeline stage from the command line.

    hibari data clean     --input 'raw/*.jsonl.gz' --output clean.jsonl.gz [--html]
    hibari data filter    --input clean.jsonl.gz --output kept.jsonl.gz [--languages en,ja] [--wordlist F]
    hibari data dedup     --input IN.jsonl --output OUT.jsonl [--threshold 0.8] [--ngram 5] [--bands B --rows R]
    hibari data tokenizer train  --input 'corpus/*.jsonl.gz' --model tok.model [--vocab-size 8000] [--model-type bpe]
    hibari data tokenizer expand --base base.model --input 'ja/*.jsonl.gz' --model out.model [--heldout F]
    hibari data tokenizer report --model tok.model --input heldout.jsonl.gz
    hibari data pack      --source en='en/*.jsonl.gz' --source ja=ja.jsonl.gz --tokenizer tok.model --out DIR --seq-len 1024
    hibari data pipeline  --input 'corpus/*.jsonl.gz' --out DIR [--vocab-size 8000] [--seq-len 1024]
    hibari data prepare   --config configs/data/quickstart.py:runs/data/quickstart [--resume-only]
    hibari data prepare   --config configs/data/quality.py:runs/data/quality[,CHECKPOINT]  # + model-based quality stage
    hibari data prepare   --config configs/data/quickstart.py:runs/data/beam --runner beam [--beam-option=--runner=...]

pipeline / prepare into an existing folder reuse each stage whose recorded fingerprint (inputs
and settings) still matches and redo the others with everything after them; --resume-only fails
instead, naming the stage and what changed. One run at a time per output folder (a lock).
The perplexity filter's language model comes from the `hibari data` command (hibari/data_cli.py,
`hibari.evaluation.quality_scoring`): data/ itself knows no models.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from hibari.base.errors import UsageError
from hibari.data.sources import SourceStats, read_docs, write_jsonl

if TYPE_CHECKING:
    from hibari.data.quality import PerplexityScoring


def _inputs(p: argparse.ArgumentParser):
    p.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl/.parquet/.txt, .gz/.zst)")
    p.add_argument("--text-field", default="text", help="JSON/parquet field holding the text")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")


def _dedup_args(p: argparse.ArgumentParser):
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity that counts as duplicate")
    p.add_argument("--ngram", type=int, default=5, help="shingle length in units")
    p.add_argument("--unit", choices=("char", "word"), default="char", help="char n-grams work for Japanese")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--bands", type=int, help="LSH bands b (default: chosen from threshold)")
    p.add_argument("--rows", type=int, help="LSH rows per band r")
    p.add_argument("--processes", type=int, default=1, help="worker processes for MinHash signatures")
    p.add_argument("--no-verify", action="store_true", help="keep LSH candidates without checking the estimate")


def _dedup_config(a):
    from hibari.data.dedup import NearDedupConfig
    if (a.bands is None) != (a.rows is None):
        raise UsageError("give both --bands and --rows, or neither")
    return NearDedupConfig(threshold=a.threshold, num_perm=a.num_perm, ngram=a.ngram, unit=a.unit,
                           bands=a.bands, rows=a.rows, verify=not a.no_verify)


def _report_bad(stats: SourceStats):
    if stats.bad:
        print(f"skipped {stats.bad} bad records, e.g.:", *stats.bad_examples[:5], sep="\n  ", file=sys.stderr)


def cmd_clean(a):
    from hibari.data.clean import clean_docs
    stats = SourceStats()
    docs = read_docs(a.input, a.text_field, stats=stats, strict=a.strict, nonempty=True)
    n = write_jsonl(a.output, clean_docs(docs, a.html))
    _report_bad(stats)
    print(json.dumps({"docs_in": stats.docs, "docs_out": n, "bad_records": stats.bad}))


def cmd_filter(a):
    from hibari.data.filters import FilterStats, default_filters, filter_docs
    words = [w.strip() for w in open(a.wordlist, encoding="utf-8") if w.strip()] if a.wordlist else []
    stats, fstats = SourceStats(), FilterStats()
    docs = read_docs(a.input, a.text_field, stats=stats, strict=a.strict, nonempty=True)
    write_jsonl(a.output, filter_docs(docs, default_filters(a.languages.split(","), words), fstats))
    _report_bad(stats)
    report = json.dumps(fstats.report(), indent=1, ensure_ascii=False)
    if a.report:
        open(a.report, "w", encoding="utf-8").write(report)
    print(report)


def cmd_dedup(a):
    from hibari.data.dedup import dedup_files
    result = dedup_files(a.input, a.output, _dedup_config(a), processes=a.processes, text_field=a.text_field,
                         exact=not a.no_exact, nonempty=True)
    print(json.dumps(result, indent=1))


def cmd_tokenizer(a):
    from hibari.data.pipeline import sentencepiece_message
    from hibari.data.tokenizer import (
        expand_tokenizer,
        load_tokenizer,
        tokenizer_report,
        train_tokenizer,
    )
    docs = read_docs(a.input, a.text_field, strict=a.strict, nonempty=True)
    if a.action == "train":
        try:
            sp = train_tokenizer(docs, a.model, vocab_size=a.vocab_size, model_type=a.model_type,
                                 byte_fallback=not a.no_byte_fallback, character_coverage=a.character_coverage,
                                 num_threads=a.threads)
        except RuntimeError as e:
            raise UsageError(f"--vocab-size {a.vocab_size} on {' '.join(a.input)}: SentencePiece says "
                             f"\"{sentencepiece_message(e)}\"") from None
        print(json.dumps({"model": a.model, "vocab_size": sp.get_piece_size()}))
    elif a.action == "expand":
        if not a.base:
            raise UsageError("tokenizer expand needs --base BASE.model")
        ex = expand_tokenizer(a.base, docs, a.model, new_vocab_size=a.vocab_size, max_new_pieces=a.max_new_pieces,
                              num_threads=a.threads)
        ex.save_mapping(a.model + ".mapping.json")
        out = {"model": a.model, "base_vocab_size": ex.base_vocab_size, "vocab_size": ex.vocab_size,
               "mapping": a.model + ".mapping.json"}
        if a.heldout:
            texts = [d["text"] for d in read_docs(a.heldout, a.text_field)]
            out["before"] = tokenizer_report(load_tokenizer(a.base), texts)
            out["after"] = tokenizer_report(load_tokenizer(a.model), texts)
        print(json.dumps(out, indent=1))
    else:
        print(json.dumps(tokenizer_report(load_tokenizer(a.model), (d["text"] for d in docs)), indent=1))


def cmd_pack(a):
    from hibari.data.pack import pack_corpus
    sources = {}
    for spec in a.source:
        name, sep, pattern = spec.partition("=")
        if not sep:
            raise UsageError(f"--source {spec!r}: write NAME=GLOB, e.g. --source ja='ja/*.jsonl.gz'")
        sources[name] = read_docs(pattern, a.text_field, strict=a.strict, nonempty=True)
    manifest = pack_corpus(sources, a.tokenizer, a.out, a.seq_len, a.method, a.rows_per_shard)
    print(json.dumps({n: {k: v for k, v in e.items() if k != "shards"} for n, e in manifest["sources"].items()},
                     indent=1))


def _reuse_args(p: argparse.ArgumentParser):
    p.add_argument("--resume-only", action="store_true",
                   help="only finish or reuse earlier outputs: fail, naming the stage and the difference, "
                        "where an output was made from other inputs or settings (default: redo it)")
    p.add_argument("--fingerprint", choices=("stat", "content"), default=None,
                   help="how input files are recognised as unchanged: stat = path + size + mtime (default, "
                        "no read), content = + a hash of the bytes (reads every input on every run)")


def _run_prepare(cfg, perplexity_scorer=None):
    from hibari.data.pipeline import prepare, summary
    print(summary(prepare(cfg, perplexity_scorer)), end="")


def cmd_pipeline(a):
    from hibari.data.pipeline import PrepareConfig
    _run_prepare(PrepareConfig(inputs=a.input, out=a.out, text_field=a.text_field, html=a.html, strict=a.strict,
                               languages=tuple(a.languages.split(",")), wordlist=a.wordlist,
                               dedup=_dedup_config(a), processes=a.processes, tokenizer_vocab_size=a.vocab_size,
                               seq_len=a.seq_len, pack_method=a.method, resume_only=a.resume_only,
                               input_fingerprint=a.fingerprint or "stat"), a.perplexity_scorer)


def load_prepare_config(spec: str, strict: bool = False):
    """`path.py[:arg]` (relative to the cwd, else to the installed package, e.g.
    `configs/data/quickstart.py:runs/data/quickstart`) -> PrepareConfig from its `get_config(arg)`."""
    import dataclasses

    from hibari.base.config_files import ConfigFileError, load_python_config
    from hibari.data.dedup import NearDedupConfig
    from hibari.data.pipeline import PrepareConfig
    fields = dict(load_python_config(spec, "--config"))
    known = {f.name for f in dataclasses.fields(PrepareConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigFileError(f"--config {spec!r}: unknown fields {unknown}; PrepareConfig has "
                              f"{sorted(known)}")
    fields["dedup"] = NearDedupConfig(**dict(fields.get("dedup", {})))
    if strict:
        fields["strict"] = True
    return PrepareConfig(**fields)


def prepare_config_from_args(a):
    """PrepareConfig of `hibari data prepare` arguments: the config file, then the flags."""
    import dataclasses
    cfg = load_prepare_config(a.config, a.strict)
    changes = {k: v for k, v in (("tokenizer_vocab_size", a.vocab_size), ("seq_len", a.seq_len),
                                 ("tokenizer_character_coverage", a.character_coverage),
                                 ("input_fingerprint", getattr(a, "fingerprint", None)))
               if v is not None}
    if getattr(a, "resume_only", False):
        changes["resume_only"] = True
    if getattr(a, "runner", None):
        changes["runner"] = a.runner
    if getattr(a, "beam_option", None):
        changes["beam_options"] = tuple(cfg.beam_options) + tuple(a.beam_option)
    return dataclasses.replace(cfg, **changes)


def cmd_prepare(a):
    """`--config path.py[:arg]`: a file whose `get_config(arg)` returns fields of PrepareConfig."""
    _run_prepare(prepare_config_from_args(a), a.perplexity_scorer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hibari data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("clean", help="NFKC, width unification, whitespace, optional HTML to text")
    _inputs(p)
    p.add_argument("--output", required=True)
    p.add_argument("--html", action="store_true", help="inputs are HTML pages")
    p.set_defaults(fn=cmd_clean)

    p = sub.add_parser("filter", help="language, Gopher quality/repetition, Japanese rules, word list")
    _inputs(p)
    p.add_argument("--output", required=True)
    p.add_argument("--languages", default="en,ja")
    p.add_argument("--wordlist", help="file: one unwanted word or phrase per line")
    p.add_argument("--report", help="write the filter report (JSON) here")
    p.set_defaults(fn=cmd_filter)

    p = sub.add_parser("dedup", help="exact + MinHash-LSH near-duplicate removal")
    _inputs(p)
    p.add_argument("--output", required=True, help="JSONL; removed ids go to OUTPUT.removed.jsonl")
    p.add_argument("--no-exact", action="store_true")
    _dedup_args(p)
    p.set_defaults(fn=cmd_dedup)

    for name in ("tokenizer", "train-tokenizer", "expand-tokenizer"):
        p = sub.add_parser(name, help="train / expand / report a SentencePiece tokenizer")
        if name == "tokenizer":
            p.add_argument("action", choices=("train", "expand", "report"))
        else:
            p.set_defaults(action=name.split("-")[0])
        _inputs(p)
        p.add_argument("--model", required=True, help="output .model (train/expand) or model to report on")
        p.add_argument("--base", help="expand: the existing .model")
        p.add_argument("--vocab-size", type=int, default=8000, help="train: vocabulary; expand: new-language vocabulary")
        p.add_argument("--max-new-pieces", type=int, help="expand: append at most this many pieces")
        p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
        p.add_argument("--character-coverage", type=float, default=0.9995)
        p.add_argument("--no-byte-fallback", action="store_true")
        p.add_argument("--heldout", help="expand: report before/after on these files")
        p.add_argument("--threads", type=int, default=2)
        p.set_defaults(fn=cmd_tokenizer)

    p = sub.add_parser("pack", help="tokenize and pack into fixed-length rows (token shards + manifest)")
    p.add_argument("--source", action="append", required=True, help="NAME=GLOB, repeatable")
    p.add_argument("--text-field", default="text")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--method", choices=("greedy", "best_fit"), default="greedy")
    p.add_argument("--rows-per-shard", type=int, default=4096)
    p.set_defaults(fn=cmd_pack)

    p = sub.add_parser("pipeline", help="clean -> filter -> dedup [-> tokenizer -> pack], with report.json")
    _inputs(p)
    p.add_argument("--out", required=True)
    p.add_argument("--html", action="store_true")
    p.add_argument("--languages", default="en,ja")
    p.add_argument("--wordlist")
    _dedup_args(p)
    p.add_argument("--vocab-size", type=int, help="also train a tokenizer of this size")
    p.add_argument("--seq-len", type=int, help="also pack (needs --vocab-size)")
    p.add_argument("--method", choices=("greedy", "best_fit"), default="greedy")
    _reuse_args(p)
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("prepare", help="the pipeline from a config file (get_config())")
    p.add_argument("--config", required=True,
                   help="path.py[:arg], e.g. configs/data/quickstart.py:runs/data/quickstart (arg: output dir)")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--vocab-size", type=int, help="override the config's tokenizer_vocab_size")
    p.add_argument("--seq-len", type=int, help="override the config's seq_len")
    p.add_argument("--character-coverage", type=float,
                   help="override the config's tokenizer_character_coverage")
    p.add_argument("--runner", choices=("local", "beam"),
                   help="where the stages run (default: the config's runner, else local): beam = Apache Beam "
                        "transforms, the same outputs (pip install \"hibari[beam]\"; docs/beam.md)")
    p.add_argument("--beam-option", action="append", metavar="FLAG",
                   help="a Beam pipeline flag, repeatable, e.g. --beam-option=--runner=FlinkRunner "
                        "(default: the DirectRunner, multi-process, the config's processes workers)")
    _reuse_args(p)
    p.set_defaults(fn=cmd_prepare)
    return parser


def data_main(argv: list[str], perplexity_scorer: PerplexityScoring | None = None) -> int:
    """`hibari data ...`; `perplexity_scorer` scores documents for the quality stage's perplexity
    filter (data/ knows no models: the `hibari data` command, hibari/data_cli.py, passes
    `hibari.evaluation.quality_scoring.CheckpointScorer()`)."""
    args = build_parser().parse_args(argv)
    args.perplexity_scorer = perplexity_scorer
    if getattr(args, "seq_len", None) and args.stage == "pipeline" and not args.vocab_size:
        raise UsageError("--seq-len needs --vocab-size (packing uses the tokenizer the pipeline trains)")
    args.fn(args)
    return 0
