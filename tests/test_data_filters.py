"""Quality filters: hand-computed values, hand-checked decisions, and real vendored text."""
import os
import re
import sys
from collections import Counter

import numpy as np
import pytest

from hibari.data import CORPUS_DIR
from hibari.data.clean import clean_docs
from hibari.data.filters import (
    EN_STOP_WORDS,
    GOPHER_DUP_NGRAM,
    GOPHER_TOP_NGRAM,
    HAN,
    HANGUL,
    HIRAGANA,
    KATAKANA,
    LATIN,
    FilterStats,
    NGrams,
    compile_wordlist,
    default_filters,
    detect_language,
    duplicate_fractions,
    duplicate_ngram_char_fraction,
    filter_docs,
    gopher_quality,
    gopher_repetition,
    japanese_quality,
    script_counts,
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


# ------------------------------------------------------------------ fast paths vs brute force
def brute_top(units, n):
    """Most frequent n-gram (first to occur among equals) by counting every window."""
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    best, best_count = None, 0
    for g in dict.fromkeys(grams):
        c = grams.count(g)
        if c > best_count:
            best, best_count = g, c
    if best_count < 2:
        return 0.0
    return best_count * sum(map(len, best)) / max(1, sum(map(len, units)))


def brute_dup(units, n):
    """Characters of units inside a window that equals an earlier window."""
    covered = [False] * len(units)
    for i in range(len(units) - n + 1):
        if any(units[j:j + n] == units[i:i + n] for j in range(i)):
            covered[i:i + n] = [True] * n
    return sum(len(u) for u, c in zip(units, covered) if c) / max(1.0, sum(map(len, units)))


def generated_units(rng, kind, size):
    if kind == "words":  # few distinct words of different lengths: many repeats
        vocab = ["a", "to", "the", "cat", "sat", "mat", "over", "jumped", "quickly", "ok"][:int(rng.integers(2, 11))]
        units = [vocab[i] for i in rng.integers(0, len(vocab), size)]
    else:  # Japanese characters
        alphabet = "あいうえおかきくけこ日本語文字列テスト。"[:int(rng.integers(2, 20))]
        units = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size))
    if size > 20 and rng.random() < 0.5:  # a planted copy of a stretch
        i, j = sorted(rng.integers(0, size, 2))
        units = units[:j] + units[i:j] + units[j:]
    return units


def test_ngram_fractions_equal_brute_force_on_generated_text():
    rng = np.random.default_rng(0)
    for trial in range(120):
        units = generated_units(rng, ("words", "chars")[trial % 2], int(rng.integers(0, 90)))
        grams = NGrams(units, 32)  # one index asked for every n in turn: sorted further on demand
        for n in range(1, 33):
            assert top_ngram_char_fraction(units, n) == brute_top(units, n), (units, n)
            assert duplicate_ngram_char_fraction(units, n) == brute_dup(units, n), (units, n)
            assert grams.top_char_fraction(n) == brute_top(units, n) and grams.duplicate_char_fraction(n) == brute_dup(
                units, n), (units, n)


def test_ngram_fractions_equal_brute_force_on_real_text(corpus):
    en = [d["text"].split()[:250] for i, d in corpus.items() if i.startswith(("kjv", "debref"))][:6]
    ja = ["".join(d["text"].split())[:300] for i, d in corpus.items() if i.startswith("manpages-ja")][:6]
    for units in en + ja:
        scale = 3 if isinstance(units, str) else 1
        for n in (2, 3, 4, 5, 6, 7, 8, 9, 10):
            assert top_ngram_char_fraction(units, n * scale) == brute_top(units, n * scale)
            assert duplicate_ngram_char_fraction(units, n * scale) == brute_dup(units, n * scale)


def plain_top(units, n):
    """Most frequent n-gram by a Counter over tuples (the first inserted wins ties)."""
    grams = Counter(tuple(units[i:i + n]) for i in range(len(units) - n + 1))
    if not grams or max(grams.values()) < 2:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return count * sum(map(len, gram)) / max(1, sum(map(len, units)))


