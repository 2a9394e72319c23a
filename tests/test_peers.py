"""bench/peers.py: the front door's ratio table from the parts' rows."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import main, ratios  # noqa: E402


def row(part, work, system, ups):
    return {"part": part, "work": work, "system": system, "units_per_s": ups, "unit": "u/s"}


def test_ratios_pair_each_hibari_row_with_each_peer_of_the_same_work():
    rows = [row("train", "w", "hibari", 300.0), row("train", "w", "hibari (packed)", 240.0),
            row("train", "w", "jax", 200.0), row("train", "w", "torch", 400.0),
            row("data", "q", "datatrove", 2.0), row("data", "q", "hibari", 9.0),
            row("data", "agreement", "hibari", None)]
    got = {(e["work"], e["hibari"], e["peer"]): e["ratio"] for e in ratios(rows)}
    assert got.keys() == {("w", "hibari", "jax"), ("w", "hibari", "torch"),
                          ("w", "hibari (packed)", "jax"), ("w", "hibari (packed)", "torch"),
                          ("q", "hibari", "datatrove")}
    assert math.isclose(got["w", "hibari", "jax"], 1.5)
    assert math.isclose(got["w", "hibari", "torch"], 0.75)
    assert math.isclose(got["w", "hibari (packed)", "jax"], 1.2)
    assert math.isclose(got["q", "hibari", "datatrove"], 4.5)


def test_unknown_part_is_refused(capsys):
    import pytest
    with pytest.raises(SystemExit):
        main(["--parts", "train,speed"])
    assert "--parts 'train,speed': choose from" in capsys.readouterr().err
