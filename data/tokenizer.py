"""SentencePiece: train from a document stream, load, expand a vocabulary, report coverage.

Ids: pad=0, unk=1, bos=2, eos=3, then the chat-role tokens and "\n" (user-defined symbols, never
split; a line break is its own piece rather than the byte <0x0A>), then the learned pieces. With `byte_fallback` the 256 byte pieces `<0x00>..<0xFF>` encode any
character outside the vocabulary.

Vocabulary expansion (Swallow-style continual pretraining): pieces learned on a new-language
corpus that the base model lacks are appended to its ModelProto, so every old id keeps its meaning.
`ExpandedTokenizer.init_map` gives, for each new id, the base-model ids of the piece's text: the
model's vocabulary-resize helper initialises the new embedding rows from their mean.

Tokenizer records: a training run writes `tokenizer_record.json` ({"sha256", "path",
"vocab_size"} of the tokenizer its data was encoded with: config.data.tokenizer, or the packed
shards' manifest) into its run directory (`write_tokenizer_record`); `check_tokenizer_record`
refuses a checkpoint used with a tokenizer of another content hash (`tokenizer_sha256`), unless
allowed. Checkpoints without a record (older runs, HF dirs, GGUF files) are not checked.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from hibari.base.errors import InputNotFound, UserError
from hibari.base.files import write_atomic
from hibari.data.sources import Doc

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def _sentences(docs: Iterable[Doc], max_sentence_chars: int) -> Iterator[str]:
    """Lines of the documents, cut to SentencePiece's sentence-length limit."""
    for doc in docs:
        for line in doc["text"].split("\n"):
            line = line.strip()
            while line:
                yield line[:max_sentence_chars]
                line = line[max_sentence_chars:]


def sample_key(doc_id: str) -> int:
    """A document's place in the tokenizer's sample: a 64-bit blake2b hash of its id (not the
    held-out split's crc32, so the two choices are independent)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, person=b"tok-sample").digest(), "big")


def tokenizer_sample(docs: Iterable[Doc], max_docs: int) -> list[Doc]:
    """The `max_docs` documents of smallest (`sample_key`, position), in their input order: a
    bounded sample that does not depend on how the corpus is sharded or split among workers
    (data.beam takes the same one with a distributed top-k); every document when there are fewer."""
    heap: list = []  # (-key, -position, doc): the largest kept (key, position) on top
    for i, doc in enumerate(docs):
        item = (-sample_key(doc["id"]), -i, doc)
        if len(heap) < max_docs:
            heapq.heappush(heap, item)
        elif item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)
    return [doc for _, _, doc in sorted(heap, key=lambda t: -t[1])]


def train_tokenizer(docs: Iterable[Doc], model_path: str, vocab_size: int = 8000, model_type: str = "unigram",
                    byte_fallback: bool = True, character_coverage: float = 0.9995,
                    special_tokens: Iterable[str] = CHAT_TOKENS + ("\n",), max_sentence_chars: int = 4192,
                    input_sentence_size: int = 2_000_000, num_threads: int = 2, seed_sentencepiece_size: int = 1_000_000,
                    normalization_rule_name: str = "identity", seed: int = 0, **extra) -> spm.SentencePieceProcessor:
    """Train in-process from the stream (no temporary text file) and write `model_path`.
    `seed` seeds SentencePiece's sampling of `input_sentence_size` sentences from longer input.

    Normalisation is left to `data.clean` (identity rule, whitespace kept), so that
    `decode(encode(text)) == text`: line breaks and indentation survive (as byte pieces when
    `byte_fallback`; SentencePiece's default nmt_nfkc rule would turn them into spaces)."""
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', not {model_type!r}")
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(docs, max_sentence_chars), model_writer=buf,
        vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
        character_coverage=character_coverage, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=list(special_tokens), max_sentence_length=max_sentence_chars * 4,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True, num_threads=num_threads,
        seed_sentencepiece_size=seed_sentencepiece_size, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name=normalization_rule_name, remove_extra_whitespaces=False,
        train_extremely_large_corpus=False, minloglevel=2, **extra)
    tmp = model_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, model_path)
    return load_tokenizer(model_path)


