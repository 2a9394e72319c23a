"""End to end: sources -> clean -> filter (per input shard) -> [quality] -> dedup -> [tokenizer] -> [pack].

Writes under `out/`: `filtered/<shard>.jsonl.gz` (+ `.stats.json`), with the optional model-based
quality stage (`quality_classifier*` / `perplexity_*` fields, data/quality.py; the perplexity filter scores
with the language model the caller passes as `prepare(cfg, perplexity_scorer=...)`) `quality/<shard>.jsonl.gz`
(+ `quality/stage.json`, `quality/classifier.npz` when trained in-process), `corpus.jsonl.gz` (deduplicated,
with `corpus.jsonl.gz.removed.jsonl`), optionally `tokenizer.model`, `packed/` (training documents)
and `packed-heldout/` (held-out documents), and `report.json` + `summary.txt`.

`runner="beam"` (`hibari data prepare --runner beam`) runs the same stages as Apache Beam pipelines
instead (data/beam.py: the same kept documents, tokenizer and packed shards, byte for byte).

One document in `heldout_every` (by crc32 of its id, so the split is stable across runs and inputs)
is held out: the tokenizer is trained without it, its report is measured on it, and it is packed
only into `packed-heldout/`, never into the training rows.

Stages keyed by content. Each stage's output records a fingerprint of what shaped it (beside it:
`<shard>.stats.json`, `corpus.jsonl.gz.stage.json`, `tokenizer.model.stage.json`, the packed
`manifest.json`), and the fingerprints chain:

    filter shard i   input file i (path + size + mtime_ns, or a content hash) + text_field, html,
                     languages, word list content
    quality          (optional) every filter shard's fingerprint + the classifier (model file, or
                     its reference / other inputs and seed) and threshold + the perplexity
                     checkpoint's files, tokenizer, keep share and max_tokens
    dedup / corpus   every filter (or quality) shard's fingerprint + the dedup config
    tokenizer        corpus + vocab size, model type, character coverage, heldout_every
    pack (per dir)   tokenizer + corpus + seq_len, method, source_field, heldout_every

each with its stage's version (`STAGE_VERSIONS`, raised when a stage's code changes its output).
A stage whose fingerprint matches (and whose output is the file it wrote) is reused; one that
differs is redone, and with it everything downstream; `resume_only=True` fails instead, naming
the stage, the output and the difference. Outputs are replaced atomically (a temporary name,
then a rename; packed directories swap in whole, see data.pack), so an interrupted run loses
nothing and a restart redoes no finished shard. The whole run holds an exclusive lock on `out/`.
`report.json["stages"]` records every fingerprint and whether the stage was reused, new or rerun.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from hibari.base.errors import UsageError
from hibari.base.files import json_digest
from hibari.base.progress import progress_bar
from hibari.base.runlock import DirLock
from hibari.data.clean import clean_docs
from hibari.data.dedup import NearDedupConfig, dedup_files
from hibari.data.filters import FilterStats, default_filters, filter_docs
from hibari.data.quality import (
    ClassifierConfig,
    PerplexityScoring,
    QualityClassifier,
    percentile_keep,
    plant_noise,
    train_classifier,
)
from hibari.data.sources import BadInput, Doc, SourceStats, expand_paths, read_docs, write_jsonl
from hibari.data.stages import (  # noqa: F401 (is_heldout, split_docs, sentencepiece_message: imported from here too)
    SPLITS,
    PrepareError,
    is_heldout,
    sentencepiece_message,
    split_docs,
    totals,
    train_tokenizer_on,
)

# Raise a stage's version when its code changes what it writes: outputs of the old code are redone.
STAGE_VERSIONS = {"filter": 1, "quality": 1, "dedup": 1, "tokenizer": 1, "pack": 1}
FINGERPRINT_MODES = ("stat", "content")
RUNNERS = ("local", "beam")


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
    tokenizer_sample_docs: int = 200_000  # trained on at most this many documents (tokenizer_sample)
    seq_len: int | None = None           # pack when set
    pack_method: str = "greedy"
    source_field: str = "lang"           # meta field that names a document's source for packing
    heldout_every: int = 20              # hold out documents with crc32(id) % heldout_every == 0
    resume_only: bool = False            # a stage whose recorded inputs differ is an error, not redone
    input_fingerprint: str = "stat"      # "stat": path + size + mtime_ns; "content": + blake2b of the bytes
    # Model-based quality stage (data/quality.py), after the rule filters, before dedup; off unless set.
    quality_classifier: str | None = None               # a QualityClassifier .npz (hashed n-gram logistic regression)
    quality_classifier_reference: list[str] | None = None  # or train one in-process: reference globs (label 1)
    quality_classifier_other: list[str] | None = None   # "other" globs (label 0); unset: planted noise of the reference
    quality_classifier_threshold: float = 0.5           # drop documents with P(reference) < threshold
    quality_classifier_seed: int = 0                     # training order and the planted noise
    perplexity_checkpoint: str | None = None            # a hibari checkpoint (run dir, step dir, params export)
    perplexity_tokenizer: str | None = None             # its SentencePiece model (default: the run's tokenizer record)
    perplexity_keep: float = 0.8                         # share kept per language: lowest bits/byte first
    perplexity_max_tokens: int = 256                     # each document scored on its first tokens
    # Where the stages run: "local" (worker processes on this machine, resumable stage by stage) or
    # "beam" (Apache Beam transforms, data/beam.py: the same outputs; `pip install "hibari[beam]"`).
    runner: str = "local"
    beam_options: tuple[str, ...] = ()  # Beam pipeline flags, e.g. ("--runner=FlinkRunner", ...)


class StageChanged(PrepareError):
    """`resume_only` and a stage's output was made from other inputs or settings."""


