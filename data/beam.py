"""`hibari data prepare --runner beam`: the pipeline's stages as Apache Beam transforms.

The same stages, settings (`PrepareConfig`) and rules as the local run (data/pipeline.py), as two
Beam pipelines that run on the DirectRunner here and on Dataflow, Flink or Spark at scale
(docs/beam.md). On the same inputs and config the kept documents, the tokenizer file and the
packed shards equal a `--runner local` run's byte for byte (tests/test_data_beam.py).

First pipeline (`build_corpus`):
    files ─ read (one file per task; a document's position is (input shard, record))
          ─ reshuffle ─ clean + rule filters per document (a Beam counter per drop reason;
            per-shard FilterStats by a group)
          ─ MinHash signature + LSH band keys per document (batched)
          ─ group by band key; buckets of two or more fetch their members' signatures (a join by
            position) and verify candidate pairs with the local rule (`dedup.bucket_edges`)
          ─ connected components: union-find on ONE worker over the verified edges (only near
            duplicates make edges, ~0.4 KB each there)
          ─ exact duplicates grouped by normalised-text digest: the first document (input order)
            that near dedup kept stays, as in `dedup.dedup_files`
          ─ corpus/ (one part per input shard, in input order) + the removed-id logs
          ─ tokenizer: the bounded sample `tokenizer_sample` (a distributed top-k by
            `sample_key`), trained by SentencePiece on one worker
Second pipeline (`build_pack`), once the tokenizer file exists (each worker loads it: no side
input, which the bundle-based DirectRunner mishandles after a retried bundle):
    corpus parts ─ read ─ tokenize ─ packing plan per (split, source) on one worker from the
          lengths alone (`pack.plan_placements`; 16 bytes per document held) ─ token pieces
          grouped by output shard ─ shards written by the workers (`pack.rows_from_placements`)

Positions order everything that the local run does in input order: (index of the input file,
index of the record in it), and tuples sort as the local run reads. Workers write under
`OUT/.beam-staging/` through temporary names (a retried bundle rewrites the same bytes); the
driver reads the small per-stage results the pipelines write there, checks them, writes the
manifests and report, and moves corpus/, tokenizer.model, packed/ and packed-heldout/ into
place only when everything succeeded. A Beam run redoes every stage (no stage reuse; the runner
retries failed bundles itself).

Inputs and OUT must be paths every worker can open (a shared filesystem: NFS, Filestore, a
bucket through gcsfuse); the quality stage (model-based filters) runs only locally.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time
from dataclasses import asdict
from typing import Any, Iterable

import numpy as np

from hibari.base.errors import UsageError, UserError

try:
    import apache_beam as beam
    from apache_beam.metrics import Metrics
except ImportError:
    raise UsageError('--runner beam needs Apache Beam: pip install "hibari[beam]"') from None

from hibari.data.clean import clean_text
from hibari.data.dedup import (
    MinHasher,
    NearDedupConfig,
    UnionFind,
    band_keys,
    bucket_edges,
    normalized_digest,
)
from hibari.data.filters import FilterStats, default_filters, first_reason
from hibari.data.pack import (
    BEST_FIT_BUFFER,
    ROWS_PER_SHARD,
    new_manifest,
    plan_placements,
    rows_from_placements,
    save_array,
    shard_name,
    source_entry,
    with_bos_eos,
    write_manifest,
)
from hibari.data.sources import SourceStats, read_docs, write_jsonl
from hibari.data.stages import SPLITS, PrepareError, is_heldout, totals, train_tokenizer_on
from hibari.data.tokenizer import report_counts, report_from_counts, sample_key, vocab_characters

STAGING = ".beam-staging"
RESULTS = "_results"




def pipeline_options(cfg) -> list[str]:
    """Beam flags: `cfg.beam_options`, and without a --runner among them the DirectRunner in
    multi-process mode with `cfg.processes` workers."""
    flags = list(cfg.beam_options)
    if not any(f.startswith("--runner") for f in flags):
        flags += ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                  f"--direct_num_workers={max(1, cfg.processes)}"]
    return flags


# ------------------------------------------------------------------ stage functions (run on workers)
# DoFns with tagged outputs declare Any: Beam would infer their type from what the generator yields,
# and a tagged output beside the main one then fails the next GroupByKey's construction-time check.
@beam.typehints.with_output_types(Any)
class ReadFile(beam.DoFn):
    """(shard, path) -> ((shard, record), doc); per-file SourceStats and a read error (a one-line
    message) go to the "read" / "error" outputs."""

    def __init__(self, cfg, text_field: str | None = None, counters: str = "hibari.read"):
        super().__init__()
        self.text_field, self.strict = text_field or cfg.text_field, cfg.strict
        self.counters = counters

    def process(self, item):
        shard, path = item
        src = SourceStats()
        try:
            for j, doc in enumerate(read_docs(path, text_field=self.text_field, stats=src, strict=self.strict,
                                              nonempty=True)):
                yield (shard, j), doc
        except UserError as e:
            yield beam.pvalue.TaggedOutput("error", (shard, str(e)))
        Metrics.counter(self.counters, "docs").inc(src.docs)
        Metrics.counter(self.counters, "bad_records").inc(src.bad)
        yield beam.pvalue.TaggedOutput("read", (shard, asdict(src)))


@beam.typehints.with_output_types(Any)
class CleanFilter(beam.DoFn):
    """Clean a document (dropped when nothing is left, as `clean_docs`), then the rule filters:
    the kept document, and a (shard, (record, id, reason, chars, lang)) decision for the stats."""

    def __init__(self, cfg, words: list[str]):
        super().__init__()
        self.html, self.languages, self.words = cfg.html, tuple(cfg.languages), list(words)

    def setup(self):
        self.filters = default_filters(self.languages, self.words)

    def process(self, item):
        (shard, j), doc = item
        text = clean_text(doc["text"], self.html)
        if not text:
            return
        doc = {**doc, "text": text, "meta": dict(doc.get("meta", {}))}
        reason = first_reason(doc, self.filters)
        Metrics.counter("hibari.filter", reason or "kept").inc()
        yield beam.pvalue.TaggedOutput("decision", (shard, (j, doc["id"], reason, len(text),
                                                            doc["meta"].get("lang", "?"))))
        if reason is None:
            yield (shard, j), doc


def filter_report(decisions: Iterable[tuple]) -> dict:
    """`FilterStats.report()` of one shard from its decisions in any order, counted in record
    order as the local stream counts them (examples: the first five ids; languages in order of
    first kept document)."""
    stats = FilterStats()
    for _, doc_id, reason, chars, lang in sorted(decisions, key=lambda d: d[0]):
        stats.count(doc_id, reason, chars, lang)
    return stats.report()


@beam.typehints.with_output_types(Any)
class Signatures(beam.DoFn):
    """A batch of (position, doc) -> ((band, key), position) for every band, and the signature
    (uint32 bytes) to the "sig" output."""

    def __init__(self, config: NearDedupConfig):
        super().__init__()
        self.config = config

    def setup(self):
        c = self.config
        self.hasher = MinHasher(c.num_perm, c.ngram, c.unit, c.seed)

    def process(self, batch):
        c = self.config
        sigs = np.stack([self.hasher.signature(doc["text"]) for _, doc in batch])
        for band in range(c.bands):
            keys = band_keys(sigs, band, c.rows)
            for (pos, _), key in zip(batch, keys):
                yield (band, int(key)), pos
        for (pos, _), sig in zip(batch, sigs):
            yield beam.pvalue.TaggedOutput("sig", (pos, sig.tobytes()))


def bucket_members(item):
    """A band bucket of two or more -> (position, bucket) for each member."""
    bucket, positions = item
    positions = list(positions)
    if len(positions) > 1:
        for pos in positions:
            yield pos, bucket


def with_signature(item):
    """(position, {"sig": [bytes], "bucket": [...]}) -> (bucket, (position, signature)) per bucket."""
    pos, joined = item
    sig = joined["sig"][0] if joined["sig"] else None
    for bucket in joined["bucket"]:
        yield bucket, (pos, sig)


def verified_edges(item, min_similarity: float | None):
    _, members = item
    members = sorted(members)
    edges = bucket_edges([p for p, _ in members], [np.frombuffer(s, np.uint32) for _, s in members], min_similarity)
    Metrics.counter("hibari.dedup", "candidate_buckets").inc()
    Metrics.counter("hibari.dedup", "candidate_members").inc(len(members))
    Metrics.counter("hibari.dedup", "verified_edges").inc(len(edges))
    return edges


def components(edges: list[tuple]):
    """Union-find over the verified edges (one worker): (position, root) for every document
    whose cluster keeps an earlier one, the root being the cluster's first position."""
    nodes = sorted({p for e in edges for p in e})
    index = {p: i for i, p in enumerate(nodes)}
    uf = UnionFind(len(nodes))  # the smaller index becomes the root: the cluster's first document
    for a, b in edges:
        uf.union(index[a], index[b])
    for i, p in enumerate(nodes):
        root = uf.find(i)
        if root != i:
            yield p, nodes[root]


