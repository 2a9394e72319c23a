"""Model-based quality filters: a linear classifier on hashed n-grams (fastText-style) and a
perplexity filter (CCNet-style, Wenzek et al. 2020), plus `plant_noise`, the seeded generator of
low-quality text the two are measured on (bench/quality_filters.py).

- `hashed_counts(text, cfg)`: word n-grams and character n-grams (Japanese has no spaces, so
  character n-grams carry it) hashed into `cfg.n_features` buckets, vectorised in numpy; the hash
  of one n-gram is `ngram_hash` (a 64-bit polynomial + splitmix64 finaliser), so a brute-force
  count reproduces it.
- `train_classifier(reference, other, cfg)`: logistic regression (minibatch Adam, classes weighted
  equally, deterministic by `cfg.seed`) of P(reference | document); `QualityClassifier.save/load`
  keep weights and hyperparameters in one small `.npz` whose bytes depend only on them.
- `PerplexityScoring`: what the perplexity filter needs from a language model, given by the
  caller (data/ knows no models: `hibari data prepare` passes
  `hibari.evaluation.quality_scoring.CheckpointScorer`): per-document bits per UTF-8 byte of each
  document's first tokens; `percentile_keep` keeps, per language, the given share of documents
  with the lowest bits/byte.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from hibari.base.errors import UsageError, UserError
from hibari.data.sources import Doc

MASK64 = (1 << 64) - 1
P_CHAR = 0x100000001B3        # polynomial bases (odd): characters within a word / n-gram
P_WORD = 0x9E3779B97F4A7C15  # words within a word n-gram
SALT_CHAR = 0x5851F42D4C957F2D
SALT_WORD = 0x14057B7EF767814F
MAX_WORD_CHARS = 32          # longer words hash their first 32 characters


class QualityModelError(UserError, ValueError):
    """A quality model file that cannot be used; the message names it."""


@dataclass(frozen=True)
class HashConfig:
    n_features: int = 1 << 18
    word_ngrams: tuple[int, ...] = (1, 2)
    char_ngrams: tuple[int, ...] = (1, 2, 3)


# ------------------------------------------------------------------ hashing
def _mix(z):
    """splitmix64's finaliser, on numpy uint64 arrays or Python ints."""
    if isinstance(z, int):
        z ^= z >> 30
        z = (z * 0xBF58476D1CE4E5B9) & MASK64
        z ^= z >> 27
        z = (z * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)
    with np.errstate(over="ignore"):
        z = z ^ (z >> np.uint64(30))
        z = z * np.uint64(0xBF58476D1CE4E5B9)
        z = z ^ (z >> np.uint64(27))
        z = z * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def word_hash(word: str) -> int:
    """64-bit hash of one word: sum over its first MAX_WORD_CHARS characters of
    (code point + 1) * P_CHAR**position, mod 2**64."""
    return sum((ord(ch) + 1) * pow(P_CHAR, j, 1 << 64) for j, ch in enumerate(word[:MAX_WORD_CHARS])) & MASK64


def ngram_hash(gram: Sequence[str] | str, kind: str, n_features: int) -> int:
    """The bucket of one n-gram: `kind` "char" (gram is a string of n characters) or "word"
    (a tuple of n words). The reference definition `hashed_counts` vectorises."""
    n = len(gram)
    h = n
    if kind == "char":
        for ch in gram:
            h = (h * P_CHAR + ord(ch) + 1) & MASK64
        return _mix(h ^ SALT_CHAR) % n_features
    for w in gram:
        h = (h * P_WORD + word_hash(w)) & MASK64
    return _mix(h ^ SALT_WORD) % n_features


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space: what both n-gram kinds read."""
    return " ".join(text.lower().split())


WORD_POWERS = np.array([pow(P_CHAR, j, 1 << 64) for j in range(MAX_WORD_CHARS)], np.uint64)


def _word_hashes(words: list[str]) -> np.ndarray:
    """`word_hash` of each word: one uint64 matrix-vector product (padding code points are 0)."""
    arr = np.array(words, dtype=f"<U{MAX_WORD_CHARS}")  # truncates, zero-pads
    cps = arr.view(np.uint32).reshape(len(words), -1).astype(np.uint64)
    cps += cps > 0
    with np.errstate(over="ignore"):
        return cps @ WORD_POWERS[:cps.shape[1]]


def _rolling(units: np.ndarray, n: int, base: int, add: int) -> np.ndarray:
    m = len(units) - n + 1
    h = np.full(m, n, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(base) + units[j:j + m] + np.uint64(add)
    return h


def hashed_indices(text: str, cfg: HashConfig = HashConfig()) -> np.ndarray:
    """The bucket of every word and character n-gram occurrence of `text` (int64)."""
    t = normalize(text)
    parts = []
    if cfg.char_ngrams and t:
        cps = np.frombuffer(t.encode("utf-32-le"), np.uint32).astype(np.uint64)
        for n in cfg.char_ngrams:
            if len(cps) >= n:
                parts.append(_mix(_rolling(cps, n, P_CHAR, 1) ^ np.uint64(SALT_CHAR)))
    words = t.split(" ") if t else []
    if cfg.word_ngrams and words:
        w = _word_hashes(words)
        for n in cfg.word_ngrams:
            if len(w) >= n:
                parts.append(_mix(_rolling(w, n, P_WORD, 0) ^ np.uint64(SALT_WORD)))
    if not parts:
        return np.zeros(0, np.int64)
    return (np.concatenate(parts) % np.uint64(cfg.n_features)).astype(np.int64)


def hashed_counts(text: str, cfg: HashConfig = HashConfig()) -> tuple[np.ndarray, np.ndarray]:
    """(sorted bucket indices, occurrence counts) of `text`'s n-grams."""
    return np.unique(hashed_indices(text, cfg), return_counts=True)


