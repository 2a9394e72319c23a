"""`hibari data ...` end to end on vendored documents: the dedup contract, the resumable pipeline,
bad input reporting."""
import gzip
import json
import os
import zlib

import numpy as np
import pytest

import hibari.cli
from hibari.base.config_files import ConfigFileError
from hibari.data import CORPUS_DIR
from hibari.data.sources import expand_paths, read_docs
from hibari.data.tokenizer import load_tokenizer

CORPUS = str(CORPUS_DIR)


def sample(lang, every):
    return [d for i, d in enumerate(read_docs(os.path.join(CORPUS, f"{lang}.jsonl.gz"))) if i % every == 0]


def write(path, docs, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d["id"], "text": d["text"], **d["meta"]}, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def test_dedup_contract(tmp_path, capsys):
    docs = sample("en", 10)
    copy = {"id": "copy-of-" + docs[3]["id"], "text": docs[3]["text"] + " Amen.", "meta": {"url": "x"}}
    write(tmp_path / "in.jsonl", docs + [copy])
    out = tmp_path / "out.jsonl"
    rc = hibari.cli.main(["data", "dedup", "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                      "--threshold", "0.8", "--ngram", "5", "--bands", "16", "--rows", "8"])
    assert rc == 0
    kept = [json.loads(l) for l in open(out, encoding="utf-8")]
    removed = [json.loads(l) for l in open(str(out) + ".removed.jsonl", encoding="utf-8")]
    assert removed == [{"id": copy["id"], "kept_id": docs[3]["id"], "reason": "near"}]
    assert [k["id"] for k in kept] == [d["id"] for d in docs]
    assert all(k["source"] and k["lang"] == "en" for k in kept)  # other fields preserved
    result = json.loads(capsys.readouterr().out)
    assert (result["config"]["bands"], result["config"]["rows"]) == (16, 8)
    assert result["config"]["implied_threshold"] == pytest.approx((1 / 16) ** (1 / 8), abs=1e-4)


@pytest.mark.slow
def test_pipeline_end_to_end_and_restart(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write(raw / "en.jsonl", sample("en", 4), extra_lines=['{"id": "broken", "text": '])
    write(raw / "ja.jsonl", sample("ja", 6))
    out = tmp_path / "prepared"
    argv = ["data", "pipeline", "--input", str(raw / "*.jsonl"), "--out", str(out), "--vocab-size", "1600",
            "--seq-len", "128", "--method", "best_fit"]
    assert hibari.cli.main(argv) == 0
    report = json.load(open(out / "report.json"))
    t = report["totals"]
    assert t["read_docs"] == len(sample("en", 4)) + len(sample("ja", 6))
    assert t["bad_records"] == 1 and t["bad_examples"][0].startswith(f"{raw / 'en.jsonl'}:{len(sample('en', 4)) + 1}")
    assert t["read_docs"] == t["filtered_docs"] + sum(d["docs"] for d in t["dropped"].values())
    assert t["dedup_docs_out"] == t["filtered_docs"] - t["exact_removed"] - t["near_removed"]
    assert set(report["pack"]) == {"en", "ja"}
    assert report["tokenizer"]["heldout"]["cjk_coverage"] > 0.9
    assert (out / "summary.txt").read_text().startswith("read")
    manifest = json.load(open(out / "packed" / "manifest.json"))
    assert manifest["seq_len"] == 128 and manifest["tokenizer"]["vocab_size"] == 1600
    with gzip.open(out / "corpus.jsonl.gz", "rt") as f:
        assert sum(1 for _ in f) == t["dedup_docs_out"]
    check_heldout_split(out, report)

    finished = [d / f for d in (out / "filtered", out / "packed", out / "packed-heldout") for f in os.listdir(d)
                if f != "manifest.json"]  # the manifest is rewritten; shards are not
    stamps = {f: os.path.getmtime(f) for f in finished}
    assert hibari.cli.main(argv) == 0  # a restart redoes no finished shard
    assert stamps == {f: os.path.getmtime(f) for f in finished}
    assert json.load(open(out / "report.json"))["totals"] == t


def segments(packed_dir):
    """{source: set of segment token tuples} over a packed directory's rows."""
    manifest = json.load(open(packed_dir / "manifest.json"))
    out = {}
    for name, entry in manifest["sources"].items():
        rows = np.concatenate([np.load(packed_dir / s["path"]) for s in entry["shards"]])
        out[name] = {tuple(tok[seg == k]) for tok, seg in rows for k in range(1, seg.max() + 1)}
    return manifest, out


def check_heldout_split(out, report):
    """One corpus document in 20 (crc32 of its id) is packed into packed-heldout/ only."""
    docs = list(read_docs(str(out / "corpus.jsonl.gz")))
    heldout = [d for d in docs if zlib.crc32(d["id"].encode()) % 20 == 0]
    assert 0 < len(heldout) < len(docs) / 5
    train_manifest, train_segs = segments(out / "packed")
    held_manifest, held_segs = segments(out / "packed-heldout")
    assert held_manifest["seq_len"] == train_manifest["seq_len"]
    assert held_manifest["tokenizer"] == train_manifest["tokenizer"]
    assert sum(e["docs"] for e in report["pack"].values()) == len(docs) - len(heldout)
    assert sum(e["docs"] for e in report["pack_heldout"].values()) == len(heldout)
    assert report["packed_dirs"] == {"train": str(out / "packed"), "heldout": str(out / "packed-heldout")}
    sp = load_tokenizer(str(out / "tokenizer.model"))
    for d in heldout:  # best_fit: every seq_len chunk of [bos] + ids + [eos] is a segment
        ids = [sp.bos_id()] + sp.encode(d["text"]) + [sp.eos_id()]
        chunks = {tuple(ids[i:i + 128]) for i in range(0, len(ids), 128)}
        lang = d["meta"]["lang"]
        assert chunks <= held_segs[lang] and not chunks & train_segs.get(lang, set()), d["id"]
    assert "packed-heldout" in (out / "summary.txt").read_text()


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_prepare_config_resolves_from_the_repo_and_the_installed_package(where, tmp_path, monkeypatch):
    from hibari.data.cli import load_prepare_config
    if where == "elsewhere":
        monkeypatch.chdir(tmp_path)  # no configs/ here: found through the installed package
    else:
        monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_prepare_config("configs/data/quickstart.py:" + str(tmp_path / "out"), strict=True)
    assert cfg.out == str(tmp_path / "out") and cfg.strict and cfg.heldout_every == 20
    assert sorted(map(os.path.basename, expand_paths(cfg.inputs))) == ["en.jsonl.gz", "ja.jsonl.gz"]
    assert (cfg.dedup.threshold, cfg.dedup.ngram, cfg.seq_len) == (0.8, 5, 512)


def test_prepare_config_errors_name_the_file(tmp_path):
    from hibari.data.cli import load_prepare_config
    with pytest.raises(ConfigFileError, match="nowhere.py' not found"):
        load_prepare_config("configs/data/nowhere.py")
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=None):\n    return {'inputs': [], 'out': 'x', 'seqlen': 8}\n")
    with pytest.raises(ConfigFileError, match=r"bad.py.*unknown fields \['seqlen'\]"):
        load_prepare_config(str(bad))


def test_prepare_flags_override_the_config_file():
    from hibari.data.cli import build_parser, prepare_config_from_args
    spec = "configs/data/quickstart.py:out/x"
    base = prepare_config_from_args(build_parser().parse_args(["prepare", "--config", spec]))
    assert (base.tokenizer_vocab_size, base.seq_len, base.tokenizer_character_coverage) == \
        (8000, 512, 0.9995)
    cfg = prepare_config_from_args(build_parser().parse_args(
        ["prepare", "--config", spec, "--vocab-size", "1024", "--seq-len", "256",
         "--character-coverage", "0.995"]))
    assert (cfg.tokenizer_vocab_size, cfg.seq_len, cfg.tokenizer_character_coverage) == \
        (1024, 256, 0.995)
    assert cfg.out == "out/x" and cfg.inputs == base.inputs


def test_strict_stops_at_bad_input_naming_file_and_line(tmp_path, capsys):
    write(tmp_path / "in.jsonl", sample("en", 40), extra_lines=['{"id": "x", "body": "no text field"}'])
    n = len(sample("en", 40))
    rc = hibari.cli.main(["data", "clean", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                      "--strict"])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"in.jsonl:{n + 1}: missing field 'text'" in err and "--text-field" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # nothing half-written left behind
    assert hibari.cli.main(["data", "clean", "--input", str(tmp_path / "in.jsonl"), "--output",
                        str(tmp_path / "o.jsonl")]) == 0
    assert len(list(read_docs(str(tmp_path / "o.jsonl")))) == n


def test_help_lists_stages(capsys):
    with pytest.raises(SystemExit):
        hibari.cli.main(["data", "--help"])
    out = capsys.readouterr().out
    for stage in ("clean", "filter", "dedup", "tokenizer", "pack", "pipeline", "prepare"):
        assert stage in out