def plain_dup(units, n):
    """Windows whose tuple was seen at an earlier start cover their units."""
    first, covered = {}, [False] * len(units)
    for i in range(len(units) - n + 1):
        if first.setdefault(tuple(units[i:i + n]), i) != i:
            covered[i:i + n] = [True] * n
    return sum(len(u) for u, c in zip(units, covered) if c) / max(1.0, sum(map(len, units)))


def reference_repetition(d):
    """gopher_repetition's rules in their plain form (tuples, Counter, dict), every n computed."""
    text = d["text"]
    lines = [x for x in text.split("\n") if x.strip()]
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    (lf, lc), (pf, pc) = duplicate_fractions(lines), duplicate_fractions(paragraphs)
    for value, limit, name in ((lf, 0.3, "dup_lines"), (pf, 0.3, "dup_paragraphs"), (lc, 0.2, "dup_line_chars"),
                               (pc, 0.2, "dup_paragraph_chars")):
        if value > limit:
            return f"gopher_repetition.{name}"
    ja = d["meta"]["lang"] == "ja"
    units, scale = ("".join(text.split()), 3) if ja else (text.split(), 1)
    for n, limit in GOPHER_TOP_NGRAM.items():
        if plain_top(units, n * scale) > limit:
            return f"gopher_repetition.top_{n}gram"
    for n, limit in GOPHER_DUP_NGRAM.items():
        if plain_dup(units, n * scale) > limit:
            return f"gopher_repetition.dup_{n}gram"
    return None


def test_gopher_repetition_reasons_equal_reference(corpus):
    rng = np.random.default_rng(1)
    texts = [(d["text"][:3000], "ja" if i.startswith("manpages-ja") else "en") for i, d in list(corpus.items())[::20]]
    reasons = set()
    for text, lang in texts:
        words = text.split()
        for rate in (0.0, 0.1, 0.2, 0.4):  # plant repeated stretches: every rule gets its turn
            out = list(words)
            for _ in range(int(rate * 10)):
                i = int(rng.integers(0, max(1, len(out) - 12)))
                out[i:i] = out[i:i + int(rng.integers(3, 12))]
            x = doc(" ".join(out), lang)
            got = gopher_repetition(x)
            assert got == reference_repetition(x)
            reasons.add(got)
    assert len(reasons) >= 4  # kept, and several different reasons


def test_script_counts_and_quality_equal_plain_definitions(corpus):
    every = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)  # no surrogates
    for text in [every] + [d["text"] for d in list(corpus.values())[::25]]:
        assert script_counts(text) == {k: len(p.findall(text)) for k, p in
                                       (("hiragana", HIRAGANA), ("katakana", KATAKANA), ("han", HAN),
                                        ("hangul", HANGUL), ("latin", LATIN))}
    # words with letters: non-ASCII letters, numerals that are not letters (² ½ Ⅻ), punctuation
    odd = "the cat ² ½ Ⅻ 42 -- été ñ ÆØ 3.14 naïve ªº « » … ... x² 1st and the of with"
    for text in (odd, odd * 3, " ".join(odd.split()[::-1] * 10)):
        words = text.split()
        alpha = sum(any(ch.isalpha() for ch in w) for w in words)
        stop = len(EN_STOP_WORDS.intersection(w.lower() for w in words))
        for k in range(1, len(words) + 1):  # the threshold at every count: the rule flips exactly there
            expected = "gopher_quality.alpha_words" if alpha < (k / len(words)) * len(words) else None
            got = gopher_quality(doc(text), min_words=0, min_mean_word=0, max_mean_word=99, max_symbol_ratio=9,
                                 max_bullet_lines=9, max_ellipsis_lines=9, min_alpha_words=k / len(words),
                                 min_stop_words=0)
            assert got == expected
        for k in range(0, 6):
            got = gopher_quality(doc(text), min_words=0, min_mean_word=0, max_mean_word=99, max_symbol_ratio=9,
                                 max_bullet_lines=9, max_ellipsis_lines=9, min_alpha_words=0, min_stop_words=k)
            assert got == (None if stop >= k else "gopher_quality.stop_words")