def load_tokenizer(model_path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(model_path):
        raise InputNotFound(f"no SentencePiece model at {model_path!r}: train one with `hibari data tokenizer train`")
    return spm.SentencePieceProcessor(model_file=model_path)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------------------ records
TOKENIZER_RECORD = "tokenizer_record.json"  # not tokenizer.json: that name is an HF tokenizer
MISMATCH_FLAG = "--allow-tokenizer-mismatch"


class TokenizerMismatch(UserError, ValueError):
    """A checkpoint is used with a tokenizer other than the one it was trained with, or its
    tokenizer record cannot be read."""


def _gguf_tokenizer_sha256(path: Path) -> str:
    """sha256 of a GGUF file's `tokenizer.*` metadata (names and values in file order): the
    tokenizer is embedded, and hashing the whole file would hash the weights too."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    digest = hashlib.sha256()
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            digest.update(json.dumps([name, field.contents()], ensure_ascii=False,
                                     default=str).encode())
    return digest.hexdigest()


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """Content hash of a tokenizer source: a SentencePiece model's file sha256 (as the pack
    manifest's tokenizer.sha256); an HF tokenizer's tokenizer.json bytes (the file, or the one
    in a directory); a *.gguf file's embedded `tokenizer.*` metadata."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise InputNotFound(f"no tokenizer at {str(path)!r} to hash")
    if path.suffix == ".gguf":
        return _gguf_tokenizer_sha256(path)
    return file_sha256(str(path))


def _vocab_size(path: str) -> int | None:
    """Pieces of a SentencePiece model or ids of an HF tokenizer.json (None: neither)."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".json":
        try:
            from tokenizers import Tokenizer
            return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p)).get_vocab_size()
        except Exception:  # noqa: BLE001 - a record without a size is still a record
            return None
    try:
        return load_tokenizer(str(p)).get_piece_size()
    except Exception:  # noqa: BLE001
        return None


def _manifest_tokenizers(paths) -> list[dict]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out = []
    for item in map(str, items):
        manifest = os.path.join(item, "manifest.json") if os.path.isdir(item) else item
        try:
            with open(manifest) as f:
                out.append(json.load(f)["tokenizer"])
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise InputNotFound(f"config.data.path={item!r}: cannot read the tokenizer of "
                                f"{manifest} ({e}); pack the corpus first (`hibari data pack`)"
                                ) from None
    return out


def tokenizer_record(config) -> dict | None:
    """{"sha256", "path", "vocab_size"} of the tokenizer a training config's data is encoded
    with: config.data.tokenizer when set, else the packed manifest(s) at config.data.path;
    None for synthetic data."""
    data = config.data
    field = data.get("tokenizer")
    if field:
        from hibari.base.config_files import resolve_path
        path = resolve_path(field)
        if not os.path.exists(path):
            raise InputNotFound(f"config.data.tokenizer={field!r}: no such tokenizer")
        return {"sha256": tokenizer_sha256(path), "path": os.path.abspath(path),
                "vocab_size": _vocab_size(path)}
    if data.get("kind", "packed") == "synthetic" or not data.get("path"):
        return None
    tokenizers = {t["sha256"]: t for t in _manifest_tokenizers(data.path)}
    if len(tokenizers) != 1:
        raise TokenizerMismatch(f"config.data.path={data.path!r}: the manifests were packed "
                                f"with different tokenizers {sorted(tokenizers)}")
    (sha, tok), = tokenizers.items()
    return {"sha256": sha, "path": tok.get("path"), "vocab_size": tok.get("vocab_size")}


def write_tokenizer_record(config, workdir: str | os.PathLike) -> dict | None:
    """Write `workdir/tokenizer_record.json` (atomically) from `tokenizer_record(config)`;
    nothing for synthetic data. Returns the record. A resumed run whose tokenizer changed is
    warned about (the new record replaces the old)."""
    record = tokenizer_record(config)
    if record is None:
        return None
    workdir = Path(workdir)
    path = workdir / TOKENIZER_RECORD
    old = read_tokenizer_record(path) if path.is_file() else None
    if old is not None and old.get("sha256") != record["sha256"]:
        log.warning("%s: this run was trained with tokenizer %s (sha256 %s) and now goes on "
                    "with %s (sha256 %s)", workdir, old.get("path"), str(old.get("sha256"))[:12],
                    record["path"], record["sha256"][:12])
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return record


def read_tokenizer_record(path: str | os.PathLike) -> dict:
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError("no sha256 field")
    except (OSError, ValueError) as e:
        raise TokenizerMismatch(f"{path}: unreadable tokenizer record ({e}); delete it to use "
                                "the checkpoint unchecked") from None
    return record


def find_recorded_path(value: str | os.PathLike, run_dir: str | os.PathLike) -> Path | None:
    """The existing file or directory a path recorded in `run_dir` (config.json, a tokenizer
    record) names: an absolute path as is; a relative one (older runs recorded paths as given,
    relative to the folder the run was started from) tried relative to the run directory and
    each folder above it, then to the working directory, then as a vendored repository path
    (`align/assets/x`). None when none exists."""
    from hibari.base.config_files import package_file
    path = Path(value).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    run_dir = Path(os.path.normpath(Path(run_dir).absolute()))
    for base in (run_dir, *run_dir.parents):
        if (base / path).exists():
            return base / path
    if path.exists():
        return Path(os.path.normpath(path.absolute()))
    vendored = package_file(path)
    return vendored if vendored is not None and vendored.exists() else None


def recorded_tokenizer(checkpoint_path: str | os.PathLike) -> dict | None:
    """The tokenizer record of a run directory or of one of its `checkpoints/<step>/` dirs
    (the run dir two levels up); None without one (older runs, params exports, HF dirs,
    GGUF files). A relative recorded path that exists is returned absolute
    (`find_recorded_path`)."""
    path = Path(checkpoint_path)
    candidates = [path]
    if path.parent.name == "checkpoints":
        candidates.append(path.parent.parent)
    elif path.name == "checkpoints":
        candidates.append(path.parent)
    for run_dir in candidates:
        if (run_dir / TOKENIZER_RECORD).is_file():
            record = read_tokenizer_record(run_dir / TOKENIZER_RECORD)
            recorded = record.get("path")
            found = find_recorded_path(recorded, run_dir) if isinstance(recorded, str) else None
            if found is not None and not os.path.isabs(recorded):
                record = {**record, "path": str(found)}
            return record
    return None


def check_data_tokenizer(config, checkpoint: str, *, label: str, fix: str,
                         allow: bool = False) -> None:
    """The tokenizer recorded for `checkpoint` (a hibari run) must be the one a training
    config's data use (`tokenizer_record`); nothing to check when either has none (synthetic
    data, GGUF / HF / params exports). A mismatch raises TokenizerMismatch ("`label` was
    trained with ...: `fix`"), or with `allow` logs one warning."""
    ours = tokenizer_record(config)
    theirs = recorded_tokenizer(checkpoint) if not str(checkpoint).endswith(".gguf") else None
    if ours is None or theirs is None or ours["sha256"] == theirs["sha256"]:
        return
    message = (f"{label} was trained with tokenizer {theirs.get('path')} (sha256 "
               f"{theirs['sha256'][:12]}) but this run's data use {ours.get('path')} (sha256 "
               f"{ours['sha256'][:12]})")
    if not allow:
        raise TokenizerMismatch(f"{message}: {fix}")
    log.warning("%s (--allow-tokenizer-mismatch given: going on)", message)


def check_tokenizer_record(checkpoint: str | os.PathLike, tokenizer_path: str | os.PathLike, *,
                           allow: bool = False, checkpoint_label: str | None = None,
                           tokenizer_label: str = "the tokenizer used",
                           fix: str = "pass --tokenizer {path}") -> dict | None:
    """Compare the tokenizer at `tokenizer_path` with the one recorded for `checkpoint`.

    None when there is no record or the content hashes agree. When they differ: raise
    TokenizerMismatch (one line naming both paths and short hashes; `fix` says what to do
    instead, `{path}` standing for the recorded tokenizer's path), or with `allow` log one
    warning and return {"recorded": record, "used": {"path", "sha256"}} for the caller to keep."""
    record = recorded_tokenizer(checkpoint)
    if record is None:
        return None
    used = {"path": os.path.abspath(tokenizer_path), "sha256": tokenizer_sha256(tokenizer_path)}
    if used["sha256"] == record["sha256"]:
        return None
    message = (f"{checkpoint_label or f'checkpoint {checkpoint}'} was trained with tokenizer "
               f"{record.get('path')} (sha256 {record['sha256'][:12]}) but {tokenizer_label} "
               f"is {used['path']} (sha256 {used['sha256'][:12]})")
    if not allow:
        fix = fix.format(path=record.get("path"))
        raise TokenizerMismatch(f"{message}: its ids name other pieces; {fix}, or "
                                f"{MISMATCH_FLAG} to go on anyway")
    log.warning("%s (%s given: going on)", message, MISMATCH_FLAG)
    return {"recorded": record, "used": used}


def load_proto(model_path: str) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


# ------------------------------------------------------------------ expansion
@dataclass
class ExpandedTokenizer:
    model_path: str
    base_vocab_size: int
    vocab_size: int
    new_pieces: list[str]
    init_map: dict[int, list[int]]  # new id -> base ids of the piece's text

    @property
    def new_piece_ids(self) -> list[int]:
        return list(range(self.base_vocab_size, self.vocab_size))

    def save_mapping(self, path: str):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"base_vocab_size": self.base_vocab_size, "vocab_size": self.vocab_size,
                       "new_pieces": self.new_pieces,
                       "init_map": {str(k): v for k, v in self.init_map.items()}}, f, ensure_ascii=False)


