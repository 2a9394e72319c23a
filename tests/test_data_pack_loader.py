"""Packing (never crosses documents, loses no tokens) and the grain loader (deterministic,
disjoint per host, mixtures, exact resume), on the vendored corpus."""
import json
import os
import zlib

import numpy as np
import pytest

from hibari.data import CORPUS_DIR
from hibari.data.clean import clean_docs
from hibari.data.loader import Loader, PackedLoader
from hibari.data.pack import first_fit_decreasing, pack_corpus, pack_rows, positions_from_segments
from hibari.data.sources import read_docs
from hibari.data.tokenizer import load_tokenizer, train_tokenizer

CORPUS = str(CORPUS_DIR)
SEQ = 64


def fake_docs(lengths):
    """Document k is [k*10000 + 0, k*10000 + 1, ...]: every token names its document and offset."""
    return [np.arange(n, dtype=np.int32) + 10000 * k for k, n in enumerate(lengths)]


def segments_of(tokens, segs):
    return [tokens[segs == s] for s in range(1, segs.max() + 1)] if segs.max() > 0 else []


def test_positions_match_brute_force():
    rng = np.random.default_rng(0)
    seg = np.sort(rng.integers(0, 5, (6, 40)), axis=1)[:, ::-1].copy()  # padding (0) at the end
    seg = np.where(seg > 0, 5 - seg, 0)
    pos = positions_from_segments(seg)
    for b in range(seg.shape[0]):
        for t in range(seg.shape[1]):
            want = 0 if seg[b, t] == 0 or t == 0 or seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
            assert pos[b, t] == want


