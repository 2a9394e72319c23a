"""Test setup: 8 simulated CPU devices so sharding is exercised everywhere.

The XLA flag must be set before JAX is imported anywhere in the process.
"""
import gc
import os
import shutil

# Tiny test models are dominated by XLA:CPU compile time; LLVM optimisation level 0 compiles
# ~4x faster (subprocesses started by tests inherit it).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test file. Every live XLA:CPU executable holds
    a few memory mappings (~6 for a small function, more for a train step): one pytest process
    keeping the whole suite's programs heads past the kernel's 65,530 per process
    (vm.max_map_count), and CI segfaulted in an XLA compile 93% in (tests/test_train.py) until
    the caches were cleared here. Tests share no compiled program across files."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(params export dir, its ModelConfig): a randomly initialised 2-layer model with the
    vendored SentencePiece model (align/assets/seed_sp.model) beside it, for commands that
    only need a checkpoint every hibari command loads."""
    from hibari.base.resources import resource_path
    from hibari.model import ModelConfig, init
    from hibari.model.params_io import save_params
    root = tmp_path_factory.mktemp("tiny_export")
    cfg = ModelConfig(vocab_size=1000, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                      max_seq_len=512)
    save_params(root / "export", cfg, init(cfg, jax.random.key(0)))
    shutil.copy(resource_path("hibari.align", "assets", "seed_sp.model"),
                root / "export" / "tokenizer.model")
    return root / "export", cfg


BPE_SPECIALS = ("<|endoftext|>", "<s>", "</s>")


@pytest.fixture(scope="session")
def bpe():
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2 / Llama-3 / SmolLM2 family, 400 ids, the
    special tokens <|endoftext|> <s> </s> first) trained on the first 300 records (400
    characters each) of each bundled corpus file (English and Japanese)."""
    import gzip
    import itertools
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hibari.data import CORPUS_DIR
    lines = []
    for path in sorted(CORPUS_DIR.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines += [json.loads(line)["text"][:400] for line in itertools.islice(f, 300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def add_bpe_tokenizer(writer, bpe, *, model: str = "gpt2", add_bos: bool | None = None) -> dict:
    """Write the byte-level BPE tokenizer's GGUF metadata (token list, types, merges, BOS <s>,
    EOS </s>, add_bos when given) into a gguf.GGUFWriter; returns the vocabulary."""
    import json
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in BPE_SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    return vocab