def root_ids(item):
    """(root, {"ref": [positions], "id": [id]}) -> (position, (root, root id))."""
    root, joined = item
    for pos in joined["ref"]:
        yield pos, (root, joined["id"][0])


def by_digest(item):
    """(position, {"info": [(digest, id)], "near": [(root, root id)]}) -> (digest, (position, id, near))."""
    pos, joined = item
    for digest, doc_id in joined["info"]:
        yield digest, (pos, doc_id, joined["near"][0] if joined["near"] else None)


def exact_decisions(item):
    """The documents of one normalised-text digest -> (position, (kept id, reason)) for each
    removed one, by `dedup_files`' streaming rule: the first document near dedup left is kept and
    the later ones are exact duplicates of it; a near-removed document counts as "exact" when its
    cluster's first document is that same kept one."""
    _, members = item
    members = sorted(members, key=lambda m: m[0])
    first = next(((pos, doc_id) for pos, doc_id, near in members if near is None), None)
    for pos, doc_id, near in members:
        if near is None:
            if pos != first[0]:
                yield pos, (first[1], "exact")
        else:
            root, root_id = near
            seen = first is not None and first[0] < pos and first[1] == root_id
            yield pos, (root_id, "exact" if seen else "near")


class WriteCorpusPart(beam.DoFn):
    """(shard, {"kept": [(record, doc)], "removed": [(record, entry)]}) -> the shard's corpus part
    and removed-id log, in record order; (shard, counts)."""

    def __init__(self, staging: str, names: list[str]):
        super().__init__()
        self.staging, self.names = staging, names

    def process(self, item):
        shard, joined = item
        name = os.path.join(self.staging, "corpus", self.names[shard])
        kept = [doc for _, doc in sorted(joined["kept"], key=lambda t: t[0])]
        removed = [entry for _, entry in sorted(joined["removed"], key=lambda t: t[0])]
        if kept:
            write_jsonl(name + ".jsonl.gz", kept)
        if removed:
            tmp = name + ".removed.jsonl.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in removed)
            os.replace(tmp, name + ".removed.jsonl")
        counts = {"kept": len(kept), "exact": sum(e["reason"] == "exact" for e in removed),
                  "near": sum(e["reason"] == "near" for e in removed)}
        yield shard, counts


