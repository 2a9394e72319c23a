"""`prepare` stages keyed by content (issue 18, finding 2): each output records a fingerprint of
its inputs and settings, chained filter -> dedup -> tokenizer -> pack. A changed input or setting
redoes its stage and everything after it, `--resume-only` names the difference instead, an
unchanged rerun reuses everything; one prepare at a time per output folder; empty or unusable
inputs end in one line. Tiny English corpus (24 vendored documents), vocabulary 400, seq_len 64."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import hibari.cli
from hibari.data import CORPUS_DIR
from hibari.data.dedup import NearDedupConfig
from hibari.data.pipeline import PrepareConfig, StageChanged, prepare
from hibari.data.sources import read_docs
from hibari.data.tokenizer import load_tokenizer

VOCAB, SEQ = 400, 64
DOCS = [d for i, d in enumerate(read_docs(os.path.join(CORPUS_DIR, "en.jsonl.gz"))) if i % 9 == 0][:25]
BROKEN = '{"id": "broken", "text": '
STAGES = ("dedup", "tokenizer", "pack", "pack_heldout")


def line(d) -> str:
    return json.dumps({"id": d["id"], "text": d["text"], **d["meta"]}, ensure_ascii=False)


def write_raw(root, fixed=False):
    """raw/a.jsonl (12 documents, then a broken record; `fixed`: a 13th document instead) and
    raw/b.jsonl (12 documents)."""
    raw = root / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "a.jsonl").write_text("\n".join([line(d) for d in DOCS[:12]] + [line(DOCS[24]) if fixed else BROKEN])
                                 + "\n", encoding="utf-8")
    if not (raw / "b.jsonl").exists():
        (raw / "b.jsonl").write_text("\n".join(line(d) for d in DOCS[12:24]) + "\n", encoding="utf-8")
    return raw


def config(raw, out, **changes) -> PrepareConfig:
    return PrepareConfig(**{"inputs": [str(raw / "*.jsonl")], "out": str(out), "tokenizer_vocab_size": VOCAB,
                            "seq_len": SEQ, "heldout_every": 4, "source_field": "source",
                            "dedup": NearDedupConfig(bands=16, rows=8), **changes})


def statuses(report) -> dict:
    stages = report["stages"]
    return {"filter": [s["status"] for s in stages["filter"]], **{k: stages[k]["status"] for k in STAGES}}


def stamps(out) -> dict:
    """(size, mtime_ns) of every stage output (the rewritten manifests and reports left out)."""
    skip = {"report.json", "summary.txt", "manifest.json", ".hibari.lock"}
    return {os.path.relpath(os.path.join(d, f), out): (os.stat(os.path.join(d, f)).st_size,
                                                      os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(out) for f in files if f not in skip}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("fingerprint")
    raw = write_raw(root)
    report = prepare(config(raw, root / "out"))
    assert statuses(report) == {"filter": ["new", "new"], **{k: "new" for k in STAGES}}
    return raw, root / "out", report


def test_unchanged_rerun_reuses_every_stage(prepared):
    raw, out, first = prepared
    before = stamps(out)
    again = prepare(config(raw, out, resume_only=True))
    assert statuses(again) == {"filter": ["reused", "reused"], **{k: "reused" for k in STAGES}}
    assert stamps(out) == before  # no output rewritten
    assert again["totals"] == first["totals"] and again["pack"] == first["pack"]
    assert again["stages"]["pack"]["sources"] == {"botchan": "reused", "kjv": "reused"}
    digests = {k: again["stages"][k]["fingerprint"]["digest"] for k in STAGES}
    assert digests == {k: first["stages"][k]["fingerprint"]["digest"] for k in STAGES}
    chain = again["stages"]  # each stage's fingerprint names the one it was made from
    assert chain["tokenizer"]["fingerprint"]["upstream"] == {"corpus": digests["dedup"]}
    assert chain["pack"]["fingerprint"]["upstream"] == {"corpus": digests["dedup"], "tokenizer": digests["tokenizer"]}
    assert list(chain["dedup"]["fingerprint"]["upstream"].values()) == \
        [s["fingerprint"]["digest"] for s in chain["filter"]]
    assert "stages     filter 2 reused | dedup reused | tokenizer reused" in (out / "summary.txt").read_text()

    # content hashes: switching to them redoes nothing (the hashes are recorded); a touched but
    # unchanged input is then reused, its recorded stat refreshed so that stat runs reuse it too
    hashed = prepare(config(raw, out, input_fingerprint="content", resume_only=True))
    assert statuses(hashed) == statuses(again)
    assert "blake2b" in hashed["stages"]["filter"][0]["fingerprint"]["inputs"][str(raw / "a.jsonl")]
    st = os.stat(raw / "a.jsonl")
    os.utime(raw / "a.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert statuses(prepare(config(raw, out, input_fingerprint="content", resume_only=True))) == statuses(again)
    assert statuses(prepare(config(raw, out, resume_only=True))) == statuses(again)
    assert stamps(out).keys() == before.keys()
    assert {k: v for k, v in stamps(out).items() if not k.endswith(".stats.json")} == \
        {k: v for k, v in before.items() if not k.endswith(".stats.json")}


def test_vocab_size_change_retrains_the_tokenizer_and_repacks(prepared, tmp_path):
    raw, original, _ = prepared
    out = tmp_path / "out"
    shutil.copytree(original, out)  # copy2: sizes and mtimes kept, so the copy is reusable
    before, report_before = stamps(out), (out / "report.json").read_text()
    with pytest.raises(StageChanged, match=r"tokenizer stage's output .*tokenizer\.model .*"
                                           r"tokenizer_vocab_size 400 -> 420; rerun without --resume-only"):
        prepare(config(raw, out, tokenizer_vocab_size=420, resume_only=True))
    assert stamps(out) == before and (out / "report.json").read_text() == report_before  # nothing touched

    report = prepare(config(raw, out, tokenizer_vocab_size=420))
    assert statuses(report) == {"filter": ["reused", "reused"], "dedup": "reused", "tokenizer": "rerun",
                                "pack": "rerun", "pack_heldout": "rerun"}
    assert report["stages"]["tokenizer"]["why"] == "tokenizer_vocab_size 400 -> 420"
    assert report["stages"]["pack"]["why"].startswith("tokenizer changed (fingerprint ")
    assert load_tokenizer(str(out / "tokenizer.model")).get_piece_size() == 420
    assert report["config"]["tokenizer_vocab_size"] == report["tokenizer"]["heldout"]["vocab_size"] == 420
    after = stamps(out)
    assert {k: v for k, v in after.items() if k.startswith(("filtered", "corpus"))} == \
        {k: v for k, v in before.items() if k.startswith(("filtered", "corpus"))}
    for sub in ("packed", "packed-heldout"):  # repacked with the new tokenizer, swapped in whole
        manifest = json.loads((out / sub / "manifest.json").read_text())
        assert manifest["tokenizer"]["vocab_size"] == 420
        assert manifest["fingerprint"] == report["stages"]["pack" if sub == "packed" else "pack_heldout"]["fingerprint"]
        assert sorted(os.listdir(out / sub)) == sorted(
            [s["path"] for e in manifest["sources"].values() for s in e["shards"]]
            + [f"{n}.done.json" for n in manifest["sources"]] + ["manifest.json"])  # nothing staged or stale left
    assert prepare(config(raw, out, tokenizer_vocab_size=420, resume_only=True))["stages"]["tokenizer"]["status"] \
        == "reused"


def test_fixed_input_reruns_every_stage_after_it_and_resume_only_names_it(tmp_path, capsys):
    raw = write_raw(tmp_path)
    spec = tmp_path / "prep.py"
    spec.write_text(
        "def get_config(out):\n"
        f"    return dict(inputs=[{str(raw / '*.jsonl')!r}], out=out, tokenizer_vocab_size={VOCAB}, seq_len={SEQ},\n"
        "                heldout_every=4, source_field='source', dedup=dict(bands=16, rows=8))\n")
    out = tmp_path / "out"
    argv = ["data", "prepare", "--config", f"{spec}:{out}"]
    assert hibari.cli.main(argv) == 0
    first = json.loads((out / "report.json").read_text())
    assert first["totals"]["bad_records"] == 1
    size = (raw / "a.jsonl").stat().st_size

    write_raw(tmp_path, fixed=True)  # the broken record becomes a whole document
    new_size = (raw / "a.jsonl").stat().st_size
    capsys.readouterr()
    assert hibari.cli.main(argv + ["--resume-only"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"filter stage's output {out / 'filtered' / '00000-a.jsonl.gz'}" in err
    assert f"input {raw / 'a.jsonl'} changed (size {size} -> {new_size})" in err

    assert hibari.cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert statuses(report) == {"filter": ["rerun", "reused"], **{k: "rerun" for k in STAGES}}
    assert report["stages"]["filter"][0]["why"] == f"input {raw / 'a.jsonl'} changed (size {size} -> {new_size})"
    t = report["totals"]
    assert t["bad_records"] == 0 and t["read_docs"] == first["totals"]["read_docs"] + 1
    packed = sum(e["docs"] for k in ("pack", "pack_heldout") for e in report[k].values())
    assert packed == t["dedup_docs_out"] == first["totals"]["dedup_docs_out"] + 1
    assert any(d["id"] == DOCS[24]["id"] for d in read_docs(str(out / "corpus.jsonl.gz")))


def test_pack_swap_keeps_the_old_rows_until_every_source_is_done(prepared, tmp_path):
    from hibari.data.pack import pack_corpus
    _, out, _ = prepared
    model = str(out / "tokenizer.model")
    docs = {n: [d for d in DOCS[:24] if d["meta"]["source"] == n] for n in ("botchan", "kjv")}
    target = tmp_path / "p"
    old = pack_corpus({n: iter(v) for n, v in docs.items()}, model, str(target), SEQ, fingerprint={"digest": "A"})
    rows = {f: np.load(target / f) for f in os.listdir(target) if f.endswith(".npy")}

    def failing():
        yield docs["kjv"][0]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):  # the second source fails half-way
        pack_corpus({"botchan": iter(docs["botchan"][:2]), "kjv": failing()}, model, str(target), SEQ,
                    fingerprint={"digest": "B"})
    assert json.loads((target / "manifest.json").read_text())["sources"] == old["sources"]
    assert all(np.array_equal(np.load(target / f), r) for f, r in rows.items())  # old rows untouched
    new = pack_corpus({"botchan": iter(docs["botchan"][:2]), "kjv": iter(docs["kjv"][:1])}, model, str(target),
                      SEQ, fingerprint={"digest": "B"})
    assert {n: e["docs"] for n, e in new["sources"].items()} == {"botchan": 2, "kjv": 1}
    assert json.loads((target / "manifest.json").read_text())["fingerprint"] == {"digest": "B"}
    assert sorted(os.listdir(target)) == ["botchan-00000.npy", "botchan.done.json", "kjv-00000.npy",
                                          "kjv.done.json", "manifest.json"]


def test_second_prepare_into_the_same_folder_fails_naming_the_holder(tmp_path, capsys):
    raw = write_raw(tmp_path)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hibari.base.runlock import DirLock\n"
         f"with DirLock({str(out)!r}, what='output folder'):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        capsys.readouterr()
        assert hibari.cli.main(["data", "pipeline", "--input", str(raw / "*.jsonl"), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"output folder {out} is in use by pid {holder.pid}" in err and "Traceback" not in err
        assert sorted(os.listdir(out)) == [".hibari.lock"]  # nothing written
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0


def test_empty_or_unusable_inputs_end_in_one_line(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_bytes(b'{"body": "no text"}\n{"text": "caf\xe9"}\n{"text": 3}\n')
    cases = {("pipeline", "empty.jsonl"): "empty.jsonl: the input file is empty",
             ("pipeline", "bad.jsonl"): "bad.jsonl: no usable document (all 3 records bad, e.g. ",
             ("pipeline", "none*.jsonl"): "no input file matches",
             ("tokenizer", "bad.jsonl"): "bad.jsonl: no usable document",
             ("clean", "empty.jsonl"): "empty.jsonl: no usable document (the file is empty)"}
    for (stage, name), message in cases.items():
        extra = {"pipeline": ["--out", str(tmp_path / "out")], "clean": ["--output", str(tmp_path / "o.jsonl")],
                 "tokenizer": ["train", "--model", str(tmp_path / "t.model")]}[stage]
        argv = ["data", stage] + extra[:1 if stage == "tokenizer" else 0] + ["--input", str(tmp_path / name)] \
            + extra[1 if stage == "tokenizer" else 0:]
        assert hibari.cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        last = err.rstrip("\n").split("\n")[-1]  # after any progress bars: the one-line error
        assert message in last and last.startswith("hibari data: error") and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "t.model").exists()
    assert not (tmp_path / "out" / "corpus.jsonl.gz").exists()
