"""Prefix rules: what goes before a context follows the tokenizer, as lm-evaluation-harness does.

The reference for HF tokenizers is transformers itself (`tokenizer.encode(text)` with its
default special tokens, which is what lm-eval's HF backend calls) and lm-eval's
`prefix_token_id` rule for an empty context (BOS id if the tokenizer defines one, else EOS).
"""
import gzip
import itertools
import json

import gguf
import numpy as np
import pytest
from conftest import add_bpe_tokenizer
from tokenizers import Tokenizer, processors

from hibari.data import CORPUS_DIR
from hibari.data.tokenizer import train_tokenizer
from hibari.evaluation.tokenizer import (
    TokenizerError,
    load_gguf_tokenizer,
    load_hf_tokenizer,
    load_tokenizer,
)

SPECIALS = ["<|endoftext|>", "<s>", "</s>"]  # those of the `bpe` fixture (conftest.py)
TEXTS = ["The capital of France is", "Question: where is the cat?\nAnswer:", "日本の首都は"]


def _corpus_lines(n=300, pattern="*.jsonl.gz"):
    lines = []
    for path in sorted(CORPUS_DIR.glob(pattern)):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines += [json.loads(line)["text"][:400] for line in itertools.islice(f, n)]
    return lines


def _save_hf(bpe, path, *, bos, eos, adds_bos):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(bpe.to_str())
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    hf.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.mark.parametrize("kind", ["adds_bos", "bos_not_added", "eos_only"])
def test_hf_tokenizer_prefix_matches_transformers(bpe, tmp_path, kind):
    bos = None if kind == "eos_only" else "<s>"
    eos = "<|endoftext|>" if kind == "eos_only" else "</s>"
    reference = _save_hf(bpe, tmp_path, bos=bos, eos=eos, adds_bos=kind == "adds_bos")
    tok = load_hf_tokenizer(tmp_path)
    assert tok.add_bos == (kind == "adds_bos")
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text), text
        ctx, cont = tok.encode_pair(text, " Paris")
        assert ctx == reference.encode(text) and cont == reference.encode(" Paris",
                                                                          add_special_tokens=False)
    lm_eval_prefix = (reference.bos_token_id if reference.bos_token_id is not None
                      else reference.eos_token_id)
    assert tok.encode("") == [lm_eval_prefix] == [tok.start_id]
    assert tok.encode_pair("", "Paris")[0] == [lm_eval_prefix]
    info = tok.prefix_info()
    assert info["context_prefix"] == (["<s>"] if kind == "adds_bos" else [])
    assert info["empty_context"] == (bos or eos)


def test_prefix_override_and_its_errors(bpe, tmp_path):
    _save_hf(bpe, tmp_path / "no_bos", bos="<s>", eos="</s>", adds_bos=False)
    tok = load_hf_tokenizer(tmp_path / "no_bos")
    plain = tok.encode("The cat")
    tok.set_prefix("bos")
    assert tok.encode("The cat") == [tok.bos_id] + plain and tok.start_id == tok.bos_id
    tok.set_prefix("eos")
    assert tok.encode("The cat") == [tok.eos_id] + plain and tok.start_id == tok.eos_id
    tok.set_prefix("none")
    assert tok.encode("The cat") == plain
    with pytest.raises(TokenizerError, match="prefix='bosx'; choose one of"):
        tok.set_prefix("bosx")
    _save_hf(bpe, tmp_path / "eos_only", bos=None, eos="<|endoftext|>", adds_bos=False)
    eos_only = load_hf_tokenizer(tmp_path / "eos_only")
    with pytest.raises(TokenizerError, match="defines no BOS token; use --prefix auto or none"):
        eos_only.set_prefix("bos")


def _write_gguf(bpe, path, add_bos, model="gpt2"):
    w = gguf.GGUFWriter(str(path), "llama")
    vocab = add_bpe_tokenizer(w, bpe, model=model, add_bos=add_bos)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((len(vocab), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("flag", [True, False, None])
def test_gguf_tokenizer_follows_its_add_bos_flag(bpe, tmp_path, flag):
    path = tmp_path / "m.gguf"
    _write_gguf(bpe, path, flag)
    tok = load_gguf_tokenizer(path)
    bos = bpe.token_to_id("<s>")
    assert tok.bos_id == bos and tok.eos_id == bpe.token_to_id("</s>")
    assert tok.add_bos is bool(flag)  # no key on a BPE vocabulary: llama.cpp adds no BOS
    plain = bpe.encode(TEXTS[0]).ids
    assert tok.encode(TEXTS[0]) == ([bos] if flag else []) + plain
    assert tok.encode("") == [bos]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    texts = _corpus_lines(pattern="en.jsonl.gz")
    train_tokenizer(({"id": str(i), "text": t} for i, t in enumerate(texts)),
                    str(path), vocab_size=600, seed_sentencepiece_size=20000)
    return path


def test_sentencepiece_trained_here_adds_bos(sentencepiece_model):
    import sentencepiece as spm

    tok = load_tokenizer(sentencepiece_model)
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    assert tok.add_bos and tok.bos_id == sp.bos_id()
    for text in TEXTS:  # how hibari packs a document for pretraining: BOS + its pieces
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
    tok.set_prefix("none")
    assert tok.encode(TEXTS[0]) == sp.encode(TEXTS[0]) and tok.encode("") == [sp.bos_id()]
