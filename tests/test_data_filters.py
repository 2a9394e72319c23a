"""Quality filters: hand-computed values, hand-checked decisions, and real vendored text."""
import os

import pytest

from hibari.data import CORPUS_DIR
from hibari.data.clean import clean_docs
from hibari.data.filters import (
    FilterStats,
    compile_wordlist,
    default_filters,
    detect_language,
    duplicate_fractions,
    duplicate_ngram_char_fraction,
    filter_docs,
    gopher_quality,
    gopher_repetition,
    japanese_quality,
    top_ngram_char_fraction,
    wordlist_filter,
)
from hibari.data.sources import read_docs

CORPUS = str(CORPUS_DIR)


@pytest.fixture(scope="module")
def corpus():
    docs = list(clean_docs(read_docs(os.path.join(CORPUS, "*.jsonl.gz"))))
    return {d["id"]: d for d in docs}


def doc(text, lang="en"):
    return {"id": "x", "text": text, "meta": {"lang": lang}}


def test_repetition_measures_hand_computed():
    assert duplicate_fractions(["a", "bb", "a", "a"]) == (0.5, 2 / 5)
    # bigram ("the","cat") occurs twice: 2 * 6 characters of 15
    assert top_ngram_char_fraction("the cat the cat sat".split(), 2) == pytest.approx(12 / 15)
    assert top_ngram_char_fraction("a b c d".split(), 2) == 0.0  # nothing repeats
    # second "a b c" covers words 3..5
    assert duplicate_ngram_char_fraction(list("abcabcd"), 3) == pytest.approx(3 / 7)
    assert duplicate_ngram_char_fraction(list("abcdefg"), 3) == 0.0


def test_language_detection_on_vendored_text(corpus):
    en = [d for i, d in corpus.items() if i.startswith(("botchan", "kjv"))]
    ja = [d for i, d in corpus.items() if i.startswith("manpages-ja")]
    assert all(detect_language(d["text"])[0] == "en" for d in en)
    assert sum(detect_language(d["text"])[0] == "ja" for d in ja) >= 0.95 * len(ja)
    assert detect_language("我们的研究表明这个方法有效")[0] == "zh"
    assert detect_language("안녕하세요 만나서 반갑습니다")[0] == "ko"
    assert detect_language("Der Hund und die Katze sind im Garten")[0] == "latin"


def test_gopher_quality_hand_checked(corpus):
    good = corpus["botchan/0010"]
    assert gopher_quality(doc(good["text"])) is None
    words = good["text"].split()
    assert gopher_quality(doc(" ".join(words[:40]))) == "gopher_quality.word_count"
    assert gopher_quality(doc(" ".join(["supercalifragilistic"] * 60))) == "gopher_quality.mean_word_length"
    assert gopher_quality(doc(" ".join(w + " #tag" for w in words[:100]))) == "gopher_quality.symbol_ratio"
    bullets = "\n".join("- " + " ".join(words[i:i + 8]) for i in range(0, 400, 8))
    assert gopher_quality(doc(bullets)) == "gopher_quality.bullet_lines"
    ellipses = "\n".join(" ".join(words[i:i + 16]) + "..." for i in range(0, 400, 16))  # 1 symbol / 16 words
    assert gopher_quality(doc(ellipses)) == "gopher_quality.ellipsis_lines"
    numbers = " ".join(str(1000 + i) for i in range(80)) + " the and of"
    assert gopher_quality(doc(numbers)) == "gopher_quality.alpha_words"
    no_stop = " ".join(w for w in words if w.lower() not in {"the", "be", "to", "of", "and", "that", "have", "with"})
    assert gopher_quality(doc(no_stop)) == "gopher_quality.stop_words"
    assert gopher_quality(doc("短い", "ja")) is None  # English rules leave Japanese alone