@beam.typehints.with_output_types(Any)
class TrainTokenizer(beam.DoFn):
    """The tokenizer sample (one list) -> the model file, trained on this worker; a failure (e.g.
    a vocabulary too large for the text) is an "error" output."""

    def __init__(self, cfg, model_path: str):
        super().__init__()
        self.cfg, self.model_path = cfg, model_path

    def process(self, sample):
        sample = [doc for _, _, doc in sorted(sample, key=lambda t: t[1])]  # input order
        try:
            if not sample:  # the driver words this with the run's totals
                raise UserError("")
            train_tokenizer_on(self.cfg, sample, "corpus/", self.model_path, {})
        except UserError as e:
            yield beam.pvalue.TaggedOutput("error", (-1, str(e)))
            return
        yield self.model_path


@beam.typehints.with_output_types(Any)
class Tokenize(beam.DoFn):
    """A batch of (position, (held out, source, text)) -> (position, (held out, source, token
    ids as int32 with BOS/EOS)); counts per (held out, source) and the held-out tokenizer-report
    counts to the "counts" / "heldout" outputs."""

    def __init__(self, model_path: str):
        super().__init__()
        self.model_path = model_path

    def setup(self):
        from hibari.data.tokenizer import load_tokenizer
        self.sp = load_tokenizer(self.model_path)
        self.vocab_chars = vocab_characters(self.sp)

    def process(self, batch):
        encoded = self.sp.encode([text for _, (_, _, text) in batch])
        for (pos, (heldout, source, text)), ids in zip(batch, encoded):
            tokens = with_bos_eos(ids, self.sp.bos_id(), self.sp.eos_id())
            yield pos, (heldout, source, tokens)
            yield beam.pvalue.TaggedOutput("counts", ((heldout, source), (1, len(text), len(tokens))))
            if heldout:
                yield beam.pvalue.TaggedOutput("heldout", report_counts(self.sp, self.vocab_chars, text))


