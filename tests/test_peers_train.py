"""bench/peers_train.py on a tiny shape: hibari's train step, the plain-JAX Llama step and
transformers' Llama + torch AdamW start from the same weights and see the same batches, so they
compute the same losses (step 0 to fp32 rounding, the next steps to fp32 reassociation). No
timing is asserted (speed lives in BENCHMARKS.md)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers_train import main  # noqa: E402


@pytest.mark.slow  # ~30 s CPU: compiles two JAX steps, loads torch
def test_peers_compute_the_same_losses(tmp_path):
    out = tmp_path / "peers.jsonl"
    rows = main(["--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
                 "--d-ff", "192", "--vocab", "512", "--batch", "2", "--seq", "32",
                 "--rounds", "1", "--steps", "1", "--warmup", "3", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == \
        json.loads(json.dumps(rows))
    by = {r["peer"]: r for r in rows}
    assert set(by) == {"hibari", "hibari (packed)", "jax", "torch"}
    hibari = np.array(by["hibari"]["warmup_losses"])
    assert abs(hibari[0] - np.log(512)) < 0.1  # a fresh model predicts ~uniformly
    for peer in ("jax", "torch"):
        losses = np.array(by[peer]["warmup_losses"])
        assert abs(losses[0] - hibari[0]) < 1e-4, (peer, losses, hibari)
        np.testing.assert_allclose(losses[1:], hibari[1:], atol=1e-3)
    # the updates change the loss, so agreement after them means the same optimizer
    assert abs(hibari[2] - hibari[0]) > 1e-3
    for r in rows:
        assert r["units_per_s"] == r["batch"] * r["seq"] / r["best_s"] > 0
        assert r["median_s"] >= r["best_s"] and len(r["load"]) == 3