def test_gopher_repetition_hand_checked(corpus):
    text = corpus["botchan/0010"]["text"]
    assert gopher_repetition(doc(text)) is None
    paragraphs = text.split("\n\n")
    tripled = doc("\n\n".join(paragraphs * 3))
    assert gopher_repetition(tripled) == "gopher_repetition.dup_lines"  # its paragraphs are single lines
    assert gopher_repetition(tripled, max_dup_lines=1.0) == "gopher_repetition.dup_paragraphs"
    assert gopher_repetition(doc(text + "\n\n" + text)).startswith("gopher_repetition.dup")
    spam = " ".join(["buy cheap watches now"] * 30) + " " + text
    total = sum(len(w) for w in spam.split())
    # "buy cheap" covers 30*8 chars (< 0.20), "buy cheap watches now" 30*18 chars (> 0.16)
    assert top_ngram_char_fraction(spam.split(), 2) == pytest.approx(240 / total) and 240 / total < 0.2
    assert top_ngram_char_fraction(spam.split(), 4) == pytest.approx(540 / total) and 540 / total > 0.16
    assert gopher_repetition(doc(spam)) == "gopher_repetition.top_4gram"
    ja = corpus["manpages-ja/man1/ls.1"]["text"] if "manpages-ja/man1/ls.1" in corpus else None
    ja = ja or next(d["text"] for i, d in corpus.items() if i.startswith("manpages-ja"))
    assert gopher_repetition(doc(ja[:3000] + "\n" + "\n".join([ja[:200]] * 3), "ja")) is not None


def test_japanese_rules_hand_checked(corpus):
    ok = [d for i, d in corpus.items() if i.startswith("manpages-ja")]
    passed = sum(japanese_quality(doc(d["text"], "ja")) is None for d in ok)
    assert passed >= 0.8 * len(ok)
    prose = next(d["text"] for d in ok if japanese_quality(doc(d["text"], "ja")) is None)
    assert japanese_quality(doc(prose[:100], "ja")) == "japanese.char_count"
    assert japanese_quality(doc("カタカナノミデカカレタブンショウ。" * 30, "ja")) == "japanese.hiragana_ratio"
    assert japanese_quality(doc("これはテストですがカタカナガオオイブンショウデス。" * 30, "ja")) == "japanese.katakana_ratio"
    assert japanese_quality(doc("これは ascii ばかりの text で a b c d e f g h i j k l m n o p q r s t." * 20, "ja")) \
        == "japanese.japanese_ratio"
    assert japanese_quality(doc("つづきはこちら…\n" * 40, "ja")) in ("japanese.ellipsis_sentences", "japanese.sentence_length")
    assert japanese_quality(doc(prose, "en")) is None  # Japanese rules leave English alone


def test_wordlist_matches_whole_ascii_words_and_japanese_substrings():
    pattern = compile_wordlist(["casino", "出会い系"])
    assert wordlist_filter(doc("Visit our Casino tonight"), pattern) == "wordlist"
    assert wordlist_filter(doc("occasional casinos"), pattern) is None  # not whole words
    assert wordlist_filter(doc("無料の出会い系サイト", "ja"), pattern) == "wordlist"
    assert wordlist_filter(doc("one casino mention", "en"), pattern, max_hits=1) is None


def test_filter_stats_account_for_every_document(corpus):
    docs = list(corpus.values())[::3]
    stats = FilterStats()
    kept = list(filter_docs(docs, default_filters(wordlist=["casino"]), stats))
    report = stats.report()
    assert report["docs_in"] == len(docs) and report["docs_out"] == len(kept)
    assert report["docs_in"] == report["docs_out"] + sum(d["docs"] for d in report["dropped"].values())
    assert report["chars_in"] == report["chars_out"] + sum(d["chars"] for d in report["dropped"].values())
    assert 0.6 * len(docs) < len(kept) < len(docs)  # real text: most kept, some dropped
    assert all(d["meta"]["lang"] in ("en", "ja") for d in kept)
    assert set(report["languages_kept"]) == {"en", "ja"}
    # the input documents are not mutated (meta is copied before tagging)
    assert all("lang" in d["meta"] for d in docs)
