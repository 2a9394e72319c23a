"""Sources (formats, compression, bad records) and cleaning, on vendored text and hand examples."""
import gzip
import os

import pytest

from hibari.data import CORPUS_DIR
from hibari.data.clean import clean_text, html_to_text, normalize_whitespace, unify_width
from hibari.data.sources import BadInput, SourceStats, read_docs, write_jsonl

CORPUS = str(CORPUS_DIR)


def vendored(lang, n=None):
    docs = read_docs(os.path.join(CORPUS, f"{lang}.jsonl.gz"))
    return [d for _, d in zip(range(n), docs)] if n else list(docs)


def test_vendored_corpus_reads_fully():
    stats = SourceStats()
    docs = list(read_docs(os.path.join(CORPUS, "*.jsonl.gz"), stats=stats))
    assert stats.bad == 0 and stats.docs == len(docs) == 1589
    assert len({d["id"] for d in docs}) == len(docs)
    assert {d["meta"]["lang"] for d in docs} == {"en", "ja"}
    assert all(d["text"].strip() for d in docs)


def test_bad_records_are_counted_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [b'{"id": "a", "text": "fine"}', b'{"id": "b", "text": ', b'{"id": "c", "body": "x"}',
             b'{"id": "d", "text": "   "}', b'{"id": "e", "text": "caf\xe9"}', b'', b'{"id": "f", "text": "ok"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats = SourceStats()
    docs = list(read_docs(str(path), stats=stats))
    assert [d["id"] for d in docs] == ["a", "f"]
    assert stats.bad == 4
    where = [e.split(": ")[0] for e in stats.bad_examples]
    assert where == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "malformed JSON" in stats.bad_examples[0] and "missing field 'text'" in stats.bad_examples[1]
    assert "invalid UTF-8" in stats.bad_examples[3]
    with pytest.raises(BadInput, match=r"bad\.jsonl:2: malformed JSON"):
        list(read_docs(str(path), strict=True))


def test_formats_and_compression_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    docs = vendored("ja", 40)
    write_jsonl(str(tmp_path / "a.jsonl.gz"), docs)
    raw = (tmp_path / "a.jsonl").write_bytes(gzip.decompress((tmp_path / "a.jsonl.gz").read_bytes()))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "a.jsonl").read_bytes()))
    table = pa.table({"id": [d["id"] for d in docs], "content": [d["text"] for d in docs],
                      "lang": [d["meta"]["lang"] for d in docs]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=7)
    assert raw > 0
    want = [(d["id"], d["text"]) for d in docs]
    for name, field in (("a.jsonl.gz", "text"), ("b.jsonl.zst", "text"), ("c.parquet", "content")):
        got = list(read_docs(str(tmp_path / name), text_field=field))
        assert [(d["id"], d["text"]) for d in got] == want, name
        assert all(d["meta"]["lang"] == "ja" for d in got)
    assert len(list(read_docs(str(tmp_path / "*.jsonl*")))) == 3 * len(docs)  # .jsonl, .jsonl.gz, .jsonl.zst


def test_plain_text_splits(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first para\nline two\n\nsecond para\n\n\nthird\n", encoding="utf-8")
    assert [d["text"] for d in read_docs(str(path), text_split="paragraph")] == \
        ["first para\nline two", "second para", "third"]
    assert len(list(read_docs(str(path), text_split="line"))) == 4
    assert len(list(read_docs(str(path)))) == 1


def test_missing_input_names_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        list(read_docs(str(tmp_path / "nothing-here*.jsonl")))


@pytest.mark.slow
def test_tfds_array_record_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds
    texts = [d["text"] for d in vendored("en", 12)]

    class TinyCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, t in enumerate(texts):
                yield i, {"text": t}

    TinyCorpus(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    got = list(read_docs(f"tfds:tiny_corpus/train@{tmp_path}"))
    assert sorted(d["text"] for d in got) == sorted(texts)


def test_width_unification_hand_examples():
    assert unify_width("ＡＢＣ１２３！") == "ABC123!"          # full-width ASCII -> half width
    assert unify_width("ｶﾀｶﾅﾃﾞｽ") == "カタカナデス"            # half-width katakana -> full (voiced mark merged)
    assert unify_width("１〜３") == "1~3" and unify_width("a\u3000b") == "a b"
    assert unify_width("㈱") == "(株)" and unify_width("①") == "1"


def test_whitespace_and_controls():
    assert normalize_whitespace("a\u200b b\t\t c\x07\r\n\n\n\nd  \n") == "a b c\n\nd"


def test_html_to_text():
    page = ("<html><head><title>t</title><style>p{}</style></head><body><script>var x=1;</script>"
            "<h1>見出し</h1><p>本文 &amp; <b>太字</b></p><ul><li>one</li><li>two</li></ul></body></html>")
    assert html_to_text(page) == "見出し\n\n本文 & 太字\n\none\n\ntwo"


def test_clean_is_idempotent_on_vendored_text():
    for doc in vendored("ja", 30) + vendored("en", 10):
        once = clean_text(doc["text"])
        assert clean_text(once) == once
        assert "\u3000" not in once and "\r" not in once
