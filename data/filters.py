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


def script_counts(text: str) -> dict[str, int]:
    return {"hiragana": len(HIRAGANA.findall(text)), "katakana": len(KATAKANA.findall(text)),
            "han": len(HAN.findall(text)), "hangul": len(HANGUL.findall(text)),
            "latin": len(LATIN.findall(text))}


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
    stop = sum(w in EN_STOP_WORDS for w in words) / max(1, len(words))
    return ("en", c["latin"] / letters) if stop >= 0.02 else ("latin", c["latin"] / letters)


def language_filter(doc: Doc, keep: Iterable[str] = ("en", "ja")) -> str | None:
    lang, score = detect_language(doc["text"])
    doc["meta"]["lang"] = lang
    return None if lang in keep else f"language.{lang}"


# ------------------------------------------------------------------ Gopher quality (English)
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
    mean_len = sum(len(w) for w in words) / n
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
    if sum(any(ch.isalpha() for ch in w) for w in words) < min_alpha_words * n:
        return "gopher_quality.alpha_words"
    if len(EN_STOP_WORDS.intersection(w.lower() for w in words)) < min_stop_words:
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


def _ngrams(units: Sequence[str], n: int) -> Iterator:
    """n-grams as hashable keys; `units` is a list of words or a string of characters."""
    if isinstance(units, str):
        return (units[i:i + n] for i in range(len(units) - n + 1))
    return (tuple(units[i:i + n]) for i in range(len(units) - n + 1))


def top_ngram_char_fraction(units: Sequence[str], n: int) -> float:
    """Characters covered by the most frequent n-gram (all its occurrences) / all characters."""
    grams = Counter(_ngrams(units, n))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / max(1, sum(map(len, units)))


def duplicate_ngram_char_fraction(units: Sequence[str], n: int) -> float:
    """Characters of units covered by repeated occurrences (not the first) of any n-gram."""
    if len(units) < n:
        return 0.0
    first: dict = {}
    starts = np.array([i for i, g in enumerate(_ngrams(units, n)) if first.setdefault(g, i) != i], dtype=np.int64)
    depth = np.zeros(len(units) + 1, dtype=np.int64)  # +1 where a repeated n-gram starts, -1 after it
    np.add.at(depth, starts, 1)
    np.add.at(depth, starts + n, -1)
    covered = np.cumsum(depth[:-1]) > 0
    lengths = np.ones(len(units)) if isinstance(units, str) else np.fromiter(map(len, units), float, len(units))
    return float(lengths[covered].sum() / max(1.0, lengths.sum()))


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
    for n, limit in (top_ngram or GOPHER_TOP_NGRAM).items():
        if top_ngram_char_fraction(units, n * scale) > limit:
            return f"gopher_repetition.top_{n}gram"
    for n, limit in (dup_ngram or GOPHER_DUP_NGRAM).items():
        if duplicate_ngram_char_fraction(units, n * scale) > limit:
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
    chars = sum(not ch.isspace() for ch in text)
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

    def report(self) -> dict:
        return {"docs_in": self.docs_in, "chars_in": self.chars_in, "docs_out": self.docs_out,
                "chars_out": self.chars_out, "languages_kept": dict(self.languages),
                "dropped": {r: {"docs": self.dropped[r], "chars": self.dropped_chars[r],
                                "examples": self.examples.get(r, [])}
                            for r in sorted(self.dropped)}}


def filter_docs(docs: Iterable[Doc], filters: list[Filter], stats: FilterStats | None = None) -> Iterator[Doc]:
    """Stream the documents every filter keeps; the first rejecting filter's reason is counted."""
    stats = stats if stats is not None else FilterStats()
    for doc in docs:
        stats.docs_in += 1
        stats.chars_in += len(doc["text"])
        doc = {**doc, "meta": dict(doc.get("meta", {}))}
        reason = next((r for r in (f(doc) for f in filters) if r is not None), None)
        if reason is None:
            stats.docs_out += 1
            stats.chars_out += len(doc["text"])
            stats.languages[doc["meta"].get("lang", "?")] += 1
            yield doc
        else:
            stats.dropped[reason] += 1
            stats.dropped_chars[reason] += len(doc["text"])
            ids = stats.examples.setdefault(reason, [])
            if len(ids) < 5:
                ids.append(doc["id"])


def default_filters(languages: Iterable[str] = ("en", "ja"), wordlist: Iterable[str] = ()) -> list[Filter]:
    chain: list[Filter] = [partial(language_filter, keep=tuple(languages)), gopher_quality,
                           japanese_quality, gopher_repetition]
    words = list(wordlist)
    if words:
        chain.append(partial(wordlist_filter, pattern=compile_wordlist(words)))
    return chain
