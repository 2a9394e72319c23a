"""Log-likelihood requests equal direct computations from `apply`; batching never matters."""
import gzip
import itertools
import json

import jax
import numpy as np
import pytest

from hibari.data import CORPUS_DIR
from hibari.data.tokenizer import train_tokenizer
from hibari.evaluation import loglikelihood_tokens, rolling_windows
from hibari.evaluation.lm import LanguageModel
from hibari.evaluation.loglikelihood import rolling_loglikelihood
from hibari.evaluation.runner import evaluate_task
from hibari.evaluation.tasks import load_task
from hibari.evaluation.tokenizer import SentencePieceTokenizer
from hibari.model import ModelConfig, apply, init


def _corpus():
    for name in ("en", "ja"):
        with gzip.open(CORPUS_DIR / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in itertools.islice(f, 40):
                doc = json.loads(line)
                yield {"id": doc["id"], "text": doc["text"][:1500]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A tiny byte-fallback SentencePiece model: rare kanji become <0x..> byte pieces."""
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    train_tokenizer(_corpus(), path, vocab_size=700, character_coverage=0.98,
                    seed_sentencepiece_size=20000)
    return SentencePieceTokenizer(path)


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                      max_seq_len=64)
    return cfg, init(cfg, jax.random.key(0))


def _direct(cfg, params, context, continuation):
    """sum log softmax(apply(context + continuation)) at the continuation tokens, numpy."""
    seq = np.asarray([list(context) + list(continuation)], np.int32)
    logits = np.asarray(apply(cfg, params, seq), np.float64)[0]
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True)) \
        - logits.max(-1, keepdims=True)
    start = len(context) - 1
    rows = np.arange(start, start + len(continuation))
    greedy = bool(np.all(np.argmax(logits[rows], -1) == np.asarray(continuation)))
    return float(log_p[rows, continuation].sum()), greedy


PAIRS = [
    ("The cat", "s sat on the mat."),           # continuation starts without a space
    ("Question: where?\nAnswer: ", "Paris"),     # trailing space moves to the continuation
    ("日本の首都は", "東京です。"),                  # kanji outside the vocabulary: byte pieces
    ("鬱", "蒼とした森"),                           # multi-byte characters on both sides
]


def test_encode_pair_splits_text_exactly_at_the_boundary(tok):
    for context, continuation in PAIRS:
        ctx, cont = tok.encode_pair(context, continuation)
        assert ctx[0] == tok.bos_id
        assert tok.decode(ctx[1:] + cont) == context + continuation
        pieces = "".join(tok.sp.id_to_piece(i) for i in cont if not tok.sp.is_byte(i))
        assert pieces.replace("\u2581", " ").startswith(
            (context[len(context.rstrip(" ")):] + continuation)[:1]) or tok.sp.is_byte(cont[0])
    _, cont = tok.encode_pair("日本の首都は", "東京です。")
    assert sum(tok.sp.is_byte(i) for i in cont) >= 3, "expected byte-fallback pieces"
    _, cont = tok.encode_pair("The cat", "s sat")
    assert not tok.sp.id_to_piece(cont[0]).startswith("\u2581"), "no dummy-prefix space"


def test_continuation_loglikelihood_equals_direct_computation(tok, model):
    cfg, params = model
    requests = [tok.encode_pair(c, x) for c, x in PAIRS]
    got = loglikelihood_tokens(cfg, params, requests, batch_size=3)
    for (ctx, cont), (lp, greedy) in zip(requests, got):
        want_lp, want_greedy = _direct(cfg, params, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert greedy == want_greedy
    # a greedy continuation is recognised as greedy
    ctx = requests[0][0]
    logits = np.asarray(apply(cfg, params, np.asarray([ctx], np.int32)))[0]
    (_, greedy), = loglikelihood_tokens(cfg, params, [(ctx, [int(logits[-1].argmax())])])
    assert greedy


def test_long_context_is_truncated_from_the_left(model):
    cfg, params = model
    rng = np.random.default_rng(1)
    context = rng.integers(4, cfg.vocab_size, 100).tolist()
    continuation = rng.integers(4, cfg.vocab_size, 5).tolist()
    (lp, _), = loglikelihood_tokens(cfg, params, [(context, continuation)])
    keep = (context + continuation)[-(cfg.max_seq_len + 1):]
    want, _ = _direct(cfg, params, keep[:-5], keep[-5:])
    assert lp == pytest.approx(want, abs=1e-4)


def test_rolling_windows_predict_every_token_once_and_equal_direct_product(model):
    cfg, params = model
    ids = np.random.default_rng(2).integers(4, cfg.vocab_size, 45).tolist()
    windows = rolling_windows(ids, prefix_id=2, max_len=16, stride=6)
    assert [t for _, cont in windows for t in cont] == ids
    assert all(len(c) + len(x) - 1 <= 16 for c, x in windows)
    assert all(len(c) >= 16 - 6 + 1 for c, _ in windows[1:]), "overlap of max_len - stride"
    total = rolling_loglikelihood(cfg, params, ids, prefix_id=2, max_len=16, stride=6)
    direct = sum(_direct(cfg, params, c, x)[0] for c, x in windows)
    assert total == pytest.approx(direct, abs=1e-4)
    # one window holding the whole text: the product of next-token probabilities
    whole = rolling_loglikelihood(cfg, params, ids, prefix_id=2, max_len=64)
    assert whole == pytest.approx(_direct(cfg, params, [2], ids)[0], abs=1e-4)


def test_batch_size_never_changes_scores(model):
    cfg, params = model
    rng = np.random.default_rng(3)
    requests = [(rng.integers(4, cfg.vocab_size, rng.integers(1, 40)).tolist(),
                 rng.integers(4, cfg.vocab_size, rng.integers(1, 6)).tolist())
                for _ in range(11)]
    results = {bs: loglikelihood_tokens(cfg, params, requests, batch_size=bs) for bs in (1, 3, 8)}
    for bs in (3, 8):
        np.testing.assert_allclose([lp for lp, _ in results[bs]], [lp for lp, _ in results[1]],
                                   rtol=1e-6, atol=1e-5)
        assert [g for _, g in results[bs]] == [g for _, g in results[1]]


def test_task_predictions_identical_for_batch_sizes_1_3_8(tok, model):
    cfg, params = model
    task = load_task("jcommonsenseqa_fixture")
    runs = {bs: evaluate_task(LanguageModel(cfg, params, tok, batch_size=bs), task, fewshot=1)
            for bs in (1, 3, 8)}
    for bs in (3, 8):
        assert runs[bs]["metrics"] == runs[1]["metrics"]
        assert [r["pred"] for r in runs[bs]["records"]] == [r["pred"] for r in runs[1]["records"]]
        np.testing.assert_allclose([r["loglikelihoods"] for r in runs[bs]["records"]],
                                   [r["loglikelihoods"] for r in runs[1]["records"]], atol=1e-5)


def test_batch_plan_sorts_by_length_and_pads_little():
    from hibari.evaluation.loglikelihood import batch_plan
    lengths = [3, 40, 17, 17, 5, 33, 1]
    plan = batch_plan(lengths, 4)
    # longest first, ties in input order; every row once
    assert [chunk for chunk, _, _ in plan] == [[1, 5, 2, 3], [4, 0, 6]]
    # width: the longest row to a multiple of 16; rows: a power of two, at most batch_size
    assert [(rows, width) for _, rows, width in plan] == [(4, 48), (4, 16)]
    assert [(rows, width) for _, rows, width in batch_plan([9, 9, 9, 9, 9], 8)] == [(8, 16)]
    assert [(rows, width) for _, rows, width in batch_plan([9], 8)] == [(1, 16)]