# ------------------------------------------------------------------ fingerprints
def file_fingerprint(path: str, mode: str = "stat") -> dict:
    """What identifies an input file's version: absolute path, size and mtime_ns, and with
    mode "content" a blake2b hash of the bytes too (a full read)."""
    st = os.stat(path)
    fp = {"abspath": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if mode == "content":
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        fp["blake2b"] = h.hexdigest()
    return fp


def same_file(old: dict, new: dict, mode: str) -> bool:
    """Is the input `new` the version recorded as `old`? Path and size must agree; then, in
    "content" mode, the hash (a touched but unchanged file is the same), or the mtime where the
    record has no hash; in "stat" mode the mtime."""
    if old.get("abspath") != new["abspath"] or old.get("size") != new["size"]:
        return False
    if mode == "content" and "blake2b" in old:
        return old["blake2b"] == new["blake2b"]
    return old.get("mtime_ns") == new["mtime_ns"]


def same_fingerprint(old: dict | None, new: dict, mode: str) -> bool:
    """`new` (planned) matches the recorded `old`: the same digest, or the same stage, version,
    settings and upstream outputs with inputs that `same_file` accepts (a change of
    fingerprint mode, or a touched file in "content" mode, redoes nothing)."""
    if not isinstance(old, dict) or "digest" not in old:
        return False
    if old["digest"] == new["digest"]:
        return True
    oi = old.get("inputs") or {}
    return (all(old.get(k) == new[k] for k in ("stage", "version", "params", "upstream"))
            and oi.keys() == new["inputs"].keys()
            and all(isinstance(oi[p], dict) and same_file(oi[p], f, mode) for p, f in new["inputs"].items()))


def output_stat(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def stage_fingerprint(stage: str, inputs: dict | None = None, params: dict | None = None,
                      upstream: dict | None = None) -> dict:
    """{stage, version, inputs: {path: file fingerprint}, params, upstream: {stage: digest},
    digest}: the digest (sha256 of the rest) is what downstream stages chain on."""
    fp = {"stage": stage, "version": STAGE_VERSIONS[stage], "inputs": inputs or {},
          "params": params or {}, "upstream": upstream or {}}
    fp["digest"] = json_digest(fp)[:16]
    return fp


def _when(ns) -> str:
    if not isinstance(ns, int):
        return str(ns)
    return datetime.datetime.fromtimestamp(ns / 1e9).isoformat(timespec="milliseconds")


def _file_change(old: dict, new: dict) -> str:
    if old.get("size") != new.get("size"):
        return f"size {old.get('size')} -> {new.get('size')}"
    if "blake2b" in new and "blake2b" in old and old["blake2b"] != new["blake2b"]:
        return f"content blake2b {old['blake2b'][:12]} -> {new['blake2b'][:12]}"
    if old.get("abspath") != new.get("abspath"):
        return f"now at {new.get('abspath')} (was {old.get('abspath')})"
    if old.get("mtime_ns") != new.get("mtime_ns"):
        return f"modified: mtime {_when(old.get('mtime_ns'))} -> {_when(new.get('mtime_ns'))}"
    return "fingerprint differs"


def _value(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list, tuple)) or v is None else str(v)


def describe_change(old: dict | None, new: dict) -> str:
    """Why `new` differs from the recorded fingerprint `old`, e.g. "input raw/a.jsonl changed
    (size 1200 -> 1180)" or "tokenizer_vocab_size 1000 -> 600"."""
    if not isinstance(old, dict) or "digest" not in old:
        return "no fingerprint recorded (written by an older hibari or another command)"
    parts = []
    if old.get("version") != new["version"]:
        parts.append(f"{new['stage']} stage version {old.get('version')} -> {new['version']} (the code changed)")
    oi, ni = old.get("inputs", {}), new["inputs"]
    for path in ni:
        if path not in oi:
            gone = [p for p in oi if p not in ni]
            parts.append(f"input {path} is new" + (f" (was {', '.join(gone)})" if gone else ""))
        elif isinstance(oi[path], dict) and oi[path] != ni[path]:
            parts.append(f"input {path} changed ({_file_change(oi[path], ni[path])})")
    if not any(p not in oi for p in ni):
        parts += [f"input {p} is gone" for p in oi if p not in ni]
    op, np_ = old.get("params", {}), new["params"]
    parts += [f"{k} {_value(op.get(k))} -> {_value(np_.get(k))}"
              for k in sorted(set(op) | set(np_)) if op.get(k) != np_.get(k)]
    ou, nu = old.get("upstream", {}), new["upstream"]
    changed = [k for k in sorted(set(ou) | set(nu)) if ou.get(k) != nu.get(k)]
    if changed and len(changed) <= 3:
        parts += [f"{k} changed (fingerprint {ou.get(k)} -> {nu.get(k)})" for k in changed]
    elif changed:
        parts.append(f"{len(changed)} upstream outputs changed (e.g. {changed[0]})")
    return "; ".join(parts) or f"fingerprint {old.get('digest')} -> {new['digest']}"


@dataclass
class Step:
    """One stage output: where it is, the fingerprint it needs, and what is there now."""
    stage: str                  # filter / dedup / tokenizer / pack / pack_heldout
    output: str                 # the output path (a directory for pack)
    fingerprint: dict
    status: str = "new"         # new (nothing there) / reused / rerun
    why: str = ""
    sources: dict | None = None  # pack: {source: "reused" | "packed"}
    refresh: bool = False       # reused, but its record's input stat is updated (content mode)

    def record(self, out: str) -> dict:
        entry = {"output": os.path.relpath(self.output, out), "status": self.status}
        entry.update({k: v for k, v in (("why", self.why), ("sources", self.sources)) if v})
        return {**entry, "fingerprint": self.fingerprint}


def _decide(step: Step, recorded: dict | None, exists: bool, out_changed: str, cfg: PrepareConfig) -> None:
    """Set step.status; with resume_only a recorded fingerprint that differs is an error."""
    if not exists:
        step.status = "new"
        return
    same = same_fingerprint(recorded, step.fingerprint, cfg.input_fingerprint)
    if same and not out_changed:
        step.status = "reused"
        if recorded["digest"] != step.fingerprint["digest"]:  # keep the recorded version's digest
            inputs = step.fingerprint["inputs"] if cfg.input_fingerprint == "content" else recorded["inputs"]
            step.refresh = inputs != recorded["inputs"]
            step.fingerprint = {**recorded, "inputs": inputs}
        return
    step.status = "rerun"
    step.why = out_changed if same else describe_change(recorded, step.fingerprint)
    if cfg.resume_only:
        raise StageChanged(f"--resume-only: the {step.stage} stage's output {step.output} was made from other "
                           f"inputs or settings: {step.why}; rerun without --resume-only to redo it and the "
                           "stages after it")


def _sidecar(output: str, sidecar: str) -> tuple[dict | None, bool, str]:
    """(recorded fingerprint, output exists, why the output itself changed) from a sidecar
    `{"fingerprint", "output": stat}` written after `output`."""
    if not (os.path.exists(output) and os.path.exists(sidecar)):
        return None, False, ""
    try:
        with open(sidecar) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None, True, ""
    was = record.get("output")
    changed = ""
    if was and was != output_stat(output):
        changed = (f"{os.path.basename(output)} was modified after this stage wrote it "
                   f"({_file_change(was, output_stat(output))})")
    return record.get("fingerprint"), True, changed


def _write_sidecar(path: str, record: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------ stages
def _filter_shard(path: str, out_path: str, cfg: PrepareConfig, words: list[str], fingerprint: dict) -> dict:
    src, flt = SourceStats(), FilterStats()
    docs = read_docs(path, text_field=cfg.text_field, stats=src, strict=cfg.strict, nonempty=True)
    write_jsonl(out_path, filter_docs(clean_docs(docs, cfg.html), default_filters(cfg.languages, words), flt))
    stats = {"input": path, "read": asdict(src), "filter": flt.report(), "fingerprint": fingerprint,
             "output": output_stat(out_path)}
    _write_sidecar(out_path + ".stats.json", stats)
    return stats


# ------------------------------------------------------------------ quality stage (model-based filters)
def quality_enabled(cfg: PrepareConfig) -> bool:
    return bool(cfg.quality_classifier or cfg.quality_classifier_reference or cfg.perplexity_checkpoint)


def _perplexity_tokenizer(cfg: PrepareConfig) -> str:
    if cfg.perplexity_tokenizer:
        return cfg.perplexity_tokenizer
    from hibari.data.tokenizer import recorded_tokenizer
    record = recorded_tokenizer(cfg.perplexity_checkpoint)
    if not record or not isinstance(record.get("path"), str) or not os.path.exists(record["path"]):
        raise UsageError(f"PrepareConfig.perplexity_tokenizer is not set and {cfg.perplexity_checkpoint} records "
                         "no tokenizer that exists; set perplexity_tokenizer to the model's SentencePiece file")
    return record["path"]


def check_quality_config(cfg: PrepareConfig) -> None:
    """One-line UsageErrors naming the PrepareConfig field at fault."""
    if cfg.quality_classifier and cfg.quality_classifier_reference:
        raise UsageError("PrepareConfig.quality_classifier and quality_classifier_reference are both set: give "
                         "a trained model file or reference inputs to train one, not both")
    if cfg.quality_classifier_other and not cfg.quality_classifier_reference:
        raise UsageError("PrepareConfig.quality_classifier_other is set without quality_classifier_reference")
    for name in ("quality_classifier_reference", "quality_classifier_other"):
        if getattr(cfg, name) is not None and (isinstance(getattr(cfg, name), str) or not getattr(cfg, name)):
            raise UsageError(f"PrepareConfig.{name}={getattr(cfg, name)!r}: must be a non-empty list of paths/globs")
    if not 0.0 <= cfg.quality_classifier_threshold <= 1.0:
        raise UsageError(f"PrepareConfig.quality_classifier_threshold={cfg.quality_classifier_threshold}: "
                         "must be in [0, 1] (documents with P(reference) below it are dropped)")
    if not 0.0 < cfg.perplexity_keep <= 1.0:
        raise UsageError(f"PrepareConfig.perplexity_keep={cfg.perplexity_keep}: must be in (0, 1] "
                         "(the share of each language's documents kept)")
    if cfg.perplexity_max_tokens < 2:
        raise UsageError(f"PrepareConfig.perplexity_max_tokens={cfg.perplexity_max_tokens}: must be >= 2")
    if cfg.perplexity_tokenizer and not cfg.perplexity_checkpoint:
        raise UsageError("PrepareConfig.perplexity_tokenizer is set without perplexity_checkpoint")
    for name in ("quality_classifier", "perplexity_checkpoint", "perplexity_tokenizer"):
        path = getattr(cfg, name)
        if path and not os.path.exists(path):
            raise PrepareError(f"PrepareConfig.{name}={path!r} does not exist (relative to {os.getcwd()})")


def _tree_fingerprint(path: str) -> str:
    """Digest of every file's relative path, size and mtime_ns under `path` (a checkpoint)."""
    entries = []
    for root, _, files in os.walk(path):
        for f in sorted(files):
            full = os.path.join(root, f)
            st = os.stat(full)
            entries.append([os.path.relpath(full, path), st.st_size, st.st_mtime_ns])
    return json_digest([os.path.abspath(path), sorted(entries)])[:16]


def _plan_quality(cfg: PrepareConfig, filters: list[Step], perplexity_scorer: PerplexityScoring | None
                  ) -> Step:
    inputs, params = {}, {"quality_classifier_threshold": cfg.quality_classifier_threshold}
    if cfg.quality_classifier:
        inputs[cfg.quality_classifier] = file_fingerprint(cfg.quality_classifier, "content")
    if cfg.quality_classifier_reference:
        for path in expand_paths(cfg.quality_classifier_reference + (cfg.quality_classifier_other or [])):
            inputs[path] = file_fingerprint(path, cfg.input_fingerprint)
        params.update({"quality_classifier_seed": cfg.quality_classifier_seed,
                       "quality_classifier_other": "files" if cfg.quality_classifier_other else "planted noise"})
    if cfg.perplexity_checkpoint:
        where = perplexity_scorer.weights_path(cfg.perplexity_checkpoint)
        tok = _perplexity_tokenizer(cfg)
        inputs[tok] = file_fingerprint(tok, "content")
        params.update({"perplexity_checkpoint": _tree_fingerprint(where),
                       "perplexity_keep": cfg.perplexity_keep, "perplexity_max_tokens": cfg.perplexity_max_tokens})
    return Step("quality", os.path.join(cfg.out, "quality"), stage_fingerprint(
        "quality", inputs=inputs, params=params,
        upstream={os.path.relpath(s.output, cfg.out): s.fingerprint["digest"] for s in filters}))


def _quality_outputs(cfg: PrepareConfig, filters: list[Step]) -> list[str]:
    return [os.path.join(cfg.out, "quality", os.path.basename(s.output)) for s in filters]


def _quality_sidecar(cfg: PrepareConfig, filters: list[Step]) -> tuple[dict | None, bool, str]:
    """(recorded fingerprint, outputs exist, why an output changed) of the quality stage."""
    record_path = os.path.join(cfg.out, "quality", "stage.json")
    outputs = _quality_outputs(cfg, filters)
    if not os.path.exists(record_path) or not all(map(os.path.exists, outputs)):
        return None, False, ""
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None, True, ""
    was = record.get("outputs", {})
    for path in outputs:
        name = os.path.basename(path)
        if was.get(name) != output_stat(path):
            return record.get("fingerprint"), True, f"quality/{name} was modified after this stage wrote it"
    return record.get("fingerprint"), True, ""


def _quality_classifier(cfg: PrepareConfig) -> tuple[QualityClassifier | None, dict]:
    if cfg.quality_classifier:
        return QualityClassifier.load(cfg.quality_classifier), {"path": cfg.quality_classifier}
    if not cfg.quality_classifier_reference:
        return None, {}
    reference = list(clean_docs(read_docs(cfg.quality_classifier_reference, nonempty=True), cfg.html))
    if cfg.quality_classifier_other:
        other = list(clean_docs(read_docs(cfg.quality_classifier_other, nonempty=True), cfg.html))
    else:
        noisy, labels = plant_noise(reference, rate=1.0, seed=cfg.quality_classifier_seed)
        other = [d for d, label in zip(noisy, labels) if label]
    clf = train_classifier([d["text"] for d in reference], [d["text"] for d in other],
                           ClassifierConfig(seed=cfg.quality_classifier_seed))
    path = os.path.join(cfg.out, "quality", "classifier.npz")
    clf.save(path)
    return clf, {"path": path, "trained_on": {"reference_docs": len(reference), "other_docs": len(other),
                                              "other": "files" if cfg.quality_classifier_other else "planted noise"}}


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _quality_stage(cfg: PrepareConfig, filters: list[Step], step: Step,
                   perplexity_scorer: PerplexityScoring | None) -> dict:
    """Score every filtered document (classifier P(reference); bits/byte of those it keeps, by
    `perplexity_scorer`), find each language's perplexity cut over all shards, then write
    `quality/<shard>` with the kept documents (scores in meta `quality_p` / `bits_per_byte`).
    Returns the stage's report."""
    os.makedirs(step.output, exist_ok=True)
    clf, clf_info = _quality_classifier(cfg)
    scorer = None
    if cfg.perplexity_checkpoint:
        scorer = perplexity_scorer(cfg.perplexity_checkpoint, _perplexity_tokenizer(cfg),
                                   cfg.perplexity_max_tokens)
    probs, bpb, langs = [], [], []  # pass 1: scores, one entry per filtered document
    for s in filters:
        for batch in _batches(read_docs(s.output), 256):
            texts = [d["text"] for d in batch]
            p = clf.score(texts) if clf else np.ones(len(batch))
            probs.append(p)
            b = np.full(len(batch), np.nan)
            keep = p >= cfg.quality_classifier_threshold
            if scorer is not None and keep.any():
                b[keep] = scorer([t for t, k in zip(texts, keep) if k])
            bpb.append(b)
            langs += [d["meta"].get("lang", "?") for d in batch]
    probs = np.concatenate(probs) if probs else np.zeros(0)
    bpb = np.concatenate(bpb) if bpb else np.zeros(0)
    passed = probs >= cfg.quality_classifier_threshold
    keep = passed.copy()
    ppl_report = {}
    if scorer is not None and passed.any():
        where = np.flatnonzero(passed)
        kept = percentile_keep(bpb[where], [langs[i] for i in where], cfg.perplexity_keep)
        keep[where[~kept]] = False
        for lang in sorted({langs[i] for i in where}):
            mine = where[[langs[i] == lang for i in where]]
            kept_scores = bpb[mine][keep[mine]]
            ppl_report[lang] = {"docs": int(len(mine)), "kept": int(keep[mine].sum()),
                                "max_kept_bits_per_byte": round(float(kept_scores.max()), 4),
                                "median_bits_per_byte": round(float(np.median(bpb[mine])), 4)}
    stats = FilterStats()
    outputs, i = {}, 0
    for s, out_path in zip(filters, _quality_outputs(cfg, filters)):
        def scored(docs):
            nonlocal i
            for d in docs:
                meta = {**d["meta"], "quality_p": round(float(probs[i]), 4)}
                if not np.isnan(bpb[i]):
                    meta["bits_per_byte"] = round(float(bpb[i]), 4)
                if not keep[i]:
                    meta["_quality_reason"] = "quality.classifier" if not passed[i] else "quality.perplexity"
                i += 1
                yield {**d, "meta": meta}
        write_jsonl(out_path, filter_docs(scored(read_docs(s.output)), [_given_reason], stats))
        outputs[os.path.basename(out_path)] = output_stat(out_path)
    report = {**stats.report(), "classifier": {**clf_info, "threshold": cfg.quality_classifier_threshold}
              if clf else None, "perplexity": {"checkpoint": cfg.perplexity_checkpoint, "keep": cfg.perplexity_keep,
                                               "languages": ppl_report} if scorer else None}
    _write_sidecar(os.path.join(step.output, "stage.json"), {"fingerprint": step.fingerprint, "quality": report,
                                                              "outputs": outputs})
    return report


def _given_reason(doc: Doc) -> str | None:
    """The filter of the quality stage's second pass: the reason decided in the first."""
    return doc["meta"].pop("_quality_reason", None)


def _docs_of_source(path: str, source_field: str, name: str, every: int, heldout: bool):
    return (d for d in split_docs(path, every, heldout) if d["meta"].get(source_field, "all") == name)


def _pack_splits(cfg: PrepareConfig, corpus: str, steps: dict[str, Step]) -> dict:
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
            steps.pop(key, None)
            continue  # a corpus too small to hold anything out
        sources = {n: _docs_of_source(corpus, cfg.source_field, n, cfg.heldout_every, heldout)
                   for n in sorted(names[heldout])}
        split = f"crc32(id) % {cfg.heldout_every} {'==' if heldout else '!='} 0"
        out_dir = os.path.join(cfg.out, sub)
        status: dict[str, str] = {}
        manifest = pack_corpus(sources, model, out_dir, cfg.seq_len, cfg.pack_method, split=split,
                               fingerprint=steps[key].fingerprint, status=status)
        if steps[key].status == "reused" and any(v != "reused" for v in status.values()):
            steps[key].status, steps[key].why = "rerun", ("sources repacked: shards were missing or made with "
                                                          "another tokenizer file")
        steps[key].sources = status
        report[key] = {n: {k: v for k, v in e.items() if k not in ("shards", "fingerprint")}
                       for n, e in manifest["sources"].items()}
        report["packed_dirs"]["heldout" if heldout else "train"] = out_dir
    return report


def _plan_filters(cfg: PrepareConfig, paths: list[str], words: list[str]) -> list[Step]:
    wordlist = hashlib.sha256("\n".join(words).encode()).hexdigest()[:16] if words else None
    params = {"text_field": cfg.text_field, "html": cfg.html, "languages": list(cfg.languages), "wordlist": wordlist}
    filters = []
    for i, path in enumerate(paths):
        name = os.path.basename(path).split(".")[0]
        out_path = os.path.join(cfg.out, "filtered", f"{i:05d}-{name}.jsonl.gz")
        filters.append(Step("filter", out_path, stage_fingerprint(
            "filter", inputs={path: file_fingerprint(path, cfg.input_fingerprint)}, params=params)))
    return filters


def _plan_rest(cfg: PrepareConfig, filters: list[Step], quality: Step | None = None) -> dict[str, Step]:
    """The fingerprints of the stages after filtering, from the filter shards' (recorded or new),
    or the quality stage's when it runs."""
    dedup = asdict(cfg.dedup.resolved())
    upstream = ({"quality": quality.fingerprint["digest"]} if quality else
                {os.path.relpath(s.output, cfg.out): s.fingerprint["digest"] for s in filters})
    corpus = Step("dedup", os.path.join(cfg.out, "corpus.jsonl.gz"), stage_fingerprint(
        "dedup", params={f"dedup.{k}": v for k, v in dedup.items()}, upstream=upstream))
    steps = {"quality": quality} if quality else {}
    steps["dedup"] = corpus
    if cfg.tokenizer_vocab_size:
        steps["tokenizer"] = Step("tokenizer", os.path.join(cfg.out, "tokenizer.model"), stage_fingerprint(
            "tokenizer", params={"tokenizer_vocab_size": cfg.tokenizer_vocab_size,
                                 "tokenizer_model_type": cfg.tokenizer_model_type,
                                 "tokenizer_character_coverage": cfg.tokenizer_character_coverage,
                                 "tokenizer_sample_docs": cfg.tokenizer_sample_docs,
                                 "heldout_every": cfg.heldout_every},
            upstream={"corpus": corpus.fingerprint["digest"]}))
    if cfg.seq_len:
        for heldout, key, sub in SPLITS:
            steps[key] = Step(key, os.path.join(cfg.out, sub), stage_fingerprint(
                "pack", params={"seq_len": cfg.seq_len, "pack_method": cfg.pack_method,
                                "source_field": cfg.source_field, "heldout_every": cfg.heldout_every,
                                "split": "heldout" if heldout else "train"},
                upstream={"corpus": corpus.fingerprint["digest"],
                          "tokenizer": steps["tokenizer"].fingerprint["digest"]}))
    return steps


def _plan(cfg: PrepareConfig, paths: list[str], words: list[str],
          perplexity_scorer: PerplexityScoring | None = None) -> tuple[list[Step], dict[str, Step]]:
    """Every stage output with the fingerprint it needs and its status (new / reused / rerun),
    from the inputs, the settings and what the outputs recorded: found before anything is
    written, so `resume_only` fails before any change."""
    filters = _plan_filters(cfg, paths, words)
    for step in filters:
        _decide(step, *_sidecar(step.output, step.output + ".stats.json"), cfg)
    quality = None
    if quality_enabled(cfg):
        quality = _plan_quality(cfg, filters, perplexity_scorer)
        _decide(quality, *_quality_sidecar(cfg, filters), cfg)
    steps = _plan_rest(cfg, filters, quality)
    for name in ("dedup", "tokenizer"):
        if name in steps:
            _decide(steps[name], *_sidecar(steps[name].output, steps[name].output + ".stage.json"), cfg)
    for key in ("pack", "pack_heldout"):
        if key not in steps:
            continue
        step = steps[key]
        manifest = os.path.join(step.output, "manifest.json")
        recorded = None
        if os.path.exists(manifest):
            with open(manifest) as f:
                recorded = json.load(f).get("fingerprint")
        _decide(step, recorded, os.path.exists(manifest), "", cfg)
        if cfg.resume_only and os.path.isdir(step.output):  # sources finished by an interrupted run
            for done in sorted(f for f in os.listdir(step.output) if f.endswith(".done.json")):
                with open(os.path.join(step.output, done)) as f:
                    fp = json.load(f).get("fingerprint")
                if not isinstance(fp, dict) or fp.get("digest") != step.fingerprint["digest"]:
                    _decide(Step(key, os.path.join(step.output, done), step.fingerprint), fp, True, "", cfg)
    return filters, steps


def _train_tokenizer(cfg: PrepareConfig, corpus: str, model: str, totals: dict):
    from hibari.data.tokenizer import tokenizer_sample
    sample = tokenizer_sample(split_docs(corpus, cfg.heldout_every, heldout=False), cfg.tokenizer_sample_docs)
    return train_tokenizer_on(cfg, sample, corpus, model, totals)


def prepare(cfg: PrepareConfig, perplexity_scorer: PerplexityScoring | None = None) -> dict:
    """Run the stages of `cfg` (see the module docstring) and return the report. The perplexity
    filter (`cfg.perplexity_checkpoint`) scores documents with `perplexity_scorer`, a language
    model the caller gives (data/ knows no models): `hibari data prepare` passes
    `hibari.evaluation.quality_scoring.CheckpointScorer()`."""
    if cfg.heldout_every < 2:
        raise UsageError(f"PrepareConfig.heldout_every={cfg.heldout_every}: must be >= 2 "
                         "(one document in heldout_every is held out)")
    if cfg.seq_len and not cfg.tokenizer_vocab_size:
        raise UsageError("PrepareConfig.seq_len is set but tokenizer_vocab_size is not: packing uses the "
                         "tokenizer that prepare trains, so set both")
    if cfg.input_fingerprint not in FINGERPRINT_MODES:
        raise UsageError(f"PrepareConfig.input_fingerprint={cfg.input_fingerprint!r}: choose one of "
                         f"{FINGERPRINT_MODES}")
    check_quality_config(cfg)
    if cfg.runner not in RUNNERS:
        raise UsageError(f"PrepareConfig.runner={cfg.runner!r}: choose one of {RUNNERS}")
    if cfg.tokenizer_sample_docs < 1:
        raise UsageError(f"PrepareConfig.tokenizer_sample_docs={cfg.tokenizer_sample_docs}: must be >= 1")
    if cfg.runner == "beam" and quality_enabled(cfg):
        raise UsageError("PrepareConfig.runner='beam' with the quality stage (quality_classifier* / perplexity_*): "
                         "the model-based filters run only with runner 'local'")
    if cfg.runner == "beam" and cfg.resume_only:
        raise UsageError("--resume-only with runner 'beam': a Beam run redoes every stage (use runner 'local')")
    if cfg.beam_options and cfg.runner != "beam":
        raise UsageError("PrepareConfig.beam_options is set but runner is 'local': set runner 'beam' "
                         "(--runner beam) or drop the options")
    if cfg.perplexity_checkpoint and perplexity_scorer is None:
        raise UsageError("PrepareConfig.perplexity_checkpoint is set but no perplexity scorer was given: the "
                         "perplexity filter needs the `hibari data prepare` command (or, from Python, prepare(cfg, "
                         "perplexity_scorer=hibari.evaluation.quality_scoring.CheckpointScorer()))")
    paths = expand_paths(cfg.inputs)
    for path in paths:
        if os.path.getsize(path) == 0:
            raise PrepareError(f"{path}: the input file is empty; remove it from the inputs")
    words = []
    if cfg.wordlist:
        with open(cfg.wordlist, encoding="utf-8") as f:
            words = [w.strip() for w in f if w.strip() and not w.startswith("#")]
    with DirLock(cfg.out, what="output folder"):
        if cfg.runner == "beam":
            from hibari.data.beam import prepare_beam
            steps = _plan_rest(cfg, _plan_filters(cfg, paths, words))
            report = prepare_beam(cfg, paths, words, {k: steps[k].fingerprint for _, k, _ in SPLITS if k in steps})
            write_report(cfg.out, report)
            return report
        return _prepare_locked(cfg, paths, words, perplexity_scorer)


def _prepare_locked(cfg: PrepareConfig, paths: list[str], words: list[str],
                    perplexity_scorer: PerplexityScoring | None) -> dict:
    filters, steps = _plan(cfg, paths, words, perplexity_scorer)  # resume_only: fails here, before anything is written
    os.makedirs(os.path.join(cfg.out, "filtered"), exist_ok=True)
    shard_stats = []
    shards = progress_bar("clean+filter", len(filters), unit=" shards")
    for step, path in zip(shards.track(filters), paths):  # tqdm on a tty, else lines
        if step.status == "reused":
            with open(step.output + ".stats.json") as f:
                shard_stats.append(json.load(f))
            if cfg.strict and shard_stats[-1]["read"]["bad"]:  # what a strict read would have stopped at
                raise BadInput(f"{shard_stats[-1]['read']['bad_examples'][0]} (rerun without --strict to skip "
                               "and count such records)")
            if step.refresh:  # the same content, touched: record its new stat (the digest stays)
                _write_sidecar(step.output + ".stats.json", {**shard_stats[-1], "fingerprint": step.fingerprint})
        else:
            shard_stats.append(_filter_shard(path, step.output, cfg, words, step.fingerprint))
        shard_stats[-1] = {k: v for k, v in shard_stats[-1].items() if k not in ("fingerprint", "output")}

    dedup_inputs, dedup_keys = [s.output for s in filters], [s.fingerprint["digest"] for s in filters]
    quality = steps.get("quality")
    if quality is not None:
        if quality.status == "reused":
            with open(os.path.join(quality.output, "stage.json")) as f:
                quality_report = json.load(f)["quality"]
        else:
            quality_report = _quality_stage(cfg, filters, quality, perplexity_scorer)
        dedup_inputs = _quality_outputs(cfg, filters)
        dedup_keys = [f"{quality.fingerprint['digest']}-{i}" for i in range(len(filters))]

    corpus = steps["dedup"]
    if corpus.status == "reused":
        with open(corpus.output + ".stage.json") as f:
            dedup = json.load(f)["dedup"]
    else:
        dedup = dedup_files(dedup_inputs, corpus.output, cfg.dedup,
                            work_dir=os.path.join(cfg.out, "dedup-work"), processes=cfg.processes,
                            input_keys=dedup_keys)
        _write_sidecar(corpus.output + ".stage.json", {"fingerprint": corpus.fingerprint, "dedup": dedup,
                                                       "output": output_stat(corpus.output)})
    report = {"config": {**asdict(cfg), "dedup": cfg.dedup.describe()}, "shards": shard_stats, "dedup": dedup,
              "totals": totals(shard_stats, dedup), "corpus": os.path.basename(corpus.output)}
    if quality is not None:
        report["quality"] = quality_report
        report["totals"]["quality_docs"] = quality_report["docs_out"]
        report["totals"]["quality_chars"] = quality_report["chars_out"]
        report["totals"]["quality_dropped"] = {r: {"docs": d["docs"], "chars": d["chars"]}
                                               for r, d in quality_report["dropped"].items()}

    if cfg.tokenizer_vocab_size:
        from hibari.data.tokenizer import file_sha256, load_tokenizer, tokenizer_report
        step = steps["tokenizer"]
        if step.status == "reused":
            sp = load_tokenizer(step.output)
        else:
            sp = _train_tokenizer(cfg, corpus.output, step.output, report["totals"])
            _write_sidecar(step.output + ".stage.json", {
                "fingerprint": step.fingerprint, "vocab_size": sp.get_piece_size(),
                "sha256": file_sha256(step.output), "output": output_stat(step.output)})
        report["tokenizer"] = {"path": step.output, "heldout": tokenizer_report(
            sp, (d["text"] for d in split_docs(corpus.output, cfg.heldout_every, heldout=True)))}
    if cfg.seq_len:
        report.update(_pack_splits(cfg, corpus.output, steps))

    report["stages"] = {"filter": [{"input": p, **s.record(cfg.out)} for p, s in zip(paths, filters)],
                        **{k: s.record(cfg.out) for k, s in steps.items()}}
    write_report(cfg.out, report)
    return report


def write_report(out: str, report: dict) -> None:
    """`out/report.json` and `out/summary.txt`, each replaced atomically."""
    _write_sidecar(os.path.join(out, "report.json"), report)
    with open(os.path.join(out, "summary.txt.tmp"), "w") as f:
        f.write(summary(report))
    os.replace(os.path.join(out, "summary.txt.tmp"), os.path.join(out, "summary.txt"))


def summary(report: dict) -> str:
    t = report["totals"]
    lines = [f"read       {t['read_docs']:>8} docs {t['read_chars']:>12} chars  ({t['bad_records']} bad records skipped)",
             f"filtered   {t['filtered_docs']:>8} docs {t['filtered_chars']:>12} chars"]
    lines += [f"  - {reason:<40} {d['docs']:>6} docs {d['chars']:>10} chars" for reason, d in t["dropped"].items()]
    if "quality_docs" in t:
        lines.append(f"quality    {t['quality_docs']:>8} docs {t['quality_chars']:>12} chars")
        lines += [f"  - {reason:<40} {d['docs']:>6} docs {d['chars']:>10} chars"
                  for reason, d in t["quality_dropped"].items()]
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
    if "stages" in report:
        lines.append("stages     " + stage_summary(report["stages"]))
    if "runner" in report:
        r = report["runner"]
        lines.append(f"runner     {r['name']}  {r['wall_s']} s  ({' '.join(r['options'])})")
    return "\n".join(lines) + "\n"


def stage_summary(stages: dict) -> str:
    """e.g. "filter 2 reused, 1 rerun | dedup rerun | tokenizer rerun | pack rerun"."""
    filters: dict[str, int] = {}
    for s in stages.get("filter", []):
        filters[s["status"]] = filters.get(s["status"], 0) + 1
    parts = ["filter " + ", ".join(f"{n} {status}" for status, n in sorted(filters.items()))]
    parts += [f"{k} {s['status']}" for k, s in stages.items() if k != "filter"]  # quality, dedup, ...
    return " | ".join(parts)
