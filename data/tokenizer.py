"""SentencePiece: train from a document stream, load, expand a vocabulary, report coverage.

Ids: pad=0, unk=1, bos=2, eos=3, then the chat-role tokens and "\n" (user-defined symbols, never
split; a line break is its own piece rather than the byte <0x0A>), then the learned pieces. With `byte_fallback` the 256 byte pieces `<0x00>..<0xFF>` encode any
character outside the vocabulary.

Vocabulary expansion (Swallow-style continual pretraining): pieces learned on a new-language
corpus that the base model lacks are appended to its ModelProto, so every old id keeps its meaning.
`ExpandedTokenizer.init_map` gives, for each new id, the base-model ids of the piece's text: the
model's vocabulary-resize helper initialises the new embedding rows from their mean.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from hibari.base.errors import InputNotFound
from hibari.data.sources import Doc

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


def train_tokenizer(docs: Iterable[Doc], model_path: str, vocab_size: int = 8000, model_type: str = "unigram",
                    byte_fallback: bool = True, character_coverage: float = 0.9995,
                    special_tokens: Iterable[str] = CHAT_TOKENS + ("\n",), max_sentence_chars: int = 4192,
                    input_sentence_size: int = 2_000_000, num_threads: int = 2, seed_sentencepiece_size: int = 1_000_000,
                    normalization_rule_name: str = "identity", **extra) -> spm.SentencePieceProcessor:
    """Train in-process from the stream (no temporary text file) and write `model_path`.

    Normalisation is left to `data.clean` (identity rule, whitespace kept), so that
    `decode(encode(text)) == text`: line breaks and indentation survive (as byte pieces when
    `byte_fallback`; SentencePiece's default nmt_nfkc rule would turn them into spaces)."""
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', not {model_type!r}")
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    buf = io.BytesIO()
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


def tokenizer_report(sp: spm.SentencePieceProcessor, texts: Iterable[str]) -> dict:
    """On held-out text: share of CJK character occurrences the vocabulary covers (not byte
    fallback), share of tokens that are byte pieces, characters per token, vocabulary size."""
    vocab_chars = {ch for i in range(sp.get_piece_size())
                   if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))
                   for ch in sp.id_to_piece(i)}
    chars = tokens = byte_tokens = cjk = cjk_covered = unk = 0
    for text in texts:
        ids = sp.encode(text)
        chars += len(text)
        tokens += len(ids)
        byte_tokens += sum(sp.is_byte(i) for i in ids)
        unk += sum(i == sp.unk_id() for i in ids)
        for ch in text:
            if is_cjk(ch):
                cjk += 1
                cjk_covered += ch in vocab_chars
    return {"vocab_size": sp.get_piece_size(), "chars": chars, "tokens": tokens,
            "chars_per_token": round(chars / max(1, tokens), 4),
            "byte_fallback_share": round(byte_tokens / max(1, tokens), 4),
            "unk_share": round(unk / max(1, tokens), 4),
            "cjk_coverage": round(cjk_covered / max(1, cjk), 4)}
