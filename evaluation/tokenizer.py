"""Tokenizers for evaluation: SentencePiece models, HF `tokenizer.json`, GGUF-embedded BPE.

    tok = load_tokenizer("runs/x/tok.model")          # or ".../tokenizer.json", "model.gguf"
    ctx, cont = tok.encode_pair("Question: ...\nAnswer:", " Paris")

Every tokenizer offers `encode(text, bos=True)` (a whole prompt: its prefix + text,
SentencePiece's dummy-prefix space as the model was trained), `encode_fragment(text)` (a piece of
text that continues a prompt: no prefix, no dummy prefix, so
`decode(encode(a) + encode_fragment(b)) == a + b`) and `decode(ids)`. Bits per byte count UTF-8
bytes of the text, never tokens, so they compare across tokenizers.

Prefix rules (`prefix`, default "auto"; lm-evaluation-harness's convention):
  auto   BOS before a non-empty context only if the tokenizer adds BOS itself (HF
         `add_bos_token` or its post-processor, GGUF `tokenizer.ggml.add_bos_token`,
         SentencePiece models with a BOS id, as hibari trains them); otherwise nothing.
  bos    BOS before every context (the tokenizer must define one).
  eos    EOS before every context (the old GPT-2 style).
  none   nothing before a non-empty context.
An empty context (a continuation scored from nothing, the first window of a rolling
log-likelihood) is conditioned on `start_id`: the forced token in bos/eos mode, else the BOS id
if the tokenizer defines one, else EOS (lm-eval's `prefix_token_id`).
"""
from __future__ import annotations

import abc
import json
import shutil
from pathlib import Path
from typing import Sequence

from hibari.base.errors import UsageError, UserError

PREFIX_MODES = ("auto", "bos", "eos", "none")


class TokenizerError(UserError, ValueError):
    """No tokenizer could be found or loaded; the message says where it looked."""


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