@pytest.mark.parametrize("method", ["greedy", "best_fit"])
def test_packing_never_crosses_documents_and_loses_no_tokens(method):
    rng = np.random.default_rng(1)
    lengths = list(rng.integers(1, 3 * SEQ, 300)) + [SEQ, SEQ + 1, 1]
    docs = fake_docs(lengths)
    rows = list(pack_rows(docs, SEQ, method, buffer_size=64))
    chunks = []
    for tokens, segs in rows:
        assert tokens.shape == segs.shape == (SEQ,)
        nonpad = segs > 0
        assert np.all(nonpad[:nonpad.sum()]) and np.all(tokens[~nonpad] == 0)  # padding only at the end
        assert np.all(np.diff(segs[nonpad]) >= 0)                              # segments 1, 2, 3, ...
        for seg in segments_of(tokens, segs):
            assert len(set(seg // 10000)) == 1                 # one document per segment
            assert np.all(np.diff(seg) == 1)                   # a contiguous piece of it
            chunks.append(seg)
    total = sum(lengths)
    assert sum(map(len, chunks)) == total                      # no token lost or duplicated
    if method == "greedy":
        assert np.array_equal(np.concatenate(chunks), np.concatenate(docs))  # stream order kept
        assert len(rows) == -(-total // SEQ)                   # only the last row padded
    else:
        want = sorted(tuple(d[i:i + SEQ]) for d in docs for i in range(0, len(d), SEQ))
        assert sorted(map(tuple, chunks)) == want              # docs split only at seq_len
        assert len(rows) <= 11 / 9 * -(-total // SEQ) * 1.05 + 6  # FFD bound with buffer slack


def test_first_fit_decreasing_hand_example():
    bins = first_fit_decreasing([np.zeros(n) for n in (5, 7, 3, 2, 4, 3)], 10)
    assert [sorted(map(len, b), reverse=True) for b in bins] == [[7, 3], [5, 4], [3, 2]]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    en = list(clean_docs(read_docs(os.path.join(CORPUS, "en.jsonl.gz"))))[:120]
    ja = list(clean_docs(read_docs(os.path.join(CORPUS, "ja.jsonl.gz"))))[:120]
    model = str(root / "tok.model")
    train_tokenizer(en[::2] + ja[::2], model, vocab_size=1200)
    manifest = pack_corpus({"en": en, "ja": ja}, model, str(root / "shards"), SEQ, "greedy", rows_per_shard=500)
    return {"dir": str(root / "shards"), "manifest": manifest, "model": model, "docs": {"en": en, "ja": ja}}


def test_pack_corpus_counts_and_decodes_back(packed):
    sp = load_tokenizer(packed["model"])
    for name, docs in packed["docs"].items():
        entry = packed["manifest"]["sources"][name]
        assert entry["docs"] == len(docs)
        assert entry["tokens"] == sum(len(sp.encode(d["text"])) + 2 for d in docs)
        assert entry["rows"] * SEQ - entry["padding"] == entry["tokens"]
        assert len(entry["shards"]) == -(-entry["rows"] // 500) >= 2
        rows = np.concatenate([np.load(os.path.join(packed["dir"], s["path"])) for s in entry["shards"]])
        stream = rows[:, 0][rows[:, 1] > 0]                        # greedy: the token stream, in order
        bounds = np.flatnonzero(stream == sp.bos_id())
        texts = [sp.decode(stream[b + 1:e - 1].tolist()) for b, e in zip(bounds, list(bounds[1:]) + [len(stream)])]
        assert texts == [d["text"] for d in docs]
    m = json.load(open(os.path.join(packed["dir"], "manifest.json")))
    assert m["seq_len"] == SEQ and m["tokenizer"]["vocab_size"] == 1200 and len(m["tokenizer"]["sha256"]) == 64


def test_pack_corpus_resumes_only_the_same_split(packed, tmp_path):
    en = packed["docs"]["en"]
    out = str(tmp_path / "p")
    assert pack_corpus({"en": en[:4]}, packed["model"], out, SEQ, split="a")["sources"]["en"]["docs"] == 4
    again = pack_corpus({"en": en[:6]}, packed["model"], out, SEQ, split="a")  # finished: not redone
    assert again["sources"]["en"]["docs"] == 4 and again["split"] == "a"
    other = pack_corpus({"en": en[:6]}, packed["model"], out, SEQ, split="b")  # other documents: redone
    assert other["sources"]["en"]["docs"] == 6 and other["split"] == "b"
    assert sorted(os.listdir(out)) == ["en-00000.npy", "en.done.json", "manifest.json"]  # no temporary left


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batches_format(packed):
    loader = PackedLoader(packed["dir"], batch_size=4, seq_len=SEQ, seed=0)
    assert isinstance(loader, Loader)  # the protocol the training loop reads
    batch = take(loader, 1)[0]
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    for v in batch.values():
        assert v.shape == (4, SEQ) and v.dtype == np.int32
    assert np.array_equal(batch["positions"], positions_from_segments(batch["segment_ids"]))


def test_same_seed_same_stream_and_exact_resume(packed):
    kw = dict(batch_size=4, seq_len=SEQ, weights={"en": 1.0, "ja": 2.0})
    full = take(PackedLoader(packed["dir"], seed=3, **kw), 12)
    assert same(full, take(PackedLoader(packed["dir"], seed=3, **kw), 12))
    assert not same(full, take(PackedLoader(packed["dir"], seed=4, **kw), 12))
    first = PackedLoader(packed["dir"], seed=3, **kw)
    head = take(first, 5)
    state = json.loads(json.dumps(first.get_state()))
    resumed = PackedLoader(packed["dir"], seed=3, **kw)
    resumed.set_state(state)
    assert same(head + take(resumed, 7), full)
    with pytest.raises(ValueError, match="different settings"):
        PackedLoader(packed["dir"], seed=5, **kw).set_state(state)


def row_keys(batches):
    return [zlib.crc32(r.tobytes()) for b in batches for r in np.stack([b["tokens"], b["segment_ids"]], 1)]


def source_keys(packed, name):
    entry = packed["manifest"]["sources"][name]
    rows = np.concatenate([np.load(os.path.join(packed["dir"], s["path"])) for s in entry["shards"]])
    return [zlib.crc32(r.astype(np.int32).tobytes()) for r in rows]


def test_hosts_read_disjoint_parts_and_epochs_cover_every_row(packed):
    rows_ja = source_keys(packed, "ja")
    per_host = []
    for host in range(2):
        loader = PackedLoader(packed["dir"], batch_size=2, seq_len=SEQ, seed=0, shard_index=host, shard_count=2,
                              weights={"ja": 1.0}, num_epochs=1)
        per_host.append(row_keys(list(loader)))
    assert not set(per_host[0]) & set(per_host[1])
    seen = per_host[0] + per_host[1]
    assert len(seen) == len(set(seen)) >= len(rows_ja) - 2 * 2  # each row once (last partial batch dropped)
    assert set(seen) <= set(rows_ja)
    two = row_keys(list(PackedLoader(packed["dir"], batch_size=1, seq_len=SEQ, seed=0, weights={"ja": 1.0},
                                     num_epochs=2)))
    n = len(rows_ja)
    assert sorted(two[:n]) == sorted(two[n:]) == sorted(rows_ja) and two[:n] != two[n:]  # reshuffled


def test_mixture_weights(packed):
    en = set(source_keys(packed, "en"))
    keys = row_keys(take(PackedLoader(packed["dir"], batch_size=8, seq_len=SEQ, seed=1,
                                      weights={"en": 3.0, "ja": 1.0}), 100))
    assert abs(np.mean([k in en for k in keys]) - 0.75) < 0.02


def test_bad_settings_are_named(packed):
    with pytest.raises(ValueError, match="seq_len=32 but the shards were packed with seq_len=64"):
        PackedLoader(packed["dir"], batch_size=2, seq_len=32, seed=0)
    with pytest.raises(ValueError, match="unknown sources"):
        PackedLoader(packed["dir"], batch_size=2, seq_len=SEQ, seed=0, weights={"web": 1.0})


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(packed):
    kw = dict(batch_size=4, seq_len=SEQ, seed=7)
    assert same(take(PackedLoader(packed["dir"], worker_count=2, **kw), 10), take(PackedLoader(packed["dir"], **kw), 10))
