"""`hibari data prepare --runner beam` (data/beam.py) against the local run it must equal.

- On the bundled corpus, the DirectRunner in multi-process mode (2 workers, through the CLI)
  keeps the same documents in the same order, trains a byte-identical tokenizer and writes
  byte-identical packed shards and manifests, with the same report numbers.
- Its near-duplicate clusters equal the local union-find's on planted near-duplicates (edits,
  a bucket past the 64-member pair limit, a chain the verification does not close).
- Bundles that fail mid-way (in the filters and the verification, after a corpus part and a shard
  were written) are retried by the runner without a document duplicated or lost and with the
  same bytes (greedy packing there, best-fit in the first test).
- The packing plan gives `pack_rows`' rows for both methods.

Every Beam run happens in a child process (tests/beam_cases.py: why), so Beam is never imported
here.
"""
import glob
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
from beam_cases import run_case

from hibari.data import CORPUS_DIR
from hibari.data.dedup import MinHasher, NearDedupConfig, near_duplicates
from hibari.data.pack import pack_plan, pack_rows, rows_from_placements
from hibari.data.pipeline import PrepareConfig, prepare
from hibari.data.sources import read_docs

if importlib.util.find_spec("apache_beam") is None:
    pytest.skip('needs Apache Beam: pip install -e ".[test,beam]"', allow_module_level=True)

CORPUS = os.path.join(CORPUS_DIR, "*.jsonl.gz")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(out, **kw) -> PrepareConfig:
    return PrepareConfig(**{"inputs": [CORPUS], "out": str(out), "processes": 2, "tokenizer_vocab_size": 2000,
                            "seq_len": 256, "pack_method": "best_fit", **kw})


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    prepare(config(out))
    return out


def assert_same_outputs(local, other):
    """Kept documents (ids, text, meta, order), removed-id log, tokenizer bytes, shard bytes,
    manifests (but the tokenizer's path) and the report's numbers."""
    kept = list(read_docs(os.path.join(local, "corpus.jsonl.gz")))
    beam_kept = list(read_docs(os.path.join(other, "corpus", "*.jsonl.gz")))
    assert [d["id"] for d in beam_kept] == [d["id"] for d in kept]
    assert beam_kept == kept
    with open(os.path.join(local, "corpus.jsonl.gz.removed.jsonl")) as f:
        removed = [json.loads(line) for line in f]
    beam_removed = [json.loads(line) for p in sorted(glob.glob(os.path.join(other, "corpus", "*.removed.jsonl")))
                    for line in open(p)]
    assert beam_removed == removed
    assert sha(os.path.join(other, "tokenizer.model")) == sha(os.path.join(local, "tokenizer.model"))
    for sub in ("packed", "packed-heldout"):
        names = sorted(os.listdir(os.path.join(local, sub)))
        assert sorted(os.listdir(os.path.join(other, sub))) == names
        shards = [n for n in names if n.endswith(".npy")]
        assert shards
        for name in shards:
            assert sha(os.path.join(other, sub, name)) == sha(os.path.join(local, sub, name)), f"{sub}/{name}"
        manifests = []
        for run in (local, other):
            with open(os.path.join(run, sub, "manifest.json")) as f:
                m = json.load(f)
            assert m["tokenizer"].pop("path") == os.path.join(os.path.abspath(run), "tokenizer.model")
            manifests.append(m)
        assert manifests[1] == manifests[0]
    with open(os.path.join(local, "report.json")) as f:
        a = json.load(f)
    with open(os.path.join(other, "report.json")) as f:
        b = json.load(f)
    for key in ("shards", "dedup", "totals", "pack", "pack_heldout"):
        assert b[key] == a[key], key
    assert b["tokenizer"]["heldout"] == a["tokenizer"]["heldout"]
    return b