class EvalTokenizer(abc.ABC):
    """The interface the harness needs (subclasses fill in the four primitives)."""

    name: str = "tokenizer"
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int = 0
    add_bos: bool = False  # the tokenizer's own rule: BOS before every text it encodes
    prefix: str = "auto"  # one of PREFIX_MODES

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """A prompt's ids, without BOS."""

    @abc.abstractmethod
    def encode_fragment(self, text: str) -> list[int]:
        """Ids of text that continues a prompt: no BOS, no dummy-prefix space."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids."""

    @abc.abstractmethod
    def piece(self, i: int) -> str:
        """The vocabulary entry of one id ("<s>", "▁the", ...)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids."""

    def set_prefix(self, mode: str) -> None:
        if mode not in PREFIX_MODES:
            raise TokenizerError(f"prefix={mode!r}; choose one of {PREFIX_MODES}")
        needed = {"bos": self.bos_id, "eos": self.eos_id}.get(mode, 0)
        if needed is None:
            raise TokenizerError(f"prefix={mode!r} but tokenizer {self.name} defines no "
                                 f"{mode.upper()} token; use --prefix auto or none")
        self.prefix = mode

    def context_prefix(self) -> list[int]:
        """The ids put before every non-empty context (see the prefix rules above)."""
        if self.prefix == "bos" or (self.prefix == "auto" and self.add_bos
                                    and self.bos_id is not None):
            return [self.bos_id]
        if self.prefix == "eos":
            return [self.eos_id]
        return []

    @property
    def start_id(self) -> int:
        """The token that conditions the first token of a text with an empty context."""
        forced = {"bos": self.bos_id, "eos": self.eos_id}.get(self.prefix)
        for candidate in (forced, self.bos_id, self.eos_id):
            if candidate is not None:
                return candidate
        raise TokenizerError(f"{self.name}: has neither BOS nor EOS; cannot start a sequence")

    def prefix_info(self) -> dict:
        """What results.json records about the prefix."""
        try:
            empty = self.piece(self.start_id)
        except TokenizerError:  # neither BOS nor EOS: only an empty context is impossible
            empty = None
        return {"mode": self.prefix, "tokenizer_adds_bos": self.add_bos,
                "context_prefix": [self.piece(i) for i in self.context_prefix()],
                "empty_context": empty}

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """`bos=True`: a whole context, with its prefix (an empty one gives [start_id])."""
        ids = self._encode(text) if text else []
        if not bos:
            return ids
        return (self.context_prefix() + ids) if ids else [self.start_id]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with their prefix, continuation ids). Trailing whitespace of the context
        moves to the continuation (as lm-eval does), so " Paris" is scored the same whether the
        template ends in a space. With an empty context: ([start_id], the continuation encoded
        as a whole text, with its dummy-prefix space where the tokenizer has one)."""
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        if not stripped:  # a text scored on its own: tokenized as a whole text (lm-eval too)
            return [self.start_id], self.encode(continuation, bos=False)
        return self.encode(stripped), self.encode_fragment(continuation)


class SentencePieceTokenizer(EvalTokenizer):
    """A SentencePiece model (hibari's `data/tokenizer.py` ids: pad/unk/bos/eos = 0/1/2/3)."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        self.name = str(model_path)
        proto = sp_pb2.ModelProto()
        try:
            proto.ParseFromString(Path(model_path).read_bytes())
        except (OSError, Exception) as e:  # protobuf raises DecodeError
            raise TokenizerError(f"{model_path}: not a SentencePiece model ({e})") from e
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        fragment = sp_pb2.ModelProto()
        fragment.CopyFrom(proto)
        fragment.normalizer_spec.add_dummy_prefix = False
        fragment.normalizer_spec.remove_extra_whitespaces = False
        self.fragment_sp = spm.SentencePieceProcessor(model_proto=fragment.SerializeToString())
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = max(self.sp.pad_id(), 0)
        self.add_bos = self.bos_id is not None  # documents are packed BOS + text (data/pack)

    def _encode(self, text):
        return list(self.sp.encode(text))

    def encode_fragment(self, text):
        return list(self.fragment_sp.encode(text)) if text else []

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def piece(self, i):
        return self.sp.id_to_piece(int(i))

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()


class HFTokenizer(EvalTokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json, or converted from a GGUF file)."""

    def __init__(self, tokenizer, name: str, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None, add_bos: bool = True):
        self.tok = tokenizer
        self.name = name
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos and bos_id is not None
        self.pad_id = pad_id if pad_id is not None else (eos_id or 0)

    def _encode(self, text):
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_fragment(self, text):
        return list(self.tok.encode(text, add_special_tokens=False).ids) if text else []

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, i):
        return self.tok.id_to_token(int(i))

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()


def _special_id(tok, config: dict, key: str) -> int | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def load_hf_tokenizer(path: str | Path) -> HFTokenizer:
    """tokenizer.json (+ tokenizer_config.json beside it for bos/eos/add_bos_token)."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception
        raise TokenizerError(f"{file}: cannot load as a Hugging Face tokenizer.json ({e})") from e
    config_file = file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    bos, eos = _special_id(tok, config, "bos_token"), _special_id(tok, config, "eos_token")
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:  # what transformers does by default: the tokenizer.json post-processor's rule
        add_bos = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
    return HFTokenizer(tok, str(file), bos, eos, _special_id(tok, config, "pad_token"),
                       add_bos=add_bos)


def load_gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """The byte-level BPE tokenizer inside a GGUF file (converted by transformers' GGUF
    support; needs `gguf` and `transformers`). BOS follows tokenizer.ggml.add_bos_token; without
    that key, llama.cpp's default: yes for SentencePiece vocabularies ("llama"), no for BPE."""
    from transformers import AutoTokenizer

    path = Path(path)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    import gguf
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    kind = reader.fields.get("tokenizer.ggml.model")
    add_bos = (bool(field.contents()) if field is not None
               else kind is not None and kind.contents() == "llama")
    return HFTokenizer(hf.backend_tokenizer, str(path), hf.bos_token_id, hf.eos_token_id,
                       hf.pad_token_id, add_bos=add_bos)


def load_tokenizer(path: str | Path) -> EvalTokenizer:
    """By file kind: *.model (SentencePiece), tokenizer.json or an HF dir, *.gguf."""
    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return load_hf_tokenizer(path)
    if path.suffix == ".json" and path.is_file():
        return load_hf_tokenizer(path)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf_tokenizer(path)
    if path.is_file():
        return SentencePieceTokenizer(path)
    raise TokenizerError(f"{path}: no tokenizer there; pass --tokenizer with a SentencePiece "
                         "*.model, a tokenizer.json, an HF directory or a *.gguf file")


def tokenizer_for_checkpoint(checkpoint: str | Path) -> EvalTokenizer:
    """Find a checkpoint's tokenizer: an HF dir's tokenizer.json, a GGUF file's own, a run
    dir's config.json `data.tokenizer`, the path in its tokenizer_record.json (pretraining on
    packed shards), or a tokenizer.model / *.model file beside it. Searched in the checkpoint
    and the three folders above it (a step dir's run dir). A relative recorded path (older
    runs) is tried relative to the run directory and the folders above it, then the working
    directory (`hibari.data.tokenizer.find_recorded_path`); one that exists nowhere is named
    in the error."""
    from hibari.data.tokenizer import TOKENIZER_RECORD, find_recorded_path, read_tokenizer_record
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".gguf":
        return load_gguf_tokenizer(checkpoint)
    looked, missing = [], []
    for d in (checkpoint, *list(checkpoint.parents)[:3]):
        if (d / "tokenizer.json").is_file():
            return load_hf_tokenizer(d)
        config = d / "config.json"
        if config.is_file():
            try:
                field = (json.loads(config.read_text()).get("data") or {}).get("tokenizer")
            except (json.JSONDecodeError, AttributeError):
                field = None
            if isinstance(field, str) and field:
                found = find_recorded_path(field, d)
                if found is not None:
                    return load_tokenizer(found)
                missing.append(f"{config} records data.tokenizer={field!r}")
        if (d / TOKENIZER_RECORD).is_file():
            recorded = read_tokenizer_record(d / TOKENIZER_RECORD).get("path")
            found = find_recorded_path(recorded, d) if isinstance(recorded, str) else None
            if found is not None:
                return load_tokenizer(found)
            if recorded:
                missing.append(f"{d / TOKENIZER_RECORD} records {recorded!r}")
        models = sorted(d.glob("*.model"))
        if models:
            return SentencePieceTokenizer(models[0])
        looked.append(str(d))
    if missing:
        raise TokenizerError(
            f"no tokenizer found for checkpoint {checkpoint}: {'; '.join(missing)}, which does "
            "not exist (looked relative to the run directory, the folders above it and the "
            f"working directory {Path.cwd()}); pass --tokenizer PATH/TO/tokenizer.model")
    raise TokenizerError(f"no tokenizer found for checkpoint {checkpoint} (looked in {looked} for "
                         f"tokenizer.json, config.json data.tokenizer, {TOKENIZER_RECORD}, "
                         "*.model); pass --tokenizer")


def save_tokenizer(tok: EvalTokenizer, checkpoint: str | Path, out: Path,
                   probe: Sequence[str]) -> dict:
    """Place `tok` (the tokenizer of `checkpoint`) in `out` so that tokenizer_for_checkpoint(out)
    finds it: a derived checkpoint (pruned, ablated) then loads like its source. A SentencePiece
    model is copied as tokenizer.model, with the source run's tokenizer_record.json when the hash
    matches; an HF or GGUF tokenizer is saved as tokenizer.json + tokenizer_config.json and
    checked to give the same ids on the `probe` texts. Returns what was written."""
    from hibari.data.tokenizer import (
        TOKENIZER_RECORD,
        recorded_tokenizer,
        tokenizer_sha256,
    )
    if isinstance(tok, SentencePieceTokenizer):
        shutil.copyfile(tok.name, out / "tokenizer.model")
        written = {"kind": "sentencepiece", "from": str(Path(tok.name).absolute()),
                   "file": "tokenizer.model"}
        record = (recorded_tokenizer(checkpoint)
                  if not str(checkpoint).endswith(".gguf") else None)
        if record is not None and record.get("sha256") == tokenizer_sha256(out / "tokenizer.model"):
            (out / TOKENIZER_RECORD).write_text(json.dumps(
                {**record, "path": "tokenizer.model"}, indent=1) + "\n")
            written["record"] = TOKENIZER_RECORD
        return written
    if not isinstance(tok, HFTokenizer):
        raise UsageError(f"cannot save tokenizer {tok.name} ({type(tok).__name__}) beside the "
                         "pruned checkpoint")
    tok.tok.save(str(out / "tokenizer.json"))
    config = {"add_bos_token": bool(tok.add_bos)}
    for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id),
                   ("pad_token", tok.pad_id)):
        if i is not None:
            config[key] = tok.piece(i)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    again = load_hf_tokenizer(out)
    same = ((again.bos_id, again.eos_id, again.add_bos, again.pad_id)
            == (tok.bos_id, tok.eos_id, tok.add_bos, tok.pad_id))
    if same:  # the prefix (--prefix) is a choice of the run, not saved: compare under tok's
        again.set_prefix(tok.prefix)
        same = all(again.encode(t) == tok.encode(t)
                   and again.encode_fragment(t) == tok.encode_fragment(t) for t in probe)
    if not same:
        raise UserError(f"the tokenizer of {checkpoint} does not round-trip through "
                        "tokenizer.json; pass --tokenizer with an HF tokenizer directory")
    return {"kind": "tokenizer.json", "from": tok.name, "file": "tokenizer.json"}