def featurize(texts: Iterable[str], cfg: HashConfig = HashConfig()):
    """CSR rows (indptr, indices, values): log(1 + count), each row L2-normalised."""
    indptr, idx, val = [0], [], []
    for text in texts:
        i, c = hashed_counts(text, cfg)
        v = np.log1p(c.astype(np.float32))
        v /= max(float(np.sqrt((v * v).sum())), 1e-12)
        idx.append(i)
        val.append(v)
        indptr.append(indptr[-1] + len(i))
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    return np.asarray(indptr, np.int64), cat(idx, np.int64), cat(val, np.float32)


def _row_ids(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


# ------------------------------------------------------------------ classifier
@dataclass(frozen=True)
class ClassifierConfig:
    hashing: HashConfig = field(default_factory=HashConfig)
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 0.05
    l2: float = 1e-6
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        h = d.get("hashing", {})
        hashing = HashConfig(**{**h, **{k: tuple(h[k]) for k in ("word_ngrams", "char_ngrams") if k in h}})
        return cls(**{**d, "hashing": hashing})


@dataclass
class QualityClassifier:
    """P(reference | text) = sigmoid(w · features(text) + b)."""
    weights: np.ndarray  # [n_features] float32
    bias: float
    config: ClassifierConfig

    def score_features(self, indptr, indices, values) -> np.ndarray:
        z = np.bincount(_row_ids(indptr), weights=self.weights[indices] * values,
                        minlength=len(indptr) - 1) + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def score(self, texts: Iterable[str]) -> np.ndarray:
        """P(reference) of each text, float64 [n]."""
        return self.score_features(*featurize(texts, self.config.hashing))

    def save(self, path: str) -> None:
        """A `.npz` whose bytes depend only on the weights and hyperparameters (fixed zip dates)."""
        arrays = {"weights": self.weights.astype(np.float32), "bias": np.float64(self.bias),
                  "config": np.frombuffer(json.dumps(self.config.to_dict(), sort_keys=True).encode(), np.uint8)}
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, a in arrays.items():
                b = io.BytesIO()
                np.lib.format.write_array(b, np.asarray(a), allow_pickle=False)
                z.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), b.getvalue(),
                           compress_type=zipfile.ZIP_DEFLATED)
        from hibari.base.files import write_atomic
        write_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: str) -> "QualityClassifier":
        try:
            with np.load(path, allow_pickle=False) as z:
                cfg = ClassifierConfig.from_dict(json.loads(bytes(z["config"]).decode()))
                weights, bias = z["weights"].astype(np.float32), float(z["bias"])
        except FileNotFoundError:
            from hibari.base.errors import InputNotFound
            raise InputNotFound(f"quality classifier {path} does not exist; train one with "
                                "hibari.data.quality.train_classifier or set classifier_reference") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QualityModelError(f"{path}: not a quality classifier .npz ({type(e).__name__}: {e})") from None
        if weights.shape != (cfg.hashing.n_features,):
            raise QualityModelError(f"{path}: weights shape {weights.shape} != n_features {cfg.hashing.n_features}")
        return cls(weights, bias, cfg)