def plan_source(item, seq_len: int, method: str):
    """((split, source), [(position, length)]) -> (position, placements) for every document, in
    input order (`pack.plan_placements`; global row numbers). Holds 16 bytes per document (the
    positions and lengths as one numpy record array) beside the streamed plan."""
    _, members = item
    docs = np.fromiter(((pos[0], pos[1], n) for pos, n in members),
                       dtype=[("file", np.int32), ("record", np.int64), ("length", np.int32)])
    docs = docs[np.lexsort((docs["record"], docs["file"]))]
    for d, placements in plan_placements(docs["length"], seq_len, method, BEST_FIT_BUFFER):
        yield (int(docs["file"][d]), int(docs["record"][d])), placements


def pieces(item):
    """(position, {"tokens": [(split, source, tokens)], "plan": [placements]}) ->
    ((split, source, output shard), (row in shard, column, segment, token piece))."""
    _, joined = item
    heldout, source, tokens = joined["tokens"][0]
    for row, col, seg, start, n in joined["plan"][0]:
        yield (heldout, source, row // ROWS_PER_SHARD), (row % ROWS_PER_SHARD, col, seg, tokens[start:start + n])


class WriteShard(beam.DoFn):
    def __init__(self, staging: str, seq_len: int, pad_id: int):
        super().__init__()
        self.staging, self.seq_len, self.pad_id = staging, seq_len, pad_id

    def process(self, item):
        (heldout, source, k), parts = item
        parts = list(parts)
        n_rows = max(p[0] for p in parts) + 1
        name = shard_name(source, k)
        directory = os.path.join(self.staging, "packed-heldout" if heldout else "packed")
        os.makedirs(directory, exist_ok=True)
        save_array(os.path.join(directory, name), rows_from_placements(parts, n_rows, self.seq_len, self.pad_id))
        yield (heldout, source), {"path": name, "rows": n_rows}


def _sum(rows):
    rows = list(rows)
    return tuple(int(sum(c)) for c in zip(*rows)) if rows else ()


# ------------------------------------------------------------------ the pipeline
class NearDuplicates(beam.PTransform):
    """(position, doc) -> (position, root) for every document whose near-duplicate cluster keeps
    an earlier one (its first position): `dedup.near_duplicates`' answer, distributed."""

    def __init__(self, config: NearDedupConfig):
        super().__init__()
        self.config = config.resolved()

    def expand(self, docs):
        c = self.config
        bands = (docs | "batch for minhash" >> beam.BatchElements(min_batch_size=32, max_batch_size=256)
                 | "minhash" >> beam.ParDo(Signatures(c)).with_outputs("sig", main="bands"))
        members = bands.bands | "band buckets" >> beam.GroupByKey() | "candidates" >> beam.FlatMap(bucket_members)
        edges = ({"sig": bands.sig, "bucket": members} | "fetch signatures" >> beam.CoGroupByKey()
                 | "to buckets" >> beam.FlatMap(with_signature) | "by bucket" >> beam.GroupByKey()
                 | "verify" >> beam.FlatMap(verified_edges, c.threshold if c.verify else None))
        return edges | "all edges" >> beam.combiners.ToList() | "union-find" >> beam.FlatMap(components)


def _result(pcoll, staging: str, name: str):
    """Write a (small) per-stage result as JSON lines to `staging/_results/<name>.jsonl`."""
    (pcoll | f"{name} as json" >> beam.Map(lambda x: json.dumps(x, ensure_ascii=False))
     | f"{name} to results" >> beam.io.WriteToText(os.path.join(staging, RESULTS, name), file_name_suffix=".jsonl",
                                               shard_name_template=""))


def build_corpus(p, cfg, paths: list[str], words: list[str], staging: str):
    """The first pipeline: read, clean, filter, near and exact dedup, the corpus parts, and the
    tokenizer (sample and training) when `cfg` trains one."""
    dedup = cfg.dedup.resolved()

    def result(pcoll, name):
        _result(pcoll, staging, name)

    read = (p | "files" >> beam.Create(list(enumerate(paths))) | "spread files" >> beam.Reshuffle()
            | "read" >> beam.ParDo(ReadFile(cfg)).with_outputs("read", "error", main="docs"))
    result(read.read, "read")
    result(read.error, "errors")
    filtered = (read.docs | "spread docs" >> beam.Reshuffle()
                | "clean+filter" >> beam.ParDo(CleanFilter(cfg, words)).with_outputs("decision", main="kept"))
    result(filtered.decision | "by shard" >> beam.GroupByKey()
           | "filter stats" >> beam.MapTuple(lambda shard, ds: (shard, filter_report(ds))), "filter")
    kept = filtered.kept

    near = kept | "near duplicates" >> NearDuplicates(dedup)
    result(near | "roots" >> beam.Values() | "distinct roots" >> beam.Distinct()
           | "count roots" >> beam.combiners.Count.Globally(), "near_clusters")
    info = kept | "digest" >> beam.MapTuple(lambda pos, doc: (pos, (normalized_digest(doc["text"]).hex(), doc["id"])))
    near_ids = ({"ref": near | "by root" >> beam.MapTuple(lambda pos, root: (root, pos)),
                 "id": info | "ids" >> beam.MapTuple(lambda pos, i: (pos, i[1]))}
                | "root ids" >> beam.CoGroupByKey() | "near with ids" >> beam.FlatMap(root_ids))
    removed = ({"info": info, "near": near_ids} | "join near" >> beam.CoGroupByKey()
               | "to digests" >> beam.FlatMap(by_digest) | "by digest" >> beam.GroupByKey()
               | "exact" >> beam.FlatMap(exact_decisions))

    def split_kept(pos, joined):
        if joined["removed"]:
            kept_id, reason = joined["removed"][0]
            doc = joined["doc"][0]
            yield beam.pvalue.TaggedOutput("removed", (pos[0], (pos[1], {"id": doc["id"], "kept_id": kept_id,
                                                                          "reason": reason})))
        else:
            for doc in joined["doc"]:
                yield pos, doc

    decided = ({"doc": kept, "removed": removed} | "join decisions" >> beam.CoGroupByKey()
               | "apply dedup" >> beam.FlatMapTuple(split_kept).with_outputs("removed", main="corpus"))
    corpus = decided.corpus
    names = [f"{i:05d}-{os.path.basename(p).split('.')[0]}" for i, p in enumerate(paths)]
    result({"kept": corpus | "by shard for corpus" >> beam.MapTuple(lambda pos, doc: (pos[0], (pos[1], doc))),
            "removed": decided.removed} | "corpus parts" >> beam.CoGroupByKey()
           | "write corpus" >> beam.ParDo(WriteCorpusPart(staging, names)), "corpus")
    if not cfg.tokenizer_vocab_size:
        return

    # tokenizer: the bounded sample, trained on one worker
    sample = (corpus | "training docs" >> beam.Filter(lambda kv: not is_heldout(kv[1]["id"], cfg.heldout_every))
              | "sample keys" >> beam.MapTuple(lambda pos, doc: (sample_key(doc["id"]), pos, doc))
              | "tokenizer sample" >> beam.combiners.Top.Smallest(cfg.tokenizer_sample_docs, key=lambda t: t[:2]))
    trained = sample | "train tokenizer" >> beam.ParDo(
        TrainTokenizer(cfg, os.path.join(staging, "tokenizer.model"))).with_outputs("error", main="model")
    result(trained.error, "tokenizer_errors")


def build_pack(p, cfg, parts: list[tuple[int, str]], staging: str):
    """The second pipeline, once the corpus parts and the tokenizer exist: tokenize (the model
    loaded by each worker from its file: no side input), the held-out tokenizer report, and with
    `cfg.seq_len` the packing plan and the shards. A document's position is (input shard, record
    in its corpus part), which orders as the first pipeline's positions."""

    def result(pcoll, name):
        _result(pcoll, staging, name)

    docs = (p | "corpus parts" >> beam.Create(parts) | "spread parts" >> beam.Reshuffle()
            | "read corpus" >> beam.ParDo(ReadFile(cfg, "text", "hibari.corpus")).with_outputs("read", "error", main="docs"))
    result(docs.error, "corpus_errors")
    tokenized = (docs.docs | "spread corpus" >> beam.Reshuffle()
                 | "texts" >> beam.MapTuple(lambda pos, doc: (pos, (is_heldout(doc["id"], cfg.heldout_every),
                                                                    doc["meta"].get(cfg.source_field, "all"),
                                                                    doc["text"])))
                 | "batch for tokenizer" >> beam.BatchElements(min_batch_size=32, max_batch_size=256)
                 | "tokenize" >> beam.ParDo(Tokenize(os.path.join(staging, "tokenizer.model")))
                 .with_outputs("counts", "heldout", main="tokens"))
    result(tokenized.counts | "sum counts" >> beam.CombinePerKey(_sum), "pack_counts")
    result(tokenized.heldout | "sum report" >> beam.CombineGlobally(_sum), "heldout_report")
    if not cfg.seq_len:
        return
    plan = (tokenized.tokens | "lengths" >> beam.MapTuple(lambda pos, t: ((t[0], t[1]), (pos, len(t[2]))))
            | "by source" >> beam.GroupByKey()
            | "plan rows" >> beam.FlatMap(plan_source, cfg.seq_len, cfg.pack_method))
    shards = ({"tokens": tokenized.tokens, "plan": plan} | "join plan" >> beam.CoGroupByKey()
              | "pieces" >> beam.FlatMap(pieces) | "by output shard" >> beam.GroupByKey()
              | "write shards" >> beam.ParDo(WriteShard(staging, cfg.seq_len, 0)))  # train_tokenizer's pad id
    result(shards, "shards")


# ------------------------------------------------------------------ driver
def _results(staging: str, name: str) -> list:
    path = os.path.join(staging, RESULTS, name + ".jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _metrics(result) -> dict:
    out = {}
    try:
        for c in result.metrics().query()["counters"]:
            key = f"{c.key.metric.namespace}.{c.key.metric.name}"
            value = c.committed if c.committed is not None else c.attempted
            out[key] = out.get(key, 0) + int(value)
    except Exception:  # a runner without metrics support
        return {}
    return dict(sorted(out.items()))


def _run(flags: list[str], build, *args):
    """Build one pipeline with `build(p, *args)`, run it to the end; its result (metrics)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    p = beam.Pipeline(options=PipelineOptions(flags))
    build(p, *args)
    result = p.run()
    result.wait_until_finish()
    return result


def _move_into_place(staging: str, out: str, name: str) -> None:
    src, dst = os.path.join(staging, name), os.path.join(out, name)
    if not os.path.exists(src):
        return
    if os.path.isdir(dst):
        old = os.path.join(out, f".beam-old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def prepare_beam(cfg, paths: list[str], words: list[str], pack_fingerprints: dict) -> dict:
    """Run `cfg`'s stages as Beam pipelines (module docstring) and move the outputs into place;
    returns the report (`data.pipeline.prepare` writes it): the local run's entries plus "runner"
    (options, Beam counters, wall time). `pack_fingerprints`: the packed directories' manifest
    fingerprints, as the local run plans them."""
    if cfg.pack_method not in ("greedy", "best_fit"):
        raise UsageError(f"PrepareConfig.pack_method={cfg.pack_method!r}: choose 'greedy' or 'best_fit'")
    out = cfg.out
    staging = os.path.join(out, STAGING)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "corpus"))
    flags = pipeline_options(cfg)
    start = time.time()
    first = _run(flags, build_corpus, cfg, paths, words, staging)

    errors = sorted(_results(staging, "errors"))
    if errors:
        raise PrepareError(errors[0][1])
    read = dict((i, s) for i, s in _results(staging, "read"))
    filt = dict((i, r) for i, r in _results(staging, "filter"))
    empty = {"docs_in": 0, "chars_in": 0, "docs_out": 0, "chars_out": 0, "languages_kept": {}, "dropped": {}}
    shard_stats = [{"input": path, "read": read[i], "filter": filt.get(i, empty)} for i, path in enumerate(paths)]
    parts = dict((i, c) for i, c in _results(staging, "corpus"))
    clusters = _results(staging, "near_clusters")
    dedup = {"docs_in": sum(s["filter"]["docs_out"] for s in shard_stats),
             "docs_out": sum(c["kept"] for c in parts.values()),
             "near_removed": sum(c["near"] for c in parts.values()),
             "exact_removed": sum(c["exact"] for c in parts.values()),
             "near_clusters": clusters[0] if clusters else 0,
             "bytes_per_doc_signatures": 4 * cfg.dedup.num_perm, "config": cfg.dedup.describe()}
    report = {"config": {**asdict(cfg), "dedup": cfg.dedup.describe()}, "shards": shard_stats, "dedup": dedup,
              "totals": totals(shard_stats, dedup), "corpus": "corpus/*.jsonl.gz"}

    moved, results = ["corpus"], [first]
    if cfg.tokenizer_vocab_size:
        from hibari.data.tokenizer import load_tokenizer
        for _, message in _results(staging, "tokenizer_errors"):
            if not message:  # nothing to train on: the local run's message, with these totals
                train_tokenizer_on(cfg, [], os.path.join(out, "corpus/"), "", report["totals"])
            raise PrepareError(message)
        corpus_parts = sorted((int(os.path.basename(f)[:5]), f)
                              for f in glob.glob(os.path.join(staging, "corpus", "*.jsonl.gz")))
        results.append(_run(flags, build_pack, cfg, corpus_parts, staging))
        errors = sorted(_results(staging, "corpus_errors"))
        if errors:
            raise PrepareError(errors[0][1])
        staged_model, model = os.path.join(staging, "tokenizer.model"), os.path.join(out, "tokenizer.model")
        sp = load_tokenizer(staged_model)
        held = _results(staging, "heldout_report")
        report["tokenizer"] = {"path": model, "heldout": report_from_counts(sp, held[0] if held and held[0] else
                                                                            [0] * 6)}
        moved.insert(0, "tokenizer.model")
    if cfg.seq_len:
        counts = {(h, s): c for (h, s), c in _results(staging, "pack_counts")}
        shards: dict = {}
        for (h, s), shard in _results(staging, "shards"):
            shards.setdefault((h, s), []).append(shard)
        report["packed_dirs"] = {}
        for heldout, key, sub in SPLITS:
            names = sorted(s for h, s in counts if h == heldout)
            if not names:
                continue
            split = f"crc32(id) % {cfg.heldout_every} {'==' if heldout else '!='} 0"
            manifest, done_key = new_manifest(staged_model, sp, cfg.seq_len, cfg.pack_method, split,
                                              pack_fingerprints[key])
            manifest["tokenizer"]["path"] = os.path.abspath(model)  # where it is moved below
            for name in names:
                docs, chars, tokens = counts[(heldout, name)]
                manifest["sources"][name] = source_entry(
                    {"docs": docs, "chars": chars, "tokens": tokens},
                    sorted(shards.get((heldout, name), []), key=lambda s: s["path"]), cfg.seq_len, done_key)
            write_manifest(os.path.join(staging, sub), manifest)
            report[key] = {n: {k: v for k, v in e.items() if k not in ("shards", "fingerprint")}
                           for n, e in manifest["sources"].items()}
            report["packed_dirs"]["heldout" if heldout else "train"] = os.path.join(out, sub)
            moved.append(sub)
    for name in moved:
        _move_into_place(staging, out, name)
    metrics: dict = {}
    for result in results:
        for k, v in _metrics(result).items():
            metrics[k] = metrics.get(k, 0) + v
    report["runner"] = {"name": "beam", "options": flags, "pipelines": len(results),
                        "wall_s": round(time.time() - start, 1), "metrics": dict(sorted(metrics.items()))}
    shutil.rmtree(staging, ignore_errors=True)
    return report