@pytest.mark.slow
def test_beam_multiprocess_run_equals_the_local_run(local_run, tmp_path):
    out = tmp_path / "beam"
    proc = subprocess.run([sys.executable, "-m", "hibari", "data", "prepare", "--config",
                           f"configs/data/quickstart.py:{out}", "--runner", "beam", "--vocab-size", "2000",
                           "--seq-len", "256"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = assert_same_outputs(local_run, out)
    assert report["dedup"]["exact_removed"] > 0 and report["dedup"]["near_removed"] > 0
    runner = report["runner"]
    assert runner["name"] == "beam" and "--direct_running_mode=multi_processing" in runner["options"]
    assert "--direct_num_workers=2" in runner["options"]
    # Beam's counters agree with the report's counts
    totals = report["totals"]
    assert runner["metrics"]["hibari.read.docs"] == totals["read_docs"]
    assert runner["metrics"]["hibari.filter.kept"] == totals["filtered_docs"]
    for reason, d in totals["dropped"].items():
        assert runner["metrics"][f"hibari.filter.{reason}"] == d["docs"]
    assert not os.path.exists(out / ".beam-staging")
    with open(out / "summary.txt") as f:
        assert "runner     beam" in f.read()


@pytest.mark.slow
def test_failed_bundles_are_retried_without_lost_or_duplicated_documents(tmp_path):
    """The bundle-based DirectRunner retries a failed bundle (Dataflow does the same when a worker
    dies): the filters failing half-way through a bundle, the candidate verification failing, and
    a corpus part's and a shard's writer failing after its file was written. Outputs of the failed
    attempts are dropped and the files rewritten. (The English half of the corpus, greedy packing:
    the other method, end to end, against its own local run.)"""
    english = dict(inputs=[os.path.join(CORPUS_DIR, "en.jsonl.gz")], tokenizer_vocab_size=1000,
                   pack_method="greedy")
    local = tmp_path / "local"
    prepare(config(local, **english))
    out = tmp_path / "retried"
    fields = asdict(config(out, runner="beam", beam_options=("--runner=BundleBasedDirectRunner",), **english))
    fields.pop("dedup")  # the default NearDedupConfig
    fail_at = {"first_reason": 300, "bucket_edges": 2, "write_jsonl": 1, "save_array": 2}
    calls = run_case("retried", {**fields, "fail_at": fail_at}, tmp_path)
    assert all(calls[name] > n for name, n in fail_at.items()), calls  # every failure happened, and was retried
    assert_same_outputs(local, out)


def planted_docs(seed=0):
    """Real paragraphs with planted near-duplicates: word edits at several rates, 70 copies of
    one text with one word changed each (a bucket past the 64-pair limit), and chains A ~ B ~ C
    whose ends are less similar than the threshold."""
    rng = random.Random(seed)
    texts = [d["text"] for d in read_docs(CORPUS) if len(d["text"]) > 400][:120]
    docs = list(texts[:60])
    for t in texts[:40]:
        words = t.split(" ")
        for rate in (0.02, 0.08, 0.2):
            w = list(words)
            for i in rng.sample(range(len(w)), max(1, int(rate * len(w)))):
                w[i] = "xyz" + str(rng.randrange(1000))
            docs.append(" ".join(w))
    base = texts[60].split(" ")
    for k in range(70):
        w = list(base)
        w[k % len(w)] = f"v{k}"
        docs.append(" ".join(w))
    for t in texts[61:80]:
        a = t.split(" ")
        n = len(a)
        b = a[: n // 2] + [f"b{i}" for i in range(n // 8)] + a[n // 2 + n // 8:]
        c = b[: n // 4] + [f"c{i}" for i in range(n // 8)] + b[n // 4 + n // 8:]
        docs += [" ".join(a), " ".join(b), " ".join(c)]
    rng.shuffle(docs)
    return docs


@pytest.mark.parametrize("verify", [True, False])
def test_beam_near_duplicate_clusters_equal_the_local_union_find(verify, tmp_path):
    texts = planted_docs()
    settings = dict(threshold=0.8, num_perm=64, ngram=5, verify=verify)
    cfg = NearDedupConfig(**settings).resolved()
    hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.unit, cfg.seed)
    local = near_duplicates(np.stack([hasher.signature(t) for t in texts]), cfg)
    assert len(local) > 100 and len(set(local.values())) > 20
    pairs = run_case("near", {"texts": texts, **settings}, tmp_path)
    assert pairs == sorted([i, root] for i, root in local.items())


@pytest.mark.parametrize("method", ["greedy", "best_fit"])
def test_pack_plan_gives_pack_rows_rows(method):
    rng = np.random.default_rng(0)
    seq = 64
    lengths = [int(n) for n in rng.integers(2, 3 * seq, 400)] + [seq, 2 * seq, 2, seq + 1]
    docs = [rng.integers(4, 1000, n).astype(np.int32) for n in lengths]
    rows = np.stack([np.stack(r) for r in pack_rows(docs, seq, method, buffer_size=64)])
    plan, n_rows = pack_plan(lengths, seq, method, buffer_size=64)
    pieces = [(row, col, s, docs[d][start:start + n]) for d, placements in enumerate(plan)
              for row, col, s, start, n in placements]
    assert n_rows == len(rows)
    np.testing.assert_array_equal(rows_from_placements(pieces, n_rows, seq), rows)
    assert all(sum(p[4] for p in placements) == n for placements, n in zip(plan, lengths))


def test_beam_names_a_bad_input_file_and_moves_nothing_into_place(tmp_path):
    good, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good.write_text(json.dumps({"id": "g", "text": "A plain sentence about rivers. " * 30}) + "\n")
    bad.write_text("{not json\n{\"text\": 3}\n")
    out = tmp_path / "out"
    result = run_case("prepare", {"inputs": [str(good), str(bad)], "out": str(out), "runner": "beam",
                                  "beam_options": ["--runner=DirectRunner"]}, tmp_path)
    assert result["error"] and "b.jsonl: no usable document (all 2 records bad" in result["error"]
    assert not os.path.exists(out / "corpus") and not os.path.exists(out / "report.json")


@pytest.mark.parametrize("change, message", [
    ({"runner": "spark"}, r"PrepareConfig.runner='spark': choose one of \('local', 'beam'\)"),
    ({"beam_options": ("--runner=FlinkRunner",)}, "beam_options is set but runner is 'local'"),
    ({"runner": "beam", "quality_classifier_reference": ["x"]}, "model-based filters run only with runner 'local'"),
    ({"runner": "beam", "resume_only": True}, "a Beam run redoes every stage"),
    ({"tokenizer_sample_docs": 0}, "tokenizer_sample_docs=0: must be >= 1"),
])
def test_runner_settings_errors_name_the_field(tmp_path, change, message):
    from hibari.base.errors import UsageError
    with pytest.raises(UsageError, match=message):
        prepare(PrepareConfig(inputs=[CORPUS], out=str(tmp_path / "o"), **change))
