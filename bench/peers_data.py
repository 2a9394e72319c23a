"""hibari's Gopher rule filters vs datatrove's, on the bundled corpus: speed and agreement.

    python bench/peers_data.py                      # 5 interleaved rounds, spaCy words for datatrove
    python bench/peers_data.py --rounds 7 --replicate 2 --out /tmp/peers_data.jsonl
    python bench/peers_data.py --words split --rounds 0   # agreement only, datatrove on str.split words

Documents: the bundled corpus (data/assets/corpus) cleaned as `hibari data prepare` cleans it;
the comparison uses the documents hibari's language detector calls English: datatrove's word
tokenizer for Japanese needs spaCy + SudachiPy and its Gopher rules are English rules, while
hibari's repetition rule counts Japanese characters (its own definition, nothing to agree with).
`--replicate K` repeats the document list K times (bigger timing runs). `--baseline FILE` also
times another version of data/filters.py in the same rounds (before/after an optimization).

Speed: one process, one core, rounds interleaved (hibari, datatrove, datatrove, hibari, ...),
best and median of `--rounds`; MB/s of UTF-8 input per core, by wall clock and by the process's
CPU time (`time.process_time`, steadier on a shared machine). Works: `gopher_quality` and
`gopher_repetition` (each filter on every English document) and `gopher_chain` (quality, then
repetition on the documents quality keeps: how both pipelines run them). datatrove's word splits
are cached per text (`lru_cache(5)`), so the chain tokenizes each document once; the cache is
cleared before every timed pass. Rows with system "hibari" only: the repetition filter and the
whole default chain (`filter_docs(default_filters())`: language, Gopher, Japanese rules) on all
documents, English and Japanese.

Agreement (English documents, not timed): the share of documents with the same keep/drop
decision, ± standard error, for each filter, and the same for each rule alone (the other rules
switched off in both), so a disagreement is traced to the rules that decide differently.
Thresholds: datatrove's are set to hibari's values; they agree for every rule. The definitions
that differ are listed in DEFINITIONS (printed with the table). `--words split` gives datatrove
whitespace words (a datatrove `WordTokenizer` over `str.split`, hibari's split) and isolates the
part of the disagreement that word splitting causes.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import cpu_model, emit, versions  # noqa: E402
from hibari.base.stats import rate  # noqa: E402
from hibari.data import CORPUS_DIR  # noqa: E402
from hibari.data.clean import clean_docs  # noqa: E402
from hibari.data.filters import (  # noqa: E402
    GOPHER_DUP_NGRAM,
    GOPHER_TOP_NGRAM,
    default_filters,
    detect_language,
    filter_docs,
    gopher_quality,
    gopher_repetition,
)
from hibari.data.sources import read_docs  # noqa: E402

CORPUS = os.path.join(str(CORPUS_DIR), "*.jsonl.gz")
INF = math.inf

DEFINITIONS = {
    "word_count": "datatrove counts its tokenizer's words that are not all punctuation; hibari whitespace words",
    "mean_word_length": "datatrove: mean over its non-punctuation words; hibari: over whitespace words",
    "symbol_ratio": "datatrove: '#' / words and ('...' + '…') / words, each > 0.1; hibari: their sum / words > 0.1",
    "bullet_lines": "hibari: bullets - * • · over non-blank lines; datatrove: • - over all lines (blank ones too)",
    "ellipsis_lines": "hibari: over non-blank lines; datatrove: over all lines",
    "alpha_words": "same rule (words with a letter / words < 0.8); words differ only by the split",
    "stop_words": "hibari lowercases words; datatrove matches them as written",
    "dup_lines": "hibari: non-blank lines; datatrove: split on \\n+ (whitespace-only lines count)",
    "dup_paragraphs": "hibari: split on \\n\\s*\\n, blank dropped; datatrove: \\n{2,} of the stripped text",
    "dup_line_chars": "hibari: / characters of the lines; datatrove: / len(text)",
    "dup_paragraph_chars": "hibari: / characters of the paragraphs; datatrove: / len(text)",
    "top_ngram": "hibari: count x word characters / word characters; datatrove: count x len(' '.join) / len(text)",
    "dup_ngram": "hibari: words covered by any repeated occurrence; datatrove: greedy scan that jumps n words "
                 "after a repeat, / len(text)",
}

QUALITY_RULES = {  # rule -> (hibari kwargs that leave only it on, datatrove kwargs that do)
    "word_count": ("min_words max_words", "min_doc_words max_doc_words"),
    "mean_word_length": ("min_mean_word max_mean_word", "min_avg_word_length max_avg_word_length"),
    "symbol_ratio": ("max_symbol_ratio", "max_symbol_word_ratio"),
    "bullet_lines": ("max_bullet_lines", "max_bullet_lines_ratio"),
    "ellipsis_lines": ("max_ellipsis_lines", "max_ellipsis_lines_ratio"),
    "alpha_words": ("min_alpha_words", "max_non_alpha_words_ratio"),
    "stop_words": ("min_stop_words", "min_stop_words"),
}
QUALITY_OFF = {"min_words": 0, "max_words": INF, "min_mean_word": 0, "max_mean_word": INF,
               "max_symbol_ratio": INF, "max_bullet_lines": INF, "max_ellipsis_lines": INF,
               "min_alpha_words": 0, "min_stop_words": 0}
REPETITION_RULES = {"dup_lines": ("max_dup_lines", "dup_line_frac"),
                    "dup_paragraphs": ("max_dup_paragraphs", "dup_para_frac"),
                    "dup_line_chars": ("max_dup_line_chars", "dup_line_char_frac"),
                    "dup_paragraph_chars": ("max_dup_paragraph_chars", "dup_para_char_frac")}
REPETITION_OFF = {"max_dup_lines": INF, "max_dup_paragraphs": INF, "max_dup_line_chars": INF,
                  "max_dup_paragraph_chars": INF, "top_ngram": {2: INF}, "dup_ngram": {5: INF}}


def hibari_defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def datatrove_kwargs() -> tuple[dict, dict]:
    """datatrove's thresholds set to hibari's values (every Gopher threshold has a counterpart)."""
    q, r = hibari_defaults(gopher_quality), hibari_defaults(gopher_repetition)
    quality = {"min_doc_words": q["min_words"], "max_doc_words": q["max_words"],
               "min_avg_word_length": q["min_mean_word"], "max_avg_word_length": q["max_mean_word"],
               "max_symbol_word_ratio": q["max_symbol_ratio"], "max_bullet_lines_ratio": q["max_bullet_lines"],
               "max_ellipsis_lines_ratio": q["max_ellipsis_lines"],
               "max_non_alpha_words_ratio": q["min_alpha_words"], "min_stop_words": q["min_stop_words"]}
    repetition = {"dup_line_frac": r["max_dup_lines"], "dup_para_frac": r["max_dup_paragraphs"],
                  "dup_line_char_frac": r["max_dup_line_chars"], "dup_para_char_frac": r["max_dup_paragraph_chars"],
                  "top_n_grams": tuple(GOPHER_TOP_NGRAM.items()), "dup_n_grams": tuple(GOPHER_DUP_NGRAM.items())}
    return quality, repetition


class Datatrove:
    """datatrove's two Gopher filters behind hibari's `doc -> reason | None` shape."""

    def __init__(self, words: str = "spacy"):
        from datatrove.data import Document
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
        from datatrove.utils.text import split_into_parts
        from datatrove.utils.word_tokenizers import WordTokenizer

        class SplitWords(WordTokenizer):
            """hibari's word split (str.split) as a datatrove word tokenizer."""
            def word_tokenize(self, text):
                return text.split()

            def sent_tokenize(self, text):
                return [text]

            def span_tokenize(self, text):
                return [(0, len(text))]

        if words not in ("spacy", "split"):
            raise ValueError(f"--words must be spacy or split, not {words!r}")
        self.words = words
        self.language = "en" if words == "spacy" else SplitWords()
        self.Document, self.Quality, self.Repetition = Document, GopherQualityFilter, GopherRepetitionFilter
        self.clear_cache = split_into_parts.cache_clear
        quality, repetition = datatrove_kwargs()
        self.quality_kwargs, self.repetition_kwargs = quality, repetition
        self.quality_filter = self.Quality(**quality, language=self.language)
        self.repetition_filter = self.Repetition(**repetition, language=self.language)

    @staticmethod
    def reason(result) -> str | None:
        if result is True:
            return None
        return result[1] if isinstance(result, tuple) else "dropped"

    def quality(self, doc, f=None) -> str | None:
        return self.reason((f or self.quality_filter).filter(self.Document(text=doc["text"], id=doc["id"])))

    def repetition(self, doc, f=None) -> str | None:
        return self.reason((f or self.repetition_filter).filter(self.Document(text=doc["text"], id=doc["id"])))

    def quality_only(self, rule: str):
        on = QUALITY_RULES[rule][1].split()
        return self.Quality(**{k: (v if k in on else None) for k, v in self.quality_kwargs.items()},
                            language=self.language)

    def repetition_only(self, rule: str):
        kw = {k: None for k in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac")}
        kw.update(top_n_grams=(), dup_n_grams=())
        if rule in REPETITION_RULES:
            key = REPETITION_RULES[rule][1]
            kw[key] = self.repetition_kwargs[key]
        else:
            kind, n = rule.rsplit("_", 1)
            table = GOPHER_TOP_NGRAM if kind == "top" else GOPHER_DUP_NGRAM
            kw["top_n_grams" if kind == "top" else "dup_n_grams"] = ((int(n), table[int(n)]),)
        return self.Repetition(**kw, language=self.language)


def hibari_quality_only(rule: str) -> dict:
    q = hibari_defaults(gopher_quality)
    return {**QUALITY_OFF, **{k: q[k] for k in QUALITY_RULES[rule][0].split()}}


def hibari_repetition_only(rule: str) -> dict:
    r = hibari_defaults(gopher_repetition)
    if rule in REPETITION_RULES:
        key = REPETITION_RULES[rule][0]
        return {**REPETITION_OFF, key: r[key]}
    kind, n = rule.rsplit("_", 1)
    if kind == "top":
        return {**REPETITION_OFF, "top_ngram": {int(n): GOPHER_TOP_NGRAM[int(n)]}}
    return {**REPETITION_OFF, "dup_ngram": {int(n): GOPHER_DUP_NGRAM[int(n)]}}


REPETITION_ALL = list(REPETITION_RULES) + [f"top_{n}" for n in GOPHER_TOP_NGRAM] + [f"dup_{n}" for n in GOPHER_DUP_NGRAM]


def load_docs(limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """(all cleaned documents tagged with hibari's language, the English ones)."""
    docs = list(clean_docs(read_docs(CORPUS)))[:limit]
    for d in docs:
        d["meta"] = {**d.get("meta", {}), "lang": detect_language(d["text"])[0]}
    return docs, [d for d in docs if d["meta"]["lang"] == "en"]


def agreement(docs: list[dict], dt: Datatrove) -> dict:
    """Same keep/drop share (± se) per filter and per rule alone; disagreements traced to rules."""
    out = {}
    for name, rules, h_fn, d_fn, h_only, d_only in (
            ("gopher_quality", list(QUALITY_RULES), gopher_quality, dt.quality, hibari_quality_only, dt.quality_only),
            ("gopher_repetition", REPETITION_ALL, gopher_repetition, dt.repetition, hibari_repetition_only,
             dt.repetition_only)):
        d_filters = {r: d_only(r) for r in rules}
        h_kwargs = {r: h_only(r) for r in rules}
        same, per_rule, causes = [], {r: {"same": [], "hibari_drops": 0, "datatrove_drops": 0} for r in rules}, {}
        for doc in docs:
            h, d = h_fn(doc) is not None, d_fn(doc) is not None
            same.append(h == d)
            differing = []
            for r in rules:
                hr, dr = h_fn(doc, **h_kwargs[r]) is not None, d_fn(doc, d_filters[r]) is not None
                per_rule[r]["same"].append(hr == dr)
                per_rule[r]["hibari_drops"] += hr
                per_rule[r]["datatrove_drops"] += dr
                if hr != dr:
                    differing.append(r)
            if h != d:
                key = "+".join(differing) or "order (rules agree alone)"
                causes[key] = causes.get(key, 0) + 1
        out[name] = {"same": rate(same), "hibari_drops": sum(h_fn(x) is not None for x in docs),
                     "datatrove_drops": sum(d_fn(x) is not None for x in docs),
                     "rules": {r: {**v, "same": rate(v["same"])} for r, v in per_rule.items()},
                     "disagreements_by_rule": dict(sorted(causes.items(), key=lambda kv: -kv[1]))}
    return out


def bytes_of(docs) -> int:
    return sum(len(d["text"].encode("utf-8")) for d in docs)


def environment() -> dict:
    return {"device": cpu_model(), "versions": versions("numpy", "datatrove", "spacy")}


def load_baseline(path: str):
    """Another version of data/filters.py (e.g. `git show REV:data/filters.py > FILE`), timed as
    system "hibari-baseline" in the same interleaved rounds."""
    spec = importlib.util.spec_from_file_location("hibari_filters_baseline", path)
    if spec is None or not os.path.isfile(path):
        raise SystemExit(f"--baseline {path}: not a Python file; write one with "
                         f"`git show REV:data/filters.py > FILE`")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def works(en: list[dict], all_docs: list[dict], dt: Datatrove | None, baseline=None) -> dict:
    """work -> {system: callable running it once}."""
    def chain(quality, repetition):
        return lambda: [repetition(d) for d in en if quality(d) is None]

    def each(fn, docs):
        return lambda: [fn(d) for d in docs]

    def chain_all():
        return list(filter_docs(all_docs, default_filters()))

    w = {"gopher_quality": {"hibari": each(gopher_quality, en)},
         "gopher_repetition": {"hibari": each(gopher_repetition, en)},
         "gopher_chain": {"hibari": chain(gopher_quality, gopher_repetition)},
         "gopher_repetition_en_ja": {"hibari": each(gopher_repetition, all_docs)},
         "default_chain_en_ja": {"hibari": chain_all}}
    if baseline is not None:
        b = baseline
        w["gopher_quality"]["hibari-baseline"] = each(b.gopher_quality, en)
        w["gopher_repetition"]["hibari-baseline"] = each(b.gopher_repetition, en)
        w["gopher_chain"]["hibari-baseline"] = chain(b.gopher_quality, b.gopher_repetition)
        w["gopher_repetition_en_ja"]["hibari-baseline"] = each(b.gopher_repetition, all_docs)
        w["default_chain_en_ja"]["hibari-baseline"] = lambda: list(b.filter_docs(all_docs, b.default_filters()))
    if dt is not None:
        w["gopher_quality"]["datatrove"] = each(dt.quality, en)
        w["gopher_repetition"]["datatrove"] = each(dt.repetition, en)
        w["gopher_chain"]["datatrove"] = chain(dt.quality, dt.repetition)
    return w


def timings(work: dict, rounds: int, dt: Datatrove | None) -> dict:
    """{work: {system: [(wall seconds, CPU seconds of this process) per round]}}, systems
    interleaved, their order alternating."""
    times = {name: {s: [] for s in systems} for name, systems in work.items()}
    for r in range(rounds):
        for name, systems in work.items():
            order = list(systems) if r % 2 == 0 else list(systems)[::-1]
            for s in order:
                if dt is not None:
                    dt.clear_cache()
                t, c = time.perf_counter(), time.process_time()
                systems[s]()
                times[name][s].append((time.perf_counter() - t, time.process_time() - c))
    return times


def fmt_rate(x: dict) -> str:
    return "-" if x["rate"] is None else f"{x['rate']:.3f} ± {x['stderr']:.3f}"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (0: agreement only)")
    ap.add_argument("--replicate", type=int, default=1, help="repeat the documents K times for timing")
    ap.add_argument("--limit", type=int, help="use only the first N documents of the corpus")
    ap.add_argument("--words", default="spacy", choices=("spacy", "split"),
                    help="datatrove's word split: its English spaCy tokenizer (default) or str.split")
    ap.add_argument("--no-agreement", action="store_true", help="skip the agreement pass")
    ap.add_argument("--no-datatrove", action="store_true", help="time hibari alone (no peer)")
    ap.add_argument("--baseline", help="also time this version of data/filters.py (system hibari-baseline)")
    ap.add_argument("--out", help="append the result rows to this JSONL file")
    a = ap.parse_args(argv)
    all_docs, en = load_docs(a.limit)
    dt = None if a.no_datatrove else Datatrove(a.words)
    env = environment()
    rows: list[dict] = []

    agree = None if (a.no_agreement or dt is None) else agreement(en, dt)
    timed_en, timed_all = en * a.replicate, all_docs * a.replicate
    mb = {"gopher_quality": bytes_of(timed_en), "gopher_repetition": bytes_of(timed_en),
          "gopher_chain": bytes_of(timed_en), "gopher_repetition_en_ja": bytes_of(timed_all),
          "default_chain_en_ja": bytes_of(timed_all)}
    baseline = load_baseline(a.baseline) if a.baseline else None
    times = timings(works(timed_en, timed_all, dt, baseline), a.rounds, dt) if a.rounds > 0 else {}
    load = [round(x, 2) for x in os.getloadavg()]
    for name, systems in times.items():
        for s, tc in systems.items():
            ts, cs = [t for t, _ in tc], [c for _, c in tc]
            rows.append({"part": "data", "work": name, "system": s, "rounds": len(ts),
                         "best_s": round(min(ts), 4), "median_s": round(statistics.median(ts), 4),
                         "units_per_s": round(mb[name] / 1e6 / min(ts), 3), "unit": "MB/s",
                         "median_units_per_s": round(mb[name] / 1e6 / statistics.median(ts), 3),
                         "best_cpu_s": round(min(cs), 4), "units_per_cpu_s": round(mb[name] / 1e6 / min(cs), 3),
                         "mb": round(mb[name] / 1e6, 3), "docs": len(timed_all if name.endswith("en_ja") else timed_en),
                         "datatrove_words": a.words if s == "datatrove" else None,
                         "device": env["device"], "versions": env["versions"], "load": load})
    if agree is not None:
        rows.append({"part": "data", "work": "agreement", "system": "hibari", "peer": "datatrove",
                     "datatrove_words": a.words, "docs": len(en), "language": "en", "agreement": agree,
                     "thresholds": datatrove_kwargs(), "definitions": DEFINITIONS, "rounds": 0, "best_s": None,
                     "median_s": None, "units_per_s": None, "unit": None, "device": env["device"],
                     "versions": env["versions"], "load": load})

    print(f"\n{len(all_docs)} documents ({bytes_of(all_docs) / 1e6:.2f} MB), {len(en)} English "
          f"({bytes_of(en) / 1e6:.2f} MB); replicate {a.replicate}; datatrove words: {a.words}; "
          f"load {load}; {env['device']}; {env['versions']}")
    if times:
        print("\n| work | system | MB/s (best wall) | median | MB/s per CPU-second | hibari / datatrove (wall) |"
              " per CPU-s | hibari / baseline (wall) |\n|---|---|---|---|---|---|---|---|")
        for name in times:
            by = {r["system"]: r for r in rows if r["work"] == name}
            for s, r in by.items():
                peer = by.get("datatrove") if s == "hibari" else None
                ratio = f"{r['units_per_s'] / peer['units_per_s']:.2f}x" if peer else ""
                cpu_ratio = f"{r['units_per_cpu_s'] / peer['units_per_cpu_s']:.2f}x" if peer else ""
                base = by.get("hibari-baseline") if s == "hibari" else None
                speedup = f"{r['units_per_s'] / base['units_per_s']:.2f}x" if base else ""
                print(f"| {name} | {s} | {r['units_per_s']:.2f} | {r['median_units_per_s']:.2f} | "
                      f"{r['units_per_cpu_s']:.2f} | {ratio} | {cpu_ratio} | {speedup} |")
    if agree is not None:
        for name, g in agree.items():
            print(f"\n{name}: same decision on {fmt_rate(g['same'])} of {len(en)} English documents "
                  f"(drops: hibari {g['hibari_drops']}, datatrove {g['datatrove_drops']}); "
                  f"disagreements by differing rule: {g['disagreements_by_rule']}")
            print("| rule alone | same | hibari drops | datatrove drops | definition |\n|---|---|---|---|---|")
            for r, v in g["rules"].items():
                print(f"| {r} | {fmt_rate(v['same'])} | {v['hibari_drops']} | {v['datatrove_drops']} | "
                      f"{DEFINITIONS.get(r.split('_')[0] + '_ngram' if r[:4] in ('top_', 'dup_') and r[4:].isdigit() else r, '')} |")
    if a.out:
        for r in rows:
            emit(r, a.out)
    return rows


if __name__ == "__main__":
    main()
