"""Rule-based quality filters. Each filter is `doc -> reason | None`; `filter_docs` streams the
kept documents and counts in `FilterStats` what each rule dropped (documents and characters).

- `language_filter`: script-ratio detector (ja / en / zh / ko / latin); tags `meta["lang"]`.
- `gopher_quality`: Gopher (Rae et al. 2021, App. A) quality rules, English.
- `gopher_repetition`: Gopher repetition rules; words for English, characters for Japanese.
- `japanese_quality`: hiragana / katakana / Japanese-character ratios and sentence lengths,
  in the spirit of the Swallow corpus rules (Okazaki et al. 2024).
- `wordlist_filter`: drops documents that contain listed words or phrases.
Thresholds are keyword arguments; `default_filters()` builds the standard chain.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from hibari.data.sources import Doc

Filter = Callable[[Doc], "str | None"]

# ------------------------------------------------------------------ scripts and language
HIRAGANA = re.compile("[\u3041-\u309f]")
KATAKANA = re.compile("[\u30a0-\u30ff\u31f0-\u31ff]")
HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
HANGUL = re.compile("[\uac00-\ud7af\u1100-\u11ff]")
LATIN = re.compile("[A-Za-z\u00c0-\u024f]")
EN_STOP_WORDS = frozenset("the be to of and that have with".split())  # Gopher's list


# the same classes as code-point ranges: (first, last, script)
SCRIPT_RANGES = sorted([(0x3041, 0x309F, "hiragana"), (0x30A0, 0x30FF, "katakana"), (0x31F0, 0x31FF, "katakana"),
                        (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"), (0xF900, 0xFAFF, "han"),
                        (0xAC00, 0xD7AF, "hangul"), (0x1100, 0x11FF, "hangul"), (0x41, 0x5A, "latin"),
                        (0x61, 0x7A, "latin"), (0xC0, 0x24F, "latin")])
_RANGE_EDGES = np.array([e for lo, hi, _ in SCRIPT_RANGES for e in (lo, hi + 1)], dtype=np.uint32)
_RANGE_SCRIPT = [name for _, _, name in SCRIPT_RANGES]


def script_counts(text: str) -> dict[str, int]:
    """Characters of each script (the classes above), counted over code points in one pass."""
    counts = {"hiragana": 0, "katakana": 0, "han": 0, "hangul": 0, "latin": 0}
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    bins = np.bincount(np.searchsorted(_RANGE_EDGES, codes, side="right"), minlength=len(_RANGE_EDGES) + 1)
    for i, name in enumerate(_RANGE_SCRIPT):  # odd bins lie inside a range
        counts[name] += int(bins[2 * i + 1])
    return counts


def detect_language(text: str, ja_min: float = 0.2) -> tuple[str, float]:
    """(language, score) from script ratios. Japanese if CJK+kana make up `ja_min` of the letters
    (technical Japanese text is full of ASCII commands) and kana are present; Chinese if Han
    without kana; English if Latin script with English stop words, else "latin"."""
    c = script_counts(text)
    cjk = c["hiragana"] + c["katakana"] + c["han"]
    letters = cjk + c["hangul"] + c["latin"]
    if letters == 0:
        return "unknown", 0.0
    if c["hangul"] / letters >= 0.3:
        return "ko", c["hangul"] / letters
    if cjk / letters >= ja_min:
        kana = c["hiragana"] + c["katakana"]
        return ("ja", cjk / letters) if kana >= 0.1 * cjk else ("zh", cjk / letters)
    words = text.lower().split()
    stop = sum(map(EN_STOP_WORDS.__contains__, words)) / max(1, len(words))
    return ("en", c["latin"] / letters) if stop >= 0.02 else ("latin", c["latin"] / letters)


def language_filter(doc: Doc, keep: Iterable[str] = ("en", "ja")) -> str | None:
    lang, score = detect_language(doc["text"])
    doc["meta"]["lang"] = lang
    return None if lang in keep else f"language.{lang}"


# ------------------------------------------------------------------ Gopher quality (English)
NO_ASCII_LETTER_WORD = re.compile(r"(?<!\S)[^\sA-Za-z]+(?!\S)")  # a whole str.split() word


def gopher_quality(doc: Doc, min_words=50, max_words=100_000, min_mean_word=3.0, max_mean_word=10.0,
                   max_symbol_ratio=0.1, max_bullet_lines=0.9, max_ellipsis_lines=0.3,
                   min_alpha_words=0.8, min_stop_words=2) -> str | None:
    if doc["meta"].get("lang", "en") != "en":
        return None
    text = doc["text"]
    words = text.split()
    n = len(words)
    if not min_words <= n <= max_words:
        return "gopher_quality.word_count"
    mean_len = sum(map(len, words)) / n
    if not min_mean_word <= mean_len <= max_mean_word:
        return "gopher_quality.mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > max_symbol_ratio:
        return "gopher_quality.symbol_ratio"
    lines = [l for l in text.split("\n") if l.strip()]
    if sum(l.lstrip().startswith(("-", "*", "\u2022", "\u00b7")) for l in lines) > max_bullet_lines * len(lines):
        return "gopher_quality.bullet_lines"
    if sum(l.rstrip().endswith(("...", "\u2026")) for l in lines) > max_ellipsis_lines * len(lines):
        return "gopher_quality.ellipsis_lines"
    # only words without an ASCII letter can lack a letter: check those one by one
    no_alpha = sum(not any(ch.isalpha() for ch in w) for w in NO_ASCII_LETTER_WORD.findall(text))
    if n - no_alpha < min_alpha_words * n:
        return "gopher_quality.alpha_words"
    if len(EN_STOP_WORDS.intersection(text.lower().split())) < min_stop_words:  # = each word lowered
        return "gopher_quality.stop_words"
    return None


# ------------------------------------------------------------------ Gopher repetition
def duplicate_fractions(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier part, fraction of characters in them)."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        seen.add(p)
    total_chars = sum(map(len, parts))
    return dup / max(1, len(parts)), dup_chars / max(1, total_chars)


class NGrams:
    """The n-grams (n <= `max_n`) of `units` (a list of words, or a string of characters) grouped
    exactly, for every n at once. Units become integers (a word: the index of its first
    occurrence; a character: its code point). Prefix doubling, generalised to m-fold steps
    (the ranks of (m*L)-grams are the ranks of m consecutive L-gram ranks packed into one int64,
    one `argsort` per step, stopping once all are distinct), sorts the positions by their first
    L >= n units (sorted further only when a longer n is asked for); the common prefix length of
    neighbours in that order (`lcp`, read off the same ranks) then makes the equal n-grams, for
    any n <= L, the runs with lcp >= n. No n-gram strings or tuples are built and nothing is
    hashed, so the groups are exact."""

    def __init__(self, units: Sequence[str], max_n: int):
        if isinstance(units, str):
            codes = np.frombuffer(units.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
            self.widths = None
            self.total_chars = len(units)
        else:
            codes = np.fromiter(map({}.setdefault, units, range(len(units))), np.int64, len(units))
            self.widths = np.fromiter(map(len, units), np.int64, len(units))
            self.ends = np.concatenate(([0], np.cumsum(self.widths)))
            self.total_chars = int(self.ends[-1])
        self.size = len(codes)
        self.max_n = max(1, int(max_n))
        pad = 4 * self.max_n + 4  # distinct symbols after the end: no n-gram reaching past it equals another
        ranks = np.concatenate((codes + pad, np.arange(pad, dtype=np.int64)))
        self._levels = [(1, 1, ranks)]  # (gram length L, fold m that built the next level, ranks of L-grams)
        self._bound = int(ranks.max()) + 1
        self._order = None
        self._distinct = False  # all grams of the last level distinct: longer ones change nothing
        self.lcp = None

    def _extend(self, n: int) -> None:
        """Sort by longer prefixes (each step as long as one int64 key allows, up to max_n) until
        they cover n units or are all distinct; then the neighbours' common prefix lengths."""
        length, _, ranks = self._levels[-1]
        if self.lcp is not None and (length >= n or self._distinct):
            return
        bound, order = self._bound, self._order
        while length < n and not self._distinct:
            m = min(max(2, 62 // bound.bit_length()), -(-max(n, self.max_n) // length))
            count = len(ranks) - (m - 1) * length
            key = ranks[:count].copy()
            for j in range(1, m):
                key *= bound
                key += ranks[j * length:j * length + count]
            order = np.argsort(key)
            sorted_key = key[order]
            new = np.empty(count, dtype=bool)
            new[0] = True
            np.not_equal(sorted_key[1:], sorted_key[:-1], out=new[1:])
            ranks = np.empty(count, dtype=np.int64)
            ranks[order] = np.cumsum(new) - 1
            bound = int(ranks[order[-1]]) + 1
            self._distinct = bound == count
            self._levels[-1] = (self._levels[-1][0], m, self._levels[-1][2])
            length *= m
            self._levels.append((length, 1, ranks))
        if order is None:
            order = np.argsort(ranks)
        self._bound, self._order = bound, order
        self.sa = sa = order[order < self.size]  # positions sorted by their first L units
        a, b = sa[1:], sa[:-1]
        lcp = np.zeros(max(0, self.size - 1), dtype=np.int64)
        for gram, fold, level in reversed(self._levels):  # greedy: the longest run of equal L-grams first
            same = level[a + lcp] == level[b + lcp]
            np.add(lcp, gram, out=lcp, where=same)
            pairs = np.flatnonzero(same)
            for _ in range(fold - 2):  # up to fold - 1 more L-grams: only pairs still equal can go on
                if not len(pairs):
                    break
                at = lcp[pairs]
                pairs = pairs[level[a[pairs] + at] == level[b[pairs] + at]]
                lcp[pairs] += gram
        self.lcp = lcp

    def _groups(self, n: int):
        """(size of each group of equal n-grams, its first position) in suffix order, or None
        when no n-gram repeats."""
        if n > self.max_n:
            raise ValueError(f"NGrams built for n <= {self.max_n}, asked for {n}")
        if self.size < n:
            return None
        self._extend(n)
        brk = np.empty(self.size + 1, dtype=bool)  # a group starts at 0, where lcp < n; ends at size
        brk[0] = brk[-1] = True
        np.less(self.lcp, n, out=brk[1:-1])
        bounds = np.flatnonzero(brk)
        if len(bounds) == self.size + 1:
            return None
        starts = bounds[:-1]
        return bounds[1:] - starts, np.minimum.reduceat(self.sa, starts)

    def most_frequent(self, n: int) -> tuple[int, int] | None:
        """(count, first position) of the most frequent n-gram, the first to occur among equally
        frequent ones (as `Counter.most_common`); None when no n-gram repeats."""
        g = self._groups(n)
        if g is None:
            return None
        counts, first = g
        count = int(counts.max())
        return count, int(first[counts == count].min())

    def chars(self, start: int, n: int) -> int:
        """Characters of the n units from `start`."""
        return n if self.widths is None else int(self.ends[start + n] - self.ends[start])

    def top_char_fraction(self, n: int) -> float:
        """Characters covered by the most frequent n-gram (all its occurrences) / all characters."""
        top = self.most_frequent(n)
        if top is None:
            return 0.0
        count, start = top
        return count * self.chars(start, n) / max(1, self.total_chars)

    def duplicate_char_fraction(self, n: int) -> float:
        """Characters of units covered by repeated occurrences (not the first) of any n-gram."""
        g = self._groups(n)
        if g is None:
            return 0.0
        counts, first = g
        starts = self.sa[self.sa != np.repeat(first, counts)]
        depth = np.bincount(starts, minlength=self.size + 1) - np.bincount(starts + n, minlength=self.size + 1)
        covered = np.cumsum(depth[:-1]) > 0
        chars = int(covered.sum()) if self.widths is None else int(self.widths[covered].sum())
        return chars / max(1.0, self.total_chars)


def top_ngram_char_fraction(units: Sequence[str], n: int) -> float:
    """Characters covered by the most frequent n-gram (all its occurrences) / all characters."""
    return NGrams(units, n).top_char_fraction(n)


def duplicate_ngram_char_fraction(units: Sequence[str], n: int) -> float:
    """Characters of units covered by repeated occurrences (not the first) of any n-gram."""
    return NGrams(units, n).duplicate_char_fraction(n)


GOPHER_TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def gopher_repetition(doc: Doc, max_dup_lines=0.30, max_dup_paragraphs=0.30, max_dup_line_chars=0.20,
                      max_dup_paragraph_chars=0.20, top_ngram=None, dup_ngram=None,
                      ja_ngram_scale: int = 3) -> str | None:
    """Gopher's repetition rules. Japanese has no spaces: its units are characters and n is
    scaled by `ja_ngram_scale` (a character carries less than a word)."""
    text = doc["text"]
    lines = [l for l in text.split("\n") if l.strip()]
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    line_frac, line_chars = duplicate_fractions(lines)
    para_frac, para_chars = duplicate_fractions(paragraphs)
    if line_frac > max_dup_lines:
        return "gopher_repetition.dup_lines"
    if para_frac > max_dup_paragraphs:
        return "gopher_repetition.dup_paragraphs"
    if line_chars > max_dup_line_chars:
        return "gopher_repetition.dup_line_chars"
    if para_chars > max_dup_paragraph_chars:
        return "gopher_repetition.dup_paragraph_chars"
    ja = doc["meta"].get("lang") == "ja"
    units = "".join(text.split()) if ja else text.split()
    scale = ja_ngram_scale if ja else 1
    top_ngram, dup_ngram = top_ngram or GOPHER_TOP_NGRAM, dup_ngram or GOPHER_DUP_NGRAM
    grams = NGrams(units, scale * max([*top_ngram, *dup_ngram], default=1))
    for n, limit in top_ngram.items():
        if grams.top_char_fraction(n * scale) > limit:
            return f"gopher_repetition.top_{n}gram"
    done: dict[int, float] = {}  # n -> duplicate fraction; it never grows with n (a repeated
    for n, limit in dup_ngram.items():  # (n+1)-gram holds two repeated n-grams), so skip an n
        if any(m < n and f <= limit for m, f in done.items()):  # a shorter one's fraction clears
            continue
        done[n] = grams.duplicate_char_fraction(n * scale)
        if done[n] > limit:
            return f"gopher_repetition.dup_{n}gram"
    return None


# ------------------------------------------------------------------ Japanese rules
SENTENCE_END = re.compile(r"(?<=[。!?！？])|\n")


def japanese_quality(doc: Doc, min_chars=200, min_hiragana=0.1, max_katakana=0.5, min_japanese=0.3,
                     min_mean_sentence=10, max_mean_sentence=250, max_ellipsis_sentences=0.2) -> str | None:
    """Ratios are over non-space characters; sentences end at 。!? or a line break."""
    if doc["meta"].get("lang") != "ja":
        return None
    text = doc["text"]
    chars = len("".join(text.split()))  # non-space characters
    if chars < min_chars:
        return "japanese.char_count"
    c = script_counts(text)
    if c["hiragana"] / chars < min_hiragana:
        return "japanese.hiragana_ratio"
    if c["katakana"] / chars > max_katakana:
        return "japanese.katakana_ratio"
    if (c["hiragana"] + c["katakana"] + c["han"]) / chars < min_japanese:
        return "japanese.japanese_ratio"
    sentences = [s.strip() for s in SENTENCE_END.split(text) if s.strip()]
    mean = sum(map(len, sentences)) / max(1, len(sentences))
    if not min_mean_sentence <= mean <= max_mean_sentence:
        return "japanese.sentence_length"
    if sum(s.endswith(("...", "\u2026")) for s in sentences) > max_ellipsis_sentences * len(sentences):
        return "japanese.ellipsis_sentences"
    return None


# ------------------------------------------------------------------ word list
def compile_wordlist(words: Iterable[str]) -> re.Pattern:
    """ASCII entries match whole words (case-insensitive); others (Japanese) match as substrings."""
    alts = [rf"\b{re.escape(w)}\b" if w.isascii() else re.escape(w) for w in words if w.strip()]
    return re.compile("|".join(alts) or r"(?!x)x", re.IGNORECASE)


def wordlist_filter(doc: Doc, pattern: re.Pattern, max_hits: int = 0) -> str | None:
    hits = 0
    for _ in pattern.finditer(doc["text"]):
        hits += 1
        if hits > max_hits:
            return "wordlist"
    return None


# ------------------------------------------------------------------ chain and stats
@dataclass
class FilterStats:
    docs_in: int = 0
    chars_in: int = 0
    docs_out: int = 0
    chars_out: int = 0
    dropped: Counter = field(default_factory=Counter)        # reason -> documents
    dropped_chars: Counter = field(default_factory=Counter)  # reason -> characters
    examples: dict = field(default_factory=dict)             # reason -> first few ids
    languages: Counter = field(default_factory=Counter)      # detected language of kept docs

    def count(self, doc_id: str, reason: str | None, chars: int, lang: str) -> None:
        """One document's decision: kept (`reason` None, in language `lang`) or dropped."""
        self.docs_in += 1
        self.chars_in += chars
        if reason is None:
            self.docs_out += 1
            self.chars_out += chars
            self.languages[lang] += 1
            return
        self.dropped[reason] += 1
        self.dropped_chars[reason] += chars
        ids = self.examples.setdefault(reason, [])
        if len(ids) < 5:
            ids.append(doc_id)

    def report(self) -> dict:
        return {"docs_in": self.docs_in, "chars_in": self.chars_in, "docs_out": self.docs_out,
                "chars_out": self.chars_out, "languages_kept": dict(self.languages),
                "dropped": {r: {"docs": self.dropped[r], "chars": self.dropped_chars[r],
                                "examples": self.examples.get(r, [])}
                            for r in sorted(self.dropped)}}


def first_reason(doc: Doc, filters: list[Filter]) -> str | None:
    """The reason of the first filter that rejects `doc` (filters may add to its meta), or None."""
    return next((r for r in (f(doc) for f in filters) if r is not None), None)


def filter_docs(docs: Iterable[Doc], filters: list[Filter], stats: FilterStats | None = None) -> Iterator[Doc]:
    """Stream the documents every filter keeps; the first rejecting filter's reason is counted."""
    stats = stats if stats is not None else FilterStats()
    for doc in docs:
        doc = {**doc, "meta": dict(doc.get("meta", {}))}
        reason = first_reason(doc, filters)
        stats.count(doc["id"], reason, len(doc["text"]), doc["meta"].get("lang", "?"))
        if reason is None:
            yield doc


def default_filters(languages: Iterable[str] = ("en", "ja"), wordlist: Iterable[str] = ()) -> list[Filter]:
    chain: list[Filter] = [partial(language_filter, keep=tuple(languages)), gopher_quality,
                           japanese_quality, gopher_repetition]
    words = list(wordlist)
    if words:
        chain.append(partial(wordlist_filter, pattern=compile_wordlist(words)))
    return chain