def _text_encoder(proto: sp_pb2.ModelProto) -> spm.SentencePieceProcessor:
    """A copy of the model that encodes a piece's text verbatim: no dummy prefix, spaces kept."""
    p = sp_pb2.ModelProto()
    p.CopyFrom(proto)
    p.normalizer_spec.add_dummy_prefix = False
    p.normalizer_spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=p.SerializeToString())


def expand_tokenizer(base_model_path: str, new_docs: Iterable[Doc], out_path: str, new_vocab_size: int = 8000,
                     max_new_pieces: int | None = None, **train_kwargs) -> ExpandedTokenizer:
    """Train a tokenizer of `new_vocab_size` on `new_docs` (same model type as the base), append its
    normal pieces the base lacks (best-scored first, at most `max_new_pieces`), write `out_path`."""
    base = load_proto(base_model_path)
    model_type = {1: "unigram", 2: "bpe"}.get(base.trainer_spec.model_type)
    if model_type is None:
        raise ValueError(f"{base_model_path}: only unigram and BPE models can be expanded")
    new_path = out_path + ".new-language.model"
    train_tokenizer(new_docs, new_path, vocab_size=new_vocab_size, model_type=model_type,
                    byte_fallback=False, special_tokens=(), **train_kwargs)
    learned = load_proto(new_path)
    have = {p.piece for p in base.pieces}
    normal = sp_pb2.ModelProto.SentencePiece.NORMAL
    candidates = sorted((p for p in learned.pieces if p.type == normal and p.piece not in have),
                        key=lambda p: -p.score)[:max_new_pieces]
    encoder = _text_encoder(base)
    lowest = min((p.score for p in base.pieces if p.type == normal), default=0.0)
    init_map: dict[int, list[int]] = {}
    for i, piece in enumerate(candidates):
        new = base.pieces.add()
        new.piece, new.type = piece.piece, normal
        # unigram: the new model's log-probability; BPE: scores order merges, so new merges go last
        new.score = piece.score if model_type == "unigram" else lowest - 1 - i
        init_map[len(base.pieces) - 1] = encoder.encode(piece.piece.replace("\u2581", " "))
    base.trainer_spec.vocab_size = len(base.pieces)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(base.SerializeToString())
    os.replace(tmp, out_path)
    old_size = len(base.pieces) - len(candidates)
    return ExpandedTokenizer(out_path, old_size, len(base.pieces), [p.piece for p in candidates], init_map)


