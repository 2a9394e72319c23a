"""End to end: sources -> clean -> filter (per input shard) -> dedup -> [tokenizer] -> [pack].

Writes under `out/`: `filtered/<shard>.jsonl.gz` (+ `.stats.json`), `corpus.jsonl.gz` (deduplicated,
with `corpus.jsonl.gz.removed.jsonl`), optionally `tokenizer.model`, `packed/` (training documents)
and `packed-heldout/` (held-out documents), and `report.json` + `summary.txt`.

One document in `heldout_every` (by crc32 of its id, so the split is stable across runs and inputs)
is held out: the tokenizer is trained without it, its report is measured on it, and it is packed
only into `packed-heldout/`, never into the training rows. Finished shards are not redone when a
run restarts: each output is written under a temporary name and renamed only when complete.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field

from hibari.data.clean import clean_docs
from hibari.data.dedup import NearDedupConfig, dedup_files
from hibari.data.filters import FilterStats, default_filters, filter_docs
from hibari.data.sources import SourceStats, expand_paths, read_docs, write_jsonl


@dataclass
class PrepareConfig:
    inputs: list[str]
    out: str
    text_field: str = "text"
    html: bool = False
    strict: bool = False
    languages: tuple[str, ...] = ("en", "ja")
    wordlist: str | None = None          # file with one unwanted word/phrase per line
    dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    processes: int = 1
    tokenizer_vocab_size: int | None = None  # train a tokenizer when set
    tokenizer_model_type: str = "unigram"
    tokenizer_character_coverage: float = 0.9995  # rarer characters become byte-fallback pieces
    seq_len: int | None = None           # pack when set
    pack_method: str = "greedy"
    source_field: str = "lang"           # meta field that names a document's source for packing
    heldout_every: int = 20              # hold out documents with crc32(id) % heldout_every == 0


def _filter_shard(path: str, out_path: str, cfg: PrepareConfig, words: list[str]) -> dict:
    stats_path = out_path + ".stats.json"
    if os.path.exists(out_path) and os.path.exists(stats_path):
        with open(stats_path) as f:
            return json.load(f)
    src, flt = SourceStats(), FilterStats()
    docs = read_docs(path, text_field=cfg.text_field, stats=src, strict=cfg.strict)
    write_jsonl(out_path, filter_docs(clean_docs(docs, cfg.html), default_filters(cfg.languages, words), flt))
    stats = {"input": path, "read": asdict(src), "filter": flt.report()}
    with open(stats_path + ".tmp", "w") as f:
        json.dump(stats, f, ensure_ascii=False)
    os.replace(stats_path + ".tmp", stats_path)
    return stats


def is_heldout(doc_id: str, every: int = 20) -> bool:
    return zlib.crc32(doc_id.encode()) % every == 0


def split_docs(path: str, every: int, heldout: bool):
    """The documents of `path` on one side of the held-out split."""
    return (d for d in read_docs(path) if is_heldout(d["id"], every) == heldout)


def _docs_of_source(path: str, source_field: str, name: str, every: int, heldout: bool):
    return (d for d in split_docs(path, every, heldout) if d["meta"].get(source_field, "all") == name)


SPLITS = ((False, "pack", "packed"), (True, "pack_heldout", "packed-heldout"))  # (held out, report key, dir)


def _pack_splits(cfg: PrepareConfig, corpus: str) -> dict:
    """Pack training documents into `out/packed/` and held-out ones into `out/packed-heldout/`
    (same tokenizer and seq_len). Returns report entries: per-source counts under "pack" and
    "pack_heldout", the two directories under "packed_dirs"."""
    from hibari.data.pack import pack_corpus
    model = os.path.join(cfg.out, "tokenizer.model")
    names: dict[bool, set] = {False: set(), True: set()}
    for d in read_docs(corpus):
        names[is_heldout(d["id"], cfg.heldout_every)].add(d["meta"].get(cfg.source_field, "all"))
    report: dict = {"packed_dirs": {}}
    for heldout, key, sub in SPLITS:
        if not names[heldout]:
            continue  # a corpus too small to hold anything out
        sources = {n: _docs_of_source(corpus, cfg.source_field, n, cfg.heldout_every, heldout)
                   for n in sorted(names[heldout])}
        split = f"crc32(id) % {cfg.heldout_every} {'==' if heldout else '!='} 0"
        out_dir = os.path.join(cfg.out, sub)
        manifest = pack_corpus(sources, model, out_dir, cfg.seq_len, cfg.pack_method, split=split)
        report[key] = {n: {k: v for k, v in e.items() if k != "shards"} for n, e in manifest["sources"].items()}
        report["packed_dirs"]["heldout" if heldout else "train"] = out_dir
    return report


def prepare(cfg: PrepareConfig) -> dict:
    from tqdm import tqdm
    if cfg.heldout_every < 2:
        raise ValueError(f"PrepareConfig.heldout_every={cfg.heldout_every}: must be >= 2 "
                         "(one document in heldout_every is held out)")
    if cfg.seq_len and not cfg.tokenizer_vocab_size:
        raise ValueError("PrepareConfig.seq_len is set but tokenizer_vocab_size is not: packing uses the "
                         "tokenizer that prepare trains, so set both")
    paths = expand_paths(cfg.inputs)
    words = []
    if cfg.wordlist:
        with open(cfg.wordlist, encoding="utf-8") as f:
            words = [w.strip() for w in f if w.strip() and not w.startswith("#")]
    os.makedirs(os.path.join(cfg.out, "filtered"), exist_ok=True)
    shard_stats = []
    for i, path in enumerate(tqdm(paths, desc="clean+filter", unit="shard")):
        name = os.path.basename(path).split(".")[0]
        shard_stats.append(_filter_shard(path, os.path.join(cfg.out, "filtered", f"{i:05d}-{name}.jsonl.gz"), cfg, words))

    filtered = [os.path.join(cfg.out, "filtered", f"{i:05d}-{os.path.basename(p).split('.')[0]}.jsonl.gz")
                for i, p in enumerate(paths)]
    corpus = os.path.join(cfg.out, "corpus.jsonl.gz")
    dedup = dedup_files(filtered, corpus, cfg.dedup, work_dir=os.path.join(cfg.out, "dedup-work"),
                        processes=cfg.processes)
    report = {"config": {**asdict(cfg), "dedup": cfg.dedup.describe()}, "shards": shard_stats, "dedup": dedup,
              "totals": _totals(shard_stats, dedup)}

    if cfg.tokenizer_vocab_size:
        from hibari.data.tokenizer import load_tokenizer, tokenizer_report, train_tokenizer
        model = os.path.join(cfg.out, "tokenizer.model")
        train = split_docs(corpus, cfg.heldout_every, heldout=False)
        if os.path.exists(model):  # finished by an earlier run
            sp = load_tokenizer(model)
        else:
            sp = train_tokenizer(train, model, vocab_size=cfg.tokenizer_vocab_size,
                                 model_type=cfg.tokenizer_model_type,
                                 character_coverage=cfg.tokenizer_character_coverage)
        report["tokenizer"] = {"path": model, "heldout": tokenizer_report(
            sp, (d["text"] for d in split_docs(corpus, cfg.heldout_every, heldout=True)))}
    if cfg.seq_len:
        report.update(_pack_splits(cfg, corpus))

    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    with open(os.path.join(cfg.out, "summary.txt"), "w") as f:
        f.write(summary(report))
    return report


def _totals(shard_stats: list[dict], dedup: dict) -> dict:
    dropped: dict[str, dict] = {}
    for s in shard_stats:
        for reason, d in s["filter"]["dropped"].items():
            agg = dropped.setdefault(reason, {"docs": 0, "chars": 0})
            agg["docs"] += d["docs"]
            agg["chars"] += d["chars"]
    return {"read_docs": sum(s["read"]["docs"] for s in shard_stats),
            "read_chars": sum(s["read"]["chars"] for s in shard_stats),
            "bad_records": sum(s["read"]["bad"] for s in shard_stats),
            "bad_examples": [e for s in shard_stats for e in s["read"]["bad_examples"]][:20],
            "filtered_docs": sum(s["filter"]["docs_out"] for s in shard_stats),
            "filtered_chars": sum(s["filter"]["chars_out"] for s in shard_stats),
            "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1]["docs"])),
            "dedup_docs_out": dedup["docs_out"], "exact_removed": dedup["exact_removed"],
            "near_removed": dedup["near_removed"], "near_clusters": dedup["near_clusters"]}


def summary(report: dict) -> str:
    t = report["totals"]
    lines = [f"read       {t['read_docs']:>8} docs {t['read_chars']:>12} chars  ({t['bad_records']} bad records skipped)",
             f"filtered   {t['filtered_docs']:>8} docs {t['filtered_chars']:>12} chars"]
    lines += [f"  - {reason:<40} {d['docs']:>6} docs {d['chars']:>10} chars" for reason, d in t["dropped"].items()]
    d = report["dedup"]
    lines.append(f"dedup      {t['dedup_docs_out']:>8} docs  (exact -{t['exact_removed']}, near -{t['near_removed']} "
                 f"in {t['near_clusters']} clusters; b={d['config']['bands']} r={d['config']['rows']}, "
                 f"implied threshold {d['config']['implied_threshold']})")
    if "tokenizer" in report:
        h = report["tokenizer"]["heldout"]
        lines.append(f"tokenizer  vocab {h['vocab_size']}, held-out chars/token {h['chars_per_token']}, "
                     f"byte fallback {h['byte_fallback_share']:.2%}, CJK coverage {h['cjk_coverage']:.2%}")
    for _, key, sub in SPLITS:
        for name, e in report.get(key, {}).items():
            lines.append(f"{sub:<14} {name:<6} {e['docs']:>7} docs {e['tokens']:>10} tokens {e['rows']:>7} rows  "
                         f"padding {e['padding'] / max(1, e['rows'] * e['seq_len']):.2%}  "
                         f"chars/token {e['chars_per_token']}")
    return "\n".join(lines) + "\n"