def train_classifier(reference: Sequence[str], other: Sequence[str],
                     cfg: ClassifierConfig = ClassifierConfig()) -> QualityClassifier:
    """Logistic regression of reference (1) vs other (0) texts: minibatch Adam over the hashed
    features, each class weighted by half over its size, L2 penalty `cfg.l2`; the minibatch order
    comes from `cfg.seed` alone."""
    if not reference or not other:
        raise UsageError(f"train_classifier: needs reference and other texts (got {len(reference)} "
                         f"reference, {len(other)} other)")
    indptr, idx, val = featurize(list(reference) + list(other), cfg.hashing)
    n = len(indptr) - 1
    y = np.r_[np.ones(len(reference)), np.zeros(len(other))]
    sw = np.where(y == 1, 0.5 / len(reference), 0.5 / len(other)) * n
    w = np.zeros(cfg.hashing.n_features, np.float64)
    b = 0.0
    m, v = np.zeros_like(w), np.zeros_like(w)
    mb = vb = 0.0
    b1, b2, eps = 0.9, 0.999, 1e-8
    rng = np.random.default_rng(cfg.seed)
    t = 0
    for _ in range(cfg.epochs):
        order = rng.permutation(n)
        for s in range(0, n, cfg.batch_size):
            rows = order[s:s + cfg.batch_size]
            starts, ends = indptr[rows], indptr[rows + 1]
            lens = ends - starts
            take = np.repeat(starts - np.r_[0, np.cumsum(lens)[:-1]], lens) + np.arange(lens.sum())
            bi, bv, br = idx[take], val[take], np.repeat(np.arange(len(rows)), lens)
            z = np.bincount(br, weights=w[bi] * bv, minlength=len(rows)) + b
            err = (1.0 / (1.0 + np.exp(-z)) - y[rows]) * sw[rows] / len(rows)
            gw = np.bincount(bi, weights=bv * err[br], minlength=len(w)) + cfg.l2 * w
            gb = float(err.sum())
            t += 1
            m = b1 * m + (1 - b1) * gw
            v = b2 * v + (1 - b2) * gw * gw
            w -= cfg.learning_rate * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
            mb = b1 * mb + (1 - b1) * gb
            vb = b2 * vb + (1 - b2) * gb * gb
            b -= cfg.learning_rate * (mb / (1 - b1 ** t)) / (math.sqrt(vb / (1 - b2 ** t)) + eps)
    return QualityClassifier(w.astype(np.float32), float(b), cfg)


# ------------------------------------------------------------------ perplexity
def percentile_keep(scores: Sequence[float], langs: Sequence[str], keep: float) -> np.ndarray:
    """Bool mask: per language, the ceil(keep * n) documents with the lowest score (ties: the
    earlier document first)."""
    if not 0.0 < keep <= 1.0:
        raise UsageError(f"perplexity keep share {keep}: must be in (0, 1]")
    scores = np.asarray(scores, np.float64)
    langs = np.asarray(langs, dtype=object)
    mask = np.zeros(len(scores), bool)
    for lang in sorted(set(langs.tolist())):
        where = np.flatnonzero(langs == lang)
        k = math.ceil(keep * len(where) - 1e-9)
        mask[where[np.argsort(scores[where], kind="stable")[:k]]] = True
    return mask


BitsPerByte = Callable[[Sequence[str]], np.ndarray]
"""Scores a batch of documents: bits per UTF-8 byte of each, float64 [n] (lower: more typical)."""


class PerplexityScoring(Protocol):
    """A language model for the perplexity filter, given to `prepare(cfg, perplexity_scorer=...)`
    (`hibari.evaluation.quality_scoring.CheckpointScorer` is the one `hibari data prepare` uses)."""

    def weights_path(self, checkpoint: str) -> str:
        """The folder holding the weights `checkpoint` names: its files' sizes and mtimes are
        part of the quality stage's fingerprint."""
        ...

    def __call__(self, checkpoint: str, tokenizer: str, max_tokens: int) -> BitsPerByte:
        """The model of `checkpoint` with `tokenizer`, scoring each document's first
        `max_tokens` tokens (the start token included)."""
        ...


