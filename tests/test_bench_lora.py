"""bench/lora.py end to end on the tiny shape: the structural facts it reports (trainable
parameters against r * (fan_in + fan_out) per adapted projection, AdamW's 8 bytes of moments per
trainable parameter, the frozen base as big as the full model) and its JSONL line. No timing
is asserted."""
import argparse
import json
import sys
from pathlib import Path

from hibari.configs.pretrain.llama import SIZES
from hibari.model import count_params
from hibari.train.loop import model_config

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench.lora import main  # noqa: E402
from bench.train_step import make_config  # noqa: E402


def _adapter_params(rank, modules, d, heads, kv, head_dim, ff, layers):
    """r * (fan_in + fan_out) of each adapted projection, summed over layers."""
    shapes = {"q": (d, heads * head_dim), "k": (d, kv * head_dim), "v": (d, kv * head_dim),
              "o": (heads * head_dim, d), "gate": (d, ff), "up": (d, ff), "down": (ff, d)}
    return layers * sum(rank * sum(shapes[m]) for m in modules)


def test_bench_lora_tiny(tmp_path):
    out = tmp_path / "lora.jsonl"
    result = main(["--size", "tiny", "--batch", "2", "--seq", "32", "--rounds", "1",
                   "--steps", "1", "--variants", "full", "all r16", "--out", str(out)])
    assert json.loads(out.read_text().splitlines()[-1]) == json.loads(json.dumps(result))
    d, layers, heads, kv, ff, *_ = SIZES["tiny"]
    cfg = model_config(make_config(argparse.Namespace(size="tiny", batch=2, seq=32, set=[])))
    total = count_params(cfg).total
    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == {"full", "all r16"}  # q,v r8: the same code path, one compile less
    assert result["params"] == total
    shape = dict(d=d, heads=heads, kv=kv, head_dim=d // heads, ff=ff, layers=layers)
    expected = {"full": total,
                "q,v r8": _adapter_params(8, ["q", "v"], **shape),
                "all r16": _adapter_params(16, ["q", "k", "v", "o", "gate", "up", "down"],
                                           **shape)}
    for name, row in rows.items():
        n = row["trainable_params"]
        assert n == expected[name], name
        assert row["params_bytes"] == 4 * n  # fp32
        assert row["opt_moment_bytes"] == 8 * n  # AdamW: mu and nu, fp32
        assert 0 <= row["opt_state_bytes"] - row["opt_moment_bytes"] <= 16  # step counts
        assert row["tokens_per_s_best"] > 0 and len(row["tokens_per_s_rounds"]) == 1
        assert row["xla_memory_bytes"]["argument"] >= row["params_plus_opt_bytes"] \
            + row["frozen_bytes"]
    assert rows["full"]["frozen_bytes"] == 0
    assert rows["all r16"]["frozen_bytes"] == rows["full"]["params_bytes"] == 4 * total
    assert result["table"].count("\n") == 1 + len(rows)
