"""bench/peers_eval.py on a tiny random Llama: hibari and transformers compute the same scores
and the same greedy tokens from the same weights (no timing assertions: speed is in
BENCHMARKS.md)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import peers_eval  # noqa: E402


@pytest.mark.slow  # ~100 s on the shared 2-core machine (compiles of every shape)
def test_harness_rows_agree_on_scores_and_greedy_tokens(tmp_path):
    out = tmp_path / "rows.jsonl"
    rows = peers_eval.main(["--requests", "12", "--context", "8,40", "--batch-size", "4",
                            "--gen-batches", "1,4", "--prompt-len", "10", "--new-tokens", "12",
                            "--rounds", "1", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    by = {(r["work"], r["system"]): r for r in rows}
    assert set(by) == {(w, s) for w in ("score_b4", "gen_b1", "gen_b4")
                       for s in ("hibari", "transformers")}
    score = by["score_b4", "hibari"]
    assert score["max_abs_diff"] < 1e-4
    for work in ("gen_b1", "gen_b4"):
        assert by[work, "hibari"]["identical_share"] == 1.0
        assert by[work, "hibari"]["rows_identical"] == 1.0
    for r in rows:
        assert r["units_per_s"] > 0 and len(r["load"]) == 3 and r["best_s"] <= r["median_s"]


def test_scores_and_tokens_equal_an_independent_transformers_computation(tmp_path):
    """The harness' hibari side against transformers computed here without its helpers: one
    request at a time, unpadded; generation as a plain argmax loop over full forwards."""
    from hibari.model.hf import import_hf

    hf_dir = peers_eval.tiny_llama_dir(tmp_path / "tiny")
    cfg, params = import_hf(hf_dir)
    model = peers_eval.load_peer(hf_dir)
    ids = peers_eval.corpus_ids(None, cfg.vocab_size, 400)
    requests = peers_eval.scoring_requests(ids, 6, (5, 30), seed=1)
    got = peers_eval.hibari_score(cfg, params, requests, 4, 0)
    want = []
    with torch.inference_mode():
        for context, continuation in requests:
            seq = torch.tensor([context + continuation])
            log_p = torch.log_softmax(model(seq).logits[0].double(), -1)
            n = len(context)
            want.append(sum(float(log_p[n - 1 + j, t]) for j, t in enumerate(continuation)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the peer's batched, padded scoring gives the same numbers
    np.testing.assert_allclose(peers_eval.peer_score(model, requests, 4, 0), want, atol=1e-4)

    prompts = peers_eval.prompts_from(ids, 3, 9)
    new = peers_eval.hibari_generate(cfg, params, prompts, 8, 0)
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, new):
            seq = list(prompt)
            for _ in range(8):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            assert tokens == seq[len(prompt):]
