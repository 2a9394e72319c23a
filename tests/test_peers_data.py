"""bench/peers_data.py on a slice of the bundled corpus: hibari's Gopher filters and datatrove's
decide alike where the definitions agree, and the parts defined identically give identical
numbers. No timing assertions (speed lives in bench/ and BENCHMARKS.md)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

pytest.importorskip("datatrove")

from datatrove.pipeline.filters.gopher_repetition_filter import (  # noqa: E402
    find_all_duplicate,
    find_duplicates,
    find_top_duplicate,
    get_n_grams,
)

from bench.peers_data import Datatrove, agreement, load_docs, main  # noqa: E402
from hibari.data.filters import NGrams, duplicate_fractions  # noqa: E402

LIMIT = 150  # the first 150 documents of the corpus: all English (botchan, kjv)


@pytest.fixture(scope="module")
def english():
    _, en = load_docs(LIMIT)
    assert len(en) == LIMIT
    return en


def test_agreement_with_whitespace_words(english):
    """datatrove given hibari's word split: the alpha-word rule is the same rule (exactly equal);
    the rest differ only in definitions (measured on this slice: quality 1.000, repetition 0.987,
    its disagreements all in the duplicate n-gram rules: greedy scan vs coverage)."""
    a = agreement(english, Datatrove("split"))
    q, r = a["gopher_quality"], a["gopher_repetition"]
    assert q["rules"]["alpha_words"]["same"]["rate"] == 1.0
    assert q["same"]["rate"] >= 0.97 and r["same"]["rate"] >= 0.95
    for rule in ("dup_lines", "dup_paragraphs", "top_2", "top_3", "top_4"):
        assert r["rules"][rule]["same"]["rate"] >= 0.98, rule
    assert all(k.startswith("dup_") for k in r["disagreements_by_rule"]), r["disagreements_by_rule"]
    assert q["hibari_drops"] + r["hibari_drops"] > 0  # the slice exercises the rules


@pytest.mark.slow  # ~50 s: spaCy tokenizes the slice
def test_agreement_with_datatrove_default_words(english):
    """datatrove's own English words (spaCy); measured on this slice: quality 0.947 (all 8
    disagreements in the alpha-word rule: spaCy makes punctuation separate, letterless words), repetition 0.993."""
    pytest.importorskip("spacy")
    a = agreement(english, Datatrove("spacy"))
    assert a["gopher_quality"]["same"]["rate"] >= 0.9
    assert a["gopher_repetition"]["same"]["rate"] >= 0.95
    assert set(a["gopher_quality"]["disagreements_by_rule"]) <= {"alpha_words"}


def test_identically_defined_parts_give_identical_numbers(english):
    for d in english:
        text = d["text"]
        lines = [x for x in text.split("\n") if x.strip()]
        dup, chars = find_duplicates(lines)  # datatrove's duplicate count, on the same parts
        assert duplicate_fractions(lines) == (dup / len(lines), chars / sum(map(len, lines)))
        words = text.split()
        grams = NGrams(words, 10)
        for n in (2, 3, 4):  # the most frequent n-gram and its count: datatrove joins with spaces
            top = grams.most_frequent(n)
            count, start = top if top is not None else (1, 0)
            assert find_top_duplicate(get_n_grams(words, n)) == count * (grams.chars(start, n) + n - 1)
        for n in range(5, 11):  # datatrove's greedy scan counts disjoint repeats: never more than coverage
            assert find_all_duplicate(words, n) <= round(grams.duplicate_char_fraction(n) * grams.total_chars)


def test_harness_rows(english):
    rows = main(["--rounds", "1", "--limit", "12", "--words", "split"])
    timed = [r for r in rows if r["work"] != "agreement"]
    assert {(r["work"], r["system"]) for r in timed} >= {(w, s) for w in ("gopher_quality", "gopher_repetition",
                                                                          "gopher_chain")
                                                         for s in ("hibari", "datatrove")}
    for r in timed:
        assert {"part", "work", "system", "rounds", "best_s", "median_s", "units_per_s", "unit", "device",
                "versions", "load"} <= set(r)
        assert r["unit"] == "MB/s" and r["units_per_s"] > 0 and r["mb"] > 0 and len(r["load"]) == 3
    (agree,) = [r for r in rows if r["work"] == "agreement"]
    assert agree["docs"] == 12 and agree["agreement"]["gopher_quality"]["same"]["n"] == 12