# ------------------------------------------------------------------ report
def is_cjk(ch: str) -> bool:
    o = ord(ch)
    return 0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF


def vocab_characters(sp: spm.SentencePieceProcessor) -> set[str]:
    """Characters of the vocabulary's text pieces (not byte, control or unknown pieces)."""
    return {ch for i in range(sp.get_piece_size())
            if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)) for ch in sp.id_to_piece(i)}


REPORT_COUNTS = ("chars", "tokens", "byte_tokens", "unk", "cjk", "cjk_covered")


def report_counts(sp: spm.SentencePieceProcessor, vocab_chars: set[str], text: str) -> tuple[int, ...]:
    """One text's `REPORT_COUNTS`; `tokenizer_report` sums them (so can a distributed run)."""
    ids = sp.encode(text)
    cjk = [ch for ch in text if is_cjk(ch)]
    return (len(text), len(ids), sum(sp.is_byte(i) for i in ids), sum(i == sp.unk_id() for i in ids),
            len(cjk), sum(ch in vocab_chars for ch in cjk))


def report_from_counts(sp: spm.SentencePieceProcessor, counts) -> dict:
    chars, tokens, byte_tokens, unk, cjk, cjk_covered = counts
    return {"vocab_size": sp.get_piece_size(), "chars": chars, "tokens": tokens,
            "chars_per_token": round(chars / max(1, tokens), 4),
            "byte_fallback_share": round(byte_tokens / max(1, tokens), 4),
            "unk_share": round(unk / max(1, tokens), 4),
            "cjk_coverage": round(cjk_covered / max(1, cjk), 4)}


def tokenizer_report(sp: spm.SentencePieceProcessor, texts: Iterable[str]) -> dict:
    """On held-out text: share of CJK character occurrences the vocabulary covers (not byte
    fallback), share of tokens that are byte pieces, characters per token, vocabulary size."""
    vocab_chars = vocab_characters(sp)
    totals = [0] * len(REPORT_COUNTS)
    for text in texts:
        totals = [a + b for a, b in zip(totals, report_counts(sp, vocab_chars, text))]
    return report_from_counts(sp, totals)
