"""SentencePiece training, special tokens, byte fallback, and Swallow-style vocabulary expansion
on the vendored English (base) and Japanese (new language) text."""
import os
import re
import zlib

import pytest

from hibari.data import CORPUS_DIR
from hibari.data.clean import clean_docs
from hibari.data.sources import read_docs
from hibari.data.tokenizer import (
    BOS_ID,
    CHAT_TOKENS,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    expand_tokenizer,
    load_proto,
    load_tokenizer,
    tokenizer_report,
    train_tokenizer,
)

CORPUS = str(CORPUS_DIR)


def split(lang, heldout, every=10):
    docs = clean_docs(read_docs(os.path.join(CORPUS, f"{lang}.jsonl.gz")))
    return [d for d in docs if (zlib.crc32(d["id"].encode()) % every == 0) == heldout]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "en.model")
    train_tokenizer(split("en", False)[:200], path, vocab_size=1500, model_type="unigram")
    return path


@pytest.fixture(scope="module")
def expanded(base, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "en+ja.model")
    ja_train = [d for d in split("ja", False) if d["meta"]["source"] == "manpages-ja"][:250]
    return expand_tokenizer(base, ja_train, path, new_vocab_size=2500)


def test_special_tokens_and_ids(base):
    sp = load_tokenizer(base)
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert sp.get_piece_size() == 1500
    ids = [sp.piece_to_id(t) for t in CHAT_TOKENS]
    assert ids == list(range(4, 4 + len(CHAT_TOKENS)))
    encoded = sp.encode("<|user|>Where is Tokyo?<|end|><|assistant|>East.")
    for t in ("<|user|>", "<|end|>", "<|assistant|>"):
        assert encoded.count(sp.piece_to_id(t)) == 1  # never split
    text = "first line\n\n  indented line"
    assert sp.encode(text, out_type=str).count("\n") == 2 and sp.decode(sp.encode(text)) == text


def test_byte_fallback_round_trips_unseen_scripts(base):
    sp = load_tokenizer(base)
    ja = split("ja", True)[0]["text"][:500]
    ids = sp.encode(ja)
    assert sp.decode(ids) == ja
    assert sp.unk_id() not in ids
    assert sum(sp.is_byte(i) for i in ids) > 0.5 * len(ids)  # an English vocabulary: mostly bytes


def test_bpe_trains_and_round_trips(tmp_path):
    sp = train_tokenizer(split("en", False)[:80], str(tmp_path / "bpe.model"), vocab_size=800, model_type="bpe")
    assert load_proto(str(tmp_path / "bpe.model")).trainer_spec.model_type == 2
    text = split("en", True)[0]["text"]
    assert sp.decode(sp.encode(text)) == text


def test_report_counts_by_hand(base):
    sp = load_tokenizer(base)
    text = "日本語 and English"
    pieces = sp.encode(text, out_type=str)
    report = tokenizer_report(sp, [text])
    assert report["tokens"] == len(pieces) and report["chars"] == len(text)
    assert report["byte_fallback_share"] == round(sum(bool(re.fullmatch(r"<0x[0-9A-F]{2}>", p)) for p in pieces) / len(pieces), 4)
    assert report["cjk_coverage"] == 0.0


def _piece_bytes(sp, i):
    piece = sp.id_to_piece(i)
    m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")


@pytest.mark.slow
def test_expansion_keeps_old_ids_and_maps_new_pieces(base, expanded):
    old, new = load_proto(base), load_proto(expanded.model_path)
    assert expanded.base_vocab_size == len(old.pieces) == 1500
    assert expanded.vocab_size == len(new.pieces) > 1500 + 500
    for a, b in zip(old.pieces, new.pieces):  # every old id keeps its piece, score and type
        assert (a.piece, a.score, a.type) == (b.piece, b.score, b.type)
    old_pieces = {p.piece for p in old.pieces}
    added = [p.piece for p in new.pieces[1500:]]
    assert added == expanded.new_pieces and not old_pieces & set(added)
    assert expanded.new_piece_ids == list(range(1500, expanded.vocab_size))
    sp_old = load_tokenizer(base)
    for new_id, old_ids in expanded.init_map.items():  # the old ids spell the new piece exactly
        assert old_ids and all(i < 1500 for i in old_ids)
        text = new.pieces[new_id].piece.replace("\u2581", " ").encode("utf-8")
        assert b"".join(_piece_bytes(sp_old, i) for i in old_ids) == text, new.pieces[new_id].piece


@pytest.mark.slow
def test_expansion_report_before_after(base, expanded):
    held_ja = [d["text"] for d in split("ja", True)]
    held_en = [d["text"] for d in split("en", True)]
    before, after = (tokenizer_report(load_tokenizer(p), held_ja) for p in (base, expanded.model_path))
    assert before["cjk_coverage"] < 0.05 and after["cjk_coverage"] > 0.95
    assert after["byte_fallback_share"] < 0.1 < 0.5 < before["byte_fallback_share"]
    assert after["chars_per_token"] > 2.5 * before["chars_per_token"]
    en_before, en_after = (tokenizer_report(load_tokenizer(p), held_en) for p in (base, expanded.model_path))
    assert en_after["chars_per_token"] >= 0.98 * en_before["chars_per_token"]  # English not hurt
    sp = load_tokenizer(expanded.model_path)
    for text in held_ja[:20]:
        assert sp.decode(sp.encode(text)) == text
