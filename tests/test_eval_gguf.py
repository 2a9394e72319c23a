"""Opt-in: the harness on the real SmolLM2-135M-Instruct (HIBARI_GGUF=path/to/file.gguf)."""
import os
import time

import pytest

from hibari.evaluation.lm import load_lm
from hibari.evaluation.runner import evaluate_task
from hibari.evaluation.tasks import load_task

GGUF = os.environ.get("HIBARI_GGUF")
pytestmark = [pytest.mark.gguf,
              pytest.mark.skipif(not GGUF, reason="set HIBARI_GGUF to the SmolLM2 GGUF file")]


@pytest.fixture(scope="module")
def lm():
    return load_lm(GGUF, batch_size=8, max_len=1024)


def test_prefix_follows_the_file_no_bos(lm):
    """SmolLM2's GGUF says tokenizer.ggml.add_bos_token = false: contexts get no prefix."""
    assert not lm.tokenizer.add_bos and lm.tokenizer.context_prefix() == []
    assert lm.tokenizer.encode("Hi") == lm.tokenizer.encode("Hi", bos=False)


def test_greedy_capital_of_france(lm):
    out = lm.generate(["The capital of France is"], max_new_tokens=4)[0]
    assert out.startswith(" Paris"), out


def test_multiple_choice_beats_chance_on_vendored_sample(lm):
    t0 = time.perf_counter()
    result = evaluate_task(lm, load_task("commonsense_qa_sample"), limit=50)
    print("commonsense_qa_sample", result["metrics"], f"{time.perf_counter() - t0:.1f}s")
    assert result["metrics"]["acc"] > 0.3  # chance is 0.2 with five choices