# ------------------------------------------------------------------ planted noise
NOISE_KINDS = ("shuffle", "boilerplate", "repeat", "mixed_script")
BOILERPLATE = {
    "en": ["We use cookies to improve your experience. By continuing you accept our cookie policy.",
           "Home | About | Products | Blog | Contact | Login | Register",
           "Copyright (c) All rights reserved. Terms of Use | Privacy Policy",
           "Accept all cookies  Reject  Manage preferences",
           "Skip to main content", "Share on Facebook  Share on Twitter  Email this page",
           "Subscribe to our newsletter for the latest updates and offers!"],
    "ja": ["当サイトではクッキーを使用しています。サイトを利用することで同意したものとみなします。",
           "ホーム | 会社概要 | 製品情報 | ブログ | お問い合わせ | ログイン",
           "Copyright (c) All rights reserved. 無断転載を禁じます。利用規約 | プライバシーポリシー",
           "すべてのクッキーを許可する  拒否する  設定を管理", "メインコンテンツへスキップ",
           "メールマガジンの登録はこちら", "このページをシェアする Twitter Facebook LINE"],
}
NOISE_SYMBOLS = list("#$%&*+=@^~|<>[]{}_/\\") + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
NOISE_CJK = list("あいうえおかきくけこアイウエオカキクケコ日本語文字漢字") + list("、。「」・")


def _is_ja(doc: Doc) -> bool:
    if "lang" in doc.get("meta", {}):
        return doc["meta"]["lang"] == "ja"
    from hibari.data.filters import detect_language
    return detect_language(doc["text"])[0] == "ja"


def _corrupt(text: str, kind: str, ja: bool, rng: np.random.Generator) -> str:
    lines = [l for l in text.split("\n") if l.strip()] or [text]
    if kind == "shuffle":  # word order (ja: 1-4 character chunks) shuffled within each line
        out = []
        for line in lines:
            if ja:
                cuts = np.cumsum(rng.integers(1, 5, size=len(line)))
                cuts = cuts[cuts < len(line)]
                units = [line[a:b] for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(line)])]
            else:
                units = line.split()
            out.append(("" if ja else " ").join(units[i] for i in rng.permutation(len(units))))
        return "\n".join(out)
    if kind == "boilerplate":  # a short piece of the page inside repeated cookie/menu/legal lines
        pool = BOILERPLATE["ja" if ja else "en"]
        keep = lines[:max(1, len(lines) // 5)]
        bp = [pool[i] for i in rng.integers(0, len(pool), size=max(8, 2 * len(keep)))]
        half = len(bp) // 2
        return "\n".join(bp[:half] + keep + bp[half:])
    if kind == "repeat":  # a few lines repeated over and over
        pick = [lines[i] for i in rng.choice(len(lines), size=min(3, len(lines)), replace=False)]
        reps = int(rng.integers(4, 9))
        return "\n".join(line for _ in range(reps) for line in pick)
    if kind == "mixed_script":  # symbols / Latin into Japanese, kana / kanji / symbols into English
        pool = NOISE_SYMBOLS if ja else NOISE_CJK + list("#$%&*+=@^~|<>")
        chars = list(text)
        where = np.flatnonzero(rng.random(len(chars)) < 0.3)
        picks = rng.integers(0, len(pool), size=len(where))
        for w, p in zip(where[::-1], picks[::-1]):
            chars.insert(int(w), pool[p] * int(1 + p % 3))
        return "".join(chars)
    raise UsageError(f"plant_noise: unknown noise kind {kind!r}; choose from {NOISE_KINDS}")


def plant_noise(docs: Iterable[Doc], kinds: Sequence[str] = NOISE_KINDS, rate: float = 0.3,
                seed: int = 0) -> tuple[list[Doc], list[str | None]]:
    """(documents, labels): each document is replaced, with probability `rate`, by a corrupted
    version of itself (kind drawn uniformly from `kinds`; id suffixed `#noise-KIND`, meta
    `noise`), label the kind or None for an untouched document. Deterministic in `seed`."""
    bad = [k for k in kinds if k not in NOISE_KINDS]
    if bad or not kinds:
        raise UsageError(f"plant_noise: kinds {list(kinds)}: choose one or more of {NOISE_KINDS}")
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for doc in docs:
        if rng.random() < rate:
            kind = kinds[int(rng.integers(0, len(kinds)))]
            text = _corrupt(doc["text"], kind, _is_ja(doc), rng)
            out.append({"id": f"{doc['id']}#noise-{kind}", "text": text,
                        "meta": {**doc.get("meta", {}), "noise": kind}})
            labels.append(kind)
        else:
            out.append(doc)
            labels.append(None)
    return out, labels
